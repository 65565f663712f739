"""The real checkpoint's files: Salesforce/blip-image-captioning-base's config, tokenizer and image processor.

assets/blip-image-captioning-base holds every small file of the Hub repo (SOURCES.md says where
each comes from). Its tokenizer has no bos token and no [DEC] (30,522 entries), while the model's text
vocabulary is 30,524 and generation starts from id 30522: the demo's made-up tokenizer once hid that.
The model here is built from the real config.json with the real vocabulary and special ids, only
narrower and shallower, and saved as the Hub's main branch ships it: pytorch_model.bin in the
transformers 4.26 key layout (with the text embeddings' position_ids buffer), no safetensors.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

import evaluate
import explainability
import train
from attention import subject_span, word_spans
from config import PetConfig
from data import CaptionCollator, load_image, load_splits
from demo import REAL_PROCESSOR_DIR, write_synthetic_pets
from helpers import caption_images
from inference import image_embeddings, label_candidates, rank_labels
from labels import OXFORD_PETS, PETS_TEMPLATE
from model import check_fits, load_base_model, load_lora_for_inference, load_processor
from model_card import card_metadata
from run_io import UserError

FIXTURE = REAL_PROCESSOR_DIR
TEMPLATE = PETS_TEMPLATE
DEC, ENC, VOCAB = 30522, 30523, 30524
BREEDS_USED = [
    OXFORD_PETS.index("Abyssinian"),
    OXFORD_PETS.index("shiba_inu"),
    OXFORD_PETS.index("pug"),
    OXFORD_PETS.index("Sphynx"),
]


def small_real_config() -> BlipConfig:
    """The real config.json, narrowed so it runs in seconds; vocabulary, special ids and image size kept."""
    config = BlipConfig.from_pretrained(FIXTURE)
    for part in (config.text_config, config.vision_config):
        part.hidden_size, part.intermediate_size, part.num_hidden_layers, part.num_attention_heads = 32, 64, 2, 4
    config.text_config.encoder_hidden_size = config.vision_config.hidden_size
    return config


def save_as_the_hub_ships_it(model, out_dir: str) -> None:
    """config.json + pytorch_model.bin with the 4.26 keys (text position_ids were a saved buffer); no safetensors."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    positions = model.config.text_config.max_position_embeddings
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
    model.config.save_pretrained(out_dir)
    for name in os.listdir(FIXTURE):  # the processor files, exactly as published
        if name != "config.json":
            shutil.copy(os.path.join(FIXTURE, name), out_dir)


@pytest.fixture(scope="module")
def real_blip(tmp_path_factory):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(small_real_config())
    out = str(tmp_path_factory.mktemp("real-blip"))
    save_as_the_hub_ships_it(model, out)
    return out, model


@pytest.fixture(scope="module")
def real_pets(tmp_path_factory):
    return write_synthetic_pets(
        str(tmp_path_factory.mktemp("pets")), breeds=BREEDS_USED, trainval_per_breed=6, test_per_breed=2, size=64
    )


def test_the_fixture_is_the_real_tokenizer():
    tok = BertTokenizer.from_pretrained(FIXTURE)
    assert len(tok) == 30522 and tok.bos_token_id is None and tok.convert_ids_to_tokens(DEC) is None
    config = BlipConfig.from_pretrained(FIXTURE)
    assert (config.text_config.bos_token_id, config.text_config.vocab_size, config.text_config.sep_token_id) == (
        DEC,
        VOCAB,
        102,
    )


def test_load_processor_teaches_dec_and_enc_at_the_config_ids(real_blip):
    tok = load_processor(real_blip[0]).tokenizer
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == DEC
    assert tok.convert_tokens_to_ids("[ENC]") == ENC and len(tok) == VOCAB
    assert "[DEC]" in tok.all_special_tokens  # so decoding with skip_special_tokens drops it
    assert tok.decode([DEC, 1037, 17022, 102], skip_special_tokens=True) == "a puppy"  # ids from vocab.txt


def test_all_37_template_captions_start_at_30522_and_padding_is_masked(real_blip):
    tok = load_processor(real_blip[0]).tokenizer
    captions = [OXFORD_PETS.caption(b, TEMPLATE) for b in range(37)]
    batch = CaptionCollator(tok, DEC)([{"caption": c, "label": 0} for c in captions])
    assert (batch["input_ids"][:, 0] == DEC).all()
    for i, caption in enumerate(captions):
        ids = BertTokenizer.from_pretrained(FIXTURE)(caption)["input_ids"]  # [CLS] ... [SEP], the files alone
        n = len(ids)
        assert batch["input_ids"][i, 1:n].tolist() == ids[1:] and ids[-1] == 102
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i, n:] == -100).all() and (batch["labels"][i, :n] == batch["input_ids"][i, :n]).all()
    assert (batch["labels"] == -100).any()  # the batch really has padding


@pytest.mark.parametrize(
    "breed, pieces", [("Abyssinian", ["abyss", "##inian"]), ("shiba_inu", ["shi", "##ba", "in", "##u"])]
)
def test_word_pieces_are_one_breed_word_in_the_maps(real_blip, breed, pieces):
    tok = load_processor(real_blip[0]).tokenizer
    ids = [DEC] + tok(OXFORD_PETS.caption(OXFORD_PETS.index(breed), TEMPLATE))["input_ids"][1:]
    tokens = tok.convert_ids_to_tokens(ids)
    start = tokens.index(pieces[0])
    assert tokens[start : start + len(pieces)] == pieces  # the real vocabulary splits the name
    words = word_spans(tokens, set(tok.all_special_tokens))
    s, e, kind = subject_span(words, OXFORD_PETS)
    assert kind == "breed" and words[s][1] == start and words[e - 1][2] == start + len(pieces)
    assert " ".join(w for w, _, _ in words[s:e]) == OXFORD_PETS.caption(OXFORD_PETS.index(breed), "{breed}").lower()


def _one_by_one(model, pixels, caption, tokenizer):
    """log p(caption | image) through the full model's forward, one caption at a time."""
    ids = tokenizer(caption, return_tensors="pt")["input_ids"]
    ids[0, 0] = model.config.text_config.bos_token_id
    logits = model(pixel_values=pixels, input_ids=ids).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None]).sum().item()


@torch.no_grad()
def test_ranking_scores_every_word_piece(real_blip, real_pets):
    model_dir, _ = real_blip
    model, processor = load_base_model(model_dir).eval(), load_processor(model_dir)
    candidates = label_candidates(model, processor.tokenizer, OXFORD_PETS, TEMPLATE)
    assert (candidates[0][:, 0] == DEC).all()
    # tokens scored per breed = the caption's tokens after [DEC], word pieces and [SEP] included
    lengths = [len(processor.tokenizer(OXFORD_PETS.caption(b, TEMPLATE))["input_ids"]) - 1 for b in range(37)]
    assert candidates[1][:, 1:].sum(-1).tolist() == lengths
    image = load_image(load_splits(real_pets)["test"][0])
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    scores, _ = rank_labels(model, image_embeddings(model, pixels), candidates)
    for b in BREEDS_USED:
        expected = _one_by_one(model, pixels, OXFORD_PETS.caption(b, TEMPLATE), processor.tokenizer)
        assert scores[0, b].item() == pytest.approx(expected, abs=1e-3)


def test_a_tokenizer_whose_dec_has_another_id_is_one_clear_error(real_blip, tmp_path):
    model_dir, _ = real_blip
    model = load_base_model(model_dir)
    processor = load_processor(model_dir)
    model.config.text_config.bos_token_id = ENC  # a checkpoint that disagrees with its tokenizer
    with pytest.raises(UserError, match=r"starts captions with '\[DEC\]' \(id 30522\).*30523"):
        check_fits(model, processor, model_dir)


def test_the_hub_layout_loads_from_pytorch_model_bin(real_blip):
    model_dir, original = real_blip
    assert not os.path.exists(os.path.join(model_dir, "model.safetensors"))
    loaded = load_base_model(model_dir)
    expected = original.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_missing_weights_message_names_both_formats(tmp_path):
    small_real_config().save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="model.safetensors or pytorch_model.bin"):
        load_base_model(str(tmp_path))


def test_model_card_metadata_for_hub_ids():
    cfg = PetConfig(model_name_or_path="Salesforce/blip-image-captioning-base", dataset="timm/oxford-iiit-pet")
    args = train.TrainConfig(output_dir="outputs/blip-lora-pets")
    meta = yaml.safe_load(card_metadata(cfg, args, 0.912).to_yaml())
    assert meta["base_model"] == "Salesforce/blip-image-captioning-base" and meta["datasets"] == [
        "timm/oxford-iiit-pet"
    ]
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-to-text"
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric == {"type": "accuracy", "value": 0.912, "name": "validation breed accuracy"}
    # kept by another --metric_for_best_model: the card names that metric, not breed accuracy
    args = train.TrainConfig(output_dir="outputs/blip-lora-pets", metric_for_best_model="loss", greater_is_better=False)
    metric = yaml.safe_load(card_metadata(cfg, args, 3.96).to_yaml())["model-index"][0]["results"][0]["metrics"][0]
    assert metric == {"type": "loss", "value": 3.96, "name": "validation loss"}


PLAIN_PEFT = """
import json, sys, torch
from PIL import Image
from peft import AutoPeftModel
from transformers import BlipProcessor
adapter, max_new_tokens, *paths = sys.argv[1:]
model = AutoPeftModel.from_pretrained(adapter).merge_and_unload().eval()
processor = BlipProcessor.from_pretrained(adapter)
with torch.no_grad():
    ids = model.generate(**processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt"),
                         max_new_tokens=int(max_new_tokens))
captions = [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)]
project = sorted(m for m in ("config", "data", "model", "train") if m in sys.modules)
print(json.dumps({"captions": captions, "project_modules": project, "bos": processor.tokenizer.bos_token_id}))
"""


@pytest.mark.slow
def test_train_evaluate_explain_on_the_real_files(real_blip, real_pets, tmp_path):
    model_dir, _ = real_blip
    adapter = str(tmp_path / "adapter")
    common = ["--model_name_or_path", model_dir, "--dataset", real_pets, "--max_new_tokens", "12"]
    result = train.main(
        common
        + [
            "--output_dir",
            adapter,
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-3",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "3",
            "--save_strategy",
            "steps",
            "--save_steps",
            "3",
            "--logging_steps",
            "1",
            "--lora_target_modules",
            "query,value",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--embedding_cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    assert result["best_breed_accuracy"] is not None

    # The saved processor loads with plain transformers and knows [DEC] at the config's id
    processor = BlipProcessor.from_pretrained(adapter)
    assert processor.tokenizer.bos_token_id == DEC and len(processor.tokenizer) == VOCAB
    adapter_config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert adapter_config["auto_mapping"] == {
        "base_model_class": "BlipForConditionalGeneration",
        "parent_library": "transformers.models.blip.modeling_blip",
    }
    card = open(os.path.join(adapter, "README.md")).read()
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta  # a local folder is no Hub id
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-to-text"
    assert "6 optimizer steps (--max_steps 6" in card and "epochs, learning rate" not in card

    # Plain transformers + peft, no project module imported, give the project's captions
    images = [os.path.join(real_pets, "images", f"{r.image_id}.jpg") for r in load_splits(real_pets)["test"][:3]]
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, adapter, "12", *images],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["project_modules"] == [] and plain["bos"] == DEC
    model, processor = load_lora_for_inference(adapter)
    ours = caption_images(
        model, processor, [load_image(r) for r in load_splits(real_pets)["test"][:3]], max_new_tokens=12
    )
    assert plain["captions"] == ours

    metrics = evaluate.main(
        common + ["--adapter", adapter, "--output_dir", str(tmp_path / "eval"), "--bootstrap_samples", "50"]
    )["metrics"]
    assert metrics["num_samples"] == 2 * len(BREEDS_USED)
    written = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert written["fine_tuned"]["likelihood_top1"] == pytest.approx(metrics["fine_tuned"]["likelihood_top1"])

    explained = explainability.main(
        common + ["--adapter", adapter, "--output_dir", str(tmp_path / "explain"), "--num_images", "2"]
    )["metrics"]
    assert len(explained["images"]) == 2
    for entry in explained["images"]:
        assert entry["fine_tuned"]["caption"] is not None
