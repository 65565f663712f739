"""Baselines: the linear probe and CLIP zero-shot, each checked against an independent computation."""

import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
from baselines import (
    CLIP_PROMPT,
    check_clip_option,
    clip_scores,
    linear_probe,
    load_clip,
    mean_per_class_recall,
    pooled_features,
)
from config import CLIP_DEFAULT, DEMO_DIR
from data import load_image, load_splits
from embedding_cache import EmbeddingCache, vision_fingerprint
from helpers import run_script
from inference import image_embeddings
from labels import BREED_NAMES, OXFORD_PETS
from metrics import mcnemar
from model import load_base_model, load_processor
from run_io import UserError


@pytest.fixture(scope="module")
def tiny_blip(tiny_assets):
    model_dir, data_dir = tiny_assets
    return load_base_model(model_dir).eval(), load_processor(model_dir), load_splits(data_dir)


def _pooler_outputs(model, processor, records):
    """Straight from the model: vision_model(pixel_values).pooler_output, one image at a time."""
    with torch.no_grad():
        return np.stack(
            [
                model.vision_model(
                    pixel_values=processor.image_processor(load_image(r), return_tensors="pt")["pixel_values"]
                )
                .pooler_output[0]
                .numpy()
                for r in records
            ]
        )


def test_linear_probe_equals_an_independent_sklearn_fit(tiny_blip):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model, processor, splits = tiny_blip
    splits = {k: splits[k][::3] for k in ("train", "validation", "test")}  # 72 / 8 / 27 images: the images' time
    probe = linear_probe(model, processor, splits, splits["test"], batch_size=16)

    x = {k: _pooler_outputs(model, processor, splits[k]) for k in ("train", "validation", "test")}
    y = {k: np.array([r.label for r in splits[k]]) for k in x}
    scaler = StandardScaler().fit(x["train"])
    best = None
    for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x["train"]), y["train"])
        val = (clf.predict(scaler.transform(x["validation"])) == y["validation"]).mean()
        if best is None or val > best[0]:
            best = (val, c, clf)
    expected = best[2].predict(scaler.transform(x["test"]))
    assert probe["C"] == best[1]
    assert (probe["pred"] == y["test"]).mean() == pytest.approx((expected == y["test"]).mean())
    np.testing.assert_array_equal(probe["pred"], expected)  # image by image, not only in the count
    assert probe["train_images"] == len(splits["train"]) and probe["validation_images"] == len(splits["validation"])


def test_pooled_features_from_the_cache_are_the_pooler_output(tiny_blip, tmp_path):
    model, processor, splits = tiny_blip
    records = splits["validation"][:6]
    cache = EmbeddingCache(str(tmp_path), vision_fingerprint(model, processor), "float32")
    cache.build(records[:4], lambda px: image_embeddings(model, px), processor.image_processor, 4)  # 4 cached, 2 not
    feats, positions = pooled_features(model, processor.image_processor, records, 4, cache)
    assert positions == list(range(6))
    np.testing.assert_allclose(feats, _pooler_outputs(model, processor, records), atol=1e-5)


def test_clip_scores_equal_clip_logits(tiny_clip, tiny_assets):
    from transformers import CLIPModel, CLIPProcessor

    records = load_splits(tiny_assets[1])["test"][:5]
    model, processor = load_clip(tiny_clip, "cpu", torch.float32, OXFORD_PETS)
    logits, positions = clip_scores(model, processor, records, 2, OXFORD_PETS)
    assert positions == list(range(5))
    reference, ref_processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    inputs = ref_processor(
        text=[CLIP_PROMPT.format(breed=b) for b in BREED_NAMES],
        images=[load_image(r) for r in records],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        expected = reference(**inputs).logits_per_image
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_mean_per_class_recall():
    # class 0: 1 of 3 right, class 1: 1 of 1 right -> (1/3 + 1) / 2, while top-1 is 2/4
    assert mean_per_class_recall([0, 0, 0, 1], [0, 1, 1, 1]) == pytest.approx(2 / 3)


def test_bad_clip_model_options_are_one_line(tmp_path, tiny_assets):
    check_clip_option("none")
    check_clip_option(CLIP_DEFAULT)  # a Hub id: checked when loaded
    with pytest.raises(UserError, match="does not exist"):
        check_clip_option(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="holds no CLIP model"):
        check_clip_option(tiny_assets[0])  # a BLIP folder
    with pytest.raises(UserError, match="holds no CLIP model"):
        evaluate.parse_args(["--clip_model", str(tmp_path)])  # an empty folder, found before any model loads
    proc = run_script(["evaluate.py", "--clip_model", tiny_assets[0]], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "holds no CLIP model" in proc.stderr


def test_default_clip_offline_is_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="baselines"):
        assert load_clip(CLIP_DEFAULT, "cpu", torch.float32, OXFORD_PETS) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "skipped" in caplog.text


def _broken_clip(tiny_clip, tmp_path, damage):
    """A copy of the tiny CLIP with one defect."""
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / damage)
    shutil.copytree(tiny_clip, folder)
    weights = os.path.join(folder, "model.safetensors")
    tensors = load_file(weights)
    if damage == "nan weights":
        tensors["text_model.encoder.layers.0.mlp.fc1.weight"][0, 0] = float("nan")
    elif damage == "overflowing logit scale":
        tensors["logit_scale"] = torch.tensor(1e4)
    elif damage == "no text tower":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("text_model.")}
    elif damage == "no tokenizer files":
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    elif damage == "tokenizer larger than the vocabulary":
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder)
        tokenizer.add_tokens([f"extra{k}" for k in range(40)])
        tokenizer.save_pretrained(folder)
    elif damage == "other image size":
        path = os.path.join(folder, "processor_config.json")
        config = json.load(open(path))
        config["image_processor"].update(crop_size={"height": 48, "width": 48}, size={"shortest_edge": 48})
        json.dump(config, open(path, "w"))
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "damage,message",
    [
        ("nan weights", "NaN or infinite weights"),
        ("overflowing logit scale", "logit scale"),
        ("no text tower", "lacks .* weights"),
        ("no tokenizer files", "tokenizer files are missing|cannot load the CLIP model"),
        ("tokenizer larger than the vocabulary", "tokenizer files are missing or belong to another model"),
        ("other image size", "makes 48px images"),
    ],
)
def test_a_broken_clip_is_one_line_before_any_caption_is_written(damage, message, tiny_clip, tiny_adapter, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    clip = _broken_clip(tiny_clip, tmp_path, damage)
    with pytest.raises(UserError, match=message):
        load_clip(clip, "cpu", torch.float32, OXFORD_PETS)
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: pytest.fail("captioned before checking the baselines"))
    with pytest.raises(UserError, match=message):
        evaluate.main(["--adapter", tiny_adapter[0], "--clip_model", clip, "--output_dir", str(tmp_path / "out")])


def _demo_cwd(adapter):
    """The folder train.py --demo ran in (its adapter is DEMO_DIR/blip-lora there)."""
    return adapter[: -len(os.path.join(DEMO_DIR, "blip-lora"))]


@pytest.mark.slow
def test_evaluate_demo_reports_every_baseline(demo_adapter, tiny_clip, tmp_path):
    out = tmp_path / "eval"
    proc = run_script(
        ["evaluate.py", "--demo", "--clip_model", tiny_clip, "--output_dir", str(out), "--bootstrap_samples", "200"],
        cwd=_demo_cwd(demo_adapter),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    frame = pd.read_csv(out / "predictions.csv")
    ft_correct = frame["fine_tuned_breed"] == frame["true_breed"]
    for key, column in (("linear_probe", "linear_probe_breed"), ("clip_zero_shot", "clip_zero_shot_breed")):
        b = metrics[key]
        correct = frame[column] == frame["true_breed"]
        assert b["accuracy"] == pytest.approx(correct.mean())
        lo, hi = b["accuracy_ci95"]
        assert lo <= b["accuracy"] <= hi
        assert b["mcnemar_vs_fine_tuned_caption"] == mcnemar(correct, ft_correct)
    report = (out / "report.md").read_text()
    assert "## Baselines on the same images" in report and "not measured here" in report and "88.90" in report
    assert "linear probe on frozen BLIP image features" in proc.stdout and "CLIP zero-shot: top-1" in proc.stdout


@pytest.mark.slow
def test_evaluate_demo_without_clip_says_skipped(demo_adapter, tmp_path):
    cwd = _demo_cwd(demo_adapter)
    out = tmp_path / "eval"
    proc = run_script(
        [
            "evaluate.py",
            "--demo",
            "--output_dir",
            str(out),
            "--bootstrap_samples",
            "50",
            "--max_eval_samples",
            "8",
            "--linear_probe",
            "False",
        ],
        cwd=cwd,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "skipped" in metrics["clip_zero_shot"] and "skipped" in metrics["linear_probe"]
    assert proc.stderr.count("CLIP model baseline skipped") == 1
    assert "CLIP zero-shot | skipped" in (out / "report.md").read_text()


def test_the_lora_classifier_is_scored_cached_and_retrained_on_request(tiny_adapter, tmp_path, monkeypatch):
    """evaluate.py trains the classifier on the adapter's own split once, reuses it on the next run (same numbers,
    no training) and trains it again when asked."""
    out, cache = str(tmp_path / "eval"), str(tmp_path / "classifiers")
    argv = ["--adapter", tiny_adapter[0], "--output_dir", out, "--classifier_cache_dir", cache, "--linear_probe",
            "False", "--clip_model", "none", "--classifier_epochs", "2", "--bootstrap_samples", "10",
            "--max_eval_samples", "8", "--max_new_tokens", "3"]  # fmt: skip
    first = evaluate.main(argv)["metrics"]["lora_classifier"]
    assert not first["cached"] and first["trainable_parameters"]["lora"] == 2 * 64 * (32 + 96)  # tiny: 2 layers
    assert first["settings"]["seed"] == 7  # the adapter's training seed (tiny_adapter), not evaluate's 42
    predicted = pd.read_csv(os.path.join(out, "predictions.csv"))["lora_classifier_breed"]
    truth = pd.read_csv(os.path.join(out, "predictions.csv"))["true_breed"]
    assert first["accuracy"] == pytest.approx((predicted == truth).mean())
    assert "LoRA classifier on BLIP's vision encoder" in open(os.path.join(out, "report.md")).read()
    again = evaluate.main(argv)["metrics"]["lora_classifier"]
    assert again["cached"] and again["accuracy"] == first["accuracy"] and again["key"] == first["key"]
    assert not evaluate.main(argv + ["--classifier_baseline", "retrain"])["metrics"]["lora_classifier"]["cached"]
    # the probe's embedding cache and the classifier's cache key share one hash of the encoder's weights
    import embedding_cache

    calls, hash_weights = [], embedding_cache.vision_fingerprint
    monkeypatch.setattr(embedding_cache, "vision_fingerprint", lambda *a: calls.append(a) or hash_weights(*a))
    assert "accuracy" in evaluate.main(argv + ["--linear_probe", "True"])["metrics"]["linear_probe"]
    assert len(calls) == 1
