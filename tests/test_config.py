"""config.py: a flag the user typed wins over every demo preset and device default (even when it equals the default);
no abbreviated flags; evaluate and explain take the adapter's own base model, data and split unless told otherwise;
options files (YAML, JSON, a run's own run_config.json) before the flags."""

import importlib
import json
import os

import pytest
import torch

import config
from config import (
    DEMO_APP_OVERRIDES,
    DEMO_EVAL_OVERRIDES,
    DEMO_EXPLAIN_OVERRIDES,
    DEMO_OVERRIDES,
    DEMO_TRAIN_OVERRIDES,
    AppConfig,
    EvalConfig,
    ExplainConfig,
    PetConfig,
    TrainConfig,
    parse_config,
)
from devices import DEVICE_DEFAULTS
from run_io import UserError
from run_record import save_run_config

SCRIPTS = {
    TrainConfig: DEMO_TRAIN_OVERRIDES,
    EvalConfig: DEMO_EVAL_OVERRIDES,
    ExplainConfig: DEMO_EXPLAIN_OVERRIDES,
    AppConfig: DEMO_APP_OVERRIDES,
}


def _cases():
    """(script options class, options object it lands on, field, preset value) for every demo preset."""
    for options, presets in SCRIPTS.items():
        for name, value in DEMO_OVERRIDES.items():
            yield pytest.param(options, PetConfig, name, value, id=f"{options.__name__}-{name}")
        for name, value in presets.items():
            yield pytest.param(options, options, name, value, id=f"{options.__name__}-{name}")


def _other_than(value):
    """A value of the same type that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    return value + "-other"


@pytest.mark.parametrize("options,target,name,preset", list(_cases()))
def test_demo_presets_apply_and_yield_to_a_typed_flag(options, target, name, preset):
    cfg, args = parse_config((PetConfig, options), ["--demo"], SCRIPTS[options])
    parsed = cfg if target is PetConfig else args
    assert getattr(parsed, name) == preset
    # The default typed out must stay, not be taken for "not given" (a preset equal to the default: another value)
    default = getattr(target(), name)
    typed = default if default != preset else _other_than(preset)
    cfg, args = parse_config((PetConfig, options), ["--demo", f"--{name}", str(typed)], SCRIPTS[options])
    parsed = cfg if target is PetConfig else args
    assert getattr(parsed, name) == typed


def _device_cases():
    for device, per_class in DEVICE_DEFAULTS.items():
        for class_name, defaults in per_class.items():
            if not class_name[0].isupper():  # the table's sizes (ranking_rows, ...), not an options class
                continue
            for name, value in defaults.items():
                yield pytest.param(device, getattr(config, class_name), name, value, id=f"{device}-{class_name}-{name}")


@pytest.mark.parametrize("device,options,name,value", list(_device_cases()))
def test_device_defaults_apply_and_yield_to_a_typed_flag(device, options, name, value, monkeypatch):
    fake = torch.device(device)
    monkeypatch.setattr(config, "pick_device", lambda: fake)
    monkeypatch.setattr(TrainConfig, "device", property(lambda self: fake))
    default = getattr(options(), name)
    assert value != default
    _, args = parse_config((PetConfig, options), [])
    assert getattr(args, name) == value
    _, args = parse_config((PetConfig, options), [f"--{name}", str(default)])
    assert getattr(args, name) == default
    monkeypatch.setattr(config, "pick_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(TrainConfig, "device", property(lambda self: torch.device("cpu")))
    _, args = parse_config((PetConfig, options), [])
    assert getattr(args, name) == default


def test_given_options_sees_every_spelling():
    parser = config.OptionParser((PetConfig, TrainConfig), allow_abbrev=False)
    given = config.given_options(
        parser, ["--lora_r", "32", "--learning_rate=1e-4", "--no_use_embedding_cache", "--bf16", "--lora-alpha", "64"]
    )
    assert given == {"lora_r", "learning_rate", "use_embedding_cache", "bf16", "lora_alpha"}
    assert config.given_options(parser, []) == set()


def test_given_options_sees_repeatable_options():
    parser = config.OptionParser((PetConfig, ExplainConfig), allow_abbrev=False)
    assert config.given_options(parser, ["--image", "a.jpg", "--image", "b.png", "--seed", "1"]) == {"image", "seed"}
    _, ex = parse_config(
        (PetConfig, ExplainConfig), ["--demo", "--image", "a.jpg", "--image", "b.png"], DEMO_EXPLAIN_OVERRIDES
    )
    assert ex.image == ["a.jpg", "b.png"]


# ---------------------------------------------------------------------------
# Abbreviations and option checks


def test_abbreviated_flags_are_refused():
    with pytest.raises(UserError, match="--model_name"):
        parse_config((PetConfig, EvalConfig), ["--model_name", "foo/bar"])


@pytest.mark.parametrize(
    "script,bad_option,message",
    [
        ("train", ["--learning_rate", "-1"], "--learning_rate"),
        ("train", ["--num_train_epochs", "0"], "untrained adapter"),
        ("evaluate", ["--bootstrap_samples", "0"], "--bootstrap_samples"),
        ("explainability", ["--num_images", "-1"], "--num_images"),
        ("app", ["--port", "70000"], "--port"),
    ],
)
def test_demo_checks_the_options_before_building_its_base(script, bad_option, message, tmp_path, monkeypatch):
    """A bad flag beside --demo is one line at once, not after a minute of pre-training the demo base."""
    import demo

    monkeypatch.setattr(demo, "prepare_demo_base", lambda *a: pytest.fail("built the demo base before checking"))
    monkeypatch.setattr(demo, "prepare_demo_data", lambda *a: pytest.fail("drew the demo data before checking"))
    module = importlib.import_module(script)
    with pytest.raises(UserError, match=message):
        module.parse_args(["--demo", "--output_dir", str(tmp_path / "out"), *bad_option])


# ---------------------------------------------------------------------------
# Options files: `python train.py run.yaml --flag value`, and a run's own run_config.json


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_an_options_file_gives_options_and_the_flags_after_it_override_it(suffix, tmp_path):
    values = {"lora_r": 8, "lora_target_modules": "query,key", "learning_rate": 0.5, "use_embedding_cache": False}
    text = json.dumps(values) if suffix == ".json" else "\n".join(f"{k}: {v}" for k, v in values.items())
    path = _write(tmp_path / f"run{suffix}", text)
    cfg, args = parse_config((PetConfig, TrainConfig), [path, "--lora_r", "4", "--output_dir", str(tmp_path / "o")])
    assert (cfg.lora_r, cfg.lora_target_modules, args.learning_rate, args.use_embedding_cache) == (
        4,
        "query,key",
        0.5,
        False,
    )
    assert args.output_dir == str(tmp_path / "o")


def test_values_from_a_file_count_as_typed(tmp_path, monkeypatch):
    """A file's value wins over --demo's presets and the device's defaults as a typed flag does, even at the default."""
    path = _write(tmp_path / "run.yaml", "demo: true\nmax_new_tokens: 30\nlearning_rate: 1.0e-4\n")
    cfg, args = parse_config((PetConfig, TrainConfig), [path], DEMO_TRAIN_OVERRIDES)
    assert (cfg.max_new_tokens, args.learning_rate) == (30, 1e-4)  # the demo's presets: 16 and 1e-2
    assert args.num_train_epochs == DEMO_TRAIN_OVERRIDES["num_train_epochs"]  # not in the file: the preset
    monkeypatch.setattr(config, "pick_device", lambda: torch.device("cuda"))
    _, args = parse_config((PetConfig, EvalConfig), [_write(tmp_path / "eval.yaml", "per_device_eval_batch_size: 32")])
    assert args.per_device_eval_batch_size == 32  # the GPU default is 256
    _, args = parse_config((PetConfig, EvalConfig), [])
    assert args.per_device_eval_batch_size == DEVICE_DEFAULTS["cuda"]["EvalConfig"]["per_device_eval_batch_size"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_r: 8\nlora_rank: 4\n", "lora_rank is no option"),
        ("lora_r: eight\n", "invalid int value"),
        ("lora_r: 3.5\n", "invalid int value"),
        ("precision: fp8\n", "invalid choice"),
        ("lora_r: null\n", "lora_r is null"),
        ("lora_r: [8, 16]\n", "takes one value"),
        ("- lora_r\n", "holds no options"),
        ("lora_r: [8\n", "cannot be read"),
        ("shared: {lora_r: 8}\ntrian: {seed: 1}\n", "'trian' is neither an option nor a section"),
        ("shared: {lora_r: 8, no_such: 1}\n", "no_such is no option"),
    ],
)
def test_a_bad_options_file_is_one_line_naming_it(text, message, tmp_path):
    path = _write(tmp_path / "run.yaml", text)
    with pytest.raises(UserError, match=message) as caught:
        parse_config((PetConfig, EvalConfig), [path])
    assert "run.yaml" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="does not exist"):
        parse_config((PetConfig, EvalConfig), [str(tmp_path / "missing.json")])


def test_a_run_config_gives_each_script_the_shared_section_and_its_own(tmp_path):
    path = str(tmp_path / "run_config.json")
    shared = PetConfig(lora_r=8, caption_template="A {label}.", max_new_tokens=12)
    save_run_config(path, shared=shared, train=TrainConfig(output_dir="t", seed=5), evaluate=EvalConfig(seed=9))
    cfg, args = parse_config((PetConfig, TrainConfig), [path])
    assert cfg == shared and (args.output_dir, args.seed) == ("t", 5)
    cfg, args = parse_config((PetConfig, EvalConfig), [path])
    assert cfg == shared and args.seed == 9
    # the layout written before sections had names of their own
    old = json.load(open(path))
    old = {"command": old["command"], "PetConfig": old["shared"], "EvalConfig": old["evaluate"]}
    cfg, args = parse_config((PetConfig, EvalConfig), [_write(tmp_path / "old.json", json.dumps(old))])
    assert cfg == shared and args.seed == 9


def test_a_runs_record_leaves_the_machines_choices_to_the_machine_running_it(tmp_path):
    """A re-run takes what the run chose, not what its machine chose for it (precision under auto, the device's
    batch size, pinned memory), nor its token (recorded redacted), its push or its resume."""
    path = str(tmp_path / "run_config.json")
    ran = TrainConfig(
        output_dir="t",
        per_device_eval_batch_size=128,
        dataloader_pin_memory=False,
        push_to_hub=True,
        hub_model_id="me/pets",
        hub_token="hf_secret",
        resume_from_checkpoint="t/checkpoint-2",
        learning_rate=3e-4,
    )
    ran.bf16 = True  # as train.py sets it on a GPU under --precision auto (TrainingArguments refuses it on a CPU)
    save_run_config(path, shared=PetConfig(precision="auto"), train=ran)
    assert "hf_secret" not in open(path).read()
    record = json.load(open(path))
    record["train"]["logging_dir"] = "t/runs/Jan01_00-00-00"  # derived from output_dir by older transformers
    json.dump(record, open(path, "w"))
    _, args = parse_config((PetConfig, TrainConfig), [path])
    assert (args.bf16, args.per_device_eval_batch_size, args.dataloader_pin_memory) == (False, 32, True)
    assert (args.push_to_hub, args.hub_token, args.resume_from_checkpoint) == (False, None, None)
    assert (args.hub_model_id, args.learning_rate) == ("me/pets", 3e-4)
    # the same keys in a file someone wrote (no "command"): taken as written
    text = json.dumps({"train": {"per_device_eval_batch_size": 128, "dataloader_pin_memory": False}})
    _, args = parse_config((PetConfig, TrainConfig), [_write(tmp_path / "mine.json", text)])
    assert (args.per_device_eval_batch_size, args.dataloader_pin_memory) == (128, False)


def test_every_recorded_training_option_re_parses_to_itself(tmp_path):
    """TrainingArguments.to_dict writes derived forms (report_to [], enums as names, dicts): each reads back."""
    path = str(tmp_path / "run_config.json")
    ran = TrainConfig(
        output_dir="t",
        lr_scheduler_type="cosine",
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=3,
        save_steps=6,
    )
    save_run_config(path, shared=PetConfig(), train=ran)
    _, args = parse_config((PetConfig, TrainConfig), [path])
    assert args.to_dict() == ran.to_dict()


def test_the_sweep_reads_its_options_file_and_its_own_run_config(tmp_path):
    import runpy

    from helpers import ROOT

    sweep = runpy.run_path(os.path.join(ROOT, "sweep.py"))
    path = _write(tmp_path / "grid.yaml", "lora_r: '8,16'\nseeds: '1'\ntrain_args: --num_train_epochs 2\n")
    cfg, grid = sweep["parse_args"]([path, "--seeds", "4,5"])
    assert (cfg.lora_r, cfg.seeds, cfg.train_args) == ("8,16", "4,5", "--num_train_epochs 2")
    record = str(tmp_path / "run_config.json")
    save_run_config(record, sweep=cfg)
    again, _ = sweep["parse_args"]([record])
    assert again == cfg
