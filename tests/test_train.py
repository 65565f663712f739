"""train.py: its options, unreadable training data, the demo run end to end, the logged loss under accumulation."""

import json
import logging
import os
import shutil

import pytest
import torch

import train
from config import DEMO_DIR, DEMO_TRAIN_OVERRIDES
from data import load_image, load_splits
from demo import write_synthetic_pets
from helpers import caption_images, demo_argv, hostile_images, run_script
from labels import OXFORD_PETS, SPECIES, UNKNOWN
from model import load_base_model, load_lora_for_inference
from run_io import UserError, run_main

EXPECTED_FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "README.md",
    "run_config.json",
    "train_history.json",
    "training_curves.png",
]


def _accuracy(model, processor, records):
    images = [load_image(r) for r in records]
    captions = caption_images(model, processor, images, max_new_tokens=16)
    return sum(OXFORD_PETS.from_caption(c) == r.label for c, r in zip(captions, records)) / len(records), captions


@pytest.mark.slow
def test_train_demo_subprocess_writes_everything(demo_run, demo_adapter):
    _, proc = demo_run
    for name in EXPECTED_FILES:
        assert os.path.isfile(os.path.join(demo_adapter, name)), name
    assert f"Adapter saved to {DEMO_DIR}/blip-lora/" in proc.stdout.strip().splitlines()[-1]
    history = json.load(open(os.path.join(demo_adapter, "train_history.json")))
    val = history["validation"]
    epochs = DEMO_TRAIN_OVERRIDES["num_train_epochs"]
    assert len(val) == epochs and all("loss" in e and "breed_accuracy" in e for e in val)
    assert history["train"][-1]["loss"] < history["train"][0]["loss"]
    run_config = json.load(open(os.path.join(demo_adapter, "run_config.json")))
    assert "train.py --demo" in run_config["command"]
    assert run_config["shared"]["lora_target_modules"] == "query,value"
    # the demo fine-tunes with the real recipe, not one of its own
    adapter = json.load(open(os.path.join(demo_adapter, "adapter_config.json")))
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (32, 64, 0.05)
    assert set(adapter["target_modules"]) == {"query", "value"}
    card = open(os.path.join(demo_adapter, "README.md")).read()
    best = max(e["breed_accuracy"] for e in val)
    assert f"**{best:.3f}**" in card and "library_name: peft" in card and f"{epochs} epochs (" in card
    from PIL import Image

    assert Image.open(os.path.join(demo_adapter, "training_curves.png")).size[0] > 500


@pytest.mark.slow
def test_demo_learns_breeds_on_held_out_images(demo_run, demo_adapter):
    cwd, _ = demo_run
    test = load_splits(os.path.join(cwd, DEMO_DIR, "pets"))["test"]
    model, processor = load_lora_for_inference(demo_adapter)
    tuned, captions = _accuracy(model, processor, test)
    base = load_base_model(os.path.join(cwd, DEMO_DIR, "tiny-blip")).eval()
    untrained, base_captions = _accuracy(base, processor, test)
    assert tuned >= 0.8, captions[:5]
    # the pre-trained base captions like zero-shot BLIP: the species (a random base: half), no breed
    assert untrained <= 0.1 and sum(OXFORD_PETS.from_caption(c) == UNKNOWN for c in base_captions) >= 0.8 * len(test)
    species = [OXFORD_PETS.group_from_caption(c) == SPECIES[r.label] for c, r in zip(base_captions, test)]
    assert sum(species) >= 0.6 * len(test), base_captions[:5]  # measured 0.9625 (evaluate's test checks the goal, 0.9)


@pytest.mark.slow
def test_reload_gives_the_same_captions_merged_or_not(demo_run, demo_adapter, tmp_path):
    cwd, _ = demo_run
    test = load_splits(os.path.join(cwd, DEMO_DIR, "pets"))["test"][::7]
    images = [load_image(r) for r in test]
    unmerged, processor = load_lora_for_inference(demo_adapter, merge=False)
    before = caption_images(unmerged, processor, images)
    unmerged.save_pretrained(str(tmp_path / "again"))
    processor.save_pretrained(str(tmp_path / "again"))
    reloaded, _ = load_lora_for_inference(str(tmp_path / "again"), merge=False)
    merged, _ = load_lora_for_inference(str(tmp_path / "again"), merge=True)
    assert caption_images(reloaded, processor, images) == before
    assert caption_images(merged, processor, images) == before
    assert not any("lora" in n for n, _ in merged.named_modules())
    # and the adapter really changes the model: its captions differ from the base model's
    base = load_base_model(
        json.load(open(os.path.join(demo_adapter, "adapter_config.json")))["base_model_name_or_path"]
    )
    assert caption_images(base.eval(), processor, images) != before


def _logged_loss(tiny_assets, tmp_path, batch, accumulation, patch=True, monkeypatch=None):
    model_dir, data_dir = tiny_assets
    args = [
        *demo_argv((model_dir, data_dir), str(tmp_path)),
        "--max_steps",
        "2",
        "--learning_rate",
        "0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "False",
        "--max_train_samples",
        "64",
        "--per_device_train_batch_size",
        str(batch),
        "--gradient_accumulation_steps",
        str(accumulation),
        "--use_embedding_cache",
        "False",
    ]  # the pixel path; the demo run covers the cached one
    result = train.main(args)
    return [e["loss"] for e in result["history"]["train"]]


@pytest.fixture(scope="module")
def plain_loss(tiny_assets, tmp_path_factory):
    """The unaccumulated baseline, trained once for both accumulation tests (with one micro-batch per step the
    Trainer bug cannot show, so it is the same with or without the patch)."""
    return _logged_loss(tiny_assets, tmp_path_factory.mktemp("plain"), batch=8, accumulation=1)


@pytest.mark.slow
def test_logged_loss_does_not_grow_with_gradient_accumulation(tiny_assets, plain_loss, tmp_path):
    accumulated = _logged_loss(tiny_assets, tmp_path / "b", batch=2, accumulation=4)
    # the same 8 images per optimizer step: mean of 4 micro-batch means vs one mean, so close, not equal
    assert accumulated == pytest.approx(plain_loss, rel=0.05)


@pytest.mark.slow
def test_gradient_accumulation_test_catches_the_trainer_bug(tiny_assets, plain_loss, tmp_path, monkeypatch):
    """Without `accepts_loss_kwargs = False` the logged loss is ~4x larger: the patch is needed."""
    import model as model_module

    monkeypatch.setattr(model_module.BlipForPetCaptioning, "accepts_loss_kwargs", True)  # stock BLIP's behaviour
    accumulated = _logged_loss(tiny_assets, tmp_path / "b", batch=2, accumulation=4)
    assert accumulated[0] == pytest.approx(4 * plain_loss[0], rel=0.1)


def test_offline_without_local_copy_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # HF_HUB_OFFLINE=1, as conftest sets it
        run_main(lambda: train.main(["--output_dir", str(tmp_path / "x")]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--demo" in errors[0] and "--dataset" in errors[0], errors


@pytest.mark.slow
def test_unreachable_hub_is_one_clear_line_from_the_script(tmp_path):
    """The script itself: one line on stderr, exit code 2 (a subprocess, as the Hub settings are read at import)."""
    proc = run_script(
        ["train.py", "--output_dir", str(tmp_path / "x")],
        cwd=tmp_path,
        timeout=120,
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error:") and "--demo" in last[0] and "--dataset" in last[0], (
        proc.stderr[-2000:]
    )


def test_bad_options_fail_before_heavy_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train.parse_args(["--demo", "--output_dir", str(tmp_path / "file")])
    with pytest.raises(UserError, match="no_such_flag"):
        train.parse_args(["--no_such_flag", "1"])
    with pytest.raises(UserError, match="batch"):
        train.parse_args(["--per_device_train_batch_size", "0"])
    with pytest.raises(UserError, match="--embedding_cache_dtype.*invalid choice: 'bfloat16'"):
        train.parse_args(["--embedding_cache_dtype", "bfloat16"])


def test_precision_flag_reaches_trainers_autocast(tiny_assets, tmp_path):
    """--precision sets bf16 after TrainingArguments derived mixed_precision from the flags, and Trainer's
    autocast follows mixed_precision alone: it must be set too, or the step runs in fp32."""
    given = [
        *demo_argv(tiny_assets, str(tmp_path)),
    ]
    _, args = train.parse_args([*given, "--precision", "bf16"])
    assert args.bf16 and not args.fp16 and args.mixed_precision == "bf16"
    _, args = train.parse_args([*given, "--precision", "fp32"])
    assert not (args.bf16 or args.fp16) and args.mixed_precision == "no"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 training is refused on a CPU only")
def test_fp16_on_a_cpu_is_one_line(tmp_path):
    with pytest.raises(UserError, match="fp16.*needs a GPU"):
        train.parse_args(["--demo", "--precision", "fp16", "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------------------
# Options checked before anything loads, one line each


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lora_r", "0"], "--lora_r must be at least 1"),
        (["--learning_rate", "-1"], "--learning_rate must be 0 or more"),
        (["--lora_dropout", "2"], "--lora_dropout must be in"),
        (["--lora_target_modules", ","], "names no module"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        (["--seed", "-1"], "--seed must be in"),
        (["--caption_template", "A {label"], "not a valid template"),
        (["--caption_template", "{dog}"], "it has {dog}"),
        (["--caption_template", "A pet."], "must contain {label}"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be"),
        (["--num_train_epochs", "0"], "untrained adapter"),
        (["--max_steps", "0"], "--max_steps must be positive"),
        (["--val_fraction", "1.5"], "--val_fraction"),
    ],
)
def test_train_options_are_checked_first(argv, message, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_run_splits", lambda *a, **k: pytest.fail("loaded data before checking options"))
    with pytest.raises(UserError, match=message):
        train.main(["--model_name_or_path", "nobody/none", "--output_dir", str(tmp_path / "o"), *argv])


def test_train_refuses_output_dir_that_is_or_contains_the_base_model(tmp_path):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    for out in (base, tmp_path / "models"):
        with pytest.raises(UserError, match="base model folder"):
            train.parse_args(["--model_name_or_path", str(base), "--output_dir", str(out)])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--per_device_train_batch_size", "-4"], "batch"),
        (["--dataset", "nobody/no-such-pets"], "--demo"),
        (["--dataset", "./no/such/folder"], "does not exist"),
    ],
)
def test_nonsense_options_are_one_clear_line(argv, message, tmp_path, capsys):
    # In-process: test_train's offline test runs the script itself for the real stderr and exit code
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(["--output_dir", str(tmp_path / "o"), *argv]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


# ---------------------------------------------------------------------------
# Unreadable training data


def _corrupt_images(names, images_dir):
    for name in names:
        open(os.path.join(images_dir, f"{name}.jpg"), "wb").write(b"not a jpeg")


@pytest.mark.parametrize("cached", ["True", "False"])
def test_all_validation_images_unreadable_is_an_error(tiny_assets, tmp_path, cached):
    data = write_synthetic_pets(str(tmp_path / "pets"), breeds=[0, 1], trainval_per_breed=6, test_per_breed=1, size=32)
    _corrupt_images([r.image_id for r in load_splits(data, 0.34, 0)["validation"]], os.path.join(data, "images"))
    # cached: found before training; uncached: the first validation batch is empty. Never "best accuracy 0.000"
    with pytest.raises(UserError, match="no validation image could be read|a whole batch of images was unreadable"):
        train.main(
            [
                "--demo",
                "--model_name_or_path",
                tiny_assets[0],
                "--dataset",
                data,
                "--val_fraction",
                "0.34",
                "--seed",
                "0",
                "--output_dir",
                str(tmp_path / "o"),
                "--max_steps",
                "1",
                "--use_embedding_cache",
                cached,
                "--embedding_cache_dir",
                str(tmp_path / "cache"),
            ]
        )
    assert not os.path.exists(tmp_path / "o" / "adapter_model.safetensors")


def test_all_trainval_unreadable_with_the_cache_is_one_line(tiny_assets, tmp_path):
    data = write_synthetic_pets(str(tmp_path / "pets"), breeds=[0, 1], trainval_per_breed=3, test_per_breed=1, size=32)
    _corrupt_images(
        [r.image_id for s in ("train", "validation") for r in load_splits(data)[s]], os.path.join(data, "images")
    )
    with pytest.raises(UserError, match="no training image could be read"):
        train.main(
            [
                "--demo",
                "--model_name_or_path",
                tiny_assets[0],
                "--dataset",
                data,
                "--output_dir",
                str(tmp_path / "o"),
                "--max_steps",
                "1",
                "--embedding_cache_dir",
                str(tmp_path / "cache"),
            ]
        )


@pytest.mark.slow
def test_training_skips_unreadable_images_and_reports_them(pets, tiny_assets, tmp_path, caplog):
    hostile = hostile_images(str(tmp_path / "h"))
    images = os.path.join(pets, "images")
    shutil.copy(hostile["truncated_jpeg"][0], os.path.join(images, "Abyssinian_1.jpg"))
    shutil.copy(hostile["text_as_jpg"][0], os.path.join(images, "american_bulldog_2.jpg"))
    shutil.copy(hostile["cmyk_jpeg"][0], os.path.join(images, "Abyssinian_3.jpg"))
    for cached in ("True", "False"):
        with caplog.at_level(logging.WARNING):
            train.main(
                [
                    "--demo",
                    "--model_name_or_path",
                    tiny_assets[0],
                    "--dataset",
                    pets,
                    "--val_fraction",
                    "0.25",
                    "--output_dir",
                    str(tmp_path / cached),
                    "--num_train_epochs",
                    "1",
                    "--use_embedding_cache",
                    cached,
                    "--embedding_cache_dir",
                    str(tmp_path / "cache"),
                ]
            )
        assert os.path.isfile(tmp_path / cached / "adapter_model.safetensors")
        assert "Skipped 2 unreadable images" in caplog.text and "Abyssinian_1" in caplog.text
        caplog.clear()


# ---------------------------------------------------------------------------
# A run from its own run_config.json, early stopping, gradient checkpointing


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_a_runs_own_run_config_re_runs_it_to_the_same_adapter(tiny_adapter, tmp_path):
    """tiny_adapter's run had seed 7 and val_fraction 0.2, not the defaults: a re-run that missed them would differ."""
    folder, _ = tiny_adapter
    again = str(tmp_path / "again")
    result = train.main([os.path.join(folder, "run_config.json"), "--output_dir", again])
    first, second = _weights(folder), _weights(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in second.items())  # it trained
    history = json.load(open(os.path.join(folder, "train_history.json")))
    assert result["history"] == json.loads(json.dumps(history))
    old, new = (json.load(open(os.path.join(f, "run_config.json"))) for f in (folder, again))
    assert new["shared"] == old["shared"] and new["trained_on"] == old["trained_on"]
    assert {k: v for k, v in new["train"].items() if k != "output_dir"} == {
        k: v for k, v in old["train"].items() if k != "output_dir"
    }


def _tiny_run(tiny_assets, tmp_path, *extra):
    return [
        *demo_argv(tiny_assets, str(tmp_path / "run")),
        "--embedding_cache_dir",
        str(tmp_path / "cache"),
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "8",
        "--per_device_train_batch_size",
        "8",
        *extra,
    ]


def test_early_stopping_ends_training_when_validation_accuracy_stops_improving(tiny_assets, tmp_path):
    """At learning rate 0 the validation accuracy never improves on the first epoch's: patience 1 stops after the
    second of 4 epochs. The accuracy must reach the callback (it is computed after Trainer's own metrics)."""
    result = train.main(
        _tiny_run(
            tiny_assets, tmp_path, "--num_train_epochs", "4", "--learning_rate", "0", "--early_stopping_patience", "1"
        )
    )
    validation = result["history"]["validation"]
    assert [e["epoch"] for e in validation] == [1.0, 2.0] and all("breed_accuracy" in e for e in validation)
    assert result["trainer"].state.global_step == 4  # 2 epochs of 2 steps, of 8 planned
    card = open(tmp_path / "run" / "README.md").read()
    assert "stopped early at epoch 2.00: 1 evaluations without a better validation breed accuracy" in card
    record = json.load(open(tmp_path / "run" / "run_config.json"))
    assert record["train"]["early_stopping_patience"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--early_stopping_patience", "0"], "at least 1"),
        (["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False"], "--eval_strategy"),
        (["--load_best_model_at_end", "False"], "needs --load_best_model_at_end"),
    ],
)
def test_early_stopping_where_it_cannot_work_is_one_line(extra, message, tmp_path):
    with pytest.raises(UserError, match=message):
        train.parse_args(["--output_dir", str(tmp_path / "o"), "--early_stopping_patience", "2", *extra])


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_adapter_and_validates(tiny_adapter, tiny_assets, tmp_path):
    """--gradient_checkpointing recomputes the decoder's activations in the backward pass (non-reentrant, so the
    LoRA weights get gradients from frozen inputs, and the dropout masks are replayed): the same adapter as without
    it, and the validation captions (decoded in eval mode, where checkpointing is off) as before."""
    folder, argv = tiny_adapter
    out = str(tmp_path / "checkpointed")
    result = train.main([*argv, "--output_dir", out, "--gradient_checkpointing", "True"])
    assert result["trainer"].model.get_base_model().text_decoder.bert.encoder.layer[0].gradient_checkpointing
    plain, checkpointed = _weights(folder), _weights(out)
    assert plain.keys() == checkpointed.keys() and all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    history = json.load(open(os.path.join(folder, "train_history.json")))
    assert [e["breed_accuracy"] for e in result["history"]["validation"]] == [
        e["breed_accuracy"] for e in history["validation"]
    ]


def test_training_curves_name_the_loss_and_the_classes(tmp_path, monkeypatch):
    import contextlib

    import matplotlib.pyplot as plt

    axes = []

    @contextlib.contextmanager
    def keep_figure(path, **kw):  # figures.figure without the close, so the axes can be read
        fig, ax = plt.subplots(kw.get("nrows", 1), kw.get("ncols", 1))
        axes.extend(ax)
        yield fig, ax

    monkeypatch.setattr(train, "figure", keep_figure)
    history = {"train": [{"epoch": 1, "loss": 1.0}], "validation": [{"epoch": 1, "loss": 0.9, "breed_accuracy": 0.5}]}
    train.plot_curves(history, str(tmp_path / "c.png"), 0.1, "class")
    assert axes[0].get_ylabel() == "loss (cross-entropy, label smoothing 0.1)"
    assert axes[1].get_ylabel() == "class accuracy" and axes[1].get_title().startswith("Validation class accuracy")
    plt.close("all")
