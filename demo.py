"""The offline demo: synthetic pets in the official layout, a tiny pre-trained BLIP, and `--demo`'s set-up.

Used by the scripts' --demo flag, the tests and the benchmarks; the production modules never need it.
"""

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageDraw, ImageFilter
from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

from breeds import BREED_NAMES, BREEDS, NUM_BREEDS, SPECIES, article, caption_for
from config import DEMO_DIR
from data import tokenize_captions
from model import load_processor

# ---------------------------------------------------------------------------
# Synthetic pets in the official layout

# One colour per breed (cycled) and a pattern on top; cats get pointed ears, dogs floppy ones.
_PALETTE = [
    (220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 30), (150, 60, 190),
    (250, 130, 20), (30, 190, 200), (120, 70, 30), (240, 110, 180), (90, 90, 90),
]
_PATTERNS = ["solid", "stripes", "spots", "half"]


def _look(label: int) -> tuple:
    """(colour, pattern) indices of breed `label`'s synthetic pets."""
    return label % len(_PALETTE), (label // len(_PALETTE)) % len(_PATTERNS)


def _draw_pet(label: int, size: int, rng: random.Random, look=None):
    """(RGB image, pet mask) of one synthetic pet of breed `label`; look=(colour, pattern) indices overrides its look."""
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    noise = np.asarray(image, dtype=np.int16) + np.random.default_rng(rng.randint(0, 2**31)).integers(-25, 26, (size, size, 3))
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    colour_index, pattern_index = look or _look(label)
    color, pattern = _PALETTE[colour_index], _PATTERNS[pattern_index]
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
# The demo's processor: the real checkpoint's tokenizer, smaller images

REAL_PROCESSOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fixtures",
                                  "blip-image-captioning-base")  # the checkpoint's small files (SOURCES.md there)


def real_processor(image_size: int = 64) -> BlipProcessor:
    """The real checkpoint's processor ([DEC]/[ENC] added, as load_processor does), its images resized to image_size."""
    processor = load_processor(REAL_PROCESSOR_DIR)
    processor.image_processor.size = {"height": image_size, "width": image_size}
    return processor


def _tiny_config(vocab_size: int, ids: dict, image_size: int, hidden: int, patch: int) -> BlipConfig:
    return BlipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, **ids),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch, initializer_range=0.02),
    )


def _token_ids(tokenizer) -> dict:
    # [SEP] ends a caption (the decoders stop on it); bos is [DEC], which load_processor added
    return dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)


def build_tiny_blip(out_dir: str, image_size: int = 64, seed: int = 0, base_sized: bool = False,
                    hidden: int = 32) -> str:
    """Save a small RANDOM BLIP with the real checkpoint's processor to `out_dir`, in the checkpoint's format.

    For tests that need a model of the right kind, not a trained one. The vocabulary is the real
    one (30,524 with [DEC]/[ENC]); hidden 32 keeps its 30,524-row embedding and LM head cheap.
    base_sized=True gives the shapes of blip-image-captioning-base instead (224M parameters,
    384 px), random weights: for benchmarks.
    """
    processor = real_processor(384 if base_sized else image_size)
    tokenizer = processor.tokenizer
    ids = _token_ids(tokenizer)
    if base_sized:  # the base checkpoint's shapes from a config (vocabulary 30,524, bos 30522)
        config = BlipConfig(text_config=dict(num_attention_heads=12, **ids), vision_config=dict(initializer_range=0.02))
    else:
        config = _tiny_config(len(tokenizer), ids, image_size, hidden, patch=16)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------
# The demo's base: a tiny BLIP pre-trained in full on generic captions, as BLIP was on web captions
#
# 75% of each batch pairs a synthetic pet (of any of the 37 breeds' looks, drawn with another seed
# than the demo's data set) with a generic caption: species, colour, pattern, background, never a
# breed. 25% pairs a blank image with a text-only sentence that uses the breed names and the
# caption template, so every word the fine-tuned captions need has a trained embedding (as
# BERT-initialised BLIP has); without them LoRA on the frozen LM head cannot produce breed words.

DEMO_BASE_RECIPE = {
    "recipe": 1,  # bump when the recipe changes: a base folder built by another recipe is rebuilt
    "hidden": 128, "image_size": 64, "patch_size": 8, "images": 1480, "steps": 300, "batch": 32,
    "text_share": 0.25, "learning_rate": 3e-3, "seed": 0,
}
RECIPE_FILE = "demo_recipe.json"
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "cyan", "brown", "pink", "grey"]  # _PALETTE's
_PATTERN_WORDS = {"solid": "", "stripes": "striped ", "spots": "spotted ", "half": "two-tone "}


def generic_captions(species: str, look: tuple) -> list:
    """Captions of a pet that name its species, colour and pattern, never a breed."""
    colour, pattern = _COLOURS[look[0]], _PATTERN_WORDS[_PATTERNS[look[1]]]
    return [f"a photo of a {species}.", f"a {pattern}{colour} {species}.", f"a photo of a {pattern}{colour} {species}.",
            f"a {colour} {species} on a light background.", f"a {species} on a light background.",
            f"a picture of a {species}."]


def text_only_sentences(template: str) -> list:
    """Sentences with every breed name and the caption template: text-only pre-training, on a blank image."""
    out = []
    for b in range(NUM_BREEDS):
        name = BREED_NAMES[b].lower()
        out += [caption_for(b, template), f"the {name} is a breed of {SPECIES[b]}.",
                f"{article(name)} {name} is a type of pet.", f"a photo of {article(name)} {name}."]
    return out


def _pixels(processor, images) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _caption_loss(model, pixels, input_ids, mask) -> torch.Tensor:
    """BLIP's captioning loss, with the LM head (a 30,524-way projection: most of the step) run on the real
    next-token targets only, not on padding."""
    embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    hidden = model.text_decoder.bert(input_ids=input_ids, attention_mask=mask, encoder_hidden_states=embeds,
                                     is_decoder=True, use_cache=False).last_hidden_state
    scored = mask[:, 1:].bool()  # position i predicts token i + 1
    logits = model.text_decoder.cls(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits, input_ids[:, 1:][scored])


def pretrain_demo_blip(out_dir: str, template: str, recipe: dict = None, show_progress: bool = True) -> str:
    """Build the demo's base in `out_dir`: the tiny BLIP, pre-trained in full (seeded), and the real processor."""
    from tqdm.auto import tqdm

    recipe = dict(DEMO_BASE_RECIPE if recipe is None else recipe, template=template)
    rng = random.Random(recipe["seed"] + 1)  # another seed than write_synthetic_pets' 0: unseen images
    torch.manual_seed(recipe["seed"])
    processor = real_processor(recipe["image_size"])
    tokenizer = processor.tokenizer
    config = _tiny_config(len(tokenizer), _token_ids(tokenizer), recipe["image_size"], recipe["hidden"],
                          recipe["patch_size"])
    model = BlipForConditionalGeneration(config)
    pets = [(b, _look(b)) for b in range(NUM_BREEDS) for _ in range(recipe["images"] // NUM_BREEDS)]
    pixels = _pixels(processor, [_draw_pet(label, 96, rng, look)[0] for label, look in pets])
    blank = _pixels(processor, [Image.new("RGB", (96, 96), (128, 128, 128))])[0]
    sentences = text_only_sentences(template)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=0.0)
    steps, batch = recipe["steps"], recipe["batch"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    n_text = round(batch * recipe["text_share"])
    bar = tqdm(range(steps), desc="pre-training the demo base", disable=not show_progress)
    for _ in bar:
        chosen = [rng.randrange(len(pets)) for _ in range(batch - n_text)]
        captions = [rng.choice(generic_captions(SPECIES[pets[i][0]], pets[i][1])) for i in chosen]
        captions += rng.choices(sentences, k=n_text)
        images = torch.cat([pixels[chosen], blank.expand(n_text, -1, -1, -1)])
        input_ids, mask = tokenize_captions(tokenizer, captions, config.text_config.bos_token_id)
        loss = _caption_loss(model, images, input_ids, mask)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, RECIPE_FILE), "w") as f:
        json.dump({**recipe, "final_loss": round(loss.item(), 4)}, f, indent=2)
    return out_dir


def built_by(model_dir: str) -> dict:
    """The recipe a demo base folder records ({} for none: an older random tiny-blip, or a half-written one)."""
    try:
        with open(os.path.join(model_dir, RECIPE_FILE)) as f:
            recipe = json.load(f)
    except (OSError, ValueError):
        return {}
    return recipe if isinstance(recipe, dict) and os.path.isfile(os.path.join(model_dir, "config.json")) else {}


def is_current_base(model_dir: str, template: str) -> bool:
    recipe = built_by(model_dir)
    return bool(recipe) and all(recipe.get(k) == v for k, v in {**DEMO_BASE_RECIPE, "template": template}.items())


DEMO_BREEDS = list(range(8))  # Abyssinian .. Beagle: 4 cats and 4 dogs, each a distinct colour


def use_demo_assets(cfg) -> None:
    """--demo: point cfg at the demo base and the synthetic pets, built once (by one process)."""
    with PartialState().main_process_first():
        model_dir, data_dir = prepare_demo(DEMO_DIR, cfg.caption_template)
    # None is "not given": no flag can type it
    cfg.model_name_or_path = cfg.model_name_or_path or model_dir
    cfg.dataset = cfg.dataset or data_dir


def prepare_demo(demo_dir: str, template: str):
    """(demo base folder, synthetic data folder) under demo_dir, built once and reused.

    A base folder that records another recipe or template (or none: the random tiny-blip of
    earlier versions) is rebuilt.
    """
    data_dir, model_dir = os.path.join(demo_dir, "pets"), os.path.join(demo_dir, "tiny-blip")
    os.makedirs(demo_dir, exist_ok=True)
    # Build in a temporary folder and rename, so an interrupted build is never reused half-written
    if not os.path.isfile(os.path.join(data_dir, "annotations", "list.txt")):
        tmp = tempfile.mkdtemp(dir=demo_dir)
        write_synthetic_pets(tmp, breeds=DEMO_BREEDS)
        shutil.rmtree(data_dir, ignore_errors=True)
        os.replace(tmp, data_dir)
    if not is_current_base(model_dir, template):
        tmp = tempfile.mkdtemp(dir=demo_dir)
        pretrain_demo_blip(tmp, template)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    return model_dir, data_dir
