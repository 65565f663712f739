"""BLIP + LoRA: load, wrap, reload, caption; and a tiny offline BLIP for the demo and tests."""

import json
import logging
import os
from typing import Optional

import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
from transformers.models.blip import BlipImageProcessorPil

from config import UserError, hub_reachable, offline_hint

logger = logging.getLogger(__name__)


def _local_or_cached(name: str, flag: str = "--model_name_or_path") -> dict:
    """from_pretrained kwargs that fail fast offline instead of retrying for ~45 s."""
    if os.path.isdir(name):
        return {}
    if name.startswith((".", "/", "~")):
        raise UserError(f"model folder {name!r} does not exist; pass an existing folder to {flag} or a Hub id")
    return {} if hub_reachable() else {"local_files_only": True}


def load_processor(name_or_path: str) -> BlipProcessor:
    """BlipProcessor with the PIL image processor (torchvision is optional, so don't depend on it)."""
    kwargs = _local_or_cached(name_or_path)
    try:
        image_processor = BlipImageProcessorPil.from_pretrained(name_or_path, **kwargs)
        tokenizer = BertTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError:
        if kwargs.get("local_files_only"):
            raise UserError(offline_hint("model", name_or_path, "--model_name_or_path")) from None
        raise UserError(f"no BLIP processor (preprocessor_config.json, tokenizer files) found at {name_or_path!r}") from None
    return BlipProcessor(image_processor, tokenizer)


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> BlipForConditionalGeneration:
    kwargs = _local_or_cached(name_or_path)
    try:
        model = BlipForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except OSError:
        if kwargs.get("local_files_only"):
            raise UserError(offline_hint("model", name_or_path, "--model_name_or_path")) from None
        raise UserError(f"no BLIP captioning model (config.json + safetensors weights) found at {name_or_path!r}") from None
    # BLIP's forward takes **kwargs, so Trainer believes the model normalises the loss by
    # num_items_in_batch itself and skips dividing by gradient_accumulation_steps: the loss
    # and the gradients would grow with accumulation. This one flag is the whole patch.
    model.accepts_loss_kwargs = False
    return model


def create_lora_model(model, r: int = 32, alpha: int = 64, dropout: float = 0.05, target_modules="query,value"):
    """Wrap `model` with LoRA adapters; task_type stays unset (CAUSAL_LM breaks BLIP's forward)."""
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if isinstance(target_modules, str) else list(target_modules)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(f"--lora_target_modules {','.join(unknown)} match no module of this model; e.g. query,value,key,dense")
    model.accepts_loss_kwargs = False
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def load_lora_for_inference(adapter_dir: str, base_model: Optional[str] = None, merge: bool = True,
                            dtype: torch.dtype = torch.float32, device="cpu"):
    """Adapter folder -> (model in eval mode, processor). Merged into the base weights unless merge=False."""
    from peft import PeftModel

    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isdir(adapter_dir):
        raise UserError(f"adapter folder {adapter_dir!r} does not exist; train one with `python train.py` or pass --adapter")
    if not os.path.isfile(config_path):
        raise UserError(f"{adapter_dir!r} has no adapter_config.json; is it the output folder of train.py?")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors")):
        raise UserError(f"{adapter_dir!r} has no adapter_model.safetensors (only safetensors adapters are loaded)")
    with open(config_path) as f:
        base = base_model or json.load(f).get("base_model_name_or_path")
    saved = any(os.path.isfile(os.path.join(adapter_dir, f)) for f in ("processor_config.json", "preprocessor_config.json"))
    processor_dir = adapter_dir if saved else base
    processor = load_processor(processor_dir)
    model = load_base_model(base, dtype=dtype)
    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"adapter {adapter_dir!r} does not fit base model {base!r}: {first[:300]}") from None
    if merge:
        model = model.merge_and_unload()
    return model.to(device).eval(), processor


# ---------------------------------------------------------------------------
# Inference


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision encoder's last hidden state (B, 1 + patches, hidden): what the decoder attends to."""
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


@torch.no_grad()
def captions_from_embeddings(model, processor, image_embeds: torch.Tensor, max_new_tokens: int = 30,
                             num_beams: int = 1) -> list:
    """Greedy (or beam) captions from precomputed image embeddings, as BLIP's generate does them."""
    text_config = model.config.text_config
    batch = image_embeds.shape[0]
    input_ids = torch.full((batch, 1), text_config.bos_token_id, dtype=torch.long, device=image_embeds.device)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    out = model.text_decoder.generate(
        input_ids=input_ids,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
    )
    return [c.strip() for c in processor.batch_decode(out, skip_special_tokens=True)]


@torch.no_grad()
def generate_caption(model, processor, images: list, batch_size: int = 32, max_new_tokens: int = 30,
                     num_beams: int = 1) -> list:
    """Captions for a list of PIL images, batched."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    captions = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[start:start + batch_size], return_tensors="pt")["pixel_values"]
        embeds = image_embeddings(model, pixels.to(device, dtype))
        captions += captions_from_embeddings(model, processor, embeds, max_new_tokens, num_beams)
    return captions


# ---------------------------------------------------------------------------
# A tiny BLIP for offline demo and tests


def _word_pieces(word: str) -> list:
    """Long words become several word pieces, as in BERT's vocabulary (abyssinian -> abys ##sini ##an)."""
    if len(word) <= 7:
        return [word]
    return [word[:4]] + ["##" + word[i:i + 4] for i in range(4, len(word), 4)]


def build_tiny_blip(out_dir: str, words: list, image_size: int = 64, seed: int = 0) -> str:
    """Save a small random BLIP and an offline processor to `out_dir` in the real checkpoint format.

    The vocabulary covers `words` (lower-cased), so captions built from them tokenise without
    [UNK]. It loads through the same from_pretrained path as Salesforce/blip-image-captioning-base.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = list(specials)
    for w in sorted({w.lower() for w in words}):
        for piece in _word_pieces(w):
            if piece not in vocab:
                vocab.append(piece)
    for p in ".,'-":
        if p not in vocab:
            vocab.append(p)
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, bos_token="[DEC]", model_max_length=64)
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor, tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=vocab.index("[DEC]"),
                         sep_token_id=vocab.index("[SEP]"), pad_token_id=0, eos_token_id=vocab.index("[SEP]")),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=16, initializer_range=0.02),
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


DEMO_BREEDS = list(range(8))  # Abyssinian .. Beagle: 4 cats and 4 dogs, each a distinct colour


def prepare_demo(demo_dir: str, template: str):
    """(tiny model folder, synthetic data folder) under demo_dir, built once and reused."""
    import shutil
    import tempfile

    from data import BREED_NAMES, caption_for, write_synthetic_pets

    data_dir, model_dir = os.path.join(demo_dir, "pets"), os.path.join(demo_dir, "tiny-blip")
    os.makedirs(demo_dir, exist_ok=True)
    # Build in a temporary folder and rename, so an interrupted build is never reused half-written
    if not os.path.isfile(os.path.join(data_dir, "annotations", "list.txt")):
        tmp = tempfile.mkdtemp(dir=demo_dir)
        write_synthetic_pets(tmp, breeds=DEMO_BREEDS)
        shutil.rmtree(data_dir, ignore_errors=True)
        os.replace(tmp, data_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        words = " ".join(caption_for(i, template) for i in range(len(BREED_NAMES)))
        tmp = tempfile.mkdtemp(dir=demo_dir)
        build_tiny_blip(tmp, words.replace(",", " ").replace(".", " ").split() + ["cat", "dog"])
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    return model_dir, data_dir


# ---------------------------------------------------------------------------
# Cross-attention: where the caption decoder looks (explainability.py)
#
# generate(output_attentions=True) returns the decoder's self-attentions only. The maps come
# from a second, teacher-forced pass of the text decoder over the generated ids, whose output
# has one cross-attention tensor per layer, (B, heads, T, 1 + patches). Position 0 of the last
# axis is the vision CLS token; the rest is the patch grid, row-major. Row i is the query at
# token i, i.e. the step that predicts token i + 1.


def patch_grid(model) -> tuple:
    """(rows, cols) of the vision encoder's patch grid: 24x24 for the 384 px, patch 16 base model."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


@torch.no_grad()
def caption_ids_from_embeddings(model, image_embeds: torch.Tensor, max_new_tokens: int = 30, num_beams: int = 1):
    """Generated token ids (B, T), starting with bos [DEC], and a mask that ends after the first [SEP]."""
    text_config = model.config.text_config
    batch = image_embeds.shape[0]
    input_ids = torch.full((batch, 1), text_config.bos_token_id, dtype=torch.long, device=image_embeds.device)
    ids = model.text_decoder.generate(
        input_ids=input_ids,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
    )
    # Keep everything up to and including the first [SEP]; batch padding after it is masked out
    is_sep = (ids == text_config.sep_token_id).long()
    after_sep = (is_sep.cumsum(1) - is_sep) > 0
    return ids, (~after_sep).long()


@torch.no_grad()
def cross_attention_maps(model, pixel_values_or_embeds: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None, layers=None) -> torch.Tensor:
    """Decoder cross-attention over the image patches, (B, T, grid_rows, grid_cols), float32.

    Teacher-forced over `input_ids`; averaged over heads and the chosen `layers` (indices into the
    decoder's layers, negative allowed; None = all); the vision CLS token is dropped and each
    row renormalised, so every map is a distribution over patches (sums to 1). Row i is the
    attention of the step that predicts token i + 1.
    """
    embeds = pixel_values_or_embeds
    if embeds.dim() == 4:  # pixel values (B, 3, H, W)
        embeds = image_embeddings(model, embeds)
    num_layers = model.config.text_config.num_hidden_layers
    chosen = list(range(num_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not -num_layers <= i < num_layers]
    if not chosen or bad:
        raise UserError(f"--layers {bad or chosen} is out of range: the decoder has {num_layers} layers (0-{num_layers - 1}, or negative from the end)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = model.text_decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=embeds,
                             output_attentions=True, return_dict=True)
    if out.cross_attentions is None:
        raise RuntimeError("the text decoder returned no cross_attentions; it needs eager attention")
    attn = torch.stack([out.cross_attentions[i].float() for i in chosen]).mean(dim=(0, 2))  # (B, T, 1 + patches)
    patches = attn[..., 1:]
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    rows, cols = patch_grid(model)
    if patches.shape[-1] != rows * cols:
        raise RuntimeError(f"expected {rows}x{cols} patches from the model config, got {patches.shape[-1]}")
    return patches.reshape(*patches.shape[:2], rows, cols)
