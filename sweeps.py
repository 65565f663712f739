"""A grid of LoRA settings x seeds, each run through the real train.py and evaluate.py as subprocesses.

Layout of --output_dir:

    sweep_config.json            what every run shares (demo, pass-through flags): another sweep's folder is refused
    <setting>_seed<S>/run.json   the run's setting, seed and commands, written before it starts
    <setting>_seed<S>/adapter/   train.py's --output_dir (adapter, run_config.json, train_history.json, train.log)
    <setting>_seed<S>/eval/      evaluate.py's --output_dir (metrics.json, predictions.csv, report.md, eval.log)
    sweep.md, sweep.json, sweep.png

A run is finished when its eval/metrics.json exists (evaluate.py writes it last, atomically) and its run.json
matches; rerunning the sweep skips finished runs and redoes the others from scratch, so a killed sweep resumes.
Runs go one per GPU at once on a machine with several (CUDA_VISIBLE_DEVICES); past one machine, a job array
runs one --shard each on a shared folder and a last `--summary_only` call writes the summary.

Time of `make reproduce` on one H100, estimated (not measured) from benchmarks/results/h100-recipe-summary.txt:
train.py 150 s (37 s of it building the embedding cache, which later runs reuse), evaluate.py 68 s plus about
1-2 min of baselines (the probe encodes train, validation and test again in bf16; CLIP 3.7k images),
explainability.py 27 s; the default sweep is 12 runs of about 115-150 s training and 68 s evaluation, the
baselines in 3 of them: about 40-45 min. In all about 45-50 min, downloads not counted.
"""

import itertools
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from config import DEMO_OVERRIDES, PetConfig, check_seed
from figures import pyplot
from run_io import UserError, check_output_dir, locked_output_dir, setup_logging, write_json_atomic
from run_record import read_run_config, save_run_config

logger = logging.getLogger("sweep")
ROOT = os.path.dirname(os.path.abspath(__file__))
SWEEP_FILE = "sweep_config.json"
# set by the sweep for every run: not allowed in --train_args / --eval_args
OWN_FLAGS = {
    "--output_dir",
    "--seed",
    "--lora_r",
    "--lora_alpha",
    "--lora_target_modules",
    "--max_train_samples",
    "--adapter",
    "--demo",
    "--split",
}


@dataclass
class SweepConfig:
    """sweep.py's options. Grid axes are comma-separated lists (target-module sets separated by '/')."""

    output_dir: str = field(default="outputs/sweep", metadata={"help": "one folder per run, and sweep.md/json/png"})
    lora_r: str = field(
        default="8,32", metadata={"help": "LoRA ranks, e.g. 8,16,32,64 (lora_alpha = 2 x r: the same scale)"}
    )
    lora_target_modules: str = field(
        default="query,value/query,key,value,dense",
        metadata={"help": "module sets separated by '/', e.g. query,value/query,key,value,dense"},
    )
    max_train_samples: str = field(
        default="all", metadata={"help": "training images per run (learning curve), e.g. 500,1000,all"}
    )
    seeds: str = field(default="1,2,3", metadata={"help": "training seeds; every setting runs once per seed"})
    demo: bool = field(
        default=False, metadata={"help": "offline: every run on the demo's tiny model and synthetic pets"}
    )
    train_args: str = field(
        default="", metadata={"help": 'more train.py flags for every run, e.g. "--num_train_epochs 3"'}
    )
    eval_args: str = field(
        default="", metadata={"help": 'more evaluate.py flags for every run, e.g. "--max_eval_samples 500"'}
    )
    gpus: str = field(
        default="auto",
        metadata={
            "help": "GPU ids to run on, one run per GPU at a time: auto (every visible "
            "GPU), e.g. 0,1, or none (one run at a time on the default device)"
        },
    )
    shard: str = field(
        default="0/1", metadata={"help": "i/n: run only every n-th run starting at i (a job array's task)"}
    )
    summary_only: bool = field(default=False, metadata={"help": "run nothing; summarise the finished runs"})
    results: Optional[str] = field(
        default=None,
        metadata={
            "help": "also write a results page here (e.g. outputs/results.md): "
            "--eval_dir's headline numbers and baselines, and this sweep"
        },
    )
    eval_dir: str = field(default="outputs/eval", metadata={"help": "evaluate.py's output folder, for --results"})


# ---------------------------------------------------------------------------
# Options


def _values(flag: str, text: str, sep: str = ",") -> list:
    values = [v.strip() for v in text.split(sep)]
    if not text.strip() or any(not v for v in values):
        raise UserError(
            f"--{flag} {text!r} has an empty value; give a {sep!r}-separated list, e.g. "
            f"{SweepConfig.__dataclass_fields__[flag].default!r}"
        )
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"--{flag} {text!r} repeats {', '.join(repeated)}: each value once")
    return values


def _ints(flag: str, text: str, allow_all: bool = False, minimum: int = 1) -> list:
    out = []
    for v in _values(flag, text):
        if allow_all and v.lower() == "all":
            out.append(None)
            continue
        try:
            n = int(v)
        except ValueError:
            raise UserError(f"--{flag}: {v!r} is not a whole number{' or all' if allow_all else ''}") from None
        if n < minimum:
            raise UserError(f"--{flag}: {n} must be at least {minimum}")
        out.append(n)
    return out


def _pass_through(flag: str, text: str) -> list:
    try:
        args = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--{flag} {text!r} cannot be split into flags ({e})") from None
    own = sorted({a.split("=")[0] for a in args if a.split("=")[0] in OWN_FLAGS})
    if own:
        raise UserError(
            f"--{flag} sets {', '.join(own)}, which the sweep sets for every run; use the sweep's own options"
        )
    return args


@dataclass
class Grid:
    settings: list  # dicts: lora_r, lora_target_modules, max_train_samples
    seeds: list
    train_args: list
    eval_args: list


def grid_from(cfg: SweepConfig) -> Grid:
    """The checked grid: one UserError line for an empty list, a repeated value, a bad number or a pass-through clash."""
    ranks = _ints("lora_r", cfg.lora_r)
    targets = [
        ",".join(t.strip() for t in s.split(",")) for s in _values("lora_target_modules", cfg.lora_target_modules, "/")
    ]
    for t in targets:
        _values("lora_target_modules", t)  # "query,,value" is an empty module name
    samples = _ints("max_train_samples", cfg.max_train_samples, allow_all=True)
    seeds = _ints("seeds", cfg.seeds, minimum=0)
    for s in seeds:
        check_seed(s)
    n_shard = parse_shard(cfg.shard)[1]
    if n_shard < 1:
        raise UserError(f"--shard {cfg.shard!r}: n must be at least 1")
    settings = [
        {"lora_r": r, "lora_target_modules": t, "max_train_samples": n}
        for r, t, n in itertools.product(ranks, targets, samples)
    ]
    return Grid(settings, seeds, _pass_through("train_args", cfg.train_args), _pass_through("eval_args", cfg.eval_args))


def parse_shard(text: str) -> tuple:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} must be i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text!r}: i must be in 0..n-1")
    return i, n


def default_setting(demo: bool) -> dict:
    """The setting train.py uses without flags (the demo's with --demo): the paired test's reference."""
    cfg, preset = PetConfig(), DEMO_OVERRIDES if demo else {}
    return {
        "lora_r": preset.get("lora_r", cfg.lora_r),
        "max_train_samples": cfg.max_train_samples,
        "lora_target_modules": preset.get("lora_target_modules", cfg.lora_target_modules),
    }


def setting_name(s: dict) -> str:
    n = "all" if s["max_train_samples"] is None else s["max_train_samples"]
    return f"r{s['lora_r']}_{s['lora_target_modules'].replace(',', '+')}_n{n}"


# ---------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    setting: dict
    seed: int
    folder: str
    baselines: bool  # this run's evaluation also scores the baselines

    @property
    def name(self):
        return os.path.basename(self.folder)

    def commands(self, cfg: SweepConfig, grid: Grid) -> dict:
        s = self.setting
        train = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--output_dir",
            os.path.join(self.folder, "adapter"),
            "--seed",
            str(self.seed),
            "--lora_r",
            str(s["lora_r"]),
            "--lora_alpha",
            str(2 * s["lora_r"]),
            "--lora_target_modules",
            s["lora_target_modules"],
        ]
        if s["max_train_samples"] is not None:
            train += ["--max_train_samples", str(s["max_train_samples"])]
        # evaluate.py keeps its own --seed, so every run scores the same test images (the paired test needs them)
        evaluate = [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--adapter",
            os.path.join(self.folder, "adapter"),
            "--output_dir",
            os.path.join(self.folder, "eval"),
        ]
        demo = ["--demo"] if cfg.demo else []
        # the baselines do not depend on the LoRA setting: scored in one setting's runs only (one per seed)
        off = [] if self.baselines else ["--linear_probe", "False", "--clip_model", "none"]
        return {"train": train + demo + grid.train_args, "evaluate": evaluate + demo + grid.eval_args + off}

    def record(self, cfg, grid) -> dict:
        commands = self.commands(cfg, grid)
        return {
            "setting": self.setting,
            "seed": self.seed,
            "baselines": self.baselines,
            "train_args": commands["train"][2:],
            "eval_args": commands["evaluate"][2:],
        }

    def finished(self, cfg, grid) -> bool:
        return os.path.isfile(os.path.join(self.folder, "eval", "metrics.json")) and _read(
            os.path.join(self.folder, "run.json")
        ) == self.record(cfg, grid)


def plan(cfg: SweepConfig, grid: Grid) -> list:
    default = default_setting(cfg.demo)
    with_baselines = default if default in grid.settings else grid.settings[0]
    return [
        Run(s, seed, os.path.join(cfg.output_dir, f"{setting_name(s)}_seed{seed}"), s == with_baselines)
        for s in grid.settings
        for seed in grid.seeds
    ]


def write_json(path: str, data) -> None:
    """Complete or absent (shards of a job array may write at once), indented for people to read."""
    write_json_atomic(path, data, prefix=".tmp-", suffix="", indent=2)


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_sweep_folder(cfg: SweepConfig, grid: Grid) -> None:
    """Claim --output_dir for this sweep, or UserError when it holds another sweep's runs (or other files)."""
    identity = {"demo": cfg.demo, "train_args": grid.train_args, "eval_args": grid.eval_args}
    path = os.path.join(cfg.output_dir, SWEEP_FILE)
    check_output_dir(cfg.output_dir)
    saved = _read(path)
    if os.path.exists(path) and saved is None:
        raise UserError(f"{path} is unreadable; remove it, or pass another --output_dir")
    if saved is None:
        # (a job array's shards start at once: the first one's sweep_config.json is no stranger)
        others = (
            [n for n in os.listdir(cfg.output_dir) if not n.startswith(".") and n != SWEEP_FILE]
            if os.path.isdir(cfg.output_dir)
            else []
        )
        if others:
            raise UserError(
                f"--output_dir {cfg.output_dir!r} holds other files ({', '.join(sorted(others)[:3])}), "
                "not a sweep; pass an empty or new folder"
            )
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json(path, identity)
        return
    differ = [f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in identity.items() if saved.get(k) != v]
    if differ:
        raise UserError(
            f"--output_dir {cfg.output_dir!r} holds another sweep's runs ({'; '.join(differ)}); "
            "pass another --output_dir, or the same --demo/--train_args/--eval_args to resume it"
        )


class Runner:
    """Runs each Run's train.py then evaluate.py; one at a time per slot (a GPU id, or None)."""

    def __init__(self, cfg: SweepConfig, grid: Grid, slots: list):
        self.cfg, self.grid, self.slots = cfg, grid, slots
        self.live = set()  # Popen objects of the runs in progress, terminated if the sweep is stopped
        self.lock = threading.Lock()
        self.failed = []

    def run_all(self, runs: list) -> None:
        from queue import Empty, SimpleQueue

        from tqdm.auto import tqdm

        todo = SimpleQueue()
        for run in runs:
            todo.put(run)
        bar = tqdm(total=len(runs), desc="sweep runs", unit="run")

        def worker(slot):
            while not self.failed:
                try:
                    run = todo.get_nowait()
                except Empty:
                    return
                try:
                    self.run_one(run, slot)
                except UserError as e:
                    self.failed.append(str(e))
                    return
                bar.update(1)

        threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in self.slots]
        previous = (
            signal.signal(signal.SIGTERM, _raise_interrupt)
            if threading.current_thread() is threading.main_thread()
            else None
        )
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except BaseException:
            self.stop()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            bar.close()
        if self.failed:
            raise UserError(self.failed[0])

    def stop(self):
        with self.lock:
            for proc in list(self.live):
                proc.terminate()
        for proc in list(self.live):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run_one(self, run: Run, slot) -> None:
        # held for the whole run: a second sweep (or shard) on the same run gets one line, not a mix
        with locked_output_dir(run.folder):
            for sub in ("adapter", "eval"):  # an unfinished run starts again from scratch
                shutil.rmtree(os.path.join(run.folder, sub), ignore_errors=True)
            write_json(os.path.join(run.folder, "run.json"), run.record(self.cfg, self.grid))
            commands = run.commands(self.cfg, self.grid)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            for stage, log_dir in (("train", "adapter"), ("evaluate", "eval")):
                os.makedirs(os.path.join(run.folder, log_dir), exist_ok=True)
                log_path = os.path.join(run.folder, f"{stage}.log")
                with open(log_path, "w") as log:
                    proc = subprocess.Popen(commands[stage], stdout=log, stderr=subprocess.STDOUT, env=env)
                    with self.lock:
                        self.live.add(proc)
                    try:
                        code = proc.wait()
                    finally:
                        with self.lock:
                            self.live.discard(proc)
                if code != 0:
                    raise UserError(
                        f"run {run.name}: {stage}.py failed (exit {code}): {_last_error(log_path)}; "
                        f"full log: {log_path}"
                    )
            check_trained_setting(run)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _last_error(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "Traceback")) or "Error" in line.split(":")[0]]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def check_trained_setting(run: Run) -> None:
    """UserError when the adapter's run_config.json says it trained another setting than the sweep asked for."""
    saved = read_run_config(os.path.join(run.folder, "adapter", "run_config.json"))
    shared, train = (saved.options("shared"), saved.options("train")) if saved else ({}, {})
    got = {k: shared.get(k) for k in run.setting}
    got_seed = train.get("seed")
    if got != run.setting or got_seed != run.seed:
        raise UserError(
            f"run {run.name}: train.py trained {got} with seed {got_seed}, not the sweep's {run.setting} "
            f"with seed {run.seed}"
        )


def pick_slots(text: str) -> list:
    """GPU ids, one run each at a time; [None] = one run at a time on the default device."""
    if text.lower() == "none":
        return [None]
    if text.lower() == "auto":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip():
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            return ids[: torch.cuda.device_count()] or [None]
        return list(range(torch.cuda.device_count())) or [None]
    return _values("gpus", text)


# ---------------------------------------------------------------------------
# Summary


def run_result(run: Run) -> Optional[dict]:
    """A finished run's numbers from its own files, or None."""
    metrics = _read(os.path.join(run.folder, "eval", "metrics.json"))
    history = _read(os.path.join(run.folder, "adapter", "train_history.json"))
    if metrics is None or history is None:
        return None
    val = [e["breed_accuracy"] for e in history.get("validation", []) if "breed_accuracy" in e]
    out = {
        "seed": run.seed,
        "folder": run.folder,
        "validation_breed_accuracy": max(val) if val else None,
        "test_breed_accuracy": metrics["fine_tuned"]["breed_accuracy"],
        "test_likelihood_top1": metrics["fine_tuned"]["likelihood_top1"],
    }
    for key in ("linear_probe", "clip_zero_shot"):
        if "accuracy" in (metrics.get(key) or {}):
            out[key] = metrics[key]["accuracy"]
    return out


def mean_std(values: list) -> dict:
    """Mean and sample standard deviation (ddof=1; None for a single value) over seeds."""
    v = [x for x in values if x is not None]
    return {
        "mean": float(np.mean(v)) if v else None,
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "n": len(v),
    }


def caption_correct(run: Run):
    """{image_id: fine-tuned caption right} from the run's predictions.csv."""
    import pandas as pd

    frame = pd.read_csv(os.path.join(run.folder, "eval", "predictions.csv"), dtype=str, keep_default_na=False)
    return dict(zip(frame["image_id"], frame["fine_tuned_breed"] == frame["true_breed"]))


def paired_test(best_runs: list, default_runs: list) -> dict:
    """Exact McNemar between two settings on the same test images, pooled over the seeds both have, and per seed.

    Pooled: each (seed, image) is one pair (the default's run and the best's run of that seed on that image).
    """
    from metrics import mcnemar

    by_seed = {r.seed: r for r in default_runs}
    pooled_a, pooled_b, per_seed = [], [], {}
    for run in best_runs:
        if run.seed not in by_seed:
            continue
        a, b = caption_correct(by_seed[run.seed]), caption_correct(run)
        common = sorted(set(a) & set(b))
        pa, pb = [a[i] for i in common], [b[i] for i in common]
        per_seed[str(run.seed)] = {**mcnemar(pa, pb), "images": len(common)}
        pooled_a += pa
        pooled_b += pb
    return {
        "first": "default",
        "second": "best",
        "pooled_over_seeds": {**mcnemar(pooled_a, pooled_b), "pairs": len(pooled_a)},
        "per_seed": per_seed,
    }


def summarise(cfg: SweepConfig, grid: Grid, runs: list) -> dict:
    default = default_setting(cfg.demo)
    settings, results = [], {}
    for s in grid.settings:
        mine = [r for r in runs if r.setting == s]
        done = [(r, res) for r in mine if (res := run_result(r)) is not None]
        results[setting_name(s)] = [r for r, _ in done]
        settings.append(
            {
                "name": setting_name(s),
                **s,
                "lora_alpha": 2 * s["lora_r"],
                "runs": [res for _, res in done],
                "validation_breed_accuracy": mean_std([res["validation_breed_accuracy"] for _, res in done]),
                "test_breed_accuracy": mean_std([res["test_breed_accuracy"] for _, res in done]),
                "test_likelihood_top1": mean_std([res["test_likelihood_top1"] for _, res in done]),
            }
        )
    ranked = [s for s in settings if s["validation_breed_accuracy"]["mean"] is not None]
    # chosen on validation only; ties go to the earlier setting in the grid
    best = max(ranked, key=lambda s: s["validation_breed_accuracy"]["mean"]) if ranked else None
    default_name = setting_name(default) if default in grid.settings else None
    baselines = {}
    for key in ("linear_probe", "clip_zero_shot"):
        values = [res[key] for s in settings for res in s["runs"] if key in res]
        if values:
            baselines[key] = mean_std(values)
    summary = {
        "std": "sample standard deviation (ddof=1) over seeds",
        "best_chosen_on": "mean validation breed accuracy",
        "settings": settings,
        "best": best["name"] if best else None,
        "default": default_name,
        "baselines": baselines,
        "seeds": grid.seeds,
        "missing_runs": [r.name for r in runs if run_result(r) is None],
    }
    if best and default_name and best["name"] != default_name and results[default_name] and results[best["name"]]:
        summary["paired_test"] = paired_test(results[best["name"]], results[default_name])
    return summary


def write_summary(cfg: SweepConfig, summary: dict) -> None:
    out = cfg.output_dir
    write_json(os.path.join(out, "sweep.json"), summary)
    plot_sweep(summary, os.path.join(out, "sweep.png"))
    tmp = os.path.join(out, ".sweep.md.tmp")
    with open(tmp, "w") as f:
        f.write(sweep_markdown(summary))
    os.replace(tmp, os.path.join(out, "sweep.md"))


def _ms(m: dict) -> str:
    if m["mean"] is None:
        return "-"
    return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["std"] is not None else f"{m['mean']:.3f}"


def sweep_markdown(summary: dict) -> str:
    rows = []
    for s in summary["settings"]:
        mark = " **best**" if s["name"] == summary["best"] else ""
        mark += " (default)" if s["name"] == summary["default"] else ""
        n = "all" if s["max_train_samples"] is None else s["max_train_samples"]
        rows.append(
            f"| {s['lora_r']} | {s['lora_alpha']} | {s['lora_target_modules']} | {n} | {s['test_breed_accuracy']['n']} | "
            f"{_ms(s['validation_breed_accuracy'])} | {_ms(s['test_breed_accuracy'])} | {_ms(s['test_likelihood_top1'])} |{mark} |"
        )
    names = {"linear_probe": "linear probe on frozen BLIP features", "clip_zero_shot": "CLIP zero-shot"}
    base = (
        "\n".join(f"| {names[k]} | {v['n']} | {_ms(v)} |" for k, v in summary["baselines"].items())
        or "| (none scored) | - | - |"
    )
    paired = summary.get("paired_test")
    if paired:
        p = paired["pooled_over_seeds"]
        per = "; ".join(
            f"seed {k}: {v['only_first_correct']} vs {v['only_second_correct']}, p = {v['p_value']:.3g}"
            for k, v in paired["per_seed"].items()
        )
        paired_text = (
            f"Exact McNemar test, best ({summary['best']}) against default ({summary['default']}), on the same "
            f"test images, **pooled over seeds** (each seed x image is one pair, {p['pairs']} pairs): default alone "
            f"right {p['only_first_correct']}, best alone right {p['only_second_correct']}, p = {p['p_value']:.3g}. "
            f"Per seed: {per}. Pooling treats seeds as independent replicates of the same images, so its p "
            "is optimistic when seeds agree image by image; the per-seed tests are the conservative reading."
        )
    elif summary["default"] is None:
        paired_text = "No paired test: the default setting is not in the grid."
    elif summary["best"] == summary["default"]:
        paired_text = "No paired test: the default setting is the best on validation."
    else:
        paired_text = "No paired test yet: the best or the default setting has no finished run."
    missing = summary["missing_runs"]
    return f"""# Sweep: LoRA settings x seeds

Per setting: mean ± sample standard deviation over seeds (ddof = 1) of the validation breed accuracy (the best
epoch's, as train.py selects it), the test breed accuracy (caption names the breed) and the test likelihood top-1.
lora_alpha = 2 x r throughout, so the LoRA scale is the same and only the rank changes. The best setting is
chosen on **validation only** (ties: the earlier in the grid); its test number is then read, not chosen on.

| r | alpha | target modules | train images | seeds | validation breed acc. | test breed acc. | test likelihood top-1 | |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Baselines on the same test images (they do not depend on the LoRA setting: scored in one setting's runs, over seeds):

| baseline | seeds | test top-1 |
|---|---|---|
{base}

{paired_text}

{f"Missing runs (not finished): {', '.join(missing)}." if missing else "Every run finished."}

![validation and test breed accuracy per setting](sweep.png)
"""


def plot_sweep(summary: dict, path: str) -> None:
    plt = pyplot()

    settings = summary["settings"]
    x = np.arange(len(settings))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(settings) + 3), 4.5))
    for offset, key, label in ((-0.1, "validation_breed_accuracy", "validation"), (0.1, "test_breed_accuracy", "test")):
        means = [s[key]["mean"] if s[key]["mean"] is not None else np.nan for s in settings]
        stds = [s[key]["std"] or 0.0 for s in settings]
        ax.errorbar(x + offset, means, yerr=stds, fmt="o", capsize=4, label=f"{label} breed accuracy (mean ± std)")
    styles = {"linear_probe": ("linear probe (test)", "--"), "clip_zero_shot": ("CLIP zero-shot (test)", ":")}
    for key, value in summary["baselines"].items():
        ax.axhline(value["mean"], color="gray", linestyle=styles[key][1], label=styles[key][0])
    ax.set_xticks(x, [s["name"].replace("_", "\n") for s in settings], fontsize=8)
    ax.set(
        ylabel="breed accuracy",
        ylim=(-0.02, 1.02),
        xlim=(-0.5, len(settings) - 0.5),
        title=f"Sweep over seeds {summary['seeds']}",
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci(value, interval) -> str:
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def write_results(path: str, eval_dir: str, sweep_dir: str, summary: dict) -> None:
    """One page of evidence: the main run's numbers with intervals, every baseline, and the sweep over seeds."""
    metrics = _read(os.path.join(eval_dir, "metrics.json"))
    if metrics is None:
        raise UserError(
            f"--results needs {os.path.join(eval_dir, 'metrics.json')} (run evaluate.py first, or pass --eval_dir)"
        )
    here = os.path.dirname(os.path.abspath(path))

    def link(p):
        return os.path.relpath(os.path.abspath(p), here)

    zs, ft = metrics["zero_shot"], metrics["fine_tuned"]
    rows = [
        f"| zero-shot BLIP, caption names the breed | {_ci(zs['breed_accuracy'], zs['breed_accuracy_ci95'])} |",
        f"| zero-shot BLIP, likelihood ranking top-1 | {_ci(zs['likelihood_top1'], zs['likelihood_top1_ci95'])} |",
        f"| **fine-tuned BLIP + LoRA, caption names the breed** | {_ci(ft['breed_accuracy'], ft['breed_accuracy_ci95'])} |",
        f"| fine-tuned BLIP + LoRA, likelihood ranking top-1 | {_ci(ft['likelihood_top1'], ft['likelihood_top1_ci95'])} |",
    ]
    for key, label in (("linear_probe", "linear probe on frozen BLIP features"), ("clip_zero_shot", "CLIP zero-shot")):
        b = metrics.get(key) or {}
        if "accuracy" in b:
            mc = b["mcnemar_vs_fine_tuned_caption"]
            rows.append(
                f"| {label} (McNemar vs fine-tuned captions: {mc['only_first_correct']} vs "
                f"{mc['only_second_correct']}, p = {mc['p_value']:.3g}) | {_ci(b['accuracy'], b['accuracy_ci95'])} |"
            )
        elif b:
            rows.append(f"| {label} | skipped: {b.get('skipped')} |")
    sweep = (
        sweep_markdown(summary)
        .split("\n", 2)[2]
        .replace("](sweep.png)", f"]({link(os.path.join(sweep_dir, 'sweep.png'))})")
    )
    text = f"""# Results

Main run: adapter `{metrics["adapter"]}` on `{metrics["base_model"]}`, {metrics["num_samples"]} {metrics["split"]} images of
`{metrics["dataset"]}`. Brackets: 95% bootstrap intervals. Full report: [{link(os.path.join(eval_dir, "report.md"))}]({link(os.path.join(eval_dir, "report.md"))})
(published numbers for context, and which baseline is fair for which question, are there).

| method | breed accuracy |
|---|---|
{chr(10).join(rows)}

## Over seeds and settings

{sweep}"""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    print(f"Results: {path}")


# ---------------------------------------------------------------------------


def parse_args(argv=None) -> tuple:
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # one line, like every other option problem
            raise UserError(message)

    try:
        (cfg,) = Parser((SweepConfig,), allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    except ValueError as e:
        raise UserError(str(e).strip().splitlines()[0]) from None
    return cfg, grid_from(cfg)


def main(argv=None) -> dict:
    setup_logging()
    cfg, grid = parse_args(argv)
    check_sweep_folder(cfg, grid)
    runs = plan(cfg, grid)
    save_run_config(os.path.join(cfg.output_dir, "run_config.json"), sweep=cfg)
    if not cfg.summary_only:
        index, count = parse_shard(cfg.shard)
        mine = [r for k, r in enumerate(runs) if k % count == index]
        todo = [r for r in mine if not r.finished(cfg, grid)]
        logger.info(
            "%d runs in the grid, %d in this shard: %d finished, %d to run",
            len(runs),
            len(mine),
            len(mine) - len(todo),
            len(todo),
        )
        if todo:
            slots = pick_slots(cfg.gpus)
            logger.info(
                "running on %s",
                "GPUs " + ",".join(map(str, slots)) if slots != [None] else "the default device, one run at a time",
            )
            Runner(cfg, grid, slots).run_all(todo)
    summary = summarise(cfg, grid, runs)
    write_summary(cfg, summary)
    if cfg.results:
        write_results(cfg.results, cfg.eval_dir, cfg.output_dir, summary)
    print(
        f"Sweep: {len(runs) - len(summary['missing_runs'])} of {len(runs)} runs finished; best on validation: "
        f"{summary['best']}. Summary: {os.path.join(cfg.output_dir, 'sweep.md')}"
    )
    return summary
