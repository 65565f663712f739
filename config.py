"""Defaults for every script, in one place.

Each entry script parses `PetConfig` plus its own small dataclass with
`HfArgumentParser`, so every field below is also a snake_case CLI flag
(`--lora_r 16`, `--dataset /data/oxford-iiit-pet`, ...). Unknown flags fail.
"""

import argparse
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional
from urllib.parse import urlparse

import torch
from transformers import HfArgumentParser, TrainingArguments

BASE_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_DATASET = "timm/oxford-iiit-pet"
OUTPUT_DIR = "outputs/blip-lora-pets"  # the adapter and everything train.py writes
DEMO_DIR = "outputs/demo"  # tiny model, synthetic data and demo runs
SEED = 42
CLIP_DEFAULT = "openai/clip-vit-base-patch16"  # evaluate.py's CLIP zero-shot baseline: BLIP-base's encoder size


class UserError(Exception):
    """A problem the user can fix; entry scripts print it as one line and exit 2."""


@dataclass
class PetConfig:
    """Options shared by train.py, evaluate.py, explainability.py and app.py."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": f"Hub id or local folder of a BLIP captioning model (train.py: default {BASE_MODEL}; "
                          "evaluate.py, explainability.py: default the adapter's own base model)"},
    )
    dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Hub dataset id, a folder in the official Oxford-IIIT Pet layout, or a save_to_disk folder "
                          f"(train.py: default {DEFAULT_DATASET}; evaluate.py, explainability.py: default the adapter's own)"},
    )
    demo: bool = field(default=False, metadata={"help": "run offline on a tiny BLIP and a synthetic pet set under outputs/demo"})
    # LoRA: r=32/alpha=64 on the text decoder's attention; the vision encoder stays frozen.
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="query,value", metadata={"help": "comma-separated module names"})
    caption_template: str = field(
        default="A photo of {article} {breed}, a type of pet.",
        metadata={"help": "{breed} is the readable breed name, {article} is a/an"},
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of trainval held out for validation, stratified"})
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_new_tokens: int = 30
    num_beams: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16"})


# What --demo changes in the shared options: nothing of the LoRA recipe (the demo base is pre-trained, see demo.py,
# so the real r=32, alpha=64, dropout 0.05 on query,value learns its breeds); its captions are short.
DEMO_OVERRIDES = dict(max_new_tokens=16)


@dataclass
class TrainConfig(TrainingArguments):
    """TrainingArguments with this project's defaults; every Trainer flag still works."""

    output_dir: str = OUTPUT_DIR
    seed: int = SEED
    num_train_epochs: float = 5
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "validation and cache-building batch; "
                                                                  "128 on a GPU unless given"})
    warmup_steps: float = 0.05
    weight_decay: float = 0.01
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int = 2
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "breed_accuracy"
    greater_is_better: bool = True
    logging_steps: int = 10
    report_to: str = "none"
    label_names: Optional[list[str]] = field(default_factory=lambda: ["labels"])
    remove_unused_columns: bool = False  # our collator builds the batch, keep every column
    prediction_loss_only: bool = True  # eval logits are (B, T, 30524): never gather them
    dataloader_num_workers: int = 0
    # Trainer's filter reads every step's loss back to the host to drop NaN/inf from the logged mean,
    # which makes a GPU wait each step; PetTrainer stops on a NaN/inf loss anyway (checked in batches)
    logging_nan_inf_filter: bool = False
    # The frozen vision encoder's outputs, computed once per image and memory-mapped from disk.
    use_embedding_cache: bool = field(default=True, metadata={"help": "cache image embeddings (off when LoRA targets the vision encoder)"})
    embedding_cache_dir: str = "outputs/cache"
    embedding_cache_dtype: Literal["float16", "float32"] = field(default="float16", metadata={"help": "float16 (half the disk) or float32 (exact)"})
    cuda_graphs: bool = field(default=False, metadata={"help": "on one CUDA GPU, run the training step's forward and backward "
                                                               "as CUDA graphs (no compilation; the first replay is checked against an "
                                                               "eager step, eager steps if it differs; not yet measured, see README)"})


# The demo trains the real recipe with its own schedule only (216 training images, 14 steps an epoch, 2 CPU cores)
DEMO_TRAIN_OVERRIDES = dict(
    output_dir=f"{DEMO_DIR}/blip-lora",
    # 30 epochs: with 20, validation accuracy was still rising (0.88) and test breed accuracy was 0.65
    # (benchmarks/results/README.md, issue 22)
    num_train_epochs=30,
    # 420 steps instead of the real run's ~1,000: 1e-2 learnt the breeds further than 5e-3 in them (3 seeds);
    # the real 1e-4 was not measured on the demo
    learning_rate=1e-2,
    per_device_train_batch_size=16,  # the real default
    logging_steps=5,
    embedding_cache_dir=f"{DEMO_DIR}/cache",
)


@dataclass
class EvalConfig:
    """evaluate.py's own options (the shared ones are in PetConfig)."""

    adapter: str = field(default=OUTPUT_DIR, metadata={"help": "LoRA adapter folder written by train.py"})
    split: Literal["test", "validation", "train"] = field(default="test", metadata={"help": "test (the official held-out split), validation or train"})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "images per batch; 256 on a GPU unless given"})
    output_dir: str = field(default="outputs/eval", metadata={"help": "metrics, predictions, figures and report.md"})
    seed: int = field(default=SEED, metadata={"help": "subset (--max_eval_samples), bootstrap and data split"})
    bootstrap_samples: int = field(default=1000, metadata={"help": "resamples for the 95% confidence intervals"})
    linear_probe: bool = field(default=True, metadata={"help": "baseline: logistic regression on the frozen BLIP image "
                                                                   "features (train split, C chosen on validation; --split test only)"})
    clip_model: str = field(default=CLIP_DEFAULT, metadata={"help": "baseline: CLIP zero-shot with this Hub id or folder; "
                                                                    "none turns it off (the default is skipped with a warning offline)"})


DEMO_EVAL_OVERRIDES = dict(adapter=f"{DEMO_DIR}/blip-lora", output_dir=f"{DEMO_DIR}/eval")


class OptionParser(HfArgumentParser):
    """argparse's own errors (a value not among a Literal's choices, a word for a number) print the whole usage
    and exit; here they are one UserError line like every other option problem."""

    def error(self, message):
        raise UserError(message)


def parse_config(types: tuple, argv=None, demo_overrides=None):
    """(PetConfig, the script's dataclass) from the command line, with the demo's and the device's defaults.

    --demo applies the demo's defaults, then the device's (DEVICE_DEFAULTS) apply, each only to options
    that were not on the command line: a flag the user typed always wins, even when it equals the default.
    A bad or unknown flag becomes one UserError line instead of argparse's traceback.
    """
    # allow_abbrev=False: `--model_name foo` must not silently stand for --model_name_or_path
    try:
        parser = OptionParser(types, allow_abbrev=False)
        cfg, args = parser.parse_args_into_dataclasses(args=argv)
        given = given_options(parser, argv)
    except ValueError as e:
        raise UserError(str(e).strip().splitlines()[0]) from None
    if cfg.demo:
        apply_overrides(cfg, DEMO_OVERRIDES, given)
        apply_overrides(args, demo_overrides or {}, given)
    device = args.device if isinstance(args, TrainingArguments) else pick_device()
    apply_overrides(args, device_defaults(type(args), device), given)
    check_options(cfg)
    return cfg, args


def given_options(parser: argparse.ArgumentParser, argv=None) -> set:
    """The option names on the command line (dataclass field names), whatever their values.

    argparse fills in a default only where the namespace has no value yet: start from a namespace that
    holds a marker for every option, and what was typed is what no longer holds it.
    """
    # a list, so that "append"/"extend" options can copy and extend it; what they store is then a copy
    unset = type("Unset", (list,), {})()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_known_args([])[0]), unset))
    parser.parse_known_args(argv, namespace=namespace)
    return {name for name, value in vars(namespace).items() if value is not unset}


def check_options(cfg) -> None:
    """The shared options, checked before any data or model loads: one UserError line each."""
    def require(ok, message):
        if not ok:
            raise UserError(message)

    require(cfg.lora_r >= 1, f"--lora_r must be at least 1, not {cfg.lora_r}")
    require(cfg.lora_alpha > 0, f"--lora_alpha must be positive, not {cfg.lora_alpha}")
    require(0 <= cfg.lora_dropout < 1, f"--lora_dropout must be in [0, 1), not {cfg.lora_dropout}")
    require(any(t.strip() for t in cfg.lora_target_modules.split(",")),
            f"--lora_target_modules {cfg.lora_target_modules!r} names no module; e.g. query,value")
    require(0 <= cfg.val_fraction < 1, f"--val_fraction must be in [0, 1), not {cfg.val_fraction}")
    require(1 <= cfg.max_new_tokens <= 512, f"--max_new_tokens must be 1-512, not {cfg.max_new_tokens}")
    require(1 <= cfg.num_beams <= 64, f"--num_beams must be 1-64, not {cfg.num_beams}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, name)
        require(value is None or value >= 1, f"--{name} must be at least 1, not {value}")
    try:
        text = cfg.caption_template.format(breed="Beagle", article="a")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--caption_template {cfg.caption_template!r} is not a valid template ({type(e).__name__}: {e}); "
                        "use only {breed} and {article}") from None
    require("Beagle" in text, f"--caption_template {cfg.caption_template!r} must contain {{breed}}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:  # numpy's seeding range
        raise UserError(f"--seed must be in 0-{2**32 - 1}, not {seed}")


def apply_overrides(obj, overrides: dict, given: set) -> None:
    """Set each override on `obj` unless the user gave that option on the command line."""
    for key, value in overrides.items():
        if key not in given:
            setattr(obj, key, value)


# Defaults that depend on the device, per options class; a flag the user gives wins (parse_config).
# On a GPU decoding a caption is launch-bound (a step costs about the same for 32 images or 512):
# fewer, bigger batches for validation, the embedding cache and evaluation.
DEVICE_DEFAULTS = {
    "cuda": {"TrainConfig": dict(per_device_eval_batch_size=128), "EvalConfig": dict(per_device_eval_batch_size=256)},
}


def device_defaults(options_class: type, device: torch.device) -> dict:
    return DEVICE_DEFAULTS.get(device.type, {}).get(options_class.__name__, {})


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision != "auto":
        if precision not in choices:  # the command line offers only these (PetConfig.precision)
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
        return choices[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def is_local(name: str) -> bool:
    """A local path (existing, or path-like) rather than a Hugging Face Hub id, which is "owner/name"."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's ~45 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_hint(what: str, name: str, flag: str) -> str:
    return (
        f"{what} {name!r} is not a local folder, not in the Hugging Face cache, and the Hub is unreachable. "
        f"Pass {flag} /path/to/local/copy, or run with --demo to use the offline tiny model and synthetic data."
    )


def save_run_config(path: str, *configs) -> None:
    """Write the resolved options and the command line next to a run's outputs."""
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    for cfg in configs:
        record[type(cfg).__name__] = cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)


# Disk and permission faults the user fixes outside the program: one line, not a traceback
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_main(main) -> None:
    """Entry-point wrapper: a UserError (or a full disk, a read-only folder) becomes one line on stderr, exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {os.strerror(e.errno)}{where}: free some space or pick a writable --output_dir", file=sys.stderr)
        sys.exit(2)


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def same_source(a, b) -> bool:
    """The same model or data set: the same name, or two existing paths to the same place."""
    return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
                      and same_path(a, b))


def inside(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies below it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


_HELD_LOCKS = set()  # descriptors of the lock files this process holds (exclusive_lock)


def _drop_held_locks_in_child():
    """In a forked child (a DataLoader worker): close the parent's lock files.

    A flock lock belongs to the open file, which fork shares: a worker that outlived its killed
    parent would hold the run's lock until it noticed, seconds later. The parent keeps its lock.
    """
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks_in_child)


def _lock_holder(fd: int) -> str:
    """'pid N' from a lock file its holder wrote, else 'another process' (one that has not written yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


@contextmanager
def exclusive_lock(path: str, busy):
    """Hold an exclusive flock on `path`, with this process's pid written in it, for the block.

    The kernel releases it when the process ends, even killed, so a stale lock never blocks, and
    forked children do not hold it. When another process holds it, `busy(holder)` is called with
    'pid N': it raises to refuse, or returns to wait for the lock.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy(_lock_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


@contextmanager
def locked_output_dir(out: str):
    """Hold an exclusive lock on an output folder for a whole run: a second writer gets one line, not a mix.

    The lock is out/.lock (exclusive_lock). Under the lock, a save that was killed while moving its
    files into place is completed (staged_outputs), and `.saving-*` folders left by a killed save are removed.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out!r} is a file; pass a folder")
    os.makedirs(out, exist_ok=True)

    def refuse(holder):
        raise UserError(f"another run is writing to {out!r} ({holder}); wait for it or pass another --output_dir")

    with exclusive_lock(os.path.join(out, ".lock"), refuse):
        _finish_move(out)
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if name.startswith(".saving-") and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".saving-"):
                os.remove(path)
        yield out


# A save's file names, so that the next save removes what it no longer writes (a rerun with fewer figures)
OUTPUT_SET = ".output_set.json"
# Present while a save moves its files into place: a folder holding it is a mix of two runs until _finish_move
MOVING = ".moving.json"


@contextmanager
def staged_outputs(out: str, last: tuple = ()):
    """Yield a temporary folder inside `out`; when the block succeeds, its files replace the previous set in `out`.

    The folder holds one run's complete set of files, never a mix. A full disk or a kill while
    writing leaves the previous set untouched (and a `.saving-*` folder that the next locked run
    removes). Moving the files in is one rename each, so first the plan (the new names, the old
    ones to remove) is written to out/.moving.json; a kill while moving leaves it, and whatever
    next opens the folder (locked_output_dir, finish_interrupted_save) completes the move before
    reading or writing anything: the folder is then all new. Files named in `last` move last.
    Other files in `out` (checkpoints, the lock) are not part of the set and stay.
    """
    _finish_move(out)
    tmp = tempfile.mkdtemp(prefix=".saving-", dir=out)
    try:
        yield tmp
        names = sorted(os.listdir(tmp), key=lambda n: n in last)
        stale = [n for n in _read_names(os.path.join(out, OUTPUT_SET)) if n not in names]
        _write_json(os.path.join(out, MOVING), {"staging": os.path.basename(tmp), "files": names, "stale": stale})
        _finish_move(out)
    finally:
        if not os.path.exists(os.path.join(out, MOVING)):  # an interrupted move keeps its files for _finish_move
            shutil.rmtree(tmp, ignore_errors=True)


def finish_interrupted_save(folder: str) -> None:
    """Complete a save into `folder` that was killed while moving its files in, so a reader sees one whole set."""
    if os.path.exists(os.path.join(folder, MOVING)):
        with locked_output_dir(folder):  # completes it under the lock; a save running now gets the one line
            pass


def _finish_move(out: str) -> None:
    """Carry out out/.moving.json, if a save left one: every staged file moved in, the stale ones removed."""
    path = os.path.join(out, MOVING)
    try:
        with open(path) as f:
            plan = json.load(f)
        staging = os.path.join(out, _plain_name(plan["staging"], ".saving-"))
        files, stale = [_plain_name(n) for n in plan["files"]], [_plain_name(n) for n in plan["stale"]]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} (left by a save that was stopped) cannot be read ({type(e).__name__}: {e}); "
                        f"the files in {out!r} may come from two runs: delete it and run again") from None
    for name in files:
        source, target = os.path.join(staging, name), os.path.join(out, name)
        if not os.path.lexists(source):  # moved before the interruption
            continue
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(source, target)
    for name in stale:
        target = os.path.join(out, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
    _write_json(os.path.join(out, OUTPUT_SET), files)
    os.remove(path)
    shutil.rmtree(staging, ignore_errors=True)


def _plain_name(name, prefix: str = "") -> str:
    """`name` if it is a file name in the folder itself (the plan is a file someone could edit), else ValueError."""
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..") or not name.startswith(prefix):
        raise ValueError(f"{name!r} is not a plain file name")
    return name


def _read_names(path: str) -> list:
    """The names in an OUTPUT_SET file; [] when there is none or it cannot be read (then nothing is removed)."""
    try:
        with open(path) as f:
            return [_plain_name(n) for n in json.load(f)]
    except (OSError, ValueError, TypeError):
        return []


def _write_json(path: str, value) -> None:
    """Write JSON complete or not at all (temporary file + rename)."""
    fd, tmp = tempfile.mkstemp(prefix=".saving-", suffix=".json", dir=os.path.dirname(path) or ".")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


@dataclass
class ExplainConfig:
    """Options of explainability.py (on top of PetConfig)."""

    adapter: str = field(default=OUTPUT_DIR, metadata={"help": "folder of the LoRA adapter written by train.py"})
    split: Literal["train", "validation", "test"] = field(default="test", metadata={"help": "data set split to draw images from: train, validation or test"})
    num_images: Optional[int] = field(
        default=None,
        metadata={"help": "images drawn (seeded) from --split; default 8, or none when --image is given"},
    )
    image: list[str] = field(
        default_factory=list,
        metadata={"help": "your own image files (repeatable: --image a.jpg --image b.png)", "action": "extend"},
    )
    layers: str = field(
        default="all",
        metadata={"help": "decoder layers whose cross-attention is averaged: 'all' or indices, e.g. '-1' or '8,9,10,11'"},
    )
    output_dir: str = field(default="outputs/explain", metadata={"help": "where figures, metrics and index.md go"})
    seed: int = SEED


DEMO_EXPLAIN_OVERRIDES = dict(adapter=f"{DEMO_DIR}/blip-lora", output_dir=f"{DEMO_DIR}/explain")


@dataclass
class AppConfig:
    """Options of app.py, the web demo (on top of PetConfig)."""

    adapter: str = field(default=OUTPUT_DIR, metadata={"help": "folder of the LoRA adapter written by train.py"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to serve on; 127.0.0.1 is this machine only, 0.0.0.0 every interface"})
    port: int = field(default=7860, metadata={"help": "port to serve on; 0 picks a free one"})
    num_examples: int = field(default=4, metadata={"help": "example images from the test split of --dataset, one per breed (seeded)"})
    output_dir: str = field(default="outputs/app", metadata={"help": "run_config.json and the example images"})
    seed: int = SEED


DEMO_APP_OVERRIDES = dict(adapter=f"{DEMO_DIR}/blip-lora", output_dir=f"{DEMO_DIR}/app")
