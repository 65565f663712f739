"""A sweep's runs: its options, the grid of LoRA settings x seeds, and each run's train.py + evaluate.py subprocesses.

Layout of --output_dir:

    sweep_config.json            what every run shares (demo, pass-through flags): another sweep's folder is refused
    <setting>_seed<S>/run.json   the run's setting, seed and commands, written before it starts
    <setting>_seed<S>/adapter/   train.py's --output_dir (adapter, run_config.json, train_history.json, train.log)
    <setting>_seed<S>/eval/      evaluate.py's --output_dir (metrics.json, predictions.csv, report.md, eval.log)
    sweep.md, sweep.json, sweep.png   the summary (sweep_summary.py)

A run is finished when its eval/metrics.json exists (evaluate.py writes it last, atomically) and its run.json
matches; rerunning the sweep skips finished runs and redoes the others from scratch, so a killed sweep resumes.
Runs go one per GPU at once on a machine with several (CUDA_VISIBLE_DEVICES); past one machine, a job array
runs one --shard each on a shared folder and a last `--summary_only` call writes the summary.
How long the default sweep takes on one H100 (estimated): benchmarks/results/README.md.
"""

import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

from config import PetConfig, check_seed
from run_io import UserError, check_output_dir, locked_output_dir, write_json_atomic
from run_record import read_run_config

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
    """The checked grid: one UserError line for an empty list, a repeated value, a bad number, a pass-through clash."""
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


def default_setting() -> dict:
    """The setting train.py uses without flags (the demo's too): the paired test's reference."""
    cfg = PetConfig()
    return {
        "lora_r": cfg.lora_r,
        "max_train_samples": cfg.max_train_samples,
        "lora_target_modules": cfg.lora_target_modules,
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
        return os.path.isfile(os.path.join(self.folder, "eval", "metrics.json")) and read_json(
            os.path.join(self.folder, "run.json")
        ) == self.record(cfg, grid)


def plan(cfg: SweepConfig, grid: Grid) -> list:
    default = default_setting()
    with_baselines = default if default in grid.settings else grid.settings[0]
    return [
        Run(s, seed, os.path.join(cfg.output_dir, f"{setting_name(s)}_seed{seed}"), s == with_baselines)
        for s in grid.settings
        for seed in grid.seeds
    ]


def write_json(path: str, data) -> None:
    """Complete or absent (shards of a job array may write at once), indented for people to read."""
    write_json_atomic(path, data, prefix=".tmp-", suffix="", indent=2)


def read_json(path: str):
    """A JSON file's value, or None when it is missing or unreadable."""
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
    saved = read_json(path)
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
