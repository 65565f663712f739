"""config.py: a flag the user typed wins over every demo preset and device default (even when it equals the default);
no abbreviated flags; evaluate and explain take the adapter's own base model, data and split unless told otherwise."""

import importlib
import json
import os
import shutil

import pytest
import torch

import config
import evaluate
import explainability
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
    adapter_split_settings,
    parse_config,
)
from data import load_splits
from devices import DEVICE_DEFAULTS
from helpers import TRAIN_SEED, adapter_copy, edit_json
from run_io import UserError

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
# Abbreviations, and the adapter's own base model, data and split


def test_abbreviated_flags_are_refused():
    with pytest.raises(UserError, match="--model_name"):
        parse_config((PetConfig, EvalConfig), ["--model_name", "foo/bar"])


def test_one_rule_for_the_base_model_and_data_of_evaluate_and_explain(tiny_adapter, tiny_assets, tmp_path):
    adapter = tiny_adapter[0]
    trained_on = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
    other, other_data = str(tmp_path / "other"), str(tmp_path / "data")
    shutil.copytree(tiny_assets[0], other)
    for parse in (evaluate.parse_args, explainability.parse_args):
        cfg, _ = parse(["--adapter", adapter, "--output_dir", str(tmp_path / "o")])
        # not given: the adapter's own base model and data set
        assert cfg.model_name_or_path == trained_on
        assert cfg.dataset == os.path.abspath(tiny_assets[1])
        cfg, _ = parse(
            [
                "--adapter",
                adapter,
                "--output_dir",
                str(tmp_path / "o"),
                "--model_name_or_path",
                other,
                "--dataset",
                other_data,
            ]
        )
        assert (cfg.model_name_or_path, cfg.dataset) == (other, other_data)  # given: those, in both scripts


def test_validation_split_is_rebuilt_from_the_adapters_run_settings(tiny_adapter, tiny_assets):
    adapter = tiny_adapter[0]
    cfg = PetConfig(dataset=tiny_assets[1])  # evaluate's defaults: val_fraction 0.1, seed 42
    fraction, seed = adapter_split_settings(adapter, cfg, "validation", 42)
    assert (fraction, seed) == (0.2, TRAIN_SEED)
    trained = load_splits(tiny_assets[1], 0.2, TRAIN_SEED)
    rebuilt = load_splits(tiny_assets[1], fraction, seed)
    assert [r.image_id for r in rebuilt["validation"]] == [r.image_id for r in trained["validation"]]
    assert not {r.image_id for r in rebuilt["validation"]} & {r.image_id for r in trained["train"]}


def test_validation_split_needs_the_adapters_run_config(tiny_adapter, tmp_path):
    copy = str(tmp_path / "a")
    shutil.copytree(tiny_adapter[0], copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    os.remove(os.path.join(copy, "run_config.json"))
    with pytest.raises(UserError, match="needs the adapter's run_config.json"):
        adapter_split_settings(copy, PetConfig(), "validation", 42)
    assert adapter_split_settings(copy, PetConfig(), "test", 42) == (0.1, 42)


@pytest.mark.parametrize("script", ["evaluate", "explainability", "app"])
def test_demo_with_an_adapter_takes_the_adapters_own_base_and_data(script, tiny_adapter, tiny_assets, tmp_path):
    """--demo --adapter X: the base and data set X was trained on (when still on disk), not the demo's."""
    module = importlib.import_module(script)
    base, data = str(tmp_path / "other-base"), str(tmp_path / "other-pets")
    shutil.copytree(tiny_assets[0], base)
    shutil.copytree(tiny_assets[1], data)
    adapter = adapter_copy(tiny_adapter, tmp_path)
    edit_json(os.path.join(adapter, "adapter_config.json"), base_model_name_or_path=base)
    run = json.load(open(os.path.join(adapter, "run_config.json")))
    edit_json(os.path.join(adapter, "run_config.json"), PetConfig={**run["PetConfig"], "dataset": data})
    cfg, _ = module.parse_args(["--demo", "--adapter", adapter, "--output_dir", str(tmp_path / "out")])
    assert (cfg.model_name_or_path, cfg.dataset) == (base, data)
    given = str(tmp_path / "given-base")
    shutil.copytree(tiny_assets[0], given)
    cfg, _ = module.parse_args(
        ["--demo", "--adapter", adapter, "--model_name_or_path", given, "--output_dir", str(tmp_path / "out2")]
    )
    assert cfg.model_name_or_path == given  # a typed flag still wins


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
