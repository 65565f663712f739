"""The offline demo: synthetic pets in the official layout, a tiny random BLIP, and `--demo`'s set-up.

Used by the scripts' --demo flag, the tests and the benchmarks; the production modules never need it.
"""

import os
import random
import shutil
import tempfile

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageDraw, ImageFilter
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
from transformers.models.blip import BlipImageProcessorPil

from config import DEMO_DIR
from data import BREED_NAMES, BREEDS, NUM_BREEDS, SPECIES, caption_for


# ---------------------------------------------------------------------------
# Synthetic pets in the official layout

# One colour per breed (cycled) and a pattern on top; cats get pointed ears, dogs floppy ones.
_PALETTE = [
    (220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 30), (150, 60, 190),
    (250, 130, 20), (30, 190, 200), (120, 70, 30), (240, 110, 180), (90, 90, 90),
]
_PATTERNS = ["solid", "stripes", "spots", "half"]


def _draw_pet(label: int, size: int, rng: random.Random):
    """(RGB image, pet mask) of one synthetic pet of breed `label`."""
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    noise = np.asarray(image, dtype=np.int16) + np.random.default_rng(rng.randint(0, 2**31)).integers(-25, 26, (size, size, 3))
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    color = _PALETTE[label % len(_PALETTE)]
    pattern = _PATTERNS[(label // len(_PALETTE)) % len(_PATTERNS)]
    r = rng.uniform(0.22, 0.32) * size
    cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 0.2 * size, size - r - 2)
    body = [cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r]
    hr = 0.55 * r
    hx, hy = cx + rng.choice([-0.6, 0.6]) * r, cy - 0.9 * r
    head = [hx - hr, hy - hr, hx + hr, hy + hr]
    if SPECIES[label] == "cat":
        ears = [[(hx - hr, hy - 0.3 * hr), (hx - 0.5 * hr, hy - 1.8 * hr), (hx, hy - 0.6 * hr)],
                [(hx + hr, hy - 0.3 * hr), (hx + 0.5 * hr, hy - 1.8 * hr), (hx, hy - 0.6 * hr)]]
    else:
        ears = [[(hx - 1.3 * hr, hy - 0.4 * hr), (hx - 0.7 * hr, hy - 0.6 * hr), (hx - 0.8 * hr, hy + 0.9 * hr)],
                [(hx + 1.3 * hr, hy - 0.4 * hr), (hx + 0.7 * hr, hy - 0.6 * hr), (hx + 0.8 * hr, hy + 0.9 * hr)]]
    for canvas, fill in ((image, color), (mask, 255)):
        d = ImageDraw.Draw(canvas)
        d.ellipse(body, fill=fill)
        d.ellipse(head, fill=fill)
        for ear in ears:
            d.polygon(ear, fill=fill)
    dark = tuple(c // 3 for c in color)
    pet = Image.new("RGB", (size, size), dark)
    d = ImageDraw.Draw(pet)
    if pattern == "stripes":
        d.rectangle([0, 0, size, size], fill=color)
        for x in range(0, size, max(3, size // 12)):
            d.rectangle([x, 0, x + max(1, size // 36), size], fill=dark)
    elif pattern == "spots":
        d.rectangle([0, 0, size, size], fill=color)
        for _ in range(12):
            x, y, s = rng.uniform(0, size), rng.uniform(0, size), size / 20
            d.ellipse([x - s, y - s, x + s, y + s], fill=dark)
    elif pattern == "half":
        d.rectangle([0, 0, size, size], fill=color)
        d.rectangle([0, cy, size, size], fill=dark)
    if pattern != "solid":
        image.paste(pet, (0, 0), mask)
    return image, mask


def write_synthetic_pets(root: str, breeds=None, trainval_per_breed: int = 30, test_per_breed: int = 10,
                         size: int = 96, seed: int = 0) -> str:
    """Write a synthetic Oxford-IIIT Pet in the official layout and return `root`.

    breeds: class indices to include (default: all 37). Pets differ visibly by breed
    (colour, pattern) and species (ear shape); trimaps mark pet (1), background (2), border (3).
    """
    breeds = list(range(NUM_BREEDS)) if breeds is None else list(breeds)
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", "trimaps"), exist_ok=True)
    rows = {"trainval": [], "test": []}
    for label in breeds:
        for k in range(1, trainval_per_breed + test_per_breed + 1):
            name = f"{BREEDS[label]}_{k}"
            image, mask = _draw_pet(label, size, rng)
            image.save(os.path.join(root, "images", f"{name}.jpg"), quality=92)
            inner = mask.filter(ImageFilter.MinFilter(3))
            outer = mask.filter(ImageFilter.MaxFilter(3))
            trimap = np.full((size, size), 2, np.uint8)
            trimap[np.asarray(outer) > 0] = 3
            trimap[np.asarray(inner) > 0] = 1
            Image.fromarray(trimap).save(os.path.join(root, "annotations", "trimaps", f"{name}.png"))
            species_id = 1 if SPECIES[label] == "cat" else 2
            same_species = [b for b in range(NUM_BREEDS) if SPECIES[b] == SPECIES[label]]
            line = f"{name} {label + 1} {species_id} {same_species.index(label) + 1}"
            rows["trainval" if k <= trainval_per_breed else "test"].append(line)
    header = "\n".join(["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog",
                        "#BREED ID: 1-25:Dog 1:12:Cat", "#All images with 1st letter as captial are cat images",
                        "#images with small first letter are dog images"])
    with open(os.path.join(root, "annotations", "list.txt"), "w") as f:
        f.write(header + "\n" + "\n".join(rows["trainval"] + rows["test"]) + "\n")
    for split, lines in rows.items():
        with open(os.path.join(root, "annotations", f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------
# A tiny BLIP for offline demo and tests


def _word_pieces(word: str) -> list:
    """Long words become several word pieces, as in BERT's vocabulary (abyssinian -> abys ##sini ##an)."""
    if len(word) <= 7:
        return [word]
    return [word[:4]] + ["##" + word[i:i + 4] for i in range(4, len(word), 4)]


def build_tiny_blip(out_dir: str, words: list, image_size: int = 64, seed: int = 0, base_sized: bool = False) -> str:
    """Save a small random BLIP and an offline processor to `out_dir` in the real checkpoint format.

    The vocabulary covers `words` (lower-cased), so captions built from them tokenise without
    [UNK]. It loads through the same from_pretrained path as Salesforce/blip-image-captioning-base.
    base_sized=True gives the shapes of blip-image-captioning-base instead (224M parameters,
    384 px, a 30,524-token vocabulary padded with [unusedN]), random weights: for benchmarks.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(specials)
    for w in sorted({w.lower() for w in words}):
        for piece in _word_pieces(w):
            if piece not in vocab:
                vocab.append(piece)
    for p in ".,'-":
        if p not in vocab:
            vocab.append(p)
    if base_sized:
        image_size = 384
        vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    # Like the real checkpoint's files: no bos token, no [DEC]. load_processor adds [DEC] and [ENC]
    # as the next two ids, which the model's vocabulary (two larger) and bos_token_id expect.
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=64)
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor, tokenizer)
    ids = dict(bos_token_id=len(vocab), sep_token_id=vocab.index("[SEP]"), pad_token_id=0,
               eos_token_id=vocab.index("[SEP]"))
    if base_sized:  # the base checkpoint's shapes from a config (vocabulary 30,524, bos 30522)
        config = BlipConfig(text_config=dict(num_attention_heads=12, **ids), vision_config=dict(initializer_range=0.02))
    else:
        config = BlipConfig(
            text_config=dict(vocab_size=len(vocab) + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, **ids),
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               image_size=image_size, patch_size=16, initializer_range=0.02),
        )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


DEMO_BREEDS = list(range(8))  # Abyssinian .. Beagle: 4 cats and 4 dogs, each a distinct colour


def use_demo_assets(cfg) -> None:
    """--demo: point cfg at the tiny model and the synthetic pets, built once (by one process)."""
    with PartialState().main_process_first():
        model_dir, data_dir = prepare_demo(DEMO_DIR, cfg.caption_template)
    # None is "not given": no flag can type it
    cfg.model_name_or_path = cfg.model_name_or_path or model_dir
    cfg.dataset = cfg.dataset or data_dir


def prepare_demo(demo_dir: str, template: str):
    """(tiny model folder, synthetic data folder) under demo_dir, built once and reused."""
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
