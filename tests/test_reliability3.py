"""Issue 20, reliability round three: the last silent results, kills that mix results, unguarded inputs.

In-process calls of the entry functions on small synthetic data, one tiny adapter (2 steps) for the module;
the kills are real (SIGKILL of a subprocess at a chosen moment).
"""

import json
import os
import shutil

import pytest
import torch

import app
import config
import evaluate
import explainability
import train
import trainer
from run_io import UserError

TRAIN_SEED = 7


@pytest.fixture(scope="module")
def tiny_adapter(demo_assets, tmp_path_factory):
    """A 2-step adapter with its checkpoint-2."""
    out = str(tmp_path_factory.mktemp("tiny") / "adapter")
    argv = _train_argv(demo_assets, out, tmp_path_factory.mktemp("cache"))
    train.main(argv)
    return out, argv


def _train_argv(demo_assets, out, cache):
    return ["--demo", "--model_name_or_path", demo_assets[0], "--dataset", demo_assets[1], "--output_dir", out,
            "--max_steps", "2", "--seed", str(TRAIN_SEED), "--embedding_cache_dir", str(cache)]


def _adapter_copy(tiny_adapter, tmp_path, name="adapter"):
    path = str(tmp_path / name)
    shutil.copytree(tiny_adapter[0], path, ignore=shutil.ignore_patterns("checkpoint-*"))
    return path


def _edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


# ---------------------------------------------------------------------------
# Silently wrong models: what the model computes is checked, not only what is stored


@pytest.mark.parametrize("merge", [True, False])
def test_adapter_scaled_to_overflow_is_refused(tiny_adapter, tmp_path, merge):
    from model import load_lora_for_inference

    path = _adapter_copy(tiny_adapter, tmp_path)
    _edit_json(os.path.join(path, "adapter_config.json"), lora_alpha=1e30)  # every stored tensor stays finite
    with pytest.raises(UserError, match=r"lora_alpha 1e\+30.*NaN or infinite"):
        load_lora_for_inference(path, merge=merge)


def test_evaluate_refuses_an_overflowing_adapter_before_writing(tiny_adapter, demo_assets, tmp_path):
    path = _adapter_copy(tiny_adapter, tmp_path)
    _edit_json(os.path.join(path, "adapter_config.json"), lora_alpha=1e30)
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="NaN or infinite outputs"):
        evaluate.main(["--adapter", path, "--dataset", demo_assets[1], "--output_dir", str(out), "--max_eval_samples", "4"])
    assert not (out / "metrics.json").exists()


def test_an_adapter_folder_is_not_a_base_model(tiny_adapter, demo_assets, tmp_path):
    adapter = tiny_adapter[0]
    with pytest.raises(UserError, match="holds a LoRA adapter, not a base model"):
        evaluate.main(["--adapter", adapter, "--model_name_or_path", adapter, "--dataset", demo_assets[1],
                       "--output_dir", str(tmp_path / "eval"), "--max_eval_samples", "4"])


@pytest.fixture(scope="module")
def nan_base(demo_assets, tmp_path_factory):
    """The tiny base model with one decoder weight set to NaN."""
    from safetensors.torch import load_file, save_file

    base = str(tmp_path_factory.mktemp("nan") / "base")
    shutil.copytree(demo_assets[0], base)
    weights = os.path.join(base, "model.safetensors")
    state = load_file(weights)
    state["text_decoder.bert.encoder.layer.1.attention.self.query.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("script", ["train", "evaluate", "explainability", "app"])
def test_every_script_refuses_a_base_model_with_nan_weights(script, nan_base, tiny_adapter, demo_assets, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(app, "build_ui", lambda *a: pytest.fail("the app served a model with NaN weights"))
    out = str(tmp_path / "out")
    common = ["--model_name_or_path", nan_base, "--dataset", demo_assets[1], "--output_dir", out]
    argv = {"train": _train_argv(demo_assets, out, tmp_path / "cache")[:1] + common + ["--max_steps", "1",
                                                                                        "--embedding_cache_dir", str(tmp_path / "cache")],
            "evaluate": common + ["--adapter", tiny_adapter[0], "--max_eval_samples", "4"],
            "explainability": common + ["--adapter", tiny_adapter[0], "--num_images", "2"],
            "app": common + ["--adapter", tiny_adapter[0], "--num_examples", "0"]}[script]
    main = {"train": train.main, "evaluate": evaluate.main, "explainability": explainability.main, "app": app.main}[script]
    with pytest.raises(UserError, match=r"has NaN or infinite weights \(first: text_decoder\.bert\.encoder\.layer\.1\."):
        main(argv)
    written = set(os.listdir(out)) - {".lock"} if os.path.isdir(out) else set()
    assert not written, written


def test_a_sound_model_passes_the_check(demo_assets):
    from model import check_finite_model, load_base_model

    model = load_base_model(demo_assets[0])
    check_finite_model(model, "the tiny model", "")
    with torch.no_grad():
        model.text_decoder.bert.embeddings.word_embeddings.weight[3, 0] = float("inf")  # a row no probe looks up
    with pytest.raises(UserError, match="word_embeddings"):
        check_finite_model(model, "the tiny model", "")


# ---------------------------------------------------------------------------
# Images are told apart by what identifies them, not by a base name or an id column


def _saved_dataset(path, splits: dict) -> str:
    """A save_to_disk DatasetDict from {split: {column: values}} (image: file paths, label: breed names)."""
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
                          for name, columns in splits.items()}).save_to_disk(path)
    return path


def _pngs(folder, names):
    from PIL import Image

    paths = []
    for k, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (16, 16), (20 * k, 100, 200 - 20 * k)).save(path)
        paths.append(path)
    return paths


def test_leakage_check_tells_repeated_file_names_in_other_folders_apart(tmp_path, caplog):
    from data import load_splits

    train_paths = _pngs(tmp_path, ["cats/1.png", "cats/2.png", "cats/3.png", "cats/4.png"])
    test_paths = _pngs(tmp_path, ["dogs/1.png", "dogs/2.png"])
    data = _saved_dataset(str(tmp_path / "hf"), {
        "train": {"image": train_paths + test_paths[:1], "path": train_paths + test_paths[:1],
                  "label": ["abyssinian"] * 4 + ["beagle"]},  # dogs/1.png really is in both splits
        "test": {"image": test_paths, "path": test_paths, "label": ["beagle"] * 2}})
    with caplog.at_level("WARNING"):
        splits = load_splits(data, 0.0)
    # cats/1.png and cats/2.png are not "also in the test split"; dogs/1.png (the one beagle) is
    assert sorted(r.label for r in splits["train"]) == [0] * 4
    assert sorted(r.identity for r in splits["train"]) == sorted(train_paths)
    assert "Dropped 1 images from trainval" in caplog.text


@pytest.mark.parametrize("damage", ["no_split_folders", "garbled_json", "truncated_arrow"])
def test_damaged_save_to_disk_folder_is_one_line(tmp_path, damage):
    import glob

    from data import load_splits

    paths = _pngs(tmp_path, [f"{k}.png" for k in range(8)])
    data = _saved_dataset(str(tmp_path / "hf"), {s: {"image": paths, "label": ["pug", "beagle"] * 4} for s in ("train", "test")})
    if damage == "no_split_folders":  # a save killed after dataset_dict.json
        for split in ("train", "test"):
            shutil.rmtree(os.path.join(data, split))
    elif damage == "garbled_json":
        open(os.path.join(data, "dataset_dict.json"), "w").write('{"splits": ["train", "te')
    else:
        for arrow in glob.glob(os.path.join(data, "*", "*.arrow")):
            os.truncate(arrow, os.path.getsize(arrow) // 2)
    with pytest.raises(UserError, match="save_to_disk folder .* is incomplete or corrupt"):
        load_splits(data)


def test_shards_merge_by_position_not_by_image_id():
    import numpy as np

    from data import Record
    from metrics import ModelPredictions, Predictions

    records = [Record("same", k % 2, f"img{k}.png") for k in range(5)]  # one id for every image

    def shard(positions):
        models = {"m": ModelPredictions([f"caption {p}" for p in positions], np.array([[p, 0.0] for p in positions]))}
        return positions, Predictions(["same"] * len(positions), [records[p].label for p in positions], models, None), {}

    merged, _ = evaluate.merge_shards([shard([0, 2, 4]), shard([1, 3])], records)
    assert merged.models["m"].captions == [f"caption {p}" for p in range(5)]
    assert merged.models["m"].scores[:, 0].tolist() == list(range(5)) and merged.label == [0, 1, 0, 1, 0]
    assert merged.records == records
    with pytest.raises(RuntimeError, match="two processes"):
        evaluate.merge_shards([shard([0, 2]), shard([2])], records)


@pytest.mark.slow
def test_two_processes_evaluate_a_split_with_repeated_image_ids(tiny_adapter, demo_assets, tmp_path):
    import pandas as pd
    from conftest import run_script
    from test_distributed import torchrun

    images = sorted(os.listdir(os.path.join(demo_assets[1], "images")))[:7]
    columns = {"image": [os.path.join(demo_assets[1], "images", n) for n in images], "image_id": ["pet"] * 7,
               "label": [n.rsplit("_", 1)[0] for n in images]}
    data = _saved_dataset(str(tmp_path / "hf"), {"train": columns, "test": columns})
    common = ["--adapter", tiny_adapter[0], "--dataset", data, "--per_device_eval_batch_size", "2",
              "--bootstrap_samples", "10"]
    one = run_script(["evaluate.py", *common, "--output_dir", str(tmp_path / "one")], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(["evaluate.py", *common, "--output_dir", str(tmp_path / "two")], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("one", "two"))
    assert len(a) == 7 and (a["image_id"] == "pet").all()
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------------------
# Resuming from a checkpoint that cannot be trusted or does not fit: one line


class _RunsCode:
    """Unpickled without weights_only, this would create its marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint_copy(tiny_adapter, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(tiny_adapter[0], out)
    return out, os.path.join(out, "checkpoint-2")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "scheduler.pt", "garbage"])
def test_resume_from_a_hostile_or_damaged_checkpoint_file_is_one_line(tiny_adapter, tmp_path, name):
    out, checkpoint = _checkpoint_copy(tiny_adapter, tmp_path)
    marker = str(tmp_path / "code-ran")
    if name == "garbage":
        open(os.path.join(checkpoint, "optimizer.pt"), "wb").write(b"PK\x03\x04 not really a zip")
    else:
        torch.save({"state": _RunsCode(marker)}, os.path.join(checkpoint, name))
    argv = tiny_adapter[1] + ["--output_dir", out, "--resume_from_checkpoint", checkpoint]
    message = "cannot be read: its optimizer.pt is damaged" if name == "garbage" else f"cannot be trusted: its {name}"
    with pytest.raises(UserError, match=message):
        train.main(argv)
    assert not os.path.exists(marker)


def test_resume_with_a_rank_edited_into_settings_and_config_is_one_line(tiny_adapter, tmp_path):
    out, checkpoint = _checkpoint_copy(tiny_adapter, tmp_path)
    _edit_json(os.path.join(checkpoint, trainer.RUN_SETTINGS_FILE), lora_r=8)
    _edit_json(os.path.join(checkpoint, "adapter_config.json"), r=8)  # the weights keep the demo's rank
    trained = config.PetConfig().lora_r  # the demo trains with the default rank
    argv = tiny_adapter[1] + ["--output_dir", out, "--resume_from_checkpoint", checkpoint, "--lora_r", "8"]
    with pytest.raises(UserError, match=rf"other shapes than the LoRA modules .*\({trained}, \d+\) stored, \(8, \d+\)"):
        train.main(argv)


def test_resume_from_an_intact_checkpoint_still_works(tiny_adapter, tmp_path):
    out, checkpoint = _checkpoint_copy(tiny_adapter, tmp_path)
    os.remove(os.path.join(out, "adapter_model.safetensors"))
    result = train.main(tiny_adapter[1] + ["--output_dir", out, "--resume_from_checkpoint", checkpoint])
    assert result["trainer"].state.global_step >= 2 and os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


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
from config import locked_output_dir, staged_outputs
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
    return subprocess.run([sys.executable, str(driver), script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _result_files(out):
    return sorted(n for n in os.listdir(out) if not n.startswith("."))


@pytest.mark.parametrize("moves", range(1, 9))
def test_a_save_killed_while_moving_is_completed_by_the_next_opener(moves, tmp_path):
    from conftest import ROOT

    from run_io import MOVING, finish_interrupted_save, staged_outputs

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
    finish_interrupted_save(out)  # what evaluate.py, train.py (their lock) and the adapter's readers do first
    assert _result_files(out) == ["a", "b", "c", "d", "new_only"]
    assert {open(os.path.join(out, n)).read() for n in _result_files(out)} == {"new"}
    assert not [n for n in os.listdir(out) if n.startswith((".saving-", MOVING))]


def test_a_save_killed_before_moving_leaves_the_old_set(tmp_path):
    from conftest import ROOT

    out = str(tmp_path / "out")
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT.format(root=ROOT))
    assert _killed_at(str(script), [out, "old", "a,b"], 0, tmp_path).returncode == 0
    script.write_text(SAVE_SCRIPT.format(root=ROOT).replace('write(tag)', 'write(tag); os.kill(os.getpid(), 9)'))
    assert _killed_at(str(script), [out, "new", "a,b,c"], 0, tmp_path).returncode == -9
    from run_io import locked_output_dir

    with locked_output_dir(out):
        assert _result_files(out) == ["a", "b"] and {open(os.path.join(out, n)).read() for n in "ab"} == {"old"}
    assert not [n for n in os.listdir(out) if n.startswith(".saving-")]


@pytest.mark.slow
def test_evaluate_killed_while_moving_its_results_leaves_one_run(tiny_adapter, demo_assets, tmp_path):
    import pandas as pd
    from conftest import ROOT

    from run_io import MOVING, locked_output_dir

    out = str(tmp_path / "eval")
    common = ["--adapter", tiny_adapter[0], "--dataset", demo_assets[1], "--output_dir", out, "--bootstrap_samples", "10"]
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
        assert json.load(open(os.path.join(out, "run_config.json")))["PetConfig"]["max_eval_samples"] == 6
        assert json.load(open(os.path.join(out, "metrics.json")))["num_samples"] == 6
        assert "6" in open(os.path.join(out, "report.md")).read()


@pytest.mark.slow
def test_train_killed_while_moving_its_adapter_is_completed_before_it_is_read(tiny_adapter, tmp_path):
    from conftest import ROOT

    from model import check_adapter, load_lora_for_inference
    from run_io import MOVING

    out, _ = _checkpoint_copy(tiny_adapter, tmp_path)
    argv = tiny_adapter[1] + ["--output_dir", out, "--seed", "8"]  # a new run (seed 8) into the old run's folder
    killed = _killed_at(os.path.join(ROOT, "train.py"), argv, 3, tmp_path)  # plan, README.md, adapter_model.safetensors
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert os.path.exists(os.path.join(out, MOVING))
    check_adapter(out)  # evaluate.py, explainability.py and app.py check the adapter first
    assert not os.path.exists(os.path.join(out, MOVING))
    assert json.load(open(os.path.join(out, "run_config.json")))["TrainConfig"]["seed"] == 8
    with open(os.path.join(out, "README.md")) as f:
        assert "seed 8" in f.read()
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))  # checkpoints are not part of the result set
    load_lora_for_inference(out)


def test_explain_rerun_with_fewer_images_leaves_only_its_own_figures(tiny_adapter, demo_assets, tmp_path):
    out = str(tmp_path / "explain")
    argv = ["--adapter", tiny_adapter[0], "--dataset", demo_assets[1], "--output_dir", out]
    explainability.main(argv + ["--num_images", "3"])
    assert len([n for n in os.listdir(out) if n[:3].isdigit()]) == 3
    result = explainability.main(argv + ["--num_images", "1"])
    figures = sorted(n for n in os.listdir(out) if n.endswith(".png") and n != "attention_metrics.png")
    assert figures == [image["figure"] for image in result["metrics"]["images"]] and len(figures) == 1
