"""A sweep's runs: its options, the grid of LoRA settings x seeds, and each run's train.py + evaluate.py subprocesses.

Layout of --output_dir:

    sweep_config.json            what every run shares (demo, pass-through flags): another sweep's folder is refused
    <setting>_seed<S>/run.json   the run's setting, seed and commands, written before it starts
    <setting>_seed<S>/adapter/   train.py's --output_dir (adapter, run_config.json, train_history.json, train.log)
    <setting>_seed<S>/eval/      evaluate.py's --output_dir (metrics.json, predictions.csv, report.md, eval.log)
    sweep.md, sweep.json, sweep.png   the summary (sweep_summary.py)

A run is finished when its files are complete and its own (Run.result): run.json records its setting and commands
(the folder's spelling aside), the adapter's run_config.json its setting and seed, eval/run_config.json its adapter,
no save was stopped midway (.moving.json), and metrics.json, train_history.json and predictions.csv hold the
numbers the summary reads. Rerunning the sweep skips finished runs and redoes the others from scratch, each with
one warning line saying why, so a killed sweep resumes. The sweep's train.py and evaluate.py die with it, and a
run folder that a live process holds (its .lock) is skipped with a warning, never deleted under it.
Runs go one per GPU at once on a machine with several (CUDA_VISIBLE_DEVICES); past one machine, a job array
runs one --shard each on a shared folder and a last `--summary_only` call writes the summary.
How long the default sweep takes on one H100 (estimated): benchmarks/results/README.md.
"""

import csv
import functools
import itertools
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

from config import PetConfig, check_seed, is_options_file
from data import die_with_parent
from metrics import BASELINES
from run_io import MOVING, UserError, check_output_dir, exclusive_lock, write_json_atomic
from run_record import read_run_config

# evaluate.py's baselines (metrics.json's keys), scored in one setting's runs only: they do not depend on the LoRA
logger = logging.getLogger("sweep")

ROOT = os.path.dirname(os.path.abspath(__file__))
SWEEP_FILE = "sweep_config.json"
# options the sweep sets for every run (as the scripts' dataclass fields): not allowed in --train_args / --eval_args,
# in any spelling the scripts' parser takes (--lora_alpha, --lora-alpha, --lora_alpha=1, --no_demo; it refuses
# abbreviations)
OWN_OPTIONS = {
    "output_dir",
    "seed",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "max_train_samples",
    "use_dora",
    "adapter",
    "demo",
    "split",
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
    use_dora: str = field(
        default="false",
        metadata={"help": "false (LoRA), true (DoRA: PEFT's use_dora) or false,true (both, as a grid axis)"},
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


def _values(flag: str, text: str, sep: str = ",", key=None) -> list:
    """The stripped values of a `sep`-separated list; UserError for an empty value, or for two values that are the
    same once read (`key`: 1 and 01 are one seed, query,value and value,query one set of modules)."""
    values = [v.strip() for v in text.split(sep)]
    if not text.strip() or any(not v for v in values):
        raise UserError(
            f"--{flag} {text!r} has an empty value; give a {sep!r}-separated list, e.g. "
            f"{SweepConfig.__dataclass_fields__[flag].default!r}"
        )
    seen = {}
    for v in values:
        k = key(v) if key else v
        if k in seen:
            same = "" if v == seen[k] else f" (as {v!r})"
            raise UserError(f"--{flag} {text!r} repeats {seen[k]}{same}: each value once")
        seen[k] = v
    return values


def _int(flag: str, v: str, allow_all: bool = False, minimum: int = 1) -> Optional[int]:
    if allow_all and v.lower() == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise UserError(f"--{flag}: {v!r} is not a whole number{' or all' if allow_all else ''}") from None
    if n < minimum:
        raise UserError(f"--{flag}: {n} must be at least {minimum}")
    return n


def _ints(flag: str, text: str, allow_all: bool = False, minimum: int = 1) -> list:
    read = functools.partial(_int, flag, allow_all=allow_all, minimum=minimum)
    return [read(v) for v in _values(flag, text, key=read)]


def _bool(flag: str, v: str) -> bool:
    for value, words in ((True, ("true", "yes", "1")), (False, ("false", "no", "0"))):
        if v.lower() in words:
            return value
    raise UserError(f"--{flag}: {v!r} is not true or false")


def _bools(flag: str, text: str) -> list:
    read = functools.partial(_bool, flag)
    return [read(v) for v in _values(flag, text, key=read)]


def _module_set(text: str) -> frozenset:
    return frozenset(t.strip() for t in text.split(","))


def option_name(arg: str) -> Optional[str]:
    """The option field a command-line word sets, in any spelling the scripts' parser takes (--lora-alpha=1:
    lora_alpha; --no_demo: demo), or None for a word that is not a long option."""
    if not arg.startswith("--") or arg == "--":
        return None
    name = arg[2:].split("=", 1)[0].replace("-", "_")
    return name[3:] if name.startswith("no_") else name


def _takes_value(arg: str) -> bool:
    """A flag whose value may be the next argument (`--label_names names.json`)."""
    return arg.startswith("-") and "=" not in arg


def _pass_through(flag: str, text: str) -> list:
    try:
        args = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--{flag} {text!r} cannot be split into flags ({e})") from None
    # an options file stands first in a script's command, where the sweep's own flags stand: its keys would
    # override the grid while sweep.md reports the grid's values
    files = [a for i, a in enumerate(args) if is_options_file(a) and (i == 0 or not _takes_value(args[i - 1]))]
    if files:
        raise UserError(
            f"--{flag} passes the options file {files[0]!r}, which a run cannot take after the sweep's flags; "
            "give its options as flags"
        )
    own = sorted({a.split("=")[0] for a in args if option_name(a) in OWN_OPTIONS})
    if own:
        raise UserError(
            f"--{flag} sets {', '.join(own)}, which the sweep sets for every run; use the sweep's own options"
        )
    return args


@dataclass
class Grid:
    settings: list  # dicts: lora_r, lora_target_modules, max_train_samples, use_dora
    seeds: list
    train_args: list
    eval_args: list


def grid_from(cfg: SweepConfig) -> Grid:
    """The checked grid: one UserError line for an empty list, a repeated value, a bad number, a pass-through clash."""
    ranks = _ints("lora_r", cfg.lora_r)
    targets = [
        ",".join(t.strip() for t in s.split(","))
        for s in _values("lora_target_modules", cfg.lora_target_modules, "/", key=_module_set)
    ]
    for t in targets:
        _values("lora_target_modules", t)  # "query,,value" is an empty module name, "query,query" a repeat
    samples = _ints("max_train_samples", cfg.max_train_samples, allow_all=True)
    dora = _bools("use_dora", cfg.use_dora)
    seeds = _ints("seeds", cfg.seeds, minimum=0)
    for s in seeds:
        check_seed(s)
    n_shard = parse_shard(cfg.shard)[1]
    if n_shard < 1:
        raise UserError(f"--shard {cfg.shard!r}: n must be at least 1")
    settings = [
        {"lora_r": r, "lora_target_modules": t, "max_train_samples": n, "use_dora": d}
        for r, t, n, d in itertools.product(ranks, targets, samples, dora)
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
        "use_dora": False,
    }


def same_setting(a: dict, b: dict) -> bool:
    """One training setting: module lists compare as sets (PEFT's target_modules is one), a setting recorded
    before DoRA was an axis is LoRA."""

    def key(s):
        return {**s, "lora_target_modules": _module_set(s["lora_target_modules"]), "use_dora": bool(s.get("use_dora"))}

    return key(a) == key(b)


def setting_name(s: dict) -> str:
    """The run folder's name stem; a DoRA setting's ends in _dora (LoRA settings keep the names they always had)."""
    n = "all" if s["max_train_samples"] is None else s["max_train_samples"]
    dora = "_dora" if s.get("use_dora") else ""
    return f"r{s['lora_r']}_{s['lora_target_modules'].replace(',', '+')}_n{n}{dora}"


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
        if s["use_dora"]:  # only then: a LoRA run's command, and so its run.json, is what it always was
            train += ["--use_dora", "True"]
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
        off = (
            []
            if self.baselines
            else ["--linear_probe", "False", "--clip_model", "none", "--classifier_baseline", "none"]
        )
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

    def result(self, cfg, grid) -> tuple:
        """(the numbers the summary reads, None) when the run is finished, else (None, why not).

        Finished: every file is complete and this run's own, whatever the sweep folder is called now.
        """

        def path(*parts):
            return os.path.join(self.folder, *parts)

        if not any(os.path.lexists(path(n)) for n in ("run.json", "adapter", "eval")):
            return None, "not started"
        if _comparable(read_json(path("run.json"))) != _comparable(self.record(cfg, grid)):
            return None, "its run.json is missing, unreadable or records another setting or command"
        for sub in ("adapter", "eval"):
            if os.path.lexists(path(sub, MOVING)):
                return None, f"a save into {sub}/ was stopped while moving its files in ({sub}/{MOVING})"
        if not os.path.isfile(path("adapter", "adapter_config.json")):
            return None, "adapter/adapter_config.json is missing: the training did not finish"
        why = trained_setting_mismatch(self)
        if why:
            return None, why
        evaluated = read_run_config(path("eval", "run_config.json"))
        adapter = evaluated.options("evaluate").get("adapter") if evaluated else None
        if not isinstance(adapter, str) or _tail(adapter) != _tail(path("adapter")):
            return None, f"eval/ is not the evaluation of this run's adapter (eval/run_config.json names {adapter!r})"
        metrics = read_json(path("eval", "metrics.json"))
        tuned = metrics.get("fine_tuned") if isinstance(metrics, dict) else None
        if not isinstance(tuned, dict) or not all(
            _fraction(tuned.get(k)) for k in ("breed_accuracy", "likelihood_top1")
        ):
            return None, "eval/metrics.json is missing, unreadable or lacks the fine-tuned model's accuracies"
        history = read_json(path("adapter", "train_history.json"))
        epochs = history.get("validation", []) if isinstance(history, dict) else None
        if not isinstance(epochs, list) or not all(
            isinstance(e, dict) and _fraction(e.get("breed_accuracy", 0.0)) for e in epochs
        ):
            return None, "adapter/train_history.json is missing, unreadable or not a list of validation epochs"
        if not {"image_id", "true_breed", "fine_tuned_breed"} <= set(_csv_header(path("eval", "predictions.csv"))):
            return None, "eval/predictions.csv is missing or lacks the image_id, true_breed, fine_tuned_breed columns"
        val = [e["breed_accuracy"] for e in epochs if "breed_accuracy" in e]
        out = {
            "seed": self.seed,
            "folder": self.folder,
            "validation_breed_accuracy": max(val) if val else None,
            "test_breed_accuracy": tuned["breed_accuracy"],
            "test_likelihood_top1": tuned["likelihood_top1"],
        }
        for key in BASELINES:
            baseline = metrics.get(key)
            if isinstance(baseline, dict) and "accuracy" in baseline:
                if not _fraction(baseline["accuracy"]):
                    return None, f"eval/metrics.json's {key} accuracy is not a fraction"
                out[key] = baseline["accuracy"]
        return out, None


def _comparable(record) -> Optional[dict]:
    """A run.json record as compared: each folder the sweep passed (--output_dir, --adapter) as its last two parts,
    so that a sweep folder spelled otherwise (relative, absolute, moved) holds the same runs; a setting recorded
    before DoRA was an axis is LoRA."""
    if not isinstance(record, dict) or not isinstance(record.get("setting"), dict):
        return None
    out = {**record, "setting": {"use_dora": False, **record["setting"]}}
    for key in ("train_args", "eval_args"):
        args = record.get(key)
        if isinstance(args, list):
            out[key] = [
                _tail(a) if k and isinstance(a, str) and option_name(args[k - 1]) in ("output_dir", "adapter") else a
                for k, a in enumerate(args)
            ]
    return out


def _tail(path: str) -> str:
    """The last two parts of a path: <run>/adapter."""
    return "/".join(os.path.normpath(path).split(os.sep)[-2:])


def _fraction(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= 1


def _csv_header(path: str) -> list:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def unfinished(runs: list, cfg: SweepConfig, grid: Grid) -> list:
    """The runs to do; one warning line for each that has files, saying why they are replaced."""
    todo = []
    for run in runs:
        done, why = run.result(cfg, grid)
        if done is None:
            todo.append(run)
            if why != "not started":
                logger.warning("run %s is redone from scratch, its adapter/ and eval/ replaced: %s", run.name, why)
    return todo


def plan(cfg: SweepConfig, grid: Grid) -> list:
    default = default_setting()
    with_baselines = next((s for s in grid.settings if same_setting(s, default)), grid.settings[0])
    return [
        Run(s, seed, os.path.join(cfg.output_dir, f"{setting_name(s)}_seed{seed}"), s is with_baselines)
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
    if not isinstance(saved, dict) or set(saved) != set(identity):
        raise UserError(
            f"{path} is not a sweep's record (an object with {', '.join(identity)}); if the folder holds this "
            f"sweep's runs, write {json.dumps(identity)} into it, else pass another --output_dir"
        )
    differ = [f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in identity.items() if saved.get(k) != v]
    if differ:
        raise UserError(
            f"--output_dir {cfg.output_dir!r} holds another sweep's runs ({'; '.join(differ)}); "
            "pass another --output_dir, or the same --demo/--train_args/--eval_args to resume it"
        )


class RunHeld(Exception):
    """A run folder that a live process holds (its .lock): the run is skipped, nothing in it is deleted."""


class Runner:
    """Runs each Run's train.py then evaluate.py; one at a time per slot (a GPU id, or None)."""

    def __init__(self, cfg: SweepConfig, grid: Grid, slots: list):
        self.cfg, self.grid, self.slots = cfg, grid, slots
        self.live = set()  # Popen objects of the runs in progress, terminated if the sweep is stopped
        self.lock = threading.Lock()
        self.failed = []
        self.skipped = []  # names of the runs another process holds

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
                except RunHeld as e:
                    logger.warning("run %s skipped: %s; rerun the sweep once that process has ended", run.name, e)
                    self.skipped.append(run.name)
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
        check_output_dir(run.folder)
        if os.path.islink(run.folder):  # the sweep makes run folders: a link was put there, to write elsewhere
            raise UserError(f"{run.folder} is a symbolic link, not a run folder: remove it (only the link)")
        os.makedirs(run.folder, exist_ok=True)
        # held for the whole run: a second sweep (or shard) on the same run skips it, rather than mixing two
        with exclusive_lock(os.path.join(run.folder, ".lock"), functools.partial(_refuse_held, run.folder)):
            for sub in ("adapter", "eval"):  # an unfinished run starts again from scratch
                _remove_unless_held(os.path.join(run.folder, sub))
            write_json(os.path.join(run.folder, "run.json"), run.record(self.cfg, self.grid))
            commands = run.commands(self.cfg, self.grid)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            for stage, log_dir in (("train", "adapter"), ("evaluate", "eval")):
                os.makedirs(os.path.join(run.folder, log_dir), exist_ok=True)
                log_path = os.path.join(run.folder, f"{stage}.log")
                with open(log_path, "w") as log:
                    # the kernel ends the child when this thread's process dies, killed too (Linux): a killed
                    # sweep leaves no train.py writing into a folder its resume will clear
                    proc = subprocess.Popen(
                        commands[stage],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        preexec_fn=functools.partial(die_with_parent, os.getpid(), None),
                    )
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


def _refuse_held(folder: str, holder: str):
    raise RunHeld(f"{folder} is in use by {holder}")


def _remove_unless_held(path: str) -> None:
    """Remove a run's adapter/ or eval/ (a link there: only the link), or RunHeld when a live process holds its
    .lock: an orphaned train.py or evaluate.py writing into it keeps its folder."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.remove(path)
    elif os.path.isdir(path):
        with exclusive_lock(os.path.join(path, ".lock"), functools.partial(_refuse_held, path)):
            shutil.rmtree(path)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _last_error(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "Traceback")) or "Error" in line.split(":")[0]]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def trained_setting_mismatch(run: Run) -> Optional[str]:
    """Why the adapter's run_config.json (and PEFT's adapter_config.json, for DoRA) do not record the run's setting
    (lora_alpha 2 x r) and seed, or None."""
    saved = read_run_config(os.path.join(run.folder, "adapter", "run_config.json"))
    if saved is None:
        return "adapter/run_config.json is missing or unreadable: the training did not finish"
    shared, train = saved.options("shared"), saved.options("train")
    got = {k: shared.get(k) for k in ("lora_r", "lora_target_modules", "max_train_samples")}
    # PEFT records use_dora in adapter_config.json (a version from before DoRA has no such key: LoRA)
    peft = read_json(os.path.join(run.folder, "adapter", "adapter_config.json"))
    got["use_dora"] = peft.get("use_dora", False) if isinstance(peft, dict) else None
    alpha, seed = shared.get("lora_alpha"), train.get("seed")
    want = run.setting
    if (
        isinstance(got["lora_target_modules"], str)
        and isinstance(got["use_dora"], bool)
        and same_setting(got, want)
        and alpha == 2 * want["lora_r"]
        and seed == run.seed
    ):
        return None
    return (
        f"train.py trained {got} with lora_alpha {alpha!r} and seed {seed!r}, not the sweep's {want} with lora_alpha "
        f"{2 * want['lora_r']} and seed {run.seed}"
    )


def check_trained_setting(run: Run) -> None:
    """UserError when the adapter's run_config.json says it trained another setting than the sweep asked for."""
    why = trained_setting_mismatch(run)
    if why:
        raise UserError(f"run {run.name}: {why}")


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
    return _values("gpus", text, key=lambda v: int(v) if v.isdigit() else v)
