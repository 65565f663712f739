"""run_io.py: one writer per output folder, result sets all old or all new (even after kill -9), one line for disk faults."""

import errno
import json
import os

import pytest

import evaluate
import explainability
import run_io
import train
from helpers import ROOT, checkpoint_copy
from run_io import UserError, locked_output_dir, staged_outputs

# ---------------------------------------------------------------------------
# Output folders: one writer, nothing half-written, one line for disk faults


def test_second_writer_into_an_output_folder_is_refused(tmp_path, tiny_assets, tiny_adapter):
    out = str(tmp_path / "out")
    with locked_output_dir(out):
        with pytest.raises(UserError, match="another run is writing"):
            with locked_output_dir(out):
                pass
        with pytest.raises(UserError, match="another run is writing"):
            train.main(
                [
                    "--demo",
                    "--model_name_or_path",
                    tiny_assets[0],
                    "--dataset",
                    tiny_assets[1],
                    "--output_dir",
                    out,
                    "--max_steps",
                    "1",
                ]
            )
        with pytest.raises(UserError, match="another run is writing"):
            evaluate.main(["--adapter", tiny_adapter[0], "--dataset", tiny_assets[1], "--output_dir", out])
        with pytest.raises(UserError, match="another run is writing"):
            explainability.main(["--adapter", tiny_adapter[0], "--dataset", tiny_assets[1], "--output_dir", out])
    with locked_output_dir(out):  # released when the run ends
        pass


def test_failed_write_keeps_the_old_outputs_and_leftovers_are_cleaned(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "metrics.json"), "w").write("old")
    with pytest.raises(OSError):
        with staged_outputs(out) as tmp:
            open(os.path.join(tmp, "metrics.json"), "w").write("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert open(os.path.join(out, "metrics.json")).read() == "old"
    assert not [n for n in os.listdir(out) if n.startswith(".saving-")]
    os.makedirs(os.path.join(out, ".saving-killed"))  # what a killed save leaves
    with locked_output_dir(out):
        assert not os.path.exists(os.path.join(out, ".saving-killed"))
    with staged_outputs(out) as tmp:
        open(os.path.join(tmp, "metrics.json"), "w").write("new")
    assert open(os.path.join(out, "metrics.json")).read() == "new"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_disk_faults_are_one_line(code, capsys):
    def main():
        raise OSError(code, os.strerror(code), "/data/out/metrics.json")

    with pytest.raises(SystemExit) as exit_info:
        run_io.run_main(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "/data/out/metrics.json" in err[0]


def test_a_one_line_error_keeps_its_cause_for_debug_logging(capsys, caplog):
    def main():
        try:
            int("many")
        except ValueError as e:
            raise UserError("--batch must be a number") from e

    with caplog.at_level("DEBUG", logger="run_io"), pytest.raises(SystemExit):
        run_io.run_main(main)
    assert capsys.readouterr().err.strip().splitlines() == ["error: --batch must be a number"]
    causes = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert len(causes) == 1 and isinstance(causes[0], ValueError) and "many" in str(causes[0])


def test_other_os_errors_still_raise():
    def main():
        raise FileNotFoundError(errno.ENOENT, "gone")

    with pytest.raises(FileNotFoundError):
        run_io.run_main(main)


# ---------------------------------------------------------------------------
# A result folder holds one run's files: all old or all new, even after kill -9 while moving them in


# Runs a script with os.replace wrapped: SIGKILL right after the N-th rename out of a `.saving-` folder
# (a save's plan, each of its files, its file list), i.e. at that moment of moving a result set into place.
KILL_DRIVER = """
import os, runpy, signal, sys
after, real, moved = int(os.environ["KILL_AFTER_MOVES"]), os.replace, [0]
def replace(src, dst):
    real(src, dst)
    if os.sep + ".saving-" in os.fspath(src):
        moved[0] += 1
        if moved[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


SAVE_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from run_io import locked_output_dir, staged_outputs
out, tag, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
with locked_output_dir(out), staged_outputs(out) as tmp:
    for name in names:
        open(os.path.join(tmp, name), "w").write(tag)
"""


def _killed_at(script, args, moves, tmp_path, timeout=600):
    import subprocess
    import sys

    driver = tmp_path / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    env = {**os.environ, "KILL_AFTER_MOVES": str(moves), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(driver), script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _result_files(out):
    return sorted(n for n in os.listdir(out) if not n.startswith("."))


@pytest.mark.parametrize("moves", range(1, 9))
def test_a_save_killed_while_moving_is_completed_by_the_next_opener(moves, tmp_path):

    from run_io import MOVING, locked_output_dir, staged_outputs

    out = str(tmp_path / "out")
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT.format(root=ROOT))
    os.makedirs(out)
    with staged_outputs(out) as tmp:
        for name in ("a", "b", "c", "d", "old_only"):
            open(os.path.join(tmp, name), "w").write("old")
    new = _killed_at(str(script), [out, "new", "a,b,c,d,new_only"], moves, tmp_path)
    # plan, 5 files, file list: killed at each of the 7 renames, or not at all
    assert new.returncode == (-9 if moves <= 7 else 0), new.stderr
    assert os.path.exists(os.path.join(out, MOVING)) == (moves <= 7)  # the interrupted move is marked
    with locked_output_dir(out):  # what every writer (train.py, evaluate.py, explainability.py) does first
        pass
    assert _result_files(out) == ["a", "b", "c", "d", "new_only"]
    assert {open(os.path.join(out, n)).read() for n in _result_files(out)} == {"new"}
    assert not [n for n in os.listdir(out) if n.startswith((".saving-", MOVING))]


def test_a_save_killed_before_moving_leaves_the_old_set(tmp_path):

    out = str(tmp_path / "out")
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT.format(root=ROOT))
    assert _killed_at(str(script), [out, "old", "a,b"], 0, tmp_path).returncode == 0
    script.write_text(SAVE_SCRIPT.format(root=ROOT).replace("write(tag)", "write(tag); os.kill(os.getpid(), 9)"))
    assert _killed_at(str(script), [out, "new", "a,b,c"], 0, tmp_path).returncode == -9
    from run_io import locked_output_dir

    with locked_output_dir(out):
        assert _result_files(out) == ["a", "b"] and {open(os.path.join(out, n)).read() for n in "ab"} == {"old"}
    assert not [n for n in os.listdir(out) if n.startswith(".saving-")]


@pytest.mark.slow
def test_evaluate_killed_while_moving_its_results_leaves_one_run(tiny_adapter, tiny_assets, tmp_path):
    import pandas as pd

    from run_io import MOVING, locked_output_dir

    out = str(tmp_path / "eval")
    common = [
        "--adapter",
        tiny_adapter[0],
        "--dataset",
        tiny_assets[1],
        "--output_dir",
        out,
        "--bootstrap_samples",
        "10",
    ]
    script = os.path.join(ROOT, "evaluate.py")
    first = _killed_at(script, common + ["--max_eval_samples", "4"], 0, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    files = _result_files(out)
    assert len(files) >= 8, files
    killed = _killed_at(script, common + ["--max_eval_samples", "6"], 5, tmp_path)  # plan + 4 of the files
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert os.path.exists(os.path.join(out, MOVING))  # the folder says it is a mix until the next run
    with locked_output_dir(out):  # the next run's first step
        assert _result_files(out) == files
        assert len(pd.read_csv(os.path.join(out, "predictions.csv"))) == 6
        assert json.load(open(os.path.join(out, "run_config.json")))["shared"]["max_eval_samples"] == 6
        assert json.load(open(os.path.join(out, "metrics.json")))["num_samples"] == 6
        assert "6" in open(os.path.join(out, "report.md")).read()


@pytest.mark.slow
def test_an_adapter_killed_while_moving_is_refused_by_readers_and_completed_by_its_next_writer(tiny_adapter, tmp_path):
    from model import load_lora_for_inference
    from run_io import MOVING, locked_output_dir
    from run_record import AdapterRun

    out, _ = checkpoint_copy(tiny_adapter, tmp_path)
    # a new run (seed 8) into the old run's folder; without --demo, which in a new process would first build
    # (pre-train) the demo base in the working folder
    argv = [a for a in tiny_adapter[1] if a != "--demo"] + [
        "--output_dir",
        out,
        "--seed",
        "8",
        "--max_new_tokens",
        "16",
    ]
    killed = _killed_at(os.path.join(ROOT, "train.py"), argv, 3, tmp_path)  # plan, README.md, adapter_model.safetensors
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert os.path.exists(os.path.join(out, MOVING))
    listing = sorted(os.listdir(out))
    with pytest.raises(UserError, match="stopped while moving its files in"):
        AdapterRun.read(out)  # what evaluate.py, explainability.py and app.py read first
    assert sorted(os.listdir(out)) == listing  # a reader repairs nothing
    with locked_output_dir(out):  # the next writer into the folder (train.py) finishes the move first
        pass
    assert not os.path.exists(os.path.join(out, MOVING))
    assert AdapterRun.read(out).seed == 8
    with open(os.path.join(out, "README.md")) as f:
        assert "seed 8" in f.read()
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))  # checkpoints are not part of the result set
    load_lora_for_inference(out)
