"""run_io.py: one writer per output folder, result sets all old or all new (even after kill -9), nothing outside
the folder touched through its links, one line for disk faults and a bad HF_ENDPOINT."""

import errno
import json
import os
import stat

import pytest

import evaluate
import explainability
import run_io
import train
from helpers import ROOT, checkpoint_copy, demo_argv
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
                    *demo_argv(tiny_assets, out),
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


# ---------------------------------------------------------------------------
# A folder someone hands you: writers never follow its links, never touch a file outside it


def _outside(tmp_path):
    """A folder beside the output folder, with files a hostile output folder might point at."""
    outside = tmp_path / "victim"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_text("secret")
    (outside / "sub" / "inner.txt").write_text("inner")
    return outside


def _assert_untouched(outside):
    """The files _outside made are all there, as they were (nothing moved, truncated, removed or created)."""
    tree = {os.path.relpath(os.path.join(root, n), outside) for root, _, names in os.walk(outside) for n in names}
    assert tree - {"plan.json"} == {"secret.txt", os.path.join("sub", "inner.txt")}
    assert (outside / "secret.txt").read_text() == "secret"
    assert (outside / "sub" / "inner.txt").read_text() == "inner"


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("kind", ["link", "dangling link", "folder", "hard link"])
def test_a_lock_that_is_not_a_plain_file_is_refused_and_never_written_through(kind, tmp_path):
    from embedding_cache import EmbeddingCache

    outside = _outside(tmp_path)
    for out in (tmp_path / "out", tmp_path / "cache"):
        out.mkdir()
        lock = out / ".lock"
        if kind == "link":
            lock.symlink_to(outside / "secret.txt")
        elif kind == "dangling link":
            lock.symlink_to(outside / "created")
        elif kind == "folder":
            lock.mkdir()
        else:
            os.link(outside / "secret.txt", lock)
    with pytest.raises(UserError) as error:
        with locked_output_dir(str(tmp_path / "out")):
            pass
    assert str(tmp_path / "out" / ".lock") in _one_line(error) and "remove it" in str(error.value)
    # the embedding cache's lock, in its own folder (the cache's dir is cache_dir/<key>-<dtype>-v2)
    cache = EmbeddingCache(str(tmp_path), "k")
    os.rename(tmp_path / "cache", cache.dir)
    with pytest.raises(UserError) as error:
        cache.build([], None, None)
    assert os.path.join(cache.dir, ".lock") in _one_line(error)
    _assert_untouched(outside)  # not truncated, no pid written, no file created where a dangling link points


@pytest.mark.parametrize("script", ["train", "evaluate", "explainability"])
def test_every_script_refuses_a_linked_lock_in_its_output_dir(script, tmp_path, tiny_assets, tiny_adapter):
    outside = _outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(outside / "secret.txt")
    if script == "train":
        argv = ["--demo", "--model_name_or_path", tiny_assets[0], "--dataset", tiny_assets[1], "--max_steps", "1"]
    else:
        argv = ["--adapter", tiny_adapter[0], "--dataset", tiny_assets[1]]
    with pytest.raises(UserError, match="symbolic link"):
        {"train": train, "evaluate": evaluate, "explainability": explainability}[script].main(
            argv + ["--output_dir", str(out)]
        )
    _assert_untouched(outside)


def _plan(out, staging=".saving-x", files=("secret.txt", "sub"), stale=()):
    (out / run_io.MOVING).write_text(json.dumps({"staging": staging, "files": list(files), "stale": list(stale)}))


def _staging_link(out, outside):
    """The issue's attack: the staging folder of a 'stopped save' is a link to a folder outside."""
    (out / ".saving-x").symlink_to(outside)
    _plan(out)


def _plan_link(out, outside):
    (out / ".saving-x").mkdir()
    (out / ".saving-x" / "a").write_text("staged")
    (outside / "plan.json").write_text(json.dumps({"staging": ".saving-x", "files": ["a"], "stale": []}))
    (out / run_io.MOVING).symlink_to(outside / "plan.json")


def _dangling_plan(out, outside):
    (out / run_io.MOVING).symlink_to(outside / "nowhere.json")


def _staged_link(out, outside):
    (out / ".saving-x").mkdir()
    (out / ".saving-x" / "secret.txt").symlink_to(outside / "secret.txt")
    (out / ".saving-x" / "sub").symlink_to(outside / "sub")
    _plan(out)


def _link_in_a_staged_folder(out, outside):
    (out / ".saving-x" / "figures").mkdir(parents=True)
    (out / ".saving-x" / "figures" / "secret.txt").symlink_to(outside / "secret.txt")
    _plan(out, files=["figures"])


def _stale_link(out, outside):
    (out / ".saving-x").mkdir()
    (out / "report.md").symlink_to(outside / "secret.txt")
    (out / "figures").symlink_to(outside / "sub")
    _plan(out, files=[], stale=["report.md", "figures"])


def _target_link(out, outside):
    (out / ".saving-x").mkdir()
    (out / ".saving-x" / "secret.txt").write_text("new")
    (out / "secret.txt").symlink_to(outside / "secret.txt")
    _plan(out, files=["secret.txt"])


HOSTILE_FOLDERS = [
    _staging_link,
    _plan_link,
    _dangling_plan,
    _staged_link,
    _link_in_a_staged_folder,
    _stale_link,
    _target_link,
]


@pytest.mark.parametrize("hostile", HOSTILE_FOLDERS, ids=lambda f: f.__name__.strip("_"))
def test_a_writer_never_moves_or_removes_through_a_link_in_a_stopped_save(hostile, tmp_path):
    outside = _outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    hostile(out, outside)
    before = sorted(os.listdir(out))
    for writer in (locked_output_dir, staged_outputs):  # the next run's first step, and a save without the lock
        with pytest.raises(UserError) as error:
            with writer(str(out)):
                pass
        assert "symbolic link" in _one_line(error)
        assert sorted(set(os.listdir(out)) - {".lock"}) == before  # nothing moved in, nothing removed
    _assert_untouched(outside)


def test_a_hostile_stopped_save_through_evaluate_output_dir(tmp_path, tiny_assets, tiny_adapter):
    outside = _outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    _staging_link(out, outside)
    with pytest.raises(UserError, match="symbolic link"):
        evaluate.main(["--adapter", tiny_adapter[0], "--dataset", tiny_assets[1], "--output_dir", str(out)])
    _assert_untouched(outside)
    assert not (out / "secret.txt").exists() and not (out / "sub").exists()


def test_a_save_onto_a_link_is_refused_and_finished_once_the_link_is_removed(tmp_path):
    """A result file someone replaced by a link: the save stops before moving anything, keeps its files, and says
    which link to remove; the next writer then finishes it."""
    outside = _outside(tmp_path)
    out = tmp_path / "out"
    with locked_output_dir(str(out)), staged_outputs(str(out)) as tmp:
        open(os.path.join(tmp, "report.md"), "w").write("old")
    os.remove(out / "report.md")
    (out / "report.md").symlink_to(outside / "secret.txt")
    with pytest.raises(UserError) as error:
        with locked_output_dir(str(out)), staged_outputs(str(out)) as tmp:
            open(os.path.join(tmp, "report.md"), "w").write("new")
    assert f"remove {out / 'report.md'} (if a link, only the link)" in _one_line(error)
    _assert_untouched(outside)
    os.remove(out / "report.md")  # what the line says to do
    with locked_output_dir(str(out)):
        assert (out / "report.md").read_text() == "new" and not (out / run_io.MOVING).exists()


def test_saving_leftovers_that_are_links_are_unlinked_not_followed(tmp_path):
    outside = _outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".saving-dir").symlink_to(outside)
    (out / ".saving-file").symlink_to(outside / "secret.txt")
    (out / ".saving-real").mkdir()
    (out / ".saving-real" / "link").symlink_to(outside / "sub")  # rmtree of a real leftover removes only the link
    with locked_output_dir(str(out)):
        assert sorted(os.listdir(out)) == [".lock"]
    _assert_untouched(outside)


def test_a_save_still_replaces_and_removes_its_own_files_and_folders(tmp_path):
    """The checks refuse links, not what saves make: folders and plain files are moved in and removed as before."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    with staged_outputs(out) as tmp:
        os.makedirs(os.path.join(tmp, "figures", "deep"))
        open(os.path.join(tmp, "figures", "deep", "a.png"), "w").write("old")
        open(os.path.join(tmp, "old_only.txt"), "w").write("old")
    with locked_output_dir(out), staged_outputs(out) as tmp:
        os.makedirs(os.path.join(tmp, "figures"))
        open(os.path.join(tmp, "figures", "b.png"), "w").write("new")
    assert _result_files(out) == ["figures"] and os.listdir(os.path.join(out, "figures")) == ["b.png"]


# ---------------------------------------------------------------------------
# Tracebacks where one line belongs


def _exit_line(main, capsys, alone: bool = True) -> str:
    """The line run_main prints for `main`'s error (exit code 2, no traceback); `alone`: nothing else on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_io.run_main(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: " in err[-1] and not any("Traceback" in line for line in err), err
    assert len(err) == 1 or not alone, err
    return err[-1][err[-1].index("error: ") :]  # after a progress bar that the error stopped mid-line


# /dev/full stands in for a full disk: every write fails with ENOSPC (Linux; a device, else the tests would fill a file)
full_disk = pytest.mark.skipif(
    not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)), reason="needs Linux's /dev/full"
)


@full_disk
@pytest.mark.parametrize("size", [10, 10**6])  # a small file fails in its stream, a big one in its zip writer
def test_torch_save_on_a_full_disk_is_one_line(size, capsys):
    import torch

    line = _exit_line(lambda: torch.save({"optimizer": torch.zeros(size)}, "/dev/full"), capsys)
    assert "writing a file failed (torch: " in line and "free some space" in line


@pytest.mark.parametrize(
    "message",
    [
        "PytorchStreamWriter failed writing file data/0: file write failed",
        "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534\nException raised from ...",
        "[enforce fail at inline_container.cc:747] . open file failed with strerror: No space left on device",
    ],
)
def test_torch_write_failures_are_one_line(message, capsys):
    def main():
        raise RuntimeError(message)

    assert message.splitlines()[0] in _exit_line(main, capsys)


def test_safetensors_on_a_full_disk_is_one_line(capsys):
    from safetensors import SafetensorError

    def main():  # what safetensors.torch.save_file raises on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    assert "No space left on device" in _exit_line(main, capsys)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Is a directory"),
        ValueError("file write failed"),
    ],
)
def test_other_errors_keep_their_traceback(error):
    def main():
        raise error

    with pytest.raises(type(error)):
        run_io.run_main(main)


@pytest.mark.slow  # a short training run (~10 s); the one-line rule itself is checked by the tests above
@full_disk
def test_trainer_checkpoint_on_a_full_disk_is_one_line(tmp_path, tiny_assets, monkeypatch, capsys):
    """train.py end to end: Trainer's torch.save of a checkpoint's optimizer state fails as on a full disk."""
    import torch

    from helpers import train_argv

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full", *a, **k))
    line = _exit_line(lambda: train.main(train_argv(tiny_assets, tmp_path / "out", tmp_path / "cache")), capsys, False)
    assert "writing a file failed (torch: " in line
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")  # it failed inside the checkpoint, as meant


@pytest.mark.parametrize(
    "endpoint", ["https://huggingface.co:99999", "http://x:abc", "huggingface.co", "http://[::1", "http://" + "a" * 70]
)
def test_a_bad_hf_endpoint_is_one_line(endpoint, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(UserError, match="HF_ENDPOINT") as error:
        run_io.hub_reachable(timeout=0.5)
    assert endpoint in _one_line(error)


def test_hub_reachable_connects_to_hf_endpoint(monkeypatch):
    import socket

    from helpers import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert run_io.hub_reachable(timeout=2)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert not run_io.hub_reachable(timeout=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not run_io.hub_reachable()


def test_a_failed_atomic_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    from run_io import write_text_atomic

    with pytest.raises(TypeError):
        write_text_atomic(str(tmp_path / "report.md"), 42)  # not text: the write fails half-way
    assert os.listdir(tmp_path) == []
    write_text_atomic(str(tmp_path / "report.md"), "# done\n")
    assert os.listdir(tmp_path) == ["report.md"] and oct(os.stat(tmp_path / "report.md").st_mode & 0o777) == "0o644"


def test_the_hub_is_asked_once_per_endpoint_and_process(monkeypatch):
    tries = []

    def unreachable(address, timeout):
        tries.append(address)
        raise OSError("timed out")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(run_io.socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    assert not any(run_io.hub_reachable(timeout=0.1) for _ in range(3))  # base, CLIP, classifier: one wait
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example.invalid")
    assert not run_io.hub_reachable(timeout=0.1)
    assert tries == [("hub.example.invalid", 443), ("mirror.example.invalid", 443)]
