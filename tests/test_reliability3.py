"""Issue 20, reliability round three: the last silent results, kills that mix results, unguarded inputs.

In-process calls of the entry functions on small synthetic data, one tiny adapter (2 steps) for the module;
the kills are real (SIGKILL of a subprocess at a chosen moment).
"""

import json
import os
import shutil

import pytest
import torch

import app
import evaluate
import explainability
import train
from config import UserError

TRAIN_SEED = 7


@pytest.fixture(scope="module")
def tiny_adapter(demo_assets, tmp_path_factory):
    """A 2-step adapter with its checkpoint-2."""
    out = str(tmp_path_factory.mktemp("tiny") / "adapter")
    argv = _train_argv(demo_assets, out, tmp_path_factory.mktemp("cache"))
    train.main(argv)
    return out, argv


def _train_argv(demo_assets, out, cache):
    return ["--demo", "--model_name_or_path", demo_assets[0], "--dataset", demo_assets[1], "--output_dir", out,
            "--max_steps", "2", "--seed", str(TRAIN_SEED), "--embedding_cache_dir", str(cache)]


def _adapter_copy(tiny_adapter, tmp_path, name="adapter"):
    path = str(tmp_path / name)
    shutil.copytree(tiny_adapter[0], path, ignore=shutil.ignore_patterns("checkpoint-*"))
    return path


def _edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


# ---------------------------------------------------------------------------
# Silently wrong models: what the model computes is checked, not only what is stored


@pytest.mark.parametrize("merge", [True, False])
def test_adapter_scaled_to_overflow_is_refused(tiny_adapter, tmp_path, merge):
    from model import load_lora_for_inference

    path = _adapter_copy(tiny_adapter, tmp_path)
    _edit_json(os.path.join(path, "adapter_config.json"), lora_alpha=1e30)  # every stored tensor stays finite
    with pytest.raises(UserError, match=r"lora_alpha 1e\+30.*NaN or infinite"):
        load_lora_for_inference(path, merge=merge)


def test_evaluate_refuses_an_overflowing_adapter_before_writing(tiny_adapter, demo_assets, tmp_path):
    path = _adapter_copy(tiny_adapter, tmp_path)
    _edit_json(os.path.join(path, "adapter_config.json"), lora_alpha=1e30)
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="NaN or infinite outputs"):
        evaluate.main(["--adapter", path, "--dataset", demo_assets[1], "--output_dir", str(out), "--max_eval_samples", "4"])
    assert not (out / "metrics.json").exists()


def test_an_adapter_folder_is_not_a_base_model(tiny_adapter, demo_assets, tmp_path):
    adapter = tiny_adapter[0]
    with pytest.raises(UserError, match="holds a LoRA adapter, not a base model"):
        evaluate.main(["--adapter", adapter, "--model_name_or_path", adapter, "--dataset", demo_assets[1],
                       "--output_dir", str(tmp_path / "eval"), "--max_eval_samples", "4"])


@pytest.fixture(scope="module")
def nan_base(demo_assets, tmp_path_factory):
    """The tiny base model with one decoder weight set to NaN."""
    from safetensors.torch import load_file, save_file

    base = str(tmp_path_factory.mktemp("nan") / "base")
    shutil.copytree(demo_assets[0], base)
    weights = os.path.join(base, "model.safetensors")
    state = load_file(weights)
    state["text_decoder.bert.encoder.layer.1.attention.self.query.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("script", ["train", "evaluate", "explainability", "app"])
def test_every_script_refuses_a_base_model_with_nan_weights(script, nan_base, tiny_adapter, demo_assets, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(app, "build_ui", lambda *a: pytest.fail("the app served a model with NaN weights"))
    out = str(tmp_path / "out")
    common = ["--model_name_or_path", nan_base, "--dataset", demo_assets[1], "--output_dir", out]
    argv = {"train": _train_argv(demo_assets, out, tmp_path / "cache")[:1] + common + ["--max_steps", "1",
                                                                                        "--embedding_cache_dir", str(tmp_path / "cache")],
            "evaluate": common + ["--adapter", tiny_adapter[0], "--max_eval_samples", "4"],
            "explainability": common + ["--adapter", tiny_adapter[0], "--num_images", "2"],
            "app": common + ["--adapter", tiny_adapter[0], "--num_examples", "0"]}[script]
    main = {"train": train.main, "evaluate": evaluate.main, "explainability": explainability.main, "app": app.main}[script]
    with pytest.raises(UserError, match=r"has NaN or infinite weights \(first: text_decoder\.bert\.encoder\.layer\.1\."):
        main(argv)
    written = set(os.listdir(out)) - {".lock"} if os.path.isdir(out) else set()
    assert not written, written


def test_a_sound_model_passes_the_check(demo_assets):
    from model import check_finite_model, load_base_model

    model = load_base_model(demo_assets[0])
    check_finite_model(model, "the tiny model", "")
    with torch.no_grad():
        model.text_decoder.bert.embeddings.word_embeddings.weight[3, 0] = float("inf")  # a row no probe looks up
    with pytest.raises(UserError, match="word_embeddings"):
        check_finite_model(model, "the tiny model", "")
