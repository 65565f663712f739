"""The options of every script, in one place, and the defaults a run takes from --demo and from the device.

Each entry script parses `PetConfig` plus its own small dataclass with
`HfArgumentParser`, so every field below is also a snake_case CLI flag
(`--lora_r 16`, `--dataset /data/oxford-iiit-pet`, ...). Unknown flags fail. The first argument may be a YAML
or JSON file of options, a run's own run_config.json among them (options_file); the flags after it override it.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import HfArgumentParser, TrainingArguments

from devices import DEVICE_DEFAULTS, device_defaults, pick_device
from labels import check_template
from run_io import UserError, first_line

BASE_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_DATASET = "timm/oxford-iiit-pet"
OUTPUT_DIR = "outputs/blip-lora-pets"  # the adapter and everything train.py writes
DEMO_DIR = "outputs/demo"  # tiny model, synthetic data and demo runs
SEED = 42
CLIP_DEFAULT = "openai/clip-vit-base-patch16"  # evaluate.py's CLIP zero-shot baseline: BLIP-base's encoder size
CLASSIFIER_DEFAULT = "google/vit-base-patch16-224-in21k"  # the ViT paper's ImageNet-21k ViT-B/16, no head


@dataclass
class PetConfig:
    """Options shared by train.py, evaluate.py, explainability.py and app.py."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": f"Hub id or local folder of a BLIP captioning model (train.py: default {BASE_MODEL}; "
            "evaluate.py, explainability.py: default the adapter's own base model)"
        },
    )
    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub dataset id, a folder in the official Oxford-IIIT Pet layout, or a save_to_disk folder "
            f"(train.py: default {DEFAULT_DATASET}; evaluate.py, explainability.py: default the adapter's own)"
        },
    )
    demo: bool = field(
        default=False, metadata={"help": "run offline on a tiny BLIP and a synthetic pet set under outputs/demo"}
    )
    # LoRA: r=32/alpha=64 on the text decoder's attention; the vision encoder stays frozen.
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="query,value", metadata={"help": "comma-separated module names"})
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: LoRA changes each target's direction, and a magnitude per output is trained too"},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rsLoRA: the update is scaled by lora_alpha/sqrt(r) instead of lora_alpha/r"}
    )
    caption_template: Optional[str] = field(
        default=None,
        metadata={
            "help": "the caption taught for each class: {label} (or {breed}) is its readable name, {article} a/an, "
            "{group} its group; default: 'A photo of {article} {breed}, a type of pet.' for Oxford-IIIT Pet, "
            "'A photo of {article} {label}.' for other data (evaluate.py and the others: the adapter's own)"
        },
    )
    image_column_name: Optional[str] = field(
        default=None, metadata={"help": "the column of images (default: the only column of images)"}
    )
    label_column_name: Optional[str] = field(
        default=None,
        metadata={"help": "the column of labels (default: label or labels, else the only ClassLabel column)"},
    )
    test_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "the held-out split, never trained on (default: test; a data set without one gets a "
            "stratified half held out)"
        },
    )
    label_names: Optional[str] = field(
        default=None,
        metadata={
            "help": "JSON or CSV file of display names per class, with optional aliases and group "
            "(docs/outputs.md); default: the class names, cleaned"
        },
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of trainval held out for validation, stratified"})
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_new_tokens: int = field(default=30, metadata={"help": "caption length limit, in tokens (word pieces)"})
    num_beams: int = 1
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "as generate's: a token already in the caption has its logit divided by it (1.0: off)"},
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "as generate's: no n-gram of this size twice in a caption (0: off)"}
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16"}
    )


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
    per_device_eval_batch_size: int = field(
        default=32, metadata={"help": "validation and cache-building batch; 128 on a GPU unless given"}
    )
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
    # Trainer's own label_names (the batch keys of the labels) is fixed and not a flag: --label_names is the
    # project's file of class names (PetConfig)
    label_names: Optional[list[str]] = field(default_factory=lambda: ["labels"], init=False)
    remove_unused_columns: bool = False  # our collator builds the batch, keep every column
    prediction_loss_only: bool = True  # eval logits are (B, T, 30524): never gather them
    dataloader_num_workers: int = 0
    # Trainer's filter reads every step's loss back to the host to drop NaN/inf from the logged mean,
    # which makes a GPU wait each step; PetTrainer stops on a NaN/inf loss anyway (checked in batches)
    logging_nan_inf_filter: bool = False
    # The frozen vision encoder's outputs, computed once per image and memory-mapped from disk.
    use_embedding_cache: bool = field(
        default=True, metadata={"help": "cache image embeddings (off when LoRA targets the vision encoder)"}
    )
    embedding_cache_dir: str = "outputs/cache"
    embedding_cache_dtype: Literal["float16", "float32"] = field(
        default="float16", metadata={"help": "float16 (half the disk) or float32 (exact)"}
    )
    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={
            "help": "stop when the validation breed accuracy (--metric_for_best_model) has not improved for this many "
            "evaluations in a row (transformers' EarlyStoppingCallback); the best evaluation's adapter is kept"
        },
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "on one CUDA GPU, run the training step's forward and backward "
            "as CUDA graphs (no compilation; the first replay is checked against an "
            "eager step, eager steps if it differs)"
        },
    )


# The demo trains the real LoRA recipe with a schedule of its own (216 training images, 14 steps an epoch):
# fewer steps than the real run, so more epochs and a higher rate, chosen on validation accuracy
# (benchmarks/results/README.md, "The demo base")
DEMO_TRAIN_OVERRIDES = dict(
    output_dir=f"{DEMO_DIR}/blip-lora",
    num_train_epochs=30,
    learning_rate=1e-2,
    per_device_train_batch_size=16,  # the real default
    logging_steps=5,
    embedding_cache_dir=f"{DEMO_DIR}/cache",
)


@dataclass
class EvalConfig:
    """evaluate.py's own options (the shared ones are in PetConfig)."""

    adapter: str = field(default=OUTPUT_DIR, metadata={"help": "LoRA adapter folder written by train.py"})
    split: Literal["test", "validation", "train"] = field(
        default="test", metadata={"help": "test (the official held-out split), validation or train"}
    )
    per_device_eval_batch_size: int = field(
        default=32, metadata={"help": "images per batch; 256 on a GPU unless given"}
    )
    output_dir: str = field(default="outputs/eval", metadata={"help": "metrics, predictions, figures and report.md"})
    seed: int = field(default=SEED, metadata={"help": "subset (--max_eval_samples), bootstrap and data split"})
    bootstrap_samples: int = field(default=1000, metadata={"help": "resamples for the 95% confidence intervals"})
    linear_probe: bool = field(
        default=True,
        metadata={
            "help": "baseline: logistic regression on the frozen BLIP image "
            "features (train split, C chosen on validation; --split test only)"
        },
    )
    clip_model: str = field(
        default=CLIP_DEFAULT,
        metadata={
            "help": "baseline: CLIP zero-shot with this Hub id or folder; "
            "none turns it off (the default is skipped with a warning offline)"
        },
    )
    classifier_baseline: Literal["cached", "retrain", "none"] = field(
        default="cached",
        metadata={
            "help": "baseline: BLIP's vision encoder with LoRA (r=64 on qkv) and a linear head, trained on the train "
            "split, its epoch chosen on validation (--split test only); cached: trained once and kept in "
            "--classifier_cache_dir, retrain: train it again, none: off"
        },
    )
    classifier_model: str = field(
        default=CLASSIFIER_DEFAULT,
        metadata={
            "help": "baseline: the same LoRA classifier on this Hub image classifier (id or folder); none turns it "
            "off (the default is skipped with a warning offline)"
        },
    )
    classifier_cache_dir: str = field(
        default="outputs/cache/classifier", metadata={"help": "where the trained classifiers are kept"}
    )
    classifier_epochs: int = field(default=10, metadata={"help": "the LoRA classifiers' epochs"})
    classifier_learning_rate: float = field(default=1e-3, metadata={"help": "the LoRA classifiers' learning rate"})


# The demo's classifier, like its captioner, gets a schedule of its own: 7 steps an epoch
DEMO_EVAL_OVERRIDES = dict(
    adapter=f"{DEMO_DIR}/blip-lora",
    output_dir=f"{DEMO_DIR}/eval",
    classifier_cache_dir=f"{DEMO_DIR}/cache/classifier",
    classifier_epochs=30,
    classifier_learning_rate=3e-3,
)


class OptionParser(HfArgumentParser):
    """argparse's own errors (a value not among a Literal's choices, a word for a number) print the whole usage
    and exit; here they are one UserError line like every other option problem."""

    def error(self, message):
        raise UserError(message)


OPTIONS_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def is_options_file(arg: str) -> bool:
    """An argument that names an options file (a YAML or JSON file), not a flag."""
    return not arg.startswith("-") and arg.lower().endswith(OPTIONS_FILE_SUFFIXES)


# What a run's own record (its run_config.json) does not carry into a re-run: what the machine chose (the
# precision that --precision auto picked, pinned memory, and every device default in devices.DEVICE_DEFAULTS),
# which the machine running it chooses again; what TrainingArguments derives from --output_dir (logging_dir, in
# the transformers versions that have it); the Hub token (recorded redacted); and the push and the resume: a
# re-run trains afresh and publishes only when asked
NOT_RERUN = {
    "train": (
        "bf16",
        "fp16",
        "dataloader_pin_memory",
        "logging_dir",
        "hub_token",
        "push_to_hub",
        "resume_from_checkpoint",
    )
}


# The section of each options class; files written before the sections had names of their own used the class name
SECTIONS = {
    "PetConfig": "shared",
    "TrainConfig": "train",
    "EvalConfig": "evaluate",
    "ExplainConfig": "explain",
    "AppConfig": "app",
    "SweepConfig": "sweep",
}
TRAINED_ON = "trained_on"  # train.py's section of what the adapter was trained on (base weights, label set)


@dataclass
class RunConfig:
    """A run_config.json as read: the command line and each section's options (a plain dict per section)."""

    command: str = ""
    sections: dict = field(default_factory=dict)

    def options(self, section: str) -> dict:
        return self.sections.get(section) or {}


def run_config_from(raw: dict, path: Optional[str] = None) -> RunConfig:
    """A run_config.json's contents as a RunConfig, old section names mapped to the new ones. With `path` (an options
    file given to a script), a top-level key that is no section is one UserError line; else it is left out."""
    sections = {}
    for key, value in raw.items():
        name = SECTIONS.get(key, key)
        known = name in SECTIONS.values() or name == TRAINED_ON
        if name != "command" and isinstance(value, dict) and (known or path is None):
            sections[name] = value
        elif path is not None and name != "command":
            raise UserError(
                f"options file {path!r}: {key!r} is neither an option nor a section of options "
                f"({', '.join(sorted(set(SECTIONS.values())))})"
            )
    command = raw.get("command")
    return RunConfig(command if isinstance(command, str) else "", sections)


def parse_options(types: tuple, argv=None) -> tuple:
    """(parser, the dataclasses) from the command line; a bad or unknown flag is one UserError line.

    The first argument may be a YAML or JSON file of options (options_file); the flags after it override it.
    """
    parser, _, options = _parse(types, argv)
    return parser, options


def _parse(types: tuple, argv=None) -> tuple:
    """(parser, the options given, the dataclasses): "given" are the flags typed and the options file's keys, which
    demo presets and device defaults never override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # allow_abbrev=False: `--model_name foo` must not silently stand for --model_name_or_path
    parser = OptionParser(types, allow_abbrev=False)
    from_file = {}
    if argv and is_options_file(argv[0]):
        from_file = options_file(argv.pop(0), types, parser)
        parser.set_defaults(**from_file)
    try:
        # look_for_args_file=False: HfArgumentParser would read a stray `<script>.args` from the working folder,
        # a config no one typed and run_config.json's command would not show
        options = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:
        raise UserError(first_line(e)) from e
    return parser, given_options(parser, argv) | from_file.keys(), options


def options_file(path: str, types: tuple, parser: argparse.ArgumentParser) -> dict:
    """{option: value} from a YAML or JSON file, each value checked and converted as the flag would be.

    Flat ({lora_r: 16, learning_rate: 2e-4}, as HfArgumentParser.parse_yaml_file reads), or in sections like
    run_config.json, whose sections this script's options use: "shared" and its own ("train", "evaluate", ...).
    A run's own record (a run_config.json, which has "command") re-runs that run, less NOT_RERUN and the
    device defaults. A key that is no option is one UserError line, as an unknown flag is.
    """
    import yaml

    try:
        with open(path) as f:
            raw = json.load(f) if path.lower().endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"options file {path!r} does not exist; pass a YAML or JSON file of options") from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"options file {path!r} cannot be read ({type(e).__name__}: {first_line(e)[:150]})") from e
    if not isinstance(raw, dict):
        raise UserError(f"options file {path!r} holds no options: write one `option: value` per line")
    own = [SECTIONS[t.__name__] for t in types if t.__name__ in SECTIONS]
    values = raw
    if set(raw) & (set(SECTIONS) | set(SECTIONS.values()) | {"command"}):
        record = run_config_from(raw, path)
        values = {k: v for name in own for k, v in record.options(name).items()}
        if "command" in raw:  # a run's own record
            machine = {
                k for per_class in DEVICE_DEFAULTS.values() for t in types for k in per_class.get(t.__name__, {})
            }
            dropped = machine.union(*(NOT_RERUN.get(name, ()) for name in own))
            values = {k: v for k, v in values.items() if k not in dropped}
    defaults = vars(parser.parse_known_args([])[0])
    unknown = sorted(k for k in values if k not in defaults)
    if unknown:
        raise UserError(f"options file {path!r}: {', '.join(map(str, unknown))} is no option of this script")
    return {key: _file_value(path, parser, key, value, defaults[key]) for key, value in values.items()}


def _file_value(path: str, parser: argparse.ArgumentParser, key: str, value, default):
    """One value from an options file, as the flag `--key value` gives it (its type and choices checked)."""
    if value is None:
        if default is not None:
            raise UserError(f"options file {path!r}: {key} is null; give it a value or leave it out")
        return None
    if isinstance(value, (list, dict)):
        # as HfArgumentParser.parse_yaml_file passes them; never to a number or a switch
        if isinstance(default, (bool, int, float)):
            raise UserError(f"options file {path!r}: {key} takes one value, not {type(value).__name__} {value!r}")
        return value
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        return getattr(parser.parse_known_args([f"--{key}={text}"])[0], key)
    except UserError as e:
        raise UserError(f"options file {path!r}: {e}") from None


def parse_config(types: tuple, argv=None, demo_overrides=None):
    """(PetConfig, the script's dataclass) from the command line, with the demo's and the device's defaults.

    --demo applies the demo's defaults, then the device's (DEVICE_DEFAULTS) apply, each only to options
    that were not given (on the command line or in an options file): a flag the user typed always wins,
    even when it equals the default. A bad or unknown flag becomes one UserError line instead of argparse's
    traceback.
    """
    _, given, (cfg, args) = _parse(types, argv)
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
    require(
        any(t.strip() for t in cfg.lora_target_modules.split(",")),
        f"--lora_target_modules {cfg.lora_target_modules!r} names no module; e.g. query,value",
    )
    require(0 <= cfg.val_fraction < 1, f"--val_fraction must be in [0, 1), not {cfg.val_fraction}")
    require(1 <= cfg.max_new_tokens <= 512, f"--max_new_tokens must be 1-512, not {cfg.max_new_tokens}")
    require(1 <= cfg.num_beams <= 64, f"--num_beams must be 1-64, not {cfg.num_beams}")
    require(cfg.repetition_penalty > 0, f"--repetition_penalty must be positive, not {cfg.repetition_penalty}")
    require(cfg.no_repeat_ngram_size >= 0, f"--no_repeat_ngram_size must be 0 or more, not {cfg.no_repeat_ngram_size}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, name)
        require(value is None or value >= 1, f"--{name} must be at least 1, not {value}")
    if cfg.caption_template is not None:
        # the fields only: whether {group} has groups to fill is known once the data's label set is
        check_template(cfg.caption_template)
    if cfg.label_names is not None and not os.path.isfile(cfg.label_names):
        raise UserError(f"--label_names {cfg.label_names!r} is not a file; pass a JSON or CSV file")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:  # numpy's seeding range
        raise UserError(f"--seed must be in 0-{2**32 - 1}, not {seed}")


def apply_overrides(obj, overrides: dict, given: set) -> None:
    """Set each override on `obj` unless the user gave that option on the command line."""
    for key, value in overrides.items():
        if key not in given:
            setattr(obj, key, value)


@dataclass
class ExplainConfig:
    """Options of explainability.py (on top of PetConfig)."""

    adapter: str = field(default=OUTPUT_DIR, metadata={"help": "folder of the LoRA adapter written by train.py"})
    split: Literal["train", "validation", "test"] = field(
        default="test", metadata={"help": "data set split to draw images from: train, validation or test"}
    )
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
        metadata={
            "help": "decoder layers whose cross-attention is averaged: 'all' or indices, e.g. '-1' or '8,9,10,11'"
        },
    )
    output_dir: str = field(default="outputs/explain", metadata={"help": "where figures, metrics and index.md go"})
    seed: int = SEED


DEMO_EXPLAIN_OVERRIDES = dict(adapter=f"{DEMO_DIR}/blip-lora", output_dir=f"{DEMO_DIR}/explain")


@dataclass
class AppConfig:
    """Options of app.py, the web demo (on top of PetConfig)."""

    adapter: str = field(default=OUTPUT_DIR, metadata={"help": "folder of the LoRA adapter written by train.py"})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to serve on; 127.0.0.1 is this machine only, 0.0.0.0 every interface"},
    )
    port: int = field(default=7860, metadata={"help": "port to serve on; 0 picks a free one"})
    num_examples: int = field(
        default=4, metadata={"help": "example images from the test split of --dataset, one per breed (seeded)"}
    )
    output_dir: str = field(default="outputs/app", metadata={"help": "run_config.json and the example images"})
    seed: int = SEED


DEMO_APP_OVERRIDES = dict(adapter=f"{DEMO_DIR}/blip-lora", output_dir=f"{DEMO_DIR}/app")
