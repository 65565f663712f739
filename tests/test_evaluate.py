"""evaluate.py and metrics.py: breeds read from captions, the metrics against hand computations, the demo evaluation."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import evaluate
import explainability
from config import DEMO_DIR
from data import load_image, load_splits
from demo import build_tiny_blip
from helpers import adapter_copy, edit_json, run_script
from inference import caption_log_likelihoods, image_embeddings, label_candidates, rank_labels
from labels import BREED_NAMES, OXFORD_PETS, PETS_TEMPLATE, UNKNOWN
from metrics import bleu, bootstrap_ci, confused_pairs, confusion, mcnemar, model_metrics, rouge_l
from model import load_base_model, load_lora_for_inference, load_processor, same_vision_encoder
from report import figure_captions
from run_io import UserError

TEMPLATE = PETS_TEMPLATE
FIGURES = list(figure_captions(OXFORD_PETS))
OUTPUT_FILES = ["metrics.json", "predictions.csv", "failures.csv", "report.md", "run_config.json"] + FIGURES


# ---------------------------------------------------------------------------
# Breed and species from captions


@pytest.mark.parametrize(
    "caption, breed",
    [
        ("a photo of an american pit bull terrier, a type of pet.", "american_pit_bull_terrier"),
        ("a pit bull lying on the grass", "american_pit_bull_terrier"),
        ("two pitbulls playing", "american_pit_bull_terrier"),
        ("a staffordshire bull terrier on a sofa", "staffordshire_bull_terrier"),  # not "bull terrier" -> pit bull
        ("a yorkie in a bag", "yorkshire_terrier"),
        ("A Saint Bernard in the snow", "saint_bernard"),
        ("a st. bernard in the snow", "saint_bernard"),
        ("st bernards are big", "saint_bernard"),
        ("a german shorthaired pointer in a field", "german_shorthaired"),
        ("A photo of a German Short-Haired Pointer.", "german_shorthaired"),
        ("an english cocker spaniel puppy", "english_cocker_spaniel"),
        ("a cocker spaniel", "english_cocker_spaniel"),
        ("a siamese cat sitting on a bed", "Siamese"),
        ("a pug wearing a hat", "pug"),
        ("a Maine-Coon", "Maine_Coon"),
        ("russian blue kitten", "Russian_Blue"),
        ("a shiba inu dog", "shiba_inu"),
        ("a great pyrenees", "great_pyrenees"),
    ],
)
def test_breed_from_tricky_captions(caption, breed):
    assert OXFORD_PETS.from_caption(caption) == OXFORD_PETS.index(breed)


@pytest.mark.parametrize(
    "caption",
    [
        "a cat sitting on a couch",
        "a dog with a ball",
        "a pugnacious dog",
        "a bulldog",
        "a persiana blind",
        "",
        "a photo of a type of pet.",
        "a bernard",
    ],
)
def test_captions_naming_no_breed_are_unknown(caption):
    assert OXFORD_PETS.from_caption(caption) == UNKNOWN


def test_species_from_caption():
    assert OXFORD_PETS.group_from_caption("a bengal on a chair") == "cat"
    assert OXFORD_PETS.group_from_caption("a beagle puppy") == "dog"
    assert OXFORD_PETS.group_from_caption("a cat sitting on a couch") == "cat"
    assert OXFORD_PETS.group_from_caption("two puppies") == "dog"
    assert OXFORD_PETS.group_from_caption("a cat and a dog") is None
    assert OXFORD_PETS.group_from_caption("a man on a bench") is None


# ---------------------------------------------------------------------------
# Metrics on hand-made prediction sets


def _scores(best_first):
    """Likelihood scores whose ranking starts with the given breeds, in order."""
    s = np.full(37, -100.0)
    for k, b in enumerate(best_first):
        s[b] = -float(k)
    return s


def test_metrics_on_a_hand_made_set():
    ab, bengal, pug, beagle = (
        OXFORD_PETS.index("Abyssinian"),
        OXFORD_PETS.index("Bengal"),
        OXFORD_PETS.index("pug"),
        OXFORD_PETS.index("beagle"),
    )
    labels = [ab, ab, bengal, pug, pug, beagle]
    captions = [
        "a photo of an abyssinian, a type of pet.",  # right
        "a photo of a bengal, a type of pet.",  # wrong breed, right species
        "a photo of a bengal, a type of pet.",  # right
        "a photo of a beagle, a type of pet.",  # wrong breed, right species
        "a cat on a sofa",  # no breed, wrong species
        "a dog on the grass",  # no breed, right species
    ]
    scores = np.stack(
        [
            _scores([ab]),
            _scores([bengal, ab]),
            _scores([pug, bengal, 0, 1, 2, 3]),
            _scores([pug]),
            _scores([0, 1, 2, 3, 4, 5]),
            _scores([beagle]),
        ]
    )
    m = model_metrics(OXFORD_PETS, labels, captions, scores, TEMPLATE, samples=200, seed=0).numbers
    assert m["breed_accuracy"] == pytest.approx(2 / 6)
    assert m["species_accuracy"] == pytest.approx(5 / 6)
    assert m["no_breed_rate"] == pytest.approx(2 / 6)
    assert m["likelihood_top1"] == pytest.approx(3 / 6)  # images 0, 3, 5
    assert m["likelihood_top5"] == pytest.approx(5 / 6)  # + images 1 and 2 (true breed 2nd); image 4 misses
    assert m["likelihood_top1_per_token"] == m["likelihood_top1"]  # no token counts: the same ranking
    # ranking first vs breed named: image 0 (ab, ab), 2 (pug vs bengal: no), 3 (pug vs beagle: no), 1 (bengal, bengal)
    assert m["ranking_agrees_with_caption"] == pytest.approx(2 / 6)
    tokens = np.ones(37)
    tokens[ab] = 10
    m = model_metrics(
        OXFORD_PETS, labels, captions, scores, TEMPLATE, samples=10, seed=0, candidate_tokens=tokens
    ).numbers
    assert m["likelihood_top1_per_token"] == pytest.approx(3 / 6)
    scores[1, ab], scores[1, bengal] = -10.0, -2.0  # per token: Abyssinian -1.0 beats Bengal -2.0
    m = model_metrics(
        OXFORD_PETS, labels, captions, scores, TEMPLATE, samples=10, seed=0, candidate_tokens=tokens
    ).numbers
    assert m["likelihood_top1"] == pytest.approx(3 / 6) and m["likelihood_top1_per_token"] == pytest.approx(4 / 6)
    # per token image 1 now ranks Abyssinian first while its caption names Bengal: one agreement fewer
    assert m["ranking_agrees_with_caption"] == pytest.approx(2 / 6)
    assert m["ranking_agrees_with_caption_per_token"] == pytest.approx(1 / 6)
    lo, hi = m["breed_accuracy_ci95"]
    assert 0 <= lo <= 2 / 6 <= hi <= 1
    assert m["confused_pairs"] == [
        {"true": "Abyssinian", "predicted": "Bengal", "count": 1},
        {"true": "Pug", "predicted": "Beagle", "count": 1},
    ]
    per = m["per_breed"]
    assert per["Bengal"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert per["Abyssinian"]["recall"] == 0.5 and per["Abyssinian"]["precision"] == 1.0
    assert per["Pug"]["recall"] == 0.0 and per["Beagle"]["precision"] == 0.0


def test_likelihood_top5_counts_rank_five_not_six():
    labels = [7, 7]
    m = model_metrics(
        OXFORD_PETS,
        labels,
        ["x", "x"],
        np.stack([_scores([0, 1, 2, 3, 7]), _scores([0, 1, 2, 3, 4, 7])]),
        TEMPLATE,
        samples=10,
        seed=0,
    ).numbers
    assert m["likelihood_top5"] == 0.5 and m["likelihood_top1"] == 0.0


def test_confused_pairs_are_counted_and_ordered():
    truth = [0, 0, 0, 1, 1, 2, 2, 2, 3]
    pred = [1, 1, 0, 0, UNKNOWN, 1, 1, 1, 3]
    assert confused_pairs(truth, pred, BREED_NAMES) == [
        {"true": BREED_NAMES[2], "predicted": BREED_NAMES[1], "count": 3},
        {"true": BREED_NAMES[0], "predicted": BREED_NAMES[1], "count": 2},
        {"true": BREED_NAMES[1], "predicted": BREED_NAMES[0], "count": 1},
    ]
    assert len(confused_pairs(list(range(37)) * 2, [(i + 1) % 37 for i in range(37)] * 2, BREED_NAMES)) == 10
    matrix = confusion(truth, pred, 37)
    assert matrix.shape == (38, 38) and matrix.sum() == len(truth) and matrix[1, 37] == 1 and matrix[2, 1] == 3


def test_mcnemar_exact_against_hand_computation():
    # discordant pairs: first model alone right once, second alone right 6 times; 3 ties
    a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    r = mcnemar(a, b)
    assert (r["only_first_correct"], r["only_second_correct"]) == (1, 6)
    # two-sided exact binomial, n=7: P(X<=1) + P(X>=6) = 2 * (1 + 7) / 128
    assert r["p_value"] == pytest.approx(16 / 128)
    assert mcnemar([1, 0, 1], [1, 0, 1])["p_value"] == 1.0
    assert mcnemar([0] * 10, [1] * 10)["p_value"] == pytest.approx(2 / 2**10)


def test_bootstrap_interval():
    assert bootstrap_ci([1] * 20, 500, 0) == [1.0, 1.0]
    correct = [1, 0] * 100  # p = 0.5, n = 200: normal interval 0.5 +- 0.069
    lo, hi = bootstrap_ci(correct, 2000, 0)
    assert lo == pytest.approx(0.431, abs=0.015) and hi == pytest.approx(0.569, abs=0.015)
    assert bootstrap_ci(correct, 2000, 0) == [lo, hi]  # seeded


def test_bleu_matches_torchmetrics():
    from torchmetrics.text import BLEUScore

    # no punctuation, lower case: sacrebleu's 13a tokens are then the whitespace tokens torchmetrics uses
    hyps = ["a photo of a pug a type of pet", "a photo of a beagle on the grass", "a cat on a sofa a type of pet"]
    refs = ["a photo of a pug a type of pet", "a photo of a beagle a type of pet", "a photo of a persian a type of pet"]
    expected = BLEUScore(n_gram=4)(hyps, [[r] for r in refs]).item() * 100
    assert bleu(hyps, refs) == pytest.approx(expected, abs=1e-4)
    assert bleu(["A Photo of a Pug, a type of pet."], ["a photo of a pug, a type of pet."]) == pytest.approx(100)


def test_rouge_l_matches_a_hand_worked_example_and_torchmetrics():
    from torchmetrics.text import ROUGEScore

    # ref 9 tokens "a photo of an abyssinian a type of pet", hyp 5 tokens "a photo of a cat":
    # LCS = "a photo of a" (4) -> P = 4/5, R = 4/9, F = 2PR/(P+R) = 8/14
    assert rouge_l(["a photo of a cat"], ["A photo of an Abyssinian, a type of pet."]) == pytest.approx(8 / 14)
    hyps = ["a photo of a pug, a type of pet.", "a dog lying on a bed", "a photo of a beagle"]
    refs = [OXFORD_PETS.caption(OXFORD_PETS.index(b), TEMPLATE) for b in ("pug", "beagle", "beagle")]
    tm = ROUGEScore(rouge_keys=("rougeL",))(hyps, refs)["rougeL_fmeasure"].item()
    assert rouge_l(hyps, refs) == pytest.approx(tm, abs=1e-6)


# ---------------------------------------------------------------------------
# Likelihood ranking on the demo model


def _one_by_one(model, pixel_values, caption, tokenizer):
    """log p(caption | image) through the full model's forward, one image and one caption at a time."""
    ids = tokenizer(caption, return_tensors="pt")["input_ids"]
    ids[0, 0] = tokenizer.bos_token_id
    logits = model(pixel_values=pixel_values, input_ids=ids).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None]).sum().item()


def _one_by_one_from_embeds(model, embeds, caption, tokenizer):
    """log p(caption | image embeddings) through the text decoder's forward, one caption at a time."""
    ids = tokenizer(caption, return_tensors="pt")["input_ids"]
    ids[0, 0] = model.config.text_config.bos_token_id
    logits = model.text_decoder(input_ids=ids, encoder_hidden_states=embeds).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None]).sum().item()


def test_candidates_pack_their_shared_start_once_and_drop_padding():
    from inference import SHARED, pack_candidates

    # [DEC]=9 a=5 photo=6 | x y [SEP]=3 ; [DEC] a photo | z [SEP] pad ; the shared start is 3 tokens
    ids = torch.tensor([[9, 5, 6, 7, 8, 3], [9, 5, 6, 4, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    p = pack_candidates(ids, mask)
    assert p["input_ids"].tolist() == [9, 5, 6, 7, 8, 4]  # [SEP]s are targets only; no padding
    assert p["position_ids"].tolist() == [0, 1, 2, 3, 4, 3]
    assert p["segments"].tolist() == [SHARED] * 3 + [0, 0, 1]
    assert p["last_shared"] == 2 and p["first_targets"].tolist() == [7, 4]
    assert p["targets"].tolist()[:2] == [5, 6] and p["targets"].tolist()[3:] == [8, 3, 3]


@pytest.mark.slow
@torch.no_grad()
def test_ranking_agrees_with_scoring_captions_one_by_one(demo_run, demo_adapter, tmp_path, monkeypatch):
    cwd, _ = demo_run
    monkeypatch.chdir(tmp_path)  # the adapter must find its base model from any working directory
    model, processor = load_lora_for_inference(demo_adapter)
    records = load_splits(os.path.join(cwd, DEMO_DIR, "pets"))["test"][::20]
    pixels = processor.image_processor([load_image(r) for r in records], return_tensors="pt")["pixel_values"]
    breeds = list(range(37))
    candidates = label_candidates(model, processor.tokenizer, OXFORD_PETS, TEMPLATE)
    embeds = image_embeddings(model, pixels)
    scores, order = rank_labels(model, embeds, candidates)
    assert scores.shape == (len(records), 37)
    expected = torch.tensor(
        [
            [
                _one_by_one(model, pixels[i : i + 1], OXFORD_PETS.caption(b, TEMPLATE), processor.tokenizer)
                for b in breeds
            ]
            for i in range(len(records))
        ]
    )
    assert torch.allclose(scores, expected.float(), atol=1e-3)
    # the top-ranked breed has the best one-by-one score (ties within float noise may swap)
    best = expected.gather(1, order[:, :1]).squeeze(1).float()
    assert torch.all(best >= expected.max(-1).values.float() - 1e-4)
    # chunking (a few images per decoder call) and groups of candidates do not change the numbers
    assert torch.allclose(caption_log_likelihoods(model, embeds, *candidates, max_rows=37), scores, atol=1e-5)
    grouped = caption_log_likelihoods(model, embeds, *candidates, candidates_per_pass=10)
    assert torch.allclose(grouped, scores, atol=1e-5)


@torch.no_grad()
def test_classes_ranked_in_groups_score_as_one_by_one(tiny_assets):
    """More classes than one packed pass holds: scored in groups, each class's score is its caption's own."""
    from labels import LabelSet

    model, processor = load_base_model(tiny_assets[0]).eval(), load_processor(tiny_assets[0])
    names = ["Blue Jay", "Snowy Owl", "American Goldfinch", "Common Raven", "Crow", "Great Grey Owl", "Wren"]
    birds = LabelSet(names, names)
    candidates = label_candidates(model, processor.tokenizer, birds, "A photo of {article} {label}.")
    embeds = 2 * torch.randn(3, 17, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = caption_log_likelihoods(model, embeds, *candidates)
    grouped = caption_log_likelihoods(model, embeds, *candidates, candidates_per_pass=3, max_rows=4)
    expected = torch.tensor(
        [
            [
                _one_by_one_from_embeds(model, embeds[i : i + 1], birds.caption(c, "A photo of {article} {label}."),
                                        processor.tokenizer)
                for c in range(len(birds))
            ]
            for i in range(3)
        ]
    )  # fmt: skip
    assert whole.shape == (3, 7) and torch.allclose(whole, expected, atol=1e-4)
    assert torch.allclose(grouped, expected, atol=1e-4)


@pytest.mark.slow
def test_demo_adapter_leaves_the_vision_encoder_alone(demo_run, demo_adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tuned, _ = load_lora_for_inference(demo_adapter)
    base_dir = json.load(open(os.path.join(demo_adapter, "adapter_config.json")))["base_model_name_or_path"]
    assert os.path.isabs(base_dir) and os.path.isdir(base_dir)  # recorded so that it loads from anywhere
    base = load_base_model(base_dir)
    assert not any(
        "vision" in n for n in json.load(open(os.path.join(demo_adapter, "adapter_config.json")))["target_modules"]
    )
    assert same_vision_encoder(base, tuned)
    with torch.no_grad():
        next(base.vision_model.parameters()).add_(1e-3)
    assert not same_vision_encoder(base, tuned)


# ---------------------------------------------------------------------------
# The script


@pytest.fixture(scope="module")
def demo_eval(demo_run):
    cwd, _ = demo_run
    proc = run_script(["evaluate.py", "--demo"], cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(cwd, DEMO_DIR, "eval"), proc


@pytest.mark.slow
def test_evaluate_demo_subprocess_writes_everything(demo_eval):
    import pandas as pd
    from PIL import Image

    out, proc = demo_eval
    for name in OUTPUT_FILES:
        assert os.path.isfile(os.path.join(out, name)), name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["num_samples"] == 80 and metrics["num_bad_images"] == 0 and metrics["split"] == "test"
    zs, ft = metrics["zero_shot"], metrics["fine_tuned"]
    assert ft["breed_accuracy"] > zs["breed_accuracy"]
    assert ft["breed_accuracy"] >= 0.8 and ft["likelihood_top1"] > zs["likelihood_top1"]
    # zero-shot like BLIP (the species, no breed); fine-tuned, the ranking the app draws agrees with the caption
    # (species: 0.9625 measured on the demo base, pre-trained on one thread; a random base names no species at all)
    assert zs["no_breed_rate"] >= 0.8 and zs["species_accuracy"] >= 0.9
    assert ft["ranking_agrees_with_caption"] >= 0.8
    assert ft["likelihood_top1_per_token"] > zs["likelihood_top1_per_token"]
    assert ft["bleu"] > zs["bleu"] and ft["rougeL"] > zs["rougeL"]
    assert metrics["mcnemar_caption"]["p_value"] < 0.01
    assert metrics["shared_image_embeddings"] is True
    for key in (
        "breed_accuracy_ci95",
        "species_accuracy",
        "no_breed_rate",
        "likelihood_top5",
        "per_breed",
        "confused_pairs",
    ):
        assert key in zs and key in ft
    predictions = pd.read_csv(os.path.join(out, "predictions.csv"))
    assert len(predictions) == 80 and predictions["image_id"].is_unique
    assert (predictions["fine_tuned_breed"] == predictions["true_breed"]).mean() == pytest.approx(ft["breed_accuracy"])
    assert predictions["fine_tuned_likelihood_top5"].str.count(r"\|").eq(4).all()
    failures = pd.read_csv(os.path.join(out, "failures.csv"))
    assert (failures["model"] == "fine_tuned").sum() == round((1 - ft["breed_accuracy"]) * 80)
    assert (failures["model"] == "zero_shot").sum() == round((1 - zs["breed_accuracy"]) * 80)
    report = open(os.path.join(out, "report.md")).read()
    for name in FIGURES:
        assert f"]({name})" in report
        assert Image.open(os.path.join(out, name)).size[0] >= 400
    assert f"{ft['breed_accuracy']:.3f} [" in report
    run_config = json.load(open(os.path.join(out, "run_config.json")))
    assert (
        "evaluate.py --demo" in run_config["command"] and run_config["evaluate"]["adapter"] == f"{DEMO_DIR}/blip-lora"
    )
    assert "fine-tuned" in proc.stdout and "breed accuracy" in proc.stdout  # the summary table
    assert "evaluating" in proc.stderr  # the progress bar


@pytest.mark.slow
def test_bad_images_are_skipped_counted_and_the_rest_is_unchanged(demo_eval, demo_run, tmp_path, monkeypatch):
    import pandas as pd

    cwd, _ = demo_run
    data = tmp_path / "pets"
    shutil.copytree(os.path.join(cwd, DEMO_DIR, "pets"), data)
    records = load_splits(str(data))["test"]
    broken = [records[3].image_id, records[40].image_id]
    for name in broken:
        (data / "images" / f"{name}.jpg").write_bytes(b"not a jpeg")
    monkeypatch.chdir(cwd)
    result = evaluate.main(
        ["--demo", "--dataset", str(data), "--output_dir", str(tmp_path / "eval"), "--per_device_eval_batch_size", "16"]
    )
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["num_samples"] == 78 and metrics["num_bad_images"] == 2 and metrics["bad_images"] == sorted(broken)
    clean = pd.read_csv(os.path.join(demo_eval[0], "predictions.csv"))
    clean = clean[~clean["image_id"].isin(broken)].reset_index(drop=True)
    assert pd.read_csv(tmp_path / "eval" / "predictions.csv").equals(clean)
    assert result["metrics"]["fine_tuned"]["breed_accuracy"] == pytest.approx(
        (clean["fine_tuned_breed"] == clean["true_breed"]).mean()
    )


@pytest.mark.slow
def test_adapter_problems_are_one_clear_line(demo_run, demo_adapter, tmp_path, monkeypatch):
    cwd, _ = demo_run
    monkeypatch.chdir(cwd)
    with pytest.raises(UserError, match="does not exist"):
        evaluate.parse_args(["--demo", "--adapter", str(tmp_path / "nope")])
    incomplete = tmp_path / "incomplete"
    shutil.copytree(demo_adapter, incomplete, ignore=shutil.ignore_patterns("checkpoint-*"))
    (incomplete / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        evaluate.parse_args(["--demo", "--adapter", str(incomplete)])
    truncated = tmp_path / "truncated"
    shutil.copytree(demo_adapter, truncated, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        evaluate.parse_args(["--demo", "--adapter", str(truncated)])
    # an adapter for another base model: a tiny BLIP with another vocabulary and image size ...
    other = build_tiny_blip(str(tmp_path / "other-blip"), image_size=32)
    with pytest.raises(UserError, match="does not fit the base model"):
        evaluate.main(["--demo", "--model_name_or_path", other, "--output_dir", str(tmp_path / "o")])
    # ... and one whose layers have other shapes
    with pytest.raises(UserError, match="another shape"):
        evaluate.main(
            [
                "--demo",
                "--model_name_or_path",
                _narrow_blip(tmp_path / "narrow", demo_adapter),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    # and through the script: one line on stderr, exit code 2
    proc = run_script(["evaluate.py", "--demo", "--adapter", str(truncated)], cwd=cwd, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]


def _narrow_blip(path, adapter):
    """A BLIP with the adapter's tokenizer ids (so it passes check_fits) but narrower layers."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    tok = load_processor(adapter).tokenizer
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=tok.bos_token_id,
            sep_token_id=tok.sep_token_id,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        ),
    )
    BlipForConditionalGeneration(config).save_pretrained(str(path))
    return str(path)


def test_bad_options_fail_before_heavy_work():
    with pytest.raises(UserError, match="--split: invalid choice: 'dev'"):  # a Literal's choices, at the parser
        evaluate.parse_args(["--split", "dev"])
    with pytest.raises(UserError, match="--precision: invalid choice"):
        evaluate.parse_args(["--precision", "fp8"])
    with pytest.raises(UserError, match="invalid int value: 'many'"):  # argparse's own error, one line too
        evaluate.parse_args(["--per_device_eval_batch_size", "many"])
    with pytest.raises(UserError, match="at least 1"):
        evaluate.parse_args(["--per_device_eval_batch_size", "0"])
    with pytest.raises(UserError, match="no_such_flag"):
        evaluate.parse_args(["--no_such_flag", "1"])


def test_confusion_figure_writes_the_counts_as_seaborns_own_annotation_would(tmp_path):
    """The counts are drawn by hand (non-zero cells only, for speed): the image equals seaborn's annot= one."""
    import matplotlib
    import seaborn as sns
    from PIL import Image

    from figures import pyplot
    from metrics import matrix_labels
    from report import plot_confusion

    LABELS = matrix_labels(OXFORD_PETS)

    matrix = np.zeros((len(BREED_NAMES) + 1, len(BREED_NAMES) + 1), dtype=int)
    np.fill_diagonal(matrix, 40)
    matrix[3, 7], matrix[10, 37], matrix[37, 2], matrix[5, 5] = 2, 9, 25, 17  # light, mid and dark cells
    plot_confusion(matrix, LABELS, "title", str(tmp_path / "fast.png"))
    plt = pyplot()  # the same figure through seaborn's annotation
    fig, ax = plt.subplots(figsize=(15, 13))
    sns.heatmap(
        matrix,
        annot=np.where(matrix > 0, matrix.astype(str), ""),
        fmt="",
        cmap="Blues",
        xticklabels=LABELS,
        yticklabels=LABELS,
        cbar_kws={"label": "images"},
        linewidths=0.3,
        linecolor="#eeeeee",
        annot_kws={"fontsize": 7},
        ax=ax,
    )
    ax.set(xlabel="predicted breed (from the caption)", ylabel="true breed", title="title")
    ax.tick_params(labelsize=8)
    matplotlib.pyplot.setp(ax.get_xticklabels(), rotation=60, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(tmp_path / "seaborn.png", dpi=110)
    plt.close(fig)
    fast, reference = (np.asarray(Image.open(tmp_path / n).convert("RGB")) for n in ("fast.png", "seaborn.png"))
    assert fast.shape == reference.shape and np.array_equal(fast, reference)


# ---------------------------------------------------------------------------
# Options, adapters and shards


def test_huge_bootstrap_is_refused_before_loading(tmp_path):
    with pytest.raises(UserError, match="--bootstrap_samples must be 1-100000"):
        evaluate.parse_args(["--adapter", str(tmp_path / "none"), "--bootstrap_samples", "100000000"])


def test_evaluate_and_explain_refuse_the_adapter_folder_as_output(tiny_adapter):
    adapter = tiny_adapter[0]
    before = open(os.path.join(adapter, "run_config.json")).read()
    with pytest.raises(UserError, match="is the adapter folder"):
        evaluate.parse_args(["--adapter", adapter, "--output_dir", adapter])
    with pytest.raises(UserError, match="is the adapter folder"):
        explainability.parse_args(["--adapter", adapter, "--output_dir", adapter + "/"])
    assert open(os.path.join(adapter, "run_config.json")).read() == before


def test_evaluate_refuses_an_overflowing_adapter_before_writing(tiny_adapter, tiny_assets, tmp_path):
    path = adapter_copy(tiny_adapter, tmp_path)
    edit_json(os.path.join(path, "adapter_config.json"), lora_alpha=1e30)
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="NaN or infinite outputs"):
        evaluate.main(
            ["--adapter", path, "--dataset", tiny_assets[1], "--output_dir", str(out), "--max_eval_samples", "4"]
        )
    assert not (out / "metrics.json").exists()


def test_an_adapter_folder_is_not_a_base_model(tiny_adapter, tiny_assets, tmp_path):
    adapter = tiny_adapter[0]
    with pytest.raises(UserError, match="holds a LoRA adapter, not a base model"):
        evaluate.main(
            [
                "--adapter",
                adapter,
                "--model_name_or_path",
                adapter,
                "--dataset",
                tiny_assets[1],
                "--output_dir",
                str(tmp_path / "eval"),
                "--max_eval_samples",
                "4",
            ]
        )


def test_shards_merge_by_position_not_by_image_id():
    import numpy as np

    from data import Record
    from metrics import ModelPredictions, Predictions

    records = [Record("same", k % 2, f"img{k}.png") for k in range(5)]  # one id for every image

    def shard(positions):
        models = {"m": ModelPredictions([f"caption {p}" for p in positions], np.array([[p, 0.0] for p in positions]))}
        return (
            positions,
            Predictions(["same"] * len(positions), [records[p].label for p in positions], models, None),
            {},
        )

    merged, _ = evaluate.merge_shards([shard([0, 2, 4]), shard([1, 3])], records, 37)
    assert merged.models["m"].captions == [f"caption {p}" for p in range(5)]
    assert merged.models["m"].scores[:, 0].tolist() == list(range(5)) and merged.label == [0, 1, 0, 1, 0]
    assert merged.records == records
    with pytest.raises(RuntimeError, match="two processes"):
        evaluate.merge_shards([shard([0, 2]), shard([2])], records, 37)
