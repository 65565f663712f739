"""The offline demo: synthetic pets in the official layout, a tiny pre-trained BLIP, and `--demo`'s set-up.

Used by the scripts' --demo flag, the tests and the benchmarks; the production modules never need it.
"""

import json
import math
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageDraw, ImageFilter
from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

from config import DEMO_DIR
from data import tokenize_captions
from labels import BREED_NAMES, BREEDS, NUM_BREEDS, OXFORD_PETS, PETS_TEMPLATE, SPECIES, article
from model import load_processor

# ---------------------------------------------------------------------------
# Synthetic pets in the official layout

# One colour per breed (cycled) and a pattern on top; the species differ in shape (_silhouette).
_PALETTE = [
    (220, 40, 40),
    (40, 90, 220),
    (40, 170, 60),
    (240, 200, 30),
    (150, 60, 190),
    (250, 130, 20),
    (30, 190, 200),
    (120, 70, 30),
    (240, 110, 180),
    (90, 90, 90),
]
_PATTERNS = ["solid", "stripes", "spots", "half"]
SPECIES_MARK = {"cat": (250, 250, 250), "dog": (25, 20, 20)}  # a cat's white chest, a dog's black ears and nose


def _look(label: int) -> tuple:
    """(colour, pattern) indices of breed `label`'s synthetic pets."""
    return label % len(_PALETTE), (label // len(_PALETTE)) % len(_PATTERNS)


def _silhouette(species: str, r: float, side: int) -> list:
    """(shapes, marks) of the pet around (0, 0), facing `side` (-1 left, 1 right): [(kind, points, line width)].

    The species differ in more than the ears, as real cats and dogs do: a dog stands on four legs, long,
    with a muzzle and a straight tail; a cat sits upright and round, with pointed ears and its tail
    curled up beside it. The marks, drawn over the coat in SPECIES_MARK's colour, are what a small
    network reads quickly (shape alone it did not learn in the pre-training's 300 steps): a cat's white
    chest, a dog's black ears and nose.
    """
    if species == "cat":
        hr, hx, hy = 0.6 * r, side * 0.25 * r, -1.25 * r
        tail = [
            (-side * 0.6 * r, 0.8 * r),
            (-side * 1.2 * r, 0.5 * r),
            (-side * 1.3 * r, -0.3 * r),
            (-side * r, -0.8 * r),
        ]
        chest = [("ellipse", [(side * 0.2 * r - 0.35 * r, -0.7 * r), (side * 0.2 * r + 0.35 * r, 0.3 * r)], 0)]
        return [
            ("ellipse", [(-0.8 * r, -0.85 * r), (0.8 * r, 0.95 * r)], 0),
            ("ellipse", [(hx - hr, hy - hr), (hx + hr, hy + hr)], 0),
            ("polygon", [(hx - hr, hy - 0.3 * hr), (hx - 0.6 * hr, hy - 1.9 * hr), (hx - 0.05 * hr, hy - 0.7 * hr)], 0),
            ("polygon", [(hx + hr, hy - 0.3 * hr), (hx + 0.6 * hr, hy - 1.9 * hr), (hx + 0.05 * hr, hy - 0.7 * hr)], 0),
            ("line", tail, max(2, round(0.16 * r))),
        ], chest
    hr, hx, hy, leg = 0.5 * r, side * 1.05 * r, -0.75 * r, 0.13 * r
    mx = hx + side * 0.9 * hr  # the muzzle's centre, ahead of the head
    shapes = [
        ("ellipse", [(-1.2 * r, -0.55 * r), (1.2 * r, 0.55 * r)], 0),
        ("ellipse", [(hx - hr, hy - hr), (hx + hr, hy + hr)], 0),
        ("ellipse", [(mx - 0.65 * hr, hy - 0.05 * hr), (mx + 0.65 * hr, hy + 0.6 * hr)], 0),
        ("line", [(-side * 1.1 * r, -0.2 * r), (-side * 1.65 * r, -0.8 * r)], max(2, round(0.14 * r))),
    ]
    shapes += [
        ("polygon", [(x - leg, 0.2 * r), (x + leg, 0.2 * r), (x + leg, 1.1 * r), (x - leg, 1.1 * r)], 0)
        for x in (-0.9 * r, -0.5 * r, 0.5 * r, 0.9 * r)
    ]
    nx = mx + side * 0.6 * hr  # the nose, at the muzzle's tip
    marks = [("ellipse", [(nx - 0.25 * hr, hy - 0.05 * hr), (nx + 0.25 * hr, hy + 0.4 * hr)], 0)]
    for s in (-1, 1):  # floppy ears, hanging down beside the head
        marks.append(
            (
                "polygon",
                [
                    (hx + s * 0.4 * hr, hy - 0.9 * hr),
                    (hx + s * 1.0 * hr, hy - 0.6 * hr),
                    (hx + s * 1.05 * hr, hy + 0.8 * hr),
                    (hx + s * 0.65 * hr, hy + 0.9 * hr),
                ],
                0,
            )
        )
    return shapes + marks, marks


def _draw_shapes(canvas, shapes: list, fill) -> None:
    d = ImageDraw.Draw(canvas)
    for kind, points, width in shapes:
        if kind == "ellipse":
            d.ellipse(points, fill=fill)
        elif kind == "polygon":
            d.polygon(points, fill=fill)
        else:
            d.line(points, fill=fill, width=width, joint="curve")


def _draw_pet(label: int, size: int, rng: random.Random, look=None):
    """(RGB image, pet mask) of one synthetic pet of breed `label`; look=(colour, pattern) indices replace its own."""
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    noise = np.asarray(image, dtype=np.int16) + np.random.default_rng(rng.randint(0, 2**31)).integers(
        -25, 26, (size, size, 3)
    )
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    colour_index, pattern_index = look or _look(label)
    color, pattern = _PALETTE[colour_index], _PATTERNS[pattern_index]
    r = rng.uniform(0.2, 0.27) * size
    shapes, marks = _silhouette(SPECIES[label], r, rng.choice([-1, 1]))
    xs = [x for _, points, _ in shapes for x, _ in points]
    ys = [y for _, points, _ in shapes for _, y in points]
    cx = rng.uniform(2 - min(xs), size - 2 - max(xs))
    cy = rng.uniform(2 - min(ys), size - 2 - max(ys))
    shapes, marks = (
        [(kind, [(x + cx, y + cy) for x, y in points], width) for kind, points, width in s] for s in (shapes, marks)
    )
    _draw_shapes(image, shapes, color)
    _draw_shapes(mask, shapes, 255)
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
    _draw_shapes(image, marks, SPECIES_MARK[SPECIES[label]])
    return image, mask


def write_synthetic_pets(
    root: str, breeds=None, trainval_per_breed: int = 30, test_per_breed: int = 10, size: int = 96, seed: int = 0
) -> str:
    """Write a synthetic Oxford-IIIT Pet in the official layout and return `root`.

    breeds: class indices to include (default: all 37). Pets differ visibly by breed
    (colour, pattern) and species (shape and marks, see _silhouette); trimaps mark pet (1), background (2), border (3).
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
    header = "\n".join(
        [
            "#Image CLASS-ID SPECIES BREED ID",
            "#ID: 1:37 Class ids",
            "#SPECIES: 1:Cat 2:Dog",
            "#BREED ID: 1-25:Dog 1:12:Cat",
            "#All images with 1st letter as captial are cat images",
            "#images with small first letter are dog images",
        ]
    )
    with open(os.path.join(root, "annotations", "list.txt"), "w") as f:
        f.write(header + "\n" + "\n".join(rows["trainval"] + rows["test"]) + "\n")
    for split, lines in rows.items():
        with open(os.path.join(root, "annotations", f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------
# Toy birds: a second synthetic data set, not pets, in the image-folder layout of CUB-200-2011

# (folder name as CUB numbers it, body colour, beak length, crest, tail length): told apart by colour and shape
TOY_BIRDS = [
    ("001.Northern_Cardinal", (200, 30, 30), 0.35, True, 0.9),
    ("002.Blue_Jay", (40, 90, 210), 0.35, True, 1.0),
    ("003.American_Goldfinch", (235, 205, 30), 0.3, False, 0.6),
    ("004.Common_Raven", (25, 25, 30), 0.6, False, 0.9),
    ("005.Snowy_Owl", (245, 245, 240), 0.15, False, 0.2),
    ("006.Ruby_throated_Hummingbird", (40, 160, 70), 1.0, False, 0.5),
]


def _draw_bird(kind: int, size: int, rng: random.Random) -> Image.Image:
    _, colour, beak, crest, tail = TOY_BIRDS[kind]
    bg = tuple(rng.randint(120, 230) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(image)
    r = rng.uniform(0.15, 0.2) * size
    side = rng.choice([-1, 1])
    cx, cy = rng.uniform(0.4, 0.6) * size, rng.uniform(0.45, 0.6) * size
    hx, hy, hr = cx + side * 1.0 * r, cy - 0.8 * r, 0.55 * r
    d.polygon(
        [
            (cx - side * 0.8 * r, cy),
            (cx - side * (0.8 + tail * 1.5) * r, cy - 0.3 * r),
            (cx - side * (0.8 + tail * 1.5) * r, cy + 0.4 * r),
        ],
        fill=colour,
    )  # tail
    d.ellipse([cx - 1.1 * r, cy - 0.7 * r, cx + 1.1 * r, cy + 0.7 * r], fill=colour)  # body
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=colour)  # head
    if crest:
        d.polygon(
            [(hx - 0.4 * hr, hy - 0.8 * hr), (hx - side * 0.6 * hr, hy - 2.0 * hr), (hx + 0.3 * hr, hy - 0.9 * hr)],
            fill=colour,
        )
    d.polygon(
        [
            (hx + side * 0.9 * hr, hy - 0.25 * hr),
            (hx + side * (0.9 + beak * 2.5) * hr, hy),
            (hx + side * 0.9 * hr, hy + 0.25 * hr),
        ],
        fill=(230, 150, 20),
    )  # beak
    d.ellipse(
        [hx + side * 0.2 * hr - 2, hy - 0.3 * hr - 2, hx + side * 0.2 * hr + 2, hy - 0.3 * hr + 2], fill=(0, 0, 0)
    )
    d.line([(cx - 0.2 * r, cy + 0.6 * r), (cx - 0.3 * r, cy + 1.3 * r)], fill=(60, 40, 20), width=2)  # legs
    d.line([(cx + 0.2 * r, cy + 0.6 * r), (cx + 0.3 * r, cy + 1.3 * r)], fill=(60, 40, 20), width=2)
    return image


def write_toy_birds(
    root: str,
    train_per_class: int = 20,
    test_per_class: int = 6,
    size: int = 64,
    split_folders: bool = True,
    seed: int = 0,
) -> str:
    """Write 6 synthetic bird species as an image folder (one folder per class, CUB-200-2011's numbered names)
    and return `root`: under train/ and test/ with split_folders, else all in one level."""
    rng = random.Random(seed)
    for kind, (folder, *_) in enumerate(TOY_BIRDS):
        for k in range(train_per_class + test_per_class):
            split = ("train" if k < train_per_class else "test") if split_folders else ""
            target = os.path.join(root, split, folder)
            os.makedirs(target, exist_ok=True)
            _draw_bird(kind, size, rng).save(
                os.path.join(target, f"{folder.split('.', 1)[1]}_{k + 1:04d}.jpg"), quality=92
            )
    return root


# ---------------------------------------------------------------------------
# The demo's processor: the real checkpoint's tokenizer, smaller images

REAL_PROCESSOR_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "blip-image-captioning-base"
)  # the checkpoint's small files (SOURCES.md there)


def real_processor(image_size: int = 64) -> BlipProcessor:
    """The real checkpoint's processor ([DEC]/[ENC] added, as load_processor does), its images resized to image_size."""
    processor = load_processor(REAL_PROCESSOR_DIR)
    processor.image_processor.size = {"height": image_size, "width": image_size}
    return processor


def _tiny_config(vocab_size: int, ids: dict, image_size: int, hidden: int, patch: int) -> BlipConfig:
    return BlipConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **ids,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch,
            initializer_range=0.02,
        ),
    )


def _token_ids(tokenizer) -> dict:
    # [SEP] ends a caption (the decoders stop on it); bos is [DEC], which load_processor added
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )


def build_tiny_blip(
    out_dir: str, image_size: int = 64, seed: int = 0, base_sized: bool = False, hidden: int = 32
) -> str:
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
# 75% of each batch pairs a synthetic pet with a generic caption: species, colour, pattern, background,
# never a breed. The pets (drawn with another seed than the demo's data set) are half cats, half dogs,
# each in a look drawn apart from its species, so only the shape and the marks tell the species, as in
# real photos; with each breed's own look the base would learn look -> species. 25% pairs a blank image
# with a text-only sentence that uses the breed names and the caption template, so every word the
# fine-tuned captions need has a trained embedding (as BERT-initialised BLIP has): LoRA on the frozen
# LM head cannot produce words whose embeddings were never trained.
# Pre-training runs on one thread whatever the caller's setting: CPU matrix products split their sums
# by thread, so another thread count rounds differently and the steps grow that into another model.
# The loss scores the vocabulary through SampledHead: the step was mostly the 30,524-row projection.
# The measurements behind each choice: benchmarks/results/README.md ("The demo base").

DEMO_BASE_RECIPE = {
    "recipe": 3,  # bump when the recipe changes: a base folder built by another recipe is rebuilt
    "data": 3,  # DEMO_DATA_RECIPE's: the drawing of its pre-training images
    "hidden": 128,
    "image_size": 64,
    "patch_size": 8,
    "images": 1480,
    "steps": 700,
    "batch": 12,
    "text_share": 0.25,
    "learning_rate": 3e-3,
    "seed": 1,
    "threads": 1,
    "negatives": 1024,
}
# The seed is a chosen one: the base's zero-shot species accuracy moves with it, and the demo must show a base
# that names the species as BLIP does (benchmarks/results/README.md)
RECIPE_FILE = "demo_recipe.json"
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "cyan", "brown", "pink", "grey"]  # _PALETTE's
_PATTERN_WORDS = {"solid": "", "stripes": "striped ", "spots": "spotted ", "half": "two-tone "}


def generic_captions(species: str, look: tuple) -> list:
    """Captions of a pet that name its species, colour and pattern, never a breed."""
    colour, pattern = _COLOURS[look[0]], _PATTERN_WORDS[_PATTERNS[look[1]]]
    return [
        f"a photo of a {species}.",
        f"a {pattern}{colour} {species}.",
        f"a photo of a {pattern}{colour} {species}.",
        f"a {colour} {species} on a light background.",
        f"a {species} on a light background.",
        f"a picture of a {species}.",
    ]


def text_only_sentences(template: str) -> list:
    """Sentences with every breed name and the caption template: text-only pre-training, on a blank image."""
    out = []
    for b in range(NUM_BREEDS):
        name = BREED_NAMES[b].lower()
        out += [
            OXFORD_PETS.caption(b, template),
            f"the {name} is a breed of {SPECIES[b]}.",
            f"{article(name)} {name} is a type of pet.",
            f"a photo of {article(name)} {name}.",
        ]
    return out


def _pixels(processor, images) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


class SampledHead:
    """The LM head's rows a pre-training step scores: every token the pre-training text uses, and
    `negatives` others drawn at random each step (sampled softmax).

    The full head is a 30,524-way projection, most of a step's work, for about 110 tokens the demo
    ever writes. The drawn rows stand for all the others: their logits get log(others / negatives)
    added, so the softmax sees about the mass the whole vocabulary would, and every unused token is
    pushed down now and then, as a full softmax pushes it down every step. negatives=None scores
    the full vocabulary.
    """

    def __init__(self, used_ids: torch.Tensor, vocab_size: int, negatives):
        self.negatives = negatives
        self.used = torch.unique(used_ids)
        unused = torch.ones(vocab_size, dtype=torch.bool)
        unused[self.used] = False
        self.unused = unused.nonzero().squeeze(1)
        self.position = torch.full((vocab_size,), -1, dtype=torch.long)  # token id -> column among the scored rows
        self.position[self.used] = torch.arange(len(self.used))

    def loss(self, head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = head.transform(hidden)
        if self.negatives is None:
            return torch.nn.functional.cross_entropy(head.decoder(hidden), targets)
        drawn = self.unused[torch.randperm(len(self.unused))[: self.negatives]]
        rows = torch.cat([self.used, drawn])
        logits = torch.nn.functional.linear(hidden, head.decoder.weight[rows], head.decoder.bias[rows])
        correction = torch.zeros(len(rows))
        correction[len(self.used) :] = math.log(len(self.unused) / len(drawn))
        return torch.nn.functional.cross_entropy(logits + correction, self.position[targets])


def _caption_loss(model, pixels, input_ids, mask, head: SampledHead) -> torch.Tensor:
    """BLIP's captioning loss, the LM head run on the real next-token targets only (not on padding), over
    the rows `head` picks."""
    embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    hidden = model.text_decoder.bert(
        input_ids=input_ids, attention_mask=mask, encoder_hidden_states=embeds, is_decoder=True, use_cache=False
    ).last_hidden_state
    scored = mask[:, 1:].bool()  # position i predicts token i + 1
    return head.loss(model.text_decoder.cls.predictions, hidden[:, :-1][scored], input_ids[:, 1:][scored])


def pretraining_text(template: str) -> list:
    """Every sentence the pre-training writes: the generic captions of each species and look, and the text-only ones."""
    looks = [(c, p) for c in range(len(_PALETTE)) for p in range(len(_PATTERNS))]
    return [c for s in ("cat", "dog") for look in looks for c in generic_captions(s, look)] + text_only_sentences(
        template
    )


def _pretraining_pets(n: int, rng: random.Random) -> list:
    """n (breed, look) pairs, alternately a cat and a dog of any breed, each in a random look."""
    by_species = {s: [b for b in range(NUM_BREEDS) if SPECIES[b] == s] for s in ("cat", "dog")}
    return [
        (rng.choice(by_species[("cat", "dog")[i % 2]]), (rng.randrange(len(_PALETTE)), rng.randrange(len(_PATTERNS))))
        for i in range(n)
    ]


def pretrain_demo_blip(out_dir: str, template: str, recipe: dict = None, show_progress: bool = True) -> str:
    """Build the demo base in `out_dir`: the tiny BLIP, pre-trained in full (seeded) on recipe["threads"]
    threads, and the real processor."""
    recipe = dict(DEMO_BASE_RECIPE if recipe is None else recipe, template=template)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    try:
        model, processor, loss = _pretrain(recipe, show_progress)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, RECIPE_FILE), "w") as f:
        json.dump({**recipe, "final_loss": round(loss, 4)}, f, indent=2)
    return out_dir


def _pretrain(recipe: dict, show_progress: bool) -> tuple:
    """(model, processor, last loss) of the recipe's pre-training."""
    from tqdm.auto import tqdm

    rng = random.Random(recipe["seed"] + 1)  # another seed than write_synthetic_pets' 0: unseen images
    torch.manual_seed(recipe["seed"])
    processor = real_processor(recipe["image_size"])
    tokenizer = processor.tokenizer
    config = _tiny_config(
        len(tokenizer), _token_ids(tokenizer), recipe["image_size"], recipe["hidden"], recipe["patch_size"]
    )
    model = BlipForConditionalGeneration(config)
    pets = _pretraining_pets(recipe["images"], rng)
    pixels = _pixels(processor, [_draw_pet(label, 96, rng, look)[0] for label, look in pets])
    blank = _pixels(processor, [Image.new("RGB", (96, 96), (128, 128, 128))])[0]
    sentences = text_only_sentences(recipe["template"])
    used, used_mask = tokenize_captions(
        tokenizer, pretraining_text(recipe["template"]), config.text_config.bos_token_id
    )
    # the tokens a step can have as targets: never bos (column 0), never padding
    head = SampledHead(used[:, 1:][used_mask[:, 1:].bool()], len(tokenizer), recipe["negatives"])
    # fused: one kernel over all parameters, 6x faster than the default per-tensor loop on a CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=0.0, fused=True)
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
        loss = _caption_loss(model, images, input_ids, mask, head)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), processor, loss.item()


def _recorded(folder: str, record_file: str, built_file: str) -> dict:
    """The recipe `folder` records in record_file ({} for none, or when built_file is missing: half-written)."""
    try:
        with open(os.path.join(folder, record_file)) as f:
            recipe = json.load(f)
    except (OSError, ValueError):
        return {}
    return recipe if isinstance(recipe, dict) and os.path.isfile(os.path.join(folder, built_file)) else {}


def built_by(model_dir: str) -> dict:
    """The recipe a demo base folder records ({} for none: an older random tiny-blip, or a half-written one)."""
    return _recorded(model_dir, RECIPE_FILE, "config.json")


def is_current_base(model_dir: str, template: str) -> bool:
    recipe = built_by(model_dir)
    return bool(recipe) and all(recipe.get(k) == v for k, v in {**DEMO_BASE_RECIPE, "template": template}.items())


DEMO_BREEDS = list(range(8))  # Abyssinian .. Beagle: 4 cats and 4 dogs, each a distinct colour
# How the demo's pets folder is drawn: bump "data" when _draw_pet or write_synthetic_pets changes, so a
# pets folder drawn before is redrawn (and the base, whose pre-training images it draws too, rebuilt)
DEMO_DATA_RECIPE = {"data": 3, "breeds": DEMO_BREEDS}
DATA_FILE = "demo_data.json"


def use_demo_assets(cfg, adapter_run=None) -> None:
    """--demo: point cfg at the demo base and the synthetic pets not given, built once (by one process).

    With an adapter (its run_record.AdapterRun), the base and data it was trained on come first where
    still on disk. Call it after every option check: building the base pre-trains it, about a minute on a CPU.
    """
    if adapter_run is not None:
        adapter_run.use_sources_on_disk(cfg)
    # None is "not given": no flag can type it. Only what is not given is built, so a run given both
    # writes nothing under DEMO_DIR
    with PartialState().main_process_first():
        if cfg.model_name_or_path is None:
            cfg.model_name_or_path = prepare_demo_base(DEMO_DIR, cfg.caption_template or PETS_TEMPLATE)
        if cfg.dataset is None:
            cfg.dataset = prepare_demo_data(DEMO_DIR)


def _replace_with(path: str, demo_dir: str, build) -> str:
    """Build into a temporary folder in demo_dir, then rename it to `path`: an interrupted build is never reused."""
    os.makedirs(demo_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=demo_dir)
    build(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def data_drawn_by(data_dir: str) -> dict:
    """The recipe a demo pets folder records ({} for none: drawn by an earlier version, or half-written)."""
    return _recorded(data_dir, DATA_FILE, os.path.join("annotations", "list.txt"))


def prepare_demo_data(demo_dir: str) -> str:
    """The synthetic pets folder under demo_dir; one that records another drawing (or none) is redrawn."""
    data_dir = os.path.join(demo_dir, "pets")
    if data_drawn_by(data_dir) != DEMO_DATA_RECIPE:

        def build(tmp):
            write_synthetic_pets(tmp, breeds=DEMO_DATA_RECIPE["breeds"])
            with open(os.path.join(tmp, DATA_FILE), "w") as f:
                json.dump(DEMO_DATA_RECIPE, f, indent=2)

        _replace_with(data_dir, demo_dir, build)
    return data_dir


def demo_base_dir(demo_dir: str, template: str) -> str:
    """Where the demo base pre-trained with `template` lives: a folder per template, so that building the base
    for another template never replaces the weights adapters were trained on."""
    import hashlib

    if template == PETS_TEMPLATE:
        return os.path.join(demo_dir, "tiny-blip")
    return os.path.join(demo_dir, f"tiny-blip-{hashlib.sha256(template.encode()).hexdigest()[:8]}")


def prepare_demo_base(demo_dir: str, template: str) -> str:
    """The demo base folder for `template` under demo_dir; one that records another recipe (or none: the random
    tiny-blip of earlier versions) is rebuilt, and adapters trained on the old one are then refused by its
    fingerprint (model.load_model_pair)."""
    model_dir = demo_base_dir(demo_dir, template)
    if not is_current_base(model_dir, template):
        _replace_with(model_dir, demo_dir, lambda tmp: pretrain_demo_blip(tmp, template))
    return model_dir
