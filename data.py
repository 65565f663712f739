"""Data: sources, splits, records, image decoding, the captioning dataset and collator, image batches.

source (official-layout folder | save_to_disk folder | folder of data files | Hub id: SOURCES)
  -> load_splits() -> {"train", "validation", "test"}: lists of Record(image_id, label, source)
  -> CaptionDataset (image -> pixel_values, label -> caption) -> CaptionCollator -> batch
(the label sets and their captions are labels.py; the cached image embeddings embedding_cache.py)
"""

import dataclasses
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

from devices import device_setting
from labels import OXFORD_PETS, LabelSet, from_class_names, with_label_names
from run_io import UserError, first_line, hub_reachable, is_local, offline_hint

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
            if not 1 <= class_id <= len(OXFORD_PETS) or not _IMAGE_NAME.fullmatch(parts[0]):
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


def _image_column(dataset, given: Optional[str]) -> str:
    """The column of images: --image_column_name, else the only column of datasets.Image values."""
    from datasets import Image as ImageFeature

    columns = dataset.column_names
    if given is not None:
        if given not in columns:
            raise UserError(f"--image_column_name {given!r} is not a column of the data set; its columns: {columns}")
        if not isinstance(dataset.features[given], ImageFeature):
            raise UserError(f"the {given!r} column holds {dataset.features[given]}, not images")
        return given
    images = [c for c, f in dataset.features.items() if isinstance(f, ImageFeature)]
    if len(images) == 1:
        return images[0]
    if images:
        raise UserError(f"{len(images)} columns hold images ({', '.join(images)}): pass --image_column_name")
    if "image" in columns:
        raise UserError(f"the 'image' column holds {dataset.features['image']}, not images")
    raise UserError(f"no column holds images; the data set's columns: {columns} (pass --image_column_name)")


def _label_column(dataset, given: Optional[str], image_column: str) -> str:
    """The column of labels: --label_column_name, else label/labels, else the only ClassLabel column."""
    from datasets import ClassLabel

    columns = dataset.column_names
    if given is not None:
        if given not in columns:
            raise UserError(f"--label_column_name {given!r} is not a column of the data set; its columns: {columns}")
        return given
    named = [c for c in ("label", "labels") if c in columns]
    if len(named) == 1:
        return named[0]
    classes = [c for c, f in dataset.features.items() if isinstance(f, ClassLabel)]
    if len(classes) == 1 and not named:
        return classes[0]
    candidates = named or classes
    if candidates:
        raise UserError(f"several columns could hold the labels ({', '.join(candidates)}): pass --label_column_name")
    others = [c for c in columns if c != image_column]
    if not others:
        raise UserError(
            "the data set has images and no labels: an image folder needs one sub-folder per class, at least two "
            "classes (datasets reads a single class folder as unlabelled images)"
        )
    raise UserError(f"no label column (label, labels or a ClassLabel column) among {others}: pass --label_column_name")


def _class_names(dataset_dict: dict, column: str) -> list:
    """The classes of `column`: its ClassLabel names, else the sorted distinct strings (or integers) it holds."""
    from datasets import ClassLabel, Value

    feature = next(iter(dataset_dict.values())).features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if not isinstance(feature, Value) or not (feature.dtype == "string" or feature.dtype.startswith(("int", "uint"))):
        raise UserError(
            f"the label column {column!r} holds {feature}, not labels (class names or a ClassLabel); "
            "pass the right --label_column_name"
        )
    values = {v for ds in dataset_dict.values() for v in ds[column] if v is not None}
    if feature.dtype != "string":
        logger.warning(
            "the labels in %r are plain integers: the classes are named by their numbers (give them names with "
            "--label_names, or store the column as a ClassLabel)",
            column,
        )
        return [str(v) for v in sorted(values)]
    return sorted(values)


def _records_from_hf(dataset, split: str, image_column: str, label_column: str, class_names: list) -> list:
    """Records of one split of a datasets.Dataset; each label is a position in class_names."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    classed = isinstance(dataset.features[label_column], ClassLabel)
    position = {name: i for i, name in enumerate(class_names)}
    kept, unlabelled = [], 0
    for row, value in enumerate(dataset[label_column]):
        if value is None or (classed and not 0 <= value < len(class_names)):
            unlabelled += 1  # ClassLabel -1 means "no label"; names[-1] would make it the last class
            continue
        kept.append((row, value if classed else position[str(value)]))
    if unlabelled:
        logger.warning("Skipped %d rows of split %r without a label (-1, None or out of range)", unlabelled, split)
    # Decode ourselves so a broken image is skipped, not raised inside datasets; the image column is called
    # "image" from here on (Record.source is (dataset, row))
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    if image_column != "image":
        if "image" in dataset.column_names:
            dataset = dataset.remove_columns("image")
        dataset = dataset.rename_column(image_column, "image")
    columns = dataset.column_names
    paths = [str(p) for p in dataset["path"]] if "path" in columns else _image_files(dataset)
    ids = dataset["image_id"] if "image_id" in columns else None
    if ids is None and paths is not None:
        ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [
        Record(str(ids[row]) if ids else f"{split}_{row}", label, (dataset, row), uid=paths[row] if paths else None)
        for row, label in kept
    ]


def _image_files(dataset) -> Optional[list]:
    """The files an image folder's images came from (absolute paths), or None where the images are not files
    on this disk (bytes inside parquet files); read from Arrow, without loading the images."""
    import pyarrow.compute as pc

    cells = dataset.select_columns(["image"]).with_format("arrow")[:]["image"]
    try:
        files = pc.struct_field(cells, "path").to_pylist()
    except (KeyError, ValueError, TypeError):
        return None
    if not files or not all(isinstance(f, str) and os.path.isabs(f) for f in files):
        return None
    return files if all(os.path.isfile(f) for f in files[:8]) else None


def _hf_splits(dataset_dict, options: dict) -> tuple:
    """({split name: records}, class names) of a datasets.Dataset or DatasetDict."""
    from datasets import Dataset

    if isinstance(dataset_dict, Dataset):
        dataset_dict = {"train": dataset_dict}
    if not dataset_dict:
        raise UserError("the data set has no splits")
    first = next(iter(dataset_dict.values()))
    image_column = _image_column(first, options.get("image_column"))
    label_column = _label_column(first, options.get("label_column"), image_column)
    if label_column == image_column:
        raise UserError(f"--label_column_name {label_column!r} is the image column; pass the column of labels")
    for name, split in dataset_dict.items():
        missing = {image_column, label_column} - set(split.column_names)
        if missing:
            raise UserError(f"split {name!r} lacks the column(s) {', '.join(sorted(missing))}")
    class_names = _class_names(dataset_dict, label_column)
    splits = {
        name: _records_from_hf(split, name, image_column, label_column, class_names)
        for name, split in dataset_dict.items()
    }
    return splits, class_names


def _load_data_files(path: str, options: dict) -> tuple:
    """A local folder that `datasets.load_dataset` reads: data files (parquet, csv, ...) or an image folder."""
    import datasets

    _warn_empty_class_folders(path)
    try:
        loaded = datasets.load_dataset(path)
    except Exception as e:  # datasets raises many types for a folder it cannot read
        raise UserError(
            f"--dataset {path!r} is neither the official layout (annotations/list.txt), a save_to_disk "
            f"folder, nor data files datasets can read ({type(e).__name__}: {str(e)[:120]})"
        ) from e
    return _hf_splits(loaded, options)


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _warn_empty_class_folders(path: str) -> None:
    """An image folder's class folders without images are not classes to datasets: say so in one line."""
    split_names = {"train", "validation", "valid", "val", "test", "dev"}
    tops = [os.path.join(path, d) for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    parents = [t for t in tops if os.path.basename(t).lower() in split_names] or [path]
    empty = []
    for parent in parents:
        for d in sorted(os.listdir(parent)):
            folder = os.path.join(parent, d)
            if os.path.isdir(folder) and not d.startswith(".") and folder not in tops[: 0 if parent == path else None]:
                has_images = any(f.lower().endswith(_IMAGE_SUFFIXES) for _, _, fs in os.walk(folder) for f in fs)
                if not has_images and os.path.basename(folder).lower() not in split_names:
                    empty.append(os.path.relpath(folder, path))
    if empty:
        logger.warning("Left out %d class folders without images (first: %s)", len(empty), ", ".join(empty[:5]))


def _load_hub(name: str, options: dict) -> tuple:
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
            loaded = datasets.load_dataset(name)
        except Exception as e:
            raise UserError(offline_hint("dataset", name, "--dataset")) from e
        return _hf_splits(loaded, options)
    return _hf_splits(datasets.load_dataset(name), options)


def _load_save_to_disk(path: str, options: dict) -> tuple:
    return _hf_splits(_load_from_disk(path), options)


def _load_from_disk(path: str):
    """datasets.load_from_disk, with a half-written or damaged folder as one UserError line."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except Exception as e:  # a missing split folder, garbled JSON, a truncated .arrow: datasets, json and pyarrow types
        first = first_line(e)
        raise UserError(
            f"save_to_disk folder {path!r} is incomplete or corrupt ({type(e).__name__}: {first[:150]}); "
            "save the data set again (Dataset.save_to_disk) or pass another --dataset"
        ) from e


def _load_official_layout(root: str, options: dict) -> tuple:
    if not _is_official_layout(root):
        raise UserError(
            f"{root}/annotations/list.txt is missing: the official layout needs it "
            "(from annotations.tar.gz of the Oxford-IIIT Pet release)"
        )
    return load_official_layout(root), list(OXFORD_PETS.keys)


# What --dataset can be, in the order it is recognised: (detect, load). load(dataset, options) returns
# ({split name: records}, class names), each record's label a position in the class names; the first
# source whose detect() says yes loads it.
SOURCES = [
    (lambda d: os.path.isdir(os.path.join(d, "annotations")), _load_official_layout),  # the official release
    (lambda d: os.path.isdir(d) and _is_save_to_disk(d), _load_save_to_disk),  # Dataset(Dict).save_to_disk
    (os.path.isdir, _load_data_files),  # an image folder (one folder per class), parquet, csv or json files
    (lambda d: True, _load_hub),  # a Hub id
]


@dataclass
class Splits:
    """load_splits' result: the three record lists, and the label set their labels index."""

    train: list
    validation: list
    test: list
    labels: LabelSet

    def __getitem__(self, name: str) -> list:
        """A split named at run time (--split train|validation|test)."""
        if name not in ("train", "validation", "test"):
            raise KeyError(name)
        return getattr(self, name)


def load_splits(
    dataset: str,
    val_fraction: float = 0.1,
    seed: int = 42,
    *,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    test_split: Optional[str] = None,
    label_names: Optional[str] = None,
    labels: Optional[LabelSet] = None,
) -> Splits:
    """Train, validation and test records and their label set, from any supported source.

    The held-out test split (`test`, or --test_split) is only ever evaluated; a data set without one gets
    a stratified, seeded half held out. Validation is the data set's own `validation` split where it has
    one (and it is not the test split), else a stratified, seeded share of the rest. `labels`: the label
    set of an adapter, which the data's classes must belong to (by name); else the data's own classes
    (with --label_names's names, aliases and groups).
    """
    options = {"image_column": image_column, "label_column": label_column}
    load = next(load for detect, load in SOURCES if detect(dataset))
    by_split, class_names = load(dataset, options)
    if labels is None:
        labels = from_class_names(class_names)
        if label_names is not None:
            labels = with_label_names(labels, label_names)
    by_split = _relabel(by_split, class_names, labels, dataset)
    trainval, validation, test = _choose_splits(by_split, test_split, seed)
    # An image in both trainval and test would be trained on and then scored as unseen
    test_ids = {r.identity for r in test}
    for name, records in (("trainval", trainval), ("validation", validation or [])):
        overlap = [r.identity for r in records if r.identity in test_ids]
        if overlap:
            logger.warning(
                "Dropped %d images from %s that are also in the test split (first: %s)",
                len(overlap),
                name,
                ", ".join(overlap[:5]),
            )
            records[:] = [r for r in records if r.identity not in test_ids]
    if validation is None:
        trainval, validation = stratified_split(trainval, val_fraction, seed)
    if len(labels) < 2:
        raise UserError(f"{dataset!r} has {len(labels)} class; telling classes apart needs at least two")
    return Splits(trainval, validation, test, labels)


def load_run_splits(cfg, val_fraction: float, seed: int, labels: Optional[LabelSet] = None) -> Splits:
    """load_splits with a run's data options (PetConfig's dataset, columns, test split and label names); the
    caption template the label set implies is set on cfg where none was given, and checked."""
    splits = load_splits(
        cfg.dataset,
        val_fraction,
        seed,
        image_column=cfg.image_column_name,
        label_column=cfg.label_column_name,
        test_split=cfg.test_split,
        label_names=cfg.label_names,
        labels=labels,
    )
    cfg.caption_template = cfg.caption_template or splits.labels.default_template()
    splits.labels.check_template(cfg.caption_template)
    return splits


def _relabel(by_split: dict, class_names: list, labels: LabelSet, dataset: str) -> dict:
    """Records whose labels index `labels` instead of the data's class names; one line for classes it lacks."""
    mapping, unknown = {}, []
    for i, name in enumerate(class_names):
        try:
            mapping[i] = labels.index(name)
        except ValueError:
            unknown.append(name)
    used = {r.label for records in by_split.values() for r in records}
    unknown = [name for i, name in enumerate(class_names) if i not in mapping and i in used]
    if unknown:
        what = "the 37 Oxford-IIIT Pet breeds" if labels.is_pets else f"the adapter's {len(labels)} classes"
        raise UserError(
            f"{dataset!r} has {len(unknown)} classes that are not among {what} (first: "
            f"{', '.join(map(repr, unknown[:3]))}); evaluate an adapter on the classes it was trained on"
        )
    return {
        split: [dataclasses.replace(r, label=mapping[r.label]) for r in records] for split, records in by_split.items()
    }


def _choose_splits(by_split: dict, test_split: Optional[str], seed: int) -> tuple:
    """(trainval, validation or None, test) from the source's splits."""
    names = list(by_split)
    if test_split is not None and test_split not in by_split:
        raise UserError(f"--test_split {test_split!r} is not a split of the data set; its splits: {names}")
    test_name = test_split or ("test" if "test" in by_split else None)
    rest = [n for n in names if n != test_name]
    train_name = next((n for n in ("train", "trainval") if n in rest), rest[0] if rest else None)
    if train_name is None:
        raise UserError(f"the data set has only its test split ({test_name!r}): nothing to train on")
    validation_name = next((n for n in ("validation", "valid", "val") if n in rest and n != train_name), None)
    trainval = list(by_split[train_name])
    validation = list(by_split[validation_name]) if validation_name else None
    if test_name is None:
        logger.warning(
            "The data set has no 'test' split: holding out a stratified half of %r as test (seed %d); "
            "pass --test_split to name another held-out split",
            train_name,
            seed,
        )
        trainval, test = stratified_split(trainval, 0.5, seed)
    else:
        test = list(by_split[test_name])
    return trainval, validation, test


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


class CaptionDataset(torch.utils.data.Dataset):
    """(image, class) -> pixel_values and the class's templated caption.

    An unreadable image is recorded in `bad_images` (warned once) and, for training, replaced
    by the next readable record so a batch is never short; with substitute_bad=False (evaluation)
    it comes back as None and the collator drops it, so nothing is counted twice.
    """

    def __init__(self, records: list, image_processor, labels: LabelSet, template: str, substitute_bad: bool = True):
        self.records = records
        self.image_processor = image_processor
        self.labels, self.template = labels, template
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
                "caption": self.labels.caption(record.label, self.template),
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


def longest_caption_tokens(tokenizer, labels: LabelSet, template: str) -> int:
    """Tokens in the longest caption `template` gives any class of `labels`, [DEC] and [SEP] included."""
    captions = [labels.caption(c, template) for c in range(len(labels))]
    return tokenize_captions(tokenizer, captions, 0)[0].shape[1]


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
        items = [it for it in items if it is not None]  # unreadable images (see CaptionDataset)
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


def die_with_parent(parent_pid: int, worker_id: int) -> None:
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
        worker_init_fn=functools.partial(die_with_parent, os.getpid()),
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
