"""Oxford-IIIT Pet: sources, splits, records, image decoding, the captioning dataset and collator, image batches.

source (official-layout folder | save_to_disk folder | folder of data files | Hub id: SOURCES)
  -> load_splits() -> {"train", "validation", "test"}: lists of Record(image_id, label, source)
  -> PetCaptionDataset (image -> pixel_values, label -> caption) -> CaptionCollator -> batch
(the breeds and their captions are breeds.py; the cached image embeddings embedding_cache.py)
"""

import functools
import io
import logging
import os
import random
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from breeds import NUM_BREEDS, breed_index, caption_for
from devices import device_setting
from run_io import UserError, hub_reachable, is_local, offline_hint

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Records and images


@dataclass
class Record:
    image_id: str
    label: int
    source: Any  # a file path, or (datasets.Dataset, row) for Hub and save_to_disk sources
    trimap: Optional[str] = None  # path of the official trimap (1 pet, 2 background, 3 border)
    uid: Optional[str] = None  # what tells images apart where image_id may not: a `path` column's full path

    @property
    def identity(self) -> str:
        """The same image in two splits has the same identity; two images never do (cats/1.jpg, dogs/1.jpg)."""
        return self.uid or self.image_id


class BadImage(Exception):
    pass


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB from any mode the real data set has: RGBA, LA, P, L, I;16, CMYK."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float images: scale to 8 bits instead of clipping at 255
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels often hold black RGB: composite on white, as a viewer shows them
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _open(src) -> Image.Image:
    """Open (not decode) an image from a path, a PIL image, or a (datasets.Dataset, row) cell."""
    if isinstance(src, tuple):
        dataset, row = src
        src = dataset[row]["image"]
        if isinstance(src, dict):  # datasets' undecoded Image value
            src = io.BytesIO(src["bytes"]) if src.get("bytes") else src.get("path")
    if isinstance(src, Image.Image):
        return src
    if not isinstance(src, (str, os.PathLike, io.BytesIO)):  # a None cell, a number in the image column
        raise ValueError(f"the image cell holds {type(src).__name__}, not an image")
    return Image.open(src)


def decode_image(src) -> Image.Image:
    """Open and decode, as PIL gives it; DecompressionBombWarning is an error (PIL warns in open AND in load)."""
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises at twice that, both in open() and in load(): both are bad
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(src)
        image.load()  # decode now, so truncated files fail here and not inside a batch
    return image


_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def load_image(record: Record) -> Image.Image:
    """Decoded RGB image, or BadImage with the reason."""
    try:
        return to_rgb(decode_image(record.source))
    except _IMAGE_ERRORS as e:
        raise BadImage(f"{record.image_id}: {type(e).__name__}: {e}") from e


def load_trimap(path: str) -> np.ndarray:
    """An official trimap as a 2-D uint8 array (1 pet, 2 background, 3 border), or BadImage."""
    try:
        trimap = np.asarray(decode_image(path))
    except _IMAGE_ERRORS as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from e
    return trimap[..., 0] if trimap.ndim == 3 else trimap


# ---------------------------------------------------------------------------
# Sources


def _is_official_layout(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "annotations", "list.txt"))


def _is_save_to_disk(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


# An image name is a plain file name: no folders, no "..", nothing that reads outside images/
_IMAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def _read_text(path: str) -> str:
    """An annotation file as text: UTF-8 (the official files), UTF-16 with a BOM, or else Latin-1 with a warning."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        logger.warning("%s is not UTF-8; read as Latin-1", path)
        return raw.decode("latin-1")


def _read_official_list(path: str):
    """Lines 'NAME CLASS-ID SPECIES BREED-ID' -> {name: label}; bad lines are counted and reported.

    Skipped: malformed lines, unknown class ids, names that are not plain file names (../x, /abs),
    and names listed twice with different labels (which one is right cannot be known).
    """
    labels, bad, conflicting = {}, [], set()
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            class_id = int(parts[1])
            if not 1 <= class_id <= NUM_BREEDS or not _IMAGE_NAME.fullmatch(parts[0]):
                raise ValueError
        except (IndexError, ValueError):
            bad.append(f"{os.path.basename(path)}:{n}")
            continue
        if labels.get(parts[0], class_id - 1) != class_id - 1:
            conflicting.add(parts[0])
        labels[parts[0]] = class_id - 1
    if bad:
        logger.warning(
            "Skipped %d malformed annotation lines, unknown class ids or unsafe names (first: %s)",
            len(bad),
            ", ".join(bad[:5]),
        )
    if conflicting:
        logger.warning(
            "Skipped %d images listed twice with different labels in %s (first: %s)",
            len(conflicting),
            os.path.basename(path),
            ", ".join(sorted(conflicting)[:5]),
        )
    return {name: label for name, label in labels.items() if name not in conflicting}


def load_official_layout(root: str) -> dict:
    """The official release: images/, annotations/{list,trainval,test}.txt, annotations/trimaps/."""
    ann = os.path.join(root, "annotations")
    labels = _read_official_list(os.path.join(ann, "list.txt"))
    splits, missing, conflicts = {}, [], []
    for split, fname in (("trainval", "trainval.txt"), ("test", "test.txt")):
        path = os.path.join(ann, fname)
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: the official layout needs annotations/trainval.txt and test.txt")
        records = []
        for name, label in _read_official_list(path).items():
            image = os.path.join(root, "images", f"{name}.jpg")
            if not os.path.isfile(image):
                missing.append(name)
                continue
            if labels.get(name, label) != label:
                conflicts.append(name)
                continue
            trimap = os.path.join(ann, "trimaps", f"{name}.png")
            records.append(Record(name, label, image, trimap if os.path.isfile(trimap) else None))
        splits[split] = records
    if missing:
        logger.warning("Skipped %d listed images that are missing (first: %s)", len(missing), ", ".join(missing[:5]))
    if conflicts:
        logger.warning(
            "Skipped %d images whose label in list.txt differs from their split file's (first: %s)",
            len(conflicts),
            ", ".join(conflicts[:5]),
        )
    listed = {r.image_id for records in splits.values() for r in records}
    image_dir = os.path.join(root, "images")
    unlisted = sorted(
        n[:-4]
        for n in (os.listdir(image_dir) if os.path.isdir(image_dir) else [])
        if n.endswith(".jpg") and n[:-4] not in listed
    )
    if unlisted:
        logger.info(
            "%d images are in neither trainval.txt nor test.txt and are not used (first: %s)",
            len(unlisted),
            ", ".join(unlisted[:5]),
        )
    return splits


def _records_from_hf(dataset, split: str) -> list:
    """Records for a datasets.Dataset with an `image` column and an int or string `label`."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    if "image" not in dataset.column_names or "label" not in dataset.column_names:
        raise UserError(f"the {split!r} split needs columns 'image' and 'label', it has {dataset.column_names}")
    feature = dataset.features["label"]
    raw = dataset["label"]
    names = feature.names if isinstance(feature, ClassLabel) else None
    paths = [str(p) for p in dataset["path"]] if "path" in dataset.column_names else None
    ids = (
        dataset["image_id"]
        if "image_id" in dataset.column_names
        else ([os.path.splitext(os.path.basename(p))[0] for p in paths] if paths is not None else None)
    )
    kept, unlabelled = [], 0
    for row, value in enumerate(raw):
        if value is None or (names is not None and not 0 <= value < len(names)):
            unlabelled += 1  # ClassLabel -1 means "no label"; names[-1] would make it the last breed
            continue
        try:
            label = breed_index(names[value] if names is not None else value)
        except (ValueError, IndexError) as e:
            raise UserError(f"label {value!r} in split {split!r} is not one of the 37 Oxford-IIIT Pet breeds") from e
        kept.append((row, label))
    if unlabelled:
        logger.warning("Skipped %d rows of split %r without a label (-1, None or out of range)", unlabelled, split)
    if not isinstance(dataset.features["image"], ImageFeature):
        raise UserError(f"the 'image' column of split {split!r} holds {dataset.features['image']}, not images")
    # Decode ourselves so a broken image is skipped, not raised inside datasets
    dataset = dataset.cast_column("image", ImageFeature(decode=False))
    return [
        Record(str(ids[row]) if ids else f"{split}_{row}", label, (dataset, row), uid=paths[row] if paths else None)
        for row, label in kept
    ]


def _hf_splits(dataset_dict, seed: int) -> dict:
    from datasets import Dataset

    if isinstance(dataset_dict, Dataset):
        dataset_dict = {"train": dataset_dict}
    names = list(dataset_dict.keys())
    train_name = next((n for n in ("train", "trainval") if n in names), names[0])
    trainval = _records_from_hf(dataset_dict[train_name], train_name)
    if "test" in names:
        return {"trainval": trainval, "test": _records_from_hf(dataset_dict["test"], "test")}
    # pcuenq/oxford-pets has one split: hold out half, stratified, like the official 50/50 split
    logger.warning(
        "Dataset has no 'test' split: holding out a stratified half of %r as test (seed %d)", train_name, seed
    )
    trainval, test = stratified_split(trainval, 0.5, seed)
    return {"trainval": trainval, "test": test}


def _load_data_files(path: str, seed: int) -> dict:
    """A local folder that `datasets.load_dataset` reads: data files (parquet, csv, ...) or an image folder."""
    import datasets

    try:
        loaded = datasets.load_dataset(path)
    except Exception as e:  # datasets raises many types for a folder it cannot read
        raise UserError(
            f"--dataset {path!r} is neither the official layout (annotations/list.txt), a save_to_disk "
            f"folder, nor data files datasets can read ({type(e).__name__}: {str(e)[:120]})"
        ) from e
    return _hf_splits(loaded, seed)


def _load_hub(name: str, seed: int) -> dict:
    """A Hub data set id (from the local cache when the Hub is unreachable)."""
    import datasets

    if is_local(name):  # path-like, but no folder there
        if os.path.exists(name):
            raise UserError(
                f"--dataset {name!r} is a file; pass a folder (official layout or save_to_disk) or a Hub id"
            )
        raise UserError(f"dataset folder {name!r} does not exist")
    if not hub_reachable():
        # Only the local cache can help; datasets reads this flag at call time
        datasets.config.HF_HUB_OFFLINE = True
        try:
            return _hf_splits(datasets.load_dataset(name), seed)
        except Exception as e:
            logger.debug("loading %r from the local cache failed", name, exc_info=e)
            raise UserError(offline_hint("dataset", name, "--dataset")) from e
    return _hf_splits(datasets.load_dataset(name), seed)


def _load_save_to_disk(path: str, seed: int) -> dict:
    return _hf_splits(_load_from_disk(path), seed)


def _load_from_disk(path: str):
    """datasets.load_from_disk, with a half-written or damaged folder as one UserError line."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except Exception as e:  # a missing split folder, garbled JSON, a truncated .arrow: datasets, json and pyarrow types
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise UserError(
            f"save_to_disk folder {path!r} is incomplete or corrupt ({type(e).__name__}: {first[:150]}); "
            "save the data set again (Dataset.save_to_disk) or pass another --dataset"
        ) from e


def _load_official_layout(root: str, seed: int) -> dict:
    if not _is_official_layout(root):
        raise UserError(
            f"{root}/annotations/list.txt is missing: the official layout needs it "
            "(from annotations.tar.gz of the Oxford-IIIT Pet release)"
        )
    return load_official_layout(root)


# What --dataset can be, in the order it is recognised: (detect, load). load(dataset, seed) returns
# {"trainval": records, "test": records}; the first source whose detect() says yes loads it.
SOURCES = [
    (lambda d: os.path.isdir(os.path.join(d, "annotations")), _load_official_layout),  # the official release
    (lambda d: os.path.isdir(d) and _is_save_to_disk(d), _load_save_to_disk),  # Dataset(Dict).save_to_disk
    (os.path.isdir, _load_data_files),  # parquet, csv, json files, an image folder
    (lambda d: True, _load_hub),  # a Hub id
]


def load_splits(dataset: str, val_fraction: float = 0.1, seed: int = 42) -> dict:
    """{"train", "validation", "test"} record lists from any supported source.

    The official test split is held out for evaluation; validation is a stratified,
    seeded share of trainval.
    """
    load = next(load for detect, load in SOURCES if detect(dataset))
    splits = load(dataset, seed)
    # An image in both trainval and test would be trained on and then scored as unseen
    test_ids = {r.identity for r in splits["test"]}
    overlap = [r.identity for r in splits["trainval"] if r.identity in test_ids]
    if overlap:
        logger.warning(
            "Dropped %d images from trainval that are also in the test split (first: %s)",
            len(overlap),
            ", ".join(overlap[:5]),
        )
        splits["trainval"] = [r for r in splits["trainval"] if r.identity not in test_ids]
    train, validation = stratified_split(splits["trainval"], val_fraction, seed)
    return {"train": train, "validation": validation, "test": splits["test"]}


def stratified_split(records: list, fraction: float, seed: int):
    """(rest, held_out): `fraction` of each breed held out, at least one where a breed has two or more."""
    by_label = defaultdict(list)
    for r in records:
        by_label[r.label].append(r)
    rng = random.Random(seed)
    rest, held = [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: r.image_id)
        rng.shuffle(group)
        k = min(len(group) - 1, max(1, round(len(group) * fraction))) if fraction > 0 and len(group) > 1 else 0
        held += group[:k]
        rest += group[k:]
    return rest, held


def subsample(records: list, n: Optional[int], seed: int) -> list:
    """A seeded random subset of n records (all when n is None); order is kept stable."""
    if n is None or n >= len(records):
        return records
    if n <= 0:
        raise UserError(f"a max_*_samples value must be positive, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


# ---------------------------------------------------------------------------
# Dataset and collator


class PetCaptionDataset(torch.utils.data.Dataset):
    """(image, breed) -> pixel_values and the templated caption.

    An unreadable image is recorded in `bad_images` (warned once) and, for training, replaced
    by the next readable record so a batch is never short; with substitute_bad=False (evaluation)
    it comes back as None and the collator drops it, so nothing is counted twice.
    """

    def __init__(self, records: list, image_processor, template: str, substitute_bad: bool = True):
        self.records = records
        self.image_processor = image_processor
        self.template = template
        self.substitute_bad = substitute_bad
        self.bad_images = {}

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        for step in range(len(self.records)):
            record = self.records[(i + step) % len(self.records)]
            if record.image_id in self.bad_images:
                if not self.substitute_bad:
                    return None
                continue
            try:
                image = load_image(record)
            except BadImage as e:
                self.bad_images[record.image_id] = str(e)
                logger.warning("Skipping unreadable image %s", e)
                if not self.substitute_bad:
                    return None
                continue
            pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
            return {
                "pixel_values": pixel_values,
                "caption": caption_for(record.label, self.template),
                "label": record.label,
            }
        raise UserError("no readable image in the data set")


def tokenize_captions(tokenizer, captions: list, bos_token_id: int):
    """(input_ids, attention_mask) padded to the longest caption, the tokenizer's [CLS] replaced by the
    decoder's start id (the model's text_config.bos_token_id, [DEC]: the token generate starts from)."""
    enc = tokenizer(list(captions), padding="longest", return_tensors="pt")
    input_ids = enc["input_ids"].clone()
    input_ids[:, 0] = bos_token_id
    return input_ids, enc["attention_mask"]


def longest_caption_tokens(tokenizer, template: str) -> int:
    """Tokens in the longest caption `template` gives any of the 37 breeds, [DEC] and [SEP] included."""
    return tokenize_captions(tokenizer, [caption_for(b, template) for b in range(NUM_BREEDS)], 0)[0].shape[1]


class CaptionCollator:
    """Tokenise a batch of captions for teacher-forced training.

    - pad to the batch's longest caption (never to the checkpoint's 512), or with pad_to to that
      fixed length (longest_caption_tokens: every batch one shape, for torch.compile / CUDA graphs),
    - first token = bos_token_id, the model config's [DEC], the token `generate` starts from
      (the tokenizer puts [CLS] there; the real checkpoint's tokenizer files have no bos at all),
    - labels = input_ids with padding set to -100 (BLIP's loss does not mask padding itself).
    """

    def __init__(self, tokenizer, bos_token_id: int, pad_to: Optional[int] = None):
        self.tokenizer, self.bos_token_id, self.pad_to = tokenizer, bos_token_id, pad_to

    def __call__(self, items: list) -> dict:
        items = [it for it in items if it is not None]  # unreadable images (see PetCaptionDataset)
        if not items:
            raise UserError("a whole batch of images was unreadable; check the data set (see the warnings above)")
        input_ids, attention_mask = tokenize_captions(
            self.tokenizer, [it["caption"] for it in items], self.bos_token_id
        )
        if self.pad_to is not None:
            extra = self.pad_to - input_ids.shape[1]
            if extra < 0:  # captions come from the template that pad_to was measured on
                raise ValueError(f"a caption of {input_ids.shape[1]} tokens is longer than pad_to={self.pad_to}")
            input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=self.tokenizer.pad_token_id)
            attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }
        for key in ("pixel_values", "image_embeds"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        return batch


class _PixelItems(torch.utils.data.Dataset):
    """(position, pixel_values or None, reason) per record: what pixel_batches' workers compute."""

    def __init__(self, records: list, image_processor):
        self.records, self.image_processor = records, image_processor

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            image = load_image(self.records[i])
        except BadImage as e:
            return i, None, str(e)
        return i, self.image_processor(image, return_tensors="pt")["pixel_values"][0], None


def _stack_piece(items: list):
    """(positions, pixel_values (n, C, H, W) or None, {position: reason}) of one piece, built in the worker.

    Stacked where the images were made; in a worker default_collate stacks straight into shared
    memory. The main process then gets one tensor per piece instead of stacking 32 freshly mapped
    ones, which took it ~2 ms an image, as long as a worker takes to decode and preprocess one.
    """
    good = [(i, px) for i, px, reason in items if reason is None]
    bad = {i: reason for i, _, reason in items if reason is not None}
    if not good:
        return [], None, bad
    return [i for i, _ in good], torch.utils.data.default_collate([px for _, px in good]), bad


def image_workers(num_images: int) -> int:
    """Processes for decoding and preprocessing images: JPEG decoding and the processor's numpy
    resize/rescale/normalise cost ~5-15 ms per 384 px image on one core, as much as the GPU spends on
    the whole image, so a big set is spread over the cores; a small one is not worth the start-up."""
    return 0 if num_images < 64 else max(0, min(device_setting("max_image_workers", "cpu"), (os.cpu_count() or 1) - 1))


def _die_with_parent(parent_pid: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: on Linux the kernel kills the worker when its parent dies.

    A worker of a killed run would otherwise go on decoding for seconds, until its watchdog
    noticed. (The signal follows the thread that started the workers: pixel_batches is iterated
    on the thread that keeps running.)
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the prctl call
        os._exit(1)


def pixel_batches(records: list, image_processor, batch_size: int, num_workers: Optional[int] = None, device=None):
    """(generator of (records, pixel_values) batches in order, {image_id: reason} of unreadable images).

    The same pixel values as image_processor(images) on the main process, computed by
    `num_workers` worker processes (default: image_workers). Unreadable images are left out of
    their batch and recorded in the dict as the generator reaches them. With `device`, batches
    come back on it (pieces are moved as they arrive and joined there).
    """
    bad = {}
    workers = image_workers(len(records)) if num_workers is None else num_workers
    # Workers hand over pieces of at most 32 images (a 256-image batch would keep one worker busy
    # for seconds while the others wait, and hold 450 MB in shared memory per piece)
    loader = torch.utils.data.DataLoader(
        _PixelItems(records, image_processor),
        batch_size=min(batch_size, 32),
        num_workers=workers,
        collate_fn=_stack_piece,
        generator=torch.Generator(),  # its seed draw leaves the global RNG alone
        worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )

    def gen():
        positions, pieces, held = [], [], 0
        for piece_positions, pixels, piece_bad in loader:
            bad.update({records[i].image_id: reason for i, reason in piece_bad.items()})
            if pixels is None:
                continue
            positions += piece_positions
            pieces.append(pixels if device is None else pixels.to(device))
            held += len(piece_positions)
            while held >= batch_size:
                # a whole piece that is a whole batch (batch size <= 32, no unreadable image) is not copied
                joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                yield [records[i] for i in positions[:batch_size]], joined[:batch_size]
                positions, held = positions[batch_size:], held - batch_size
                pieces = [joined[batch_size:]] if held else []
        if held:
            yield [records[i] for i in positions], pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    return gen(), bad


def report_bad_images(bad: dict) -> None:
    if bad:
        logger.warning("Skipped %d unreadable images (first: %s)", len(bad), ", ".join(list(bad)[:5]))
