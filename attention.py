"""Where the caption decoder looks: cross-attention maps, the caption's words and subject, overlays.

Used by explainability.py (figures and metrics) and app.py (one heat map per answer).
"""

import logging
import re
from typing import Optional

import cv2
import numpy as np
import torch

from data import BadImage, load_trimap
from inference import caption_ids_from_embeddings, decoding_options, image_embeddings
from labels import LabelSet, normalise_text
from run_io import UserError

logger = logging.getLogger(__name__)

MAX_OTHER_WORDS = 6  # word panels per row besides the breed, so a figure stays readable


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
def cross_attention_maps(
    model,
    pixel_values_or_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    layers=None,
) -> torch.Tensor:
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
        raise UserError(
            f"--layers {bad or chosen} is out of range: the decoder has {num_layers} layers "
            f"(0-{num_layers - 1}, or negative from the end)"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = model.text_decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=embeds,
        output_attentions=True,
        return_dict=True,
    )
    if out.cross_attentions is None:
        raise RuntimeError("the text decoder returned no cross_attentions; it needs eager attention")
    attn = torch.stack([out.cross_attentions[i].float() for i in chosen]).mean(dim=(0, 2))  # (B, T, 1 + patches)
    patches = attn[..., 1:]
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    rows, cols = patch_grid(model)
    if patches.shape[-1] != rows * cols:
        raise RuntimeError(f"expected {rows}x{cols} patches from the model config, got {patches.shape[-1]}")
    return patches.reshape(*patches.shape[:2], rows, cols)


STOPWORDS = {"a", "an", "the", "of", "on", "in", "with", "and", "is", "are", "to", "at", "its", "it", "this", "that"}
PET_WORDS = {"pet", "pets", "animal"}  # for Oxford-IIIT Pet, what else names the subject besides cat and dog words


def subject_words(labels: LabelSet) -> tuple:
    """(words that name the subject when no class is named, what such a subject is called in the outputs)."""
    if labels.is_pets:
        return labels.group_words_flat() | PET_WORDS, "animal"
    return labels.group_words_flat(), labels.group_kind


def word_spans(tokens: list, special: set) -> list:
    """[(word, start, end)]: word pieces (##xx) joined to their word; token positions [start, end)."""
    words = []
    for i, tok in enumerate(tokens):
        if tok is None or tok in special:  # None: an id the tokenizer does not know
            continue
        if tok.startswith("##") and words and words[-1][2] == i:
            word, start, _ = words[-1]
            words[-1] = (word + tok[2:], start, i + 1)
        else:
            words.append((tok, i, i + 1))
    return words


def _is_word(text: str) -> bool:
    return bool(re.search(r"[a-z0-9]", text.lower()))


def subject_span(words: list, labels: LabelSet):
    """(first word, end word, kind) of what the caption says the subject is.

    kind labels.kind ("breed" for pets): the longest run of words that is a class name or alias (plural
    allowed); else a group word (kind "animal" for pets: cat, dog, puppy, pet, ...); else None.
    """
    phrases = dict(labels.phrases)
    longest = max((len(p.split()) for p in phrases), default=1)
    # the caption's words may also hold a "-" or "'" between a name's words
    for n in range(min(longest + 2, len(words)), 0, -1):
        for s in range(len(words) - n + 1):
            run = words[s : s + n]
            if not (_is_word(run[0][0]) and _is_word(run[-1][0])):
                continue
            text = normalise_text(" ".join(w for w, _, _ in run)).strip()
            if any(t in phrases for t in (text, re.sub(r"e?s$", "", text))):
                return s, s + n, labels.kind
    group_words, group_kind = subject_words(labels)
    for s, (w, _, _) in enumerate(words):
        if normalise_text(w).strip() in group_words:
            return s, s + 1, group_kind
    return None


def span_map(maps: np.ndarray, start: int, end: int) -> np.ndarray:
    """Map of the tokens at positions [start, end): the mean of the steps that predict them.

    maps[i] is the attention of the query at token i, which predicts token i + 1, so token j
    was written by step j - 1. The mean of distributions is a distribution.
    """
    return maps[start - 1 : end - 1].mean(axis=0)


def pet_share(grid_map: np.ndarray, mask: np.ndarray):
    """(share of the attention inside the pet, share of the image the pet covers).

    The mask (H, W, bool) is averaged over each patch's area, so a patch half on the pet counts half.
    """
    rows, cols = grid_map.shape
    fraction = cv2.resize(mask.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA)
    return float((grid_map * fraction).sum() / grid_map.sum()), float(mask.mean())


def pointing_hit(grid_map: np.ndarray, mask: np.ndarray) -> bool:
    """Pointing game: is the centre of the most-attended patch on the pet?"""
    rows, cols = grid_map.shape
    r, c = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    h, w = mask.shape
    return bool(mask[min(h - 1, int((r + 0.5) * h / rows)), min(w - 1, int((c + 0.5) * w / cols))])


def load_pet_mask(trimap_path: str, size):
    """Pet mask from an official trimap (1 pet, 2 background, 3 border): pet and its border band.

    None, with a warning, for an unreadable trimap. One of another size than the image is resized to it,
    with a warning: the official trimaps match their images, so a mismatch may mean the wrong trimap.
    """
    try:
        trimap = load_trimap(trimap_path)
    except BadImage as e:
        logger.warning("not scoring against an unreadable trimap: %s", e)
        return None
    mask = trimap != 2
    if mask.shape != (size[1], size[0]):
        logger.warning(
            "trimap %s is %dx%d, its image %dx%d: resized to the image",
            trimap_path,
            mask.shape[1],
            mask.shape[0],
            size[0],
            size[1],
        )
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


def overlay(image: np.ndarray, grid_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The patch map upsampled to the image (H, W, 3 uint8 RGB), coloured with JET, blended in."""
    h, w = image.shape[:2]
    heat = np.clip(cv2.resize(grid_map.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC), 0, None)
    # Each panel stretched to its own range (min blue, max red); the title gives the contrast
    heat = (heat - heat.min()) / (heat.max() - heat.min()) if heat.max() > heat.min() else np.zeros_like(heat)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return cv2.addWeighted(image, 1 - alpha, np.ascontiguousarray(colour), alpha, 0)


@torch.no_grad()
def explain(model, processor, embeds, cfg, layers, labels: LabelSet) -> list:
    """Per image: caption, word panels [(label, grid map)], subject (kind, map) from one model."""
    ids, mask = caption_ids_from_embeddings(model, embeds, **decoding_options(cfg))
    maps = cross_attention_maps(model, embeds, ids, mask, layers).cpu().numpy()
    special = set(processor.tokenizer.all_special_tokens)
    results = []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        tokens = processor.tokenizer.convert_ids_to_tokens(ids[b, :n].tolist())
        words = word_spans(tokens, special)
        subject = subject_span(words, labels)
        panels, subject_map, kind = [], None, None
        if subject is not None:
            s, e, kind = subject
            subject_map = span_map(maps[b], words[s][1], words[e - 1][2])
            panels.append((f"{kind}: {' '.join(w for w, _, _ in words[s:e])}", subject_map))
        skip = set(range(subject[0], subject[1])) if subject else set()
        for k, (w, start, end) in enumerate(words):
            if k not in skip and _is_word(w) and w.lower() not in STOPWORDS and len(panels) <= MAX_OTHER_WORDS:
                panels.append((w, span_map(maps[b], start, end)))
        caption = processor.tokenizer.decode(ids[b, :n].tolist(), skip_special_tokens=True).strip()
        results.append({"caption": caption, "panels": panels, "subject_map": subject_map, "subject_kind": kind})
    return results
