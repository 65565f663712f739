"""Several processes (torchrun, gloo on CPU) and other BLIP sizes."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import BlipConfig

from config import DEMO_DIR, DEMO_TRAIN_OVERRIDES
from helpers import ROOT, run_script, saved_dataset, torchrun
from model import BlipForPetCaptioning, create_lora_model


@pytest.mark.slow
def test_training_with_two_processes(demo_run, tmp_path):
    cwd, _ = demo_run
    out = tmp_path / "ddp"
    # 2 processes x 8 = the single-process run's 16 images per optimizer step
    proc = torchrun(
        [
            "train.py",
            "--demo",
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "8",
            "--embedding_cache_dir",
            str(tmp_path / "cache"),
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Adapter saved to") == 1  # only the main process writes and reports
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert not [n for n in os.listdir(out) if n.startswith(".saving-")]
    assert (tmp_path / "cache").is_dir() and len([n for n in os.listdir(tmp_path / "cache")]) == 1
    single = json.load(open(os.path.join(cwd, DEMO_DIR, "blip-lora", "train_history.json")))["validation"]
    ddp = json.load(open(out / "train_history.json"))["validation"]
    best_single, best_ddp = max(e["breed_accuracy"] for e in single), max(e["breed_accuracy"] for e in ddp)
    assert len(ddp) == len(single) == DEMO_TRAIN_OVERRIDES["num_train_epochs"]
    assert best_ddp >= 0.6 and best_ddp >= best_single - 0.35, (best_ddp, best_single)


@pytest.mark.slow
def test_evaluation_with_two_processes_gives_the_same_predictions(demo_run, tmp_path):
    cwd, _ = demo_run
    # 15 images in batches of 7: uneven per process and in the last batch, which is what can go wrong
    common = ["--demo", "--max_eval_samples", "15", "--per_device_eval_batch_size", "7"]
    one = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), *common, "--output_dir", str(tmp_path / "one")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(["evaluate.py", *common, "--output_dir", str(tmp_path / "two")], cwd=cwd)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = pd.read_csv(tmp_path / "one" / "predictions.csv"), pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert len(a) == 15 and a["image_id"].is_unique  # every image once, the last uneven batch included
    pd.testing.assert_frame_equal(a, b)
    m1, m2 = (json.load(open(tmp_path / d / "metrics.json")) for d in ("one", "two"))
    assert m1["fine_tuned"] == m2["fine_tuned"] and m1["zero_shot"] == m2["zero_shot"]


def test_large_checkpoint_shapes_take_the_same_lora_targets():
    """blip-image-captioning-large: ViT-L vision encoder (1024 wide, 24 layers), BERT-base decoder."""
    config = BlipConfig(
        text_config={"num_attention_heads": 12},
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
    )
    with torch.device("meta"):
        model = create_lora_model(BlipForPetCaptioning(config))
    adapted = {
        n.rsplit(".", 3)[0] for n, p in model.named_parameters() if p.requires_grad
    }  # strip lora_A.default.weight
    assert len(adapted) == 48 and all("text_decoder" in n for n in adapted)
    # r=32: self-attention query/value 768->768, cross-attention query 768->768 and value 1024->768
    expected = 12 * 32 * (3 * (768 + 768) + (1024 + 768))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.slow
def test_two_processes_evaluate_a_split_with_repeated_image_ids(tiny_adapter, tiny_assets, tmp_path):
    import pandas as pd

    images = sorted(os.listdir(os.path.join(tiny_assets[1], "images")))[:7]
    columns = {
        "image": [os.path.join(tiny_assets[1], "images", n) for n in images],
        "image_id": ["pet"] * 7,
        "label": [n.rsplit("_", 1)[0] for n in images],
    }
    data = saved_dataset(str(tmp_path / "hf"), {"train": columns, "test": columns})
    common = [
        "--adapter",
        tiny_adapter[0],
        "--dataset",
        data,
        "--per_device_eval_batch_size",
        "2",
        "--bootstrap_samples",
        "10",
    ]
    one = run_script(["evaluate.py", *common, "--output_dir", str(tmp_path / "one")], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(["evaluate.py", *common, "--output_dir", str(tmp_path / "two")], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("one", "two"))
    assert len(a) == 7 and (a["image_id"] == "pet").all()
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_dora_trains_with_two_processes(tiny_dora_adapter, tmp_path):
    """DoRA's magnitudes are parameters DDP synchronises like LoRA's: two processes train the variant, in bf16 too."""
    _, argv = tiny_dora_adapter
    out = tmp_path / "ddp"
    argv = [*argv, "--output_dir", str(out), "--embedding_cache_dir", str(tmp_path / "cache")]
    proc = torchrun(["train.py", *argv, "--per_device_train_batch_size", "8"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Adapter saved to") == 1
    config = json.load(open(out / "adapter_config.json"))
    assert (config["use_dora"], config["use_rslora"]) == (True, True)
