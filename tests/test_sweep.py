"""sweep.py and its libraries: the grid's options, resuming, shards, the summary's numbers, and a real demo sweep
killed midway."""

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import sweep_runs
from helpers import ROOT, copy_demo, run_script
from metrics import mcnemar
from run_io import UserError
from run_record import save_run_config

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
        (["--seeds", "1,01"], "repeats 1 \\(as '01'\\)"),  # one seed, however spelled
        (["--lora_r", "8,08"], "repeats 8"),
        (["--max_train_samples", "100,0100,all"], "repeats 100"),
        (["--max_train_samples", "all,ALL"], "repeats all"),
        (["--lora_target_modules", "query,value/value, query"], "repeats query,value"),  # one set of modules
        (["--lora_target_modules", "query,query"], "repeats query"),
        (["--use_dora", "false,False"], "repeats false"),
        (["--use_dora", "maybe"], "not true or false"),
        (["--train_args", "--seed 3"], "which the sweep sets"),
        (["--eval_args=--output_dir=x"], "which the sweep sets"),
        # every spelling the scripts' parser takes (HfArgumentParser adds the dashed one)
        (["--train_args", "--lora-alpha 1"], "sets --lora-alpha, which the sweep sets"),
        (["--train_args=--lora_alpha=1"], "sets --lora_alpha, which the sweep sets"),
        (["--train_args=--output-dir=/tmp/elsewhere"], "sets --output-dir, which"),
        (["--train_args", "--num_train_epochs 1 --max-train-samples 5"], "sets --max-train-samples, which"),
        (["--train_args", "--use-dora True"], "sets --use-dora, which"),
        (["--eval_args=--adapter=x"], "sets --adapter, which"),
        (["--eval-args=--no-demo"], "sets --no-demo, which"),
        (["--train_args", "'unclosed"], "cannot be split"),
        (["--train_args", "run.yaml"], "passes the options file 'run.yaml'"),
        (["--eval_args", "--bootstrap_samples 50 old/run_config.json"], "passes the options file"),
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


def _fake_run(labels_right: dict, trained_on=None):
    """A Runner.run_one that writes what train.py and evaluate.py would: history, metrics and predictions."""
    calls = []

    def run_one(self, run, slot):
        calls.append(run.name)
        for sub in ("adapter", "eval"):  # from scratch, as the real one
            shutil.rmtree(os.path.join(run.folder, sub), ignore_errors=True)
            os.makedirs(os.path.join(run.folder, sub))
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
        s = run.setting
        shared = {
            **{k: s[k] for k in ("lora_r", "lora_target_modules", "max_train_samples")},
            "lora_alpha": 2 * s["lora_r"],
        }
        save_run_config(
            os.path.join(run.folder, "adapter", "run_config.json"),
            shared=shared,
            train={"seed": run.seed},
            **({"trained_on": trained_on} if trained_on else {}),
        )
        with open(os.path.join(run.folder, "adapter", "adapter_config.json"), "w") as f:
            json.dump({"r": s["lora_r"], "use_dora": bool(s.get("use_dora"))}, f)  # as PEFT records it
        save_run_config(
            os.path.join(run.folder, "eval", "run_config.json"),
            evaluate={"adapter": os.path.join(run.folder, "adapter")},
        )

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


def _grid(out, *more):
    """2 settings x 2 seeds, one run at a time: r8 and r32 (the default) on query,value, seeds 1 and 2."""
    return ["--output_dir", str(out), "--lora_r", "8,32", "--lora_target_modules", "query,value", "--seeds", "1,2"] + [
        "--gpus",
        "none",
        *more,
    ]


def _redone(caplog) -> list:
    return [r.getMessage().split()[1] for r in caplog.records if "is redone" in r.getMessage()]


def test_a_sweep_resumed_under_another_spelling_of_its_folder_redoes_nothing(tmp_path, monkeypatch, caplog):
    """Relative or absolute, from another working folder, or moved: the same runs, none trained again."""
    run_one, calls = _fake_run({8: 0.5, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    monkeypatch.chdir(tmp_path)
    sweep.main(_grid("s"))
    assert len(calls) == 4
    (tmp_path / "elsewhere").mkdir()
    for where, spelling in (
        (tmp_path, str(tmp_path / "s")),
        (tmp_path, "./s/"),
        (tmp_path / "elsewhere", "../s"),
        (tmp_path / "elsewhere", str(tmp_path / "moved")),
    ):
        if spelling.endswith("moved"):
            os.rename(tmp_path / "s", tmp_path / "moved")
        monkeypatch.chdir(where)
        calls.clear()
        summary = sweep.main(_grid(spelling))
        assert calls == [] and not summary["missing_runs"], spelling
    assert not _redone(caplog)
    _check_summary_against_runs(tmp_path / "moved", summary)


TARGET, OTHER = "r32_query+value_nall_seed2", "r8_query+value_nall_seed1"


def _rewrite(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _half_moved(run, other):
    """As a kill during evaluate.py's staged move leaves eval/: metrics.json in place, predictions.csv not yet."""
    staging = run / "eval" / ".saving-x"
    staging.mkdir()
    os.replace(run / "eval" / "predictions.csv", staging / "predictions.csv")
    (run / "eval" / ".moving.json").write_text(json.dumps({"staging": ".saving-x", "files": ["predictions.csv"]}))


def _foreign_eval(run, other):
    shutil.rmtree(run / "eval")
    shutil.copytree(other / "eval", run / "eval")


def _adapter_of(key, value):
    def edit(run, other):
        _rewrite(run / "adapter" / "run_config.json", lambda r: {**r, key: {**r[key], **value}})

    return edit


def _text(name, text):
    return lambda run, other: (run / name).write_text(text)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda run, other: (run / "eval/metrics.json").write_text('{"fine_tuned": {"breed_accura'), "metrics.json"),
        (_text("eval/metrics.json", "{}"), "metrics.json"),
        (_text("eval/metrics.json", "[]"), "metrics.json"),
        (_text("eval/metrics.json", '{"fine_tuned": {"breed_accuracy": "high", "likelihood_top1": 1}}'), "metrics"),
        (
            _text(
                "eval/metrics.json", '{"fine_tuned": {"breed_accuracy": 1, "likelihood_top1": 1}, "linear_probe": []}'
            ),
            None,
        ),  # not damage: a baseline that is no dict is not read; the run stays finished
        (_text("adapter/train_history.json", "[]"), "train_history.json"),
        (_text("adapter/train_history.json", '{"validation": [0.5, 0.6]}'), "train_history.json"),
        (_text("run.json", "{}"), "run.json"),
        (_text("run.json", "[]"), "run.json"),
        (_foreign_eval, "names '.*r8_query\\+value_nall_seed1/adapter'"),  # another run's evaluation
        (_half_moved, "stopped while moving"),
        (_adapter_of("train", {"seed": 1}), "seed 1, not"),  # the adapter of another seed
        (_adapter_of("shared", {"lora_alpha": 1}), "lora_alpha 1 "),  # trained with another alpha than sweep.md says
        (lambda run, other: os.remove(run / "eval/run_config.json"), "eval/run_config.json names None"),
        (lambda run, other: os.remove(run / "adapter/adapter_config.json"), "adapter_config.json is missing"),
    ],
)
def test_a_run_whose_files_are_incomplete_or_not_its_own_is_redone_saying_why(
    damage, why, tmp_path, monkeypatch, caplog
):
    run_one, calls = _fake_run({8: 0.5, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    out = tmp_path / "s"
    sweep.main(_grid(out))
    damage(out / TARGET, out / OTHER)
    calls.clear()
    summary = sweep.main(_grid(out))
    warnings = [r.getMessage() for r in caplog.records if "is redone" in r.getMessage()]
    if why is None:
        assert calls == [] and not warnings
    else:
        assert calls == [TARGET] and len(warnings) == 1 and re.search(why, warnings[0]), warnings
    assert not summary["missing_runs"]
    _check_summary_against_runs(out, summary)


def test_a_sweep_config_of_the_wrong_shape_is_one_line(tmp_path, monkeypatch):
    run_one, _ = _fake_run({8: 0.5, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    out = tmp_path / "s"
    sweep.main(_grid(out))
    for text in ("[]", "{}", '{"demo": false}', "3"):
        (out / "sweep_config.json").write_text(text)
        with pytest.raises(UserError, match="is not a sweep's record .*write .*demo.* into it"):
            sweep.main(_grid(out))


def test_results_page_from_a_metrics_json_of_the_wrong_shape_is_one_line(tmp_path, monkeypatch):
    run_one, _ = _fake_run({8: 0.5, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    (tmp_path / "eval").mkdir()
    for text in ("[]", "{}", '{"zero_shot": {"breed_accuracy": 0.5}, "fine_tuned": []}'):
        (tmp_path / "eval" / "metrics.json").write_text(text)
        with pytest.raises(UserError, match="is not a complete evaluate.py metrics.json"):
            sweep.main(
                _grid(tmp_path / "s", "--results", str(tmp_path / "results.md"), "--eval_dir", str(tmp_path / "eval"))
            )
    assert not (tmp_path / "results.md").exists()


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


def test_the_summary_names_the_classes_as_the_runs_label_set_does(tmp_path, monkeypatch):
    birds = {"labels": {"names": ["Blue Jay", "Snowy Owl"], "kind": "class"}}
    for trained_on, kind in ((None, "breed"), (birds, "class")):
        run_one, _ = _fake_run({8: 0.5, 32: 0.8}, trained_on)
        monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
        out = tmp_path / kind
        summary = sweep.main(["--output_dir", str(out), "--lora_r", "8", "--seeds", "1", "--gpus", "none"])
        table = (out / "sweep.md").read_text()
        assert summary["kind"] == kind and f"| test {kind} acc. |" in table
        assert (kind == "breed") == ("breed" in table)


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


@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_every_spelling_the_scripts_take_of_the_sweeps_own_options_is_refused(script, tmp_path):
    """Each option string the script's parser maps to an option the sweep sets (--lora-alpha, --no_x, ...) is
    refused in --train_args / --eval_args; the abbreviations the sweep cannot see are refused by the script."""
    from config import EvalConfig, PetConfig, TrainConfig, parse_options

    types = (PetConfig, TrainConfig if script == "train" else EvalConfig)
    flag = "train_args" if script == "train" else "eval_args"
    parser, _ = parse_options(types, ["--output_dir", str(tmp_path)])
    spellings = [s for s, a in parser._option_string_actions.items() if a.dest in sweep_runs.OWN_OPTIONS]
    assert {"--output-dir", "--lora-alpha", "--lora_alpha"} <= set(spellings)
    for spelling in spellings:
        with pytest.raises(UserError, match="which the sweep sets"):
            sweep.parse_args([f"--{flag}={spelling}=1"])
        with pytest.raises(UserError, match="not used"):
            parse_options(types, ["--output_dir", str(tmp_path), spelling[:-1], "1"])


# ---------------------------------------------------------------------------
# Processes: a killed sweep's children, and run folders that a live process holds


def _stand_in_stages(monkeypatch, train_code="pass"):
    monkeypatch.setattr(
        sweep_runs.Run,
        "commands",
        lambda self, cfg, grid: {
            "train": [sys.executable, "-c", train_code],
            "evaluate": [sys.executable, "-c", "pass"],
        },
    )
    monkeypatch.setattr(sweep_runs, "check_trained_setting", lambda run: None)


def test_a_run_folder_that_a_live_process_holds_is_skipped_not_deleted(tmp_path, monkeypatch, caplog):
    """An orphaned train.py (its adapter/.lock held) keeps its folder; so does a run another sweep is running."""
    from run_io import exclusive_lock

    _stand_in_stages(monkeypatch)
    out = tmp_path / "s"
    sweep.main(_grid(out))  # the stand-ins write no metrics: every run stays unfinished
    orphan = out / OTHER / "adapter"
    (orphan / "adapter_model.safetensors").write_bytes(b"being written")

    def busy(holder):
        raise AssertionError(f"held by {holder} before the sweep ran")

    # flock: a second open file of the same lock conflicts, even in one process
    with exclusive_lock(str(orphan / ".lock"), busy):
        sweep.main(_grid(out))
    assert (orphan / "adapter_model.safetensors").read_bytes() == b"being written"
    (out / TARGET / "train.log").write_text("the other sweep's log")
    with exclusive_lock(str(out / TARGET / ".lock"), busy):  # another sweep is running that run
        summary = sweep.main(_grid(out))
    assert (out / TARGET / "train.log").read_text() == "the other sweep's log"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and all(f"in use by pid {os.getpid()}" in m for m in skipped), skipped
    assert skipped[0].startswith(f"run {OTHER} skipped") and skipped[1].startswith(f"run {TARGET} skipped")
    assert len(summary["missing_runs"]) == 4


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_sweeps_train_py_dies_with_it(tmp_path):
    pid_file, out = tmp_path / "train.pid", tmp_path / "s"
    stage = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    driver = tmp_path / "driver.py"
    # the real sweep.py in its own process, its train.py a stand-in that sleeps
    driver.write_text(
        f"import runpy, sys\nsys.path.insert(0, {ROOT!r})\nimport sweep_runs\n"
        "sweep_runs.Run.commands = lambda self, cfg, grid: "
        f"{{'train': [sys.executable, '-c', {stage!r}], 'evaluate': [sys.executable, '-c', 'pass']}}\n"
        f"sys.argv = ['sweep.py', '--output_dir', {str(out)!r}, '--lora_r', '8', '--seeds', '1', '--gpus', 'none']\n"
        f"runpy.run_path({os.path.join(ROOT, 'sweep.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child = None
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no train.py"
        child = int(pid_file.read_text())
        proc.kill()  # SIGKILL: the sweep cannot clean up
        proc.wait()
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the killed sweep's train.py is still running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------
# DoRA as a grid axis


def test_use_dora_is_an_axis_and_lora_runs_keep_todays_names_and_commands(tmp_path, monkeypatch):
    out = tmp_path / "s"
    cfg, grid = sweep.parse_args(
        ["--output_dir", str(out), "--lora_r", "8", "--lora_target_modules", "query,value", "--use_dora", "false,true"]
        + ["--seeds", "1"]
    )
    lora, dora = sweep_runs.plan(cfg, grid)
    assert (lora.name, dora.name) == ("r8_query+value_nall_seed1", "r8_query+value_nall_dora_seed1")
    adapter = os.path.join(str(out), lora.name, "adapter")
    # the command a LoRA run always had; DoRA's adds the flag
    assert lora.commands(cfg, grid)["train"][2:] == [
        "--output_dir",
        adapter,
        "--seed",
        "1",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--lora_target_modules",
        "query,value",
    ]
    assert dora.commands(cfg, grid)["train"][12:] == ["--use_dora", "True"]

    run_one, calls = _fake_run({8: 0.5, 32: 0.8})
    monkeypatch.setattr(sweep_runs.Runner, "run_one", run_one)
    summary = sweep.main(_grid(out, "--use_dora", "false,true"))
    assert len(calls) == 8 and not summary["missing_runs"]
    _check_summary_against_runs(out, summary)
    assert [(s["name"], s["use_dora"]) for s in summary["settings"]][:2] == [
        ("r8_query+value_nall", False),
        ("r8_query+value_nall_dora", True),
    ]
    table = (out / "sweep.md").read_text()
    assert "| 8 | 16 | LoRA | query,value |" in table and "| 8 | 16 | DoRA | query,value |" in table
    assert summary["default"] == "r32_query+value_nall"  # LoRA: train.py's default

    # a run.json written before DoRA was an axis (no use_dora in its setting) is the same LoRA run
    for record in out.glob("*/run.json"):
        if "_dora_" not in record.parent.name:
            _rewrite(record, lambda r: {**r, "setting": {k: v for k, v in r["setting"].items() if k != "use_dora"}})
    calls.clear()
    assert not sweep.main(_grid(out, "--use_dora", "false,true"))["missing_runs"] and calls == []


def test_a_dora_run_whose_adapter_is_lora_is_refused(tmp_path, monkeypatch):
    """A train.py that ignored --use_dora (PEFT's adapter_config.json says LoRA): one line, not a LoRA result filed
    as DoRA's."""
    run_one, _ = _fake_run({8: 0.5, 32: 0.8})

    def lora_only(self, run, slot):
        run_one(self, run, slot)
        _rewrite(Path(run.folder) / "adapter" / "adapter_config.json", lambda r: {**r, "use_dora": False})
        sweep_runs.check_trained_setting(run)

    monkeypatch.setattr(sweep_runs.Runner, "run_one", lora_only)
    with pytest.raises(UserError, match="r8_query\\+value_nall_dora_seed1: train.py trained .*'use_dora': False"):
        sweep.main(_grid(tmp_path / "s", "--use_dora", "true", "--lora_r", "8"))


def test_links_in_a_sweep_folder_are_never_followed(tmp_path, monkeypatch):
    """A run's adapter/ that is a link: only the link goes; a run folder that is a link: one line."""
    _stand_in_stages(monkeypatch)
    out, outside = tmp_path / "s", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    sweep.main(_grid(out))
    adapter = out / TARGET / "adapter"
    shutil.rmtree(adapter)
    adapter.symlink_to(outside)
    sweep.main(_grid(out))
    assert adapter.is_dir() and not adapter.is_symlink() and sorted(os.listdir(outside)) == ["keep.txt"]
    shutil.rmtree(out / TARGET)
    (out / TARGET).symlink_to(outside)
    with pytest.raises(UserError, match="is a symbolic link, not a run folder"):
        sweep.main(_grid(out))
    assert sorted(os.listdir(outside)) == ["keep.txt"]


def test_one_gpu_given_twice_is_refused():
    with pytest.raises(UserError, match="repeats 0"):
        sweep_runs.pick_slots("0,00")


def test_a_file_given_as_a_flags_value_passes_through():
    _, grid = sweep.parse_args(["--train_args", "--label_names names.json --logging_dir=x.yaml"])
    assert grid.train_args == ["--label_names", "names.json", "--logging_dir=x.yaml"]
