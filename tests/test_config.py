"""config.py: a flag the user typed wins over every demo preset and device default (even when it equals the default);
no abbreviated flags; evaluate and explain take the adapter's own base model, data and split unless told otherwise."""

import importlib

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
