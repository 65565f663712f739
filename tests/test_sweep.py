"""sweep.py and its libraries: the grid's options, resuming, shards, the summary's numbers, and a real demo sweep
killed midway."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import sweep_runs
from helpers import ROOT, copy_demo, run_script
from metrics import mcnemar
from run_io import UserError

# the entry script's parse_args and main, run in this process so that a test's stand-in for the runs applies
sweep = SimpleNamespace(**runpy.run_path(os.path.join(ROOT, "sweep.py")))

DEMO_GRID = [
    "--demo",
    "--lora_r",
    "8,32",
    "--lora_target_modules",
    "query,value",
    "--seeds",
    "1,2",
]  # r=32: the default


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lora_r", ""], "empty value"),
        (["--seeds", " "], "empty value"),
        (["--lora_target_modules", "query,value/"], "empty value"),
        (["--lora_target_modules", "query,,value"], "empty value"),
        (["--seeds", "1,2,1"], "repeats 1"),
        (["--lora_r", "8,8"], "repeats 8"),
        (["--lora_r", "eight"], "not a whole number"),
        (["--lora_r", "0"], "at least 1"),
        (["--max_train_samples", "100,lots"], "not a whole number or all"),
        (["--seeds", "-1"], "at least 0"),
        (["--train_args", "--seed 3"], "which the sweep sets"),
        (["--eval_args=--output_dir=x"], "which the sweep sets"),
        (["--train_args", "'unclosed"], "cannot be split"),
        (["--shard", "2/2"], "i must be in"),
        (["--no_such_flag"], "not used"),
    ],
)
def test_bad_sweep_options_are_one_user_error(argv, message):
    with pytest.raises(UserError, match=message):
        sweep.parse_args(argv)


def test_bad_option_is_one_line_from_the_script(tmp_path):
    proc = run_script(["sweep.py", "--seeds", "1,1"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "repeats 1" in proc.stderr


def test_a_folder_of_another_sweep_or_other_files_is_refused(tmp_path):
    out = tmp_path / "sweep"
    cfg, grid = sweep.parse_args(["--output_dir", str(out), "--train_args", "--num_train_epochs 2"])
    sweep_runs.check_sweep_folder(cfg, grid)  # claims the new folder
    sweep_runs.check_sweep_folder(cfg, grid)  # the same sweep again: fine
    other, other_grid = sweep.parse_args(["--output_dir", str(out), "--train_args", "--num_train_epochs 3"])
    with pytest.raises(UserError, match="holds another sweep's runs"):
        sweep_runs.check_sweep_folder(other, other_grid)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    cfg, grid = sweep.parse_args(["--output_dir", str(stranger)])
    with pytest.raises(UserError, match="not a sweep"):
        sweep_runs.check_sweep_folder(cfg, grid)


# ---------------------------------------------------------------------------
# Resuming, shards and the summary, with a stand-in for train.py + evaluate.py


def _fake_run(labels_right: dict):
    """A Runner.run_one that writes what train.py and evaluate.py would: history, metrics and predictions."""
    calls = []

    def run_one(self, run, slot):
        calls.append(run.name)
        os.makedirs(os.path.join(run.folder, "adapter"), exist_ok=True)
        os.makedirs(os.path.join(run.folder, "eval"), exist_ok=True)
        sweep_runs.write_json(os.path.join(run.folder, "run.json"), run.record(self.cfg, self.grid))
        rng = np.random.default_rng(run.seed * 100 + run.setting["lora_r"])
        right = rng.random(20) < labels_right[run.setting["lora_r"]]
        with open(os.path.join(run.folder, "adapter", "train_history.json"), "w") as f:
            json.dump(
                {"validation": [{"breed_accuracy": float(rng.random())}, {"breed_accuracy": float(rng.random())}]}, f
            )
        rows = [f"img{i},Pug,{'Pug' if ok else 'Boxer'}" for i, ok in enumerate(right)]
        with open(os.path.join(run.folder, "eval", "predictions.csv"), "w") as f:
            f.write("image_id,true_breed,fine_tuned_breed\n" + "\n".join(rows) + "\n")
        metrics = {"fine_tuned": {"breed_accuracy": float(right.mean()), "likelihood_top1": float(right.mean())}}
        if run.baselines:
            metrics["linear_probe"] = {"accuracy": 0.5 + run.seed / 100}
        with open(os.path.join(run.folder, "eval", "metrics.json"), "w") as f:
            json.dump(metrics, f)

    return run_one, calls


def test_resume_skips_finished_runs_and_redoes_unfinished_ones(tmp_path, monkeypatch):
    run_one, calls = _fake_run({8: 0.5, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    argv = [
        "--output_dir",
        str(tmp_path / "s"),
        "--lora_r",
        "8,32",
        "--lora_target_modules",
        "query,value",
        "--seeds",
        "1,2",
        "--gpus",
        "none",
    ]
    sweep.main(argv)
    assert len(calls) == 4
    unfinished = tmp_path / "s" / "r8_query+value_nall_seed2"
    os.remove(unfinished / "eval" / "metrics.json")  # as a run killed during its evaluation leaves it
    calls.clear()
    summary = sweep.main(argv)
    assert calls == ["r8_query+value_nall_seed2"] and not summary["missing_runs"]


def test_shards_of_a_job_array_split_the_grid_and_the_last_call_summarises(tmp_path, monkeypatch):
    run_one, calls = _fake_run({8: 0.5, 16: 0.6, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    base = ["--output_dir", str(tmp_path / "s"), "--lora_r", "8,16,32", "--seeds", "1,2", "--gpus", "none"]
    done = []
    for i in range(3):
        sweep.main(base + ["--shard", f"{i}/3"])
        done.append(list(calls))
        calls.clear()
    assert sorted(sum(done, [])) == sorted({n for d in done for n in d}) and len(sum(done, [])) == 12  # each run once
    summary = sweep.main(base + ["--summary_only"])
    assert not calls and not summary["missing_runs"]


def test_summary_numbers_equal_a_recomputation_from_the_runs_files(tmp_path, monkeypatch):
    run_one, _ = _fake_run({8: 0.5, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    out = tmp_path / "s"
    summary = sweep.main(
        [
            "--output_dir",
            str(out),
            "--lora_r",
            "8,32",
            "--lora_target_modules",
            "query,value",
            "--seeds",
            "1,2,3",
            "--gpus",
            "none",
        ]
    )
    _check_summary_against_runs(out, summary)
    assert summary["default"] == "r32_query+value_nall"
    assert summary["baselines"]["linear_probe"]["mean"] == pytest.approx(np.mean([0.51, 0.52, 0.53]))


def _check_summary_against_runs(out, summary):
    """Every mean and std in sweep.json and sweep.md, recomputed from each run's own metrics.json / history."""
    table = (out / "sweep.md").read_text()
    for s in summary["settings"]:
        test, val = [], []
        for seed in summary["seeds"]:
            folder = out / f"{s['name']}_seed{seed}"
            test.append(json.loads((folder / "eval" / "metrics.json").read_text())["fine_tuned"]["breed_accuracy"])
            history = json.loads((folder / "adapter" / "train_history.json").read_text())
            val.append(max(e["breed_accuracy"] for e in history["validation"]))
        for key, values in (("test_breed_accuracy", test), ("validation_breed_accuracy", val)):
            assert s[key]["mean"] == pytest.approx(np.mean(values))
            assert s[key]["std"] == pytest.approx(np.std(values, ddof=1))
            assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" in table
    best = max(summary["settings"], key=lambda s: s["validation_breed_accuracy"]["mean"])
    assert summary["best"] == best["name"]
    if "paired_test" in summary:
        a, b = [], []
        for seed in summary["seeds"]:
            a += _correct(out / f"{summary['default']}_seed{seed}")
            b += _correct(out / f"{summary['best']}_seed{seed}")
        pooled = summary["paired_test"]["pooled_over_seeds"]
        assert {k: pooled[k] for k in ("only_first_correct", "only_second_correct", "p_value")} == {
            k: mcnemar(a, b)[k] for k in ("only_first_correct", "only_second_correct", "p_value")
        }
    assert (out / "sweep.png").stat().st_size > 0


def _correct(folder):
    import pandas as pd

    frame = pd.read_csv(folder / "eval" / "predictions.csv", dtype=str).sort_values("image_id")
    return list(frame["fine_tuned_breed"] == frame["true_breed"])


# ---------------------------------------------------------------------------
# The real thing: a demo sweep of 2 settings x 2 seeds, killed midway and resumed


@pytest.mark.slow
def test_demo_sweep_killed_midway_resumes_only_the_missing_runs(tmp_path, tiny_clip, demo_assets):
    copy_demo(demo_assets, tmp_path)  # the session's pre-trained base, not a second pre-training in the first run
    out = tmp_path / "sweep"
    argv = [
        sys.executable,
        os.path.join(ROOT, "sweep.py"),
        *DEMO_GRID,
        "--output_dir",
        str(out),
        "--train_args",
        "--num_train_epochs 1",
        "--eval_args",
        f"--max_eval_samples 16 --bootstrap_samples 100 --clip_model {tiny_clip}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = out / "r8_query+value_nall_seed1" / "eval" / "metrics.json"
    # its own session: the kill reaches the sweep and the train.py / evaluate.py it is running, nothing else
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 600
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert first.exists(), "the first run did not finish"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stamp = first.stat().st_mtime_ns
    finished_before = sorted(p.parent.parent.name for p in out.glob("*/eval/metrics.json"))
    assert 1 <= len(finished_before) < 4

    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(finished_before)} finished, {4 - len(finished_before)} to run" in again.stderr
    assert first.stat().st_mtime_ns == stamp  # a finished run is not redone
    summary = json.loads((out / "sweep.json").read_text())
    assert not summary["missing_runs"]
    _check_summary_against_runs(out, summary)
    # the baselines were scored in the default setting's runs (one per seed), with intervals
    metrics = json.loads((out / "r32_query+value_nall_seed1" / "eval" / "metrics.json").read_text())
    assert "accuracy_ci95" in metrics["linear_probe"] and "accuracy_ci95" in metrics["clip_zero_shot"]
    assert summary["baselines"]["linear_probe"]["n"] == 2


def test_one_run_per_gpu_at_a_time_on_several_gpus(tmp_path, monkeypatch):
    """--gpus 0,1: two runs at once, each child sees only its own GPU (CUDA_VISIBLE_DEVICES)."""
    stage = (
        "import os, sys, time; t = time.time(); time.sleep(1.5); "
        "print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), t, time.time())"
    )
    monkeypatch.setattr(
        sweep_runs.Run,
        "commands",
        lambda self, cfg, grid: {"train": [sys.executable, "-c", stage], "evaluate": [sys.executable, "-c", "pass"]},
    )
    monkeypatch.setattr(sweep_runs, "check_trained_setting", lambda run: None)
    summary = sweep.main(
        [
            "--output_dir",
            str(tmp_path / "s"),
            "--lora_r",
            "8,32",
            "--lora_target_modules",
            "query,value",
            "--seeds",
            "1,2",
            "--gpus",
            "0,1",
        ]
    )
    spans = {}
    for log in (tmp_path / "s").glob("*/train.log"):
        _, gpu, start, end = log.read_text().split()
        spans.setdefault(gpu, []).append((float(start), float(end)))
    assert sorted(spans) == ["0", "1"] and sum(len(v) for v in spans.values()) == 4
    for runs in spans.values():  # one at a time on each GPU
        runs.sort()
        assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:]))
    first0, first1 = spans["0"][0], spans["1"][0]
    assert first0[0] < first1[1] and first1[0] < first0[1]  # the two GPUs ran at the same time
    assert len(summary["missing_runs"]) == 4  # the stand-in wrote no metrics: nothing is summarised as finished
