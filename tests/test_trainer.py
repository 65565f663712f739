"""trainer.py: resuming from checkpoints (settings, hostile or damaged files, a killed run), stopping on a NaN loss."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import train
import trainer
from helpers import ROOT, RunsCode, checkpoint_copy, demo_argv, edit_json, run_script
from labels import PETS_TEMPLATE
from run_io import UserError

# ---------------------------------------------------------------------------
# Checkpoints of other settings


@pytest.mark.parametrize("change", [["--lora_r", "4"], ["--learning_rate", "0.5"]])
def test_resume_refuses_a_checkpoint_of_other_settings(tiny_adapter, change):
    _, argv = tiny_adapter
    with pytest.raises(UserError, match="belongs to a run with other settings"):
        train.main(argv + change + ["--resume_from_checkpoint", "True"])


def test_resume_accepts_its_own_checkpoint_and_refuses_one_without_settings(tiny_adapter, tmp_path):
    out, argv = tiny_adapter
    cfg, args = train.parse_args(argv + ["--resume_from_checkpoint", "True"])
    cfg.caption_template = PETS_TEMPLATE  # what train.py takes from the data's label set before it checks
    assert trainer.resume_point(cfg, args) == os.path.join(out, "checkpoint-2")
    old = str(tmp_path / "old")
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(old, "checkpoint-2"))
    os.remove(os.path.join(old, "checkpoint-2", trainer.RUN_SETTINGS_FILE))
    cfg, args = train.parse_args([*argv[:-4], "--output_dir", old, "--resume_from_checkpoint", "True"])
    with pytest.raises(UserError, match="cannot be checked against this run"):
        trainer.resume_point(cfg, args)


def test_a_checkpoint_from_before_the_lora_variants_resumes_as_lora_only(tiny_adapter, tmp_path):
    out, checkpoint = checkpoint_copy(tiny_adapter, tmp_path)
    path = os.path.join(checkpoint, trainer.RUN_SETTINGS_FILE)
    settings = json.load(open(path))
    json.dump({k: v for k, v in settings.items() if k not in ("use_dora", "use_rslora")}, open(path, "w"))
    argv = tiny_adapter[1] + ["--output_dir", out, "--resume_from_checkpoint", checkpoint]
    cfg, args = train.parse_args(argv)
    cfg.caption_template = PETS_TEMPLATE  # what train.py takes from the data's label set before it checks
    assert trainer.resume_point(cfg, args) == checkpoint
    cfg, args = train.parse_args(argv + ["--use_dora"])
    cfg.caption_template = PETS_TEMPLATE
    with pytest.raises(UserError, match="--use_dora False there, True here"):
        trainer.resume_point(cfg, args)


# ---------------------------------------------------------------------------
# Checkpoints that cannot be trusted or do not fit: one line


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "scheduler.pt", "garbage"])
def test_resume_from_a_hostile_or_damaged_checkpoint_file_is_one_line(tiny_adapter, tmp_path, name):
    out, checkpoint = checkpoint_copy(tiny_adapter, tmp_path)
    marker = str(tmp_path / "code-ran")
    if name == "garbage":
        open(os.path.join(checkpoint, "optimizer.pt"), "wb").write(b"PK\x03\x04 not really a zip")
    else:
        torch.save({"state": RunsCode(marker)}, os.path.join(checkpoint, name))
    argv = tiny_adapter[1] + ["--output_dir", out, "--resume_from_checkpoint", checkpoint]
    message = "cannot be read: its optimizer.pt is damaged" if name == "garbage" else f"cannot be trusted: its {name}"
    with pytest.raises(UserError, match=message):
        train.main(argv)
    assert not os.path.exists(marker)


def test_resume_with_a_rank_edited_into_settings_and_config_is_one_line(tiny_adapter, tmp_path):
    out, checkpoint = checkpoint_copy(tiny_adapter, tmp_path)
    edit_json(os.path.join(checkpoint, trainer.RUN_SETTINGS_FILE), lora_r=8)
    edit_json(os.path.join(checkpoint, "adapter_config.json"), r=8)  # the weights keep the demo's rank
    trained = config.PetConfig().lora_r  # the demo trains with the default rank
    argv = tiny_adapter[1] + ["--output_dir", out, "--resume_from_checkpoint", checkpoint, "--lora_r", "8"]
    with pytest.raises(UserError, match=rf"other shapes than the LoRA modules .*\({trained}, \d+\) stored, \(8, \d+\)"):
        train.main(argv)


def test_resume_from_an_intact_checkpoint_still_works(tiny_adapter, tmp_path):
    out, checkpoint = checkpoint_copy(tiny_adapter, tmp_path)
    os.remove(os.path.join(out, "adapter_model.safetensors"))
    result = train.main(tiny_adapter[1] + ["--output_dir", out, "--resume_from_checkpoint", checkpoint])
    assert result["trainer"].state.global_step >= 2 and os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


# ---------------------------------------------------------------------------
# Runs that die or diverge


@pytest.mark.slow
def test_nan_loss_stops_training_without_saving(tiny_assets, tmp_path, monkeypatch):
    import model as model_module

    real = model_module.BlipForPetCaptioning.forward
    calls = {"n": 0}

    def diverging(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += kw.get("labels") is not None  # training steps only, not load_base_model's probe
        if calls["n"] >= 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_module.BlipForPetCaptioning, "forward", diverging)
    with pytest.raises(UserError, match="loss became nan at step 2"):
        train.main(
            [
                *demo_argv(tiny_assets, str(tmp_path)),
                "--embedding_cache_dir",
                str(tmp_path / "cache"),
            ]
        )
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")


def _adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter(tiny_assets, tmp_path):
    """SIGKILL after the first checkpoint, resume, and end where an uninterrupted run ends."""
    # no --demo: in a new process it would first build (pre-train) the demo base in the working folder
    common = [
        "--model_name_or_path",
        tiny_assets[0],
        "--dataset",
        tiny_assets[1],
        "--num_train_epochs",
        "4",
        "--max_new_tokens",
        "16",
        "--max_train_samples",
        "64",
        "--embedding_cache_dir",
        str(tmp_path / "cache"),
    ]  # 4 steps an epoch
    full = run_script(["train.py", *common, "--output_dir", str(tmp_path / "full")], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]

    final = _last_trainer_state(tmp_path / "full")
    per_epoch = final["max_steps"] // final["num_train_epochs"]  # from the run itself, not the demo's size

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *common, "--output_dir", str(out)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / f"checkpoint-{2 * per_epoch}").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / f"checkpoint-{per_epoch}").is_dir() and not (out / "adapter_model.safetensors").exists()

    resumed = run_script(
        ["train.py", *common, "--output_dir", str(out), "--resume_from_checkpoint", "True"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _adapter_weights(tmp_path / "full"), _adapter_weights(out)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a)
    assert worst < 1e-4, worst
    assert final["global_step"] == final["max_steps"] and final["num_train_epochs"] == 4
    assert _last_trainer_state(out)["global_step"] == final["max_steps"]  # the resumed run reached the final step too


def _last_trainer_state(run):
    last = max((p for p in run.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name.split("-")[1]))
    return json.load(open(last / "trainer_state.json"))
