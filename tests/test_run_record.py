"""run_record.py: run_config.json in both layouts, and the adapter's record, read once and never written."""

import importlib
import json
import os
import shutil

import pytest

import evaluate
import explainability
import model
import run_record
from config import PetConfig
from data import load_splits
from helpers import TRAIN_SEED, adapter_copy, edit_json
from run_io import MOVING, UserError
from run_record import AdapterRun, read_run_config, save_run_config


def test_run_config_sections_have_stable_names_and_old_files_still_read(tmp_path):
    new = str(tmp_path / "new.json")
    save_run_config(new, shared=PetConfig(dataset="d", val_fraction=0.3))
    written = json.load(open(new))
    assert set(written) == {"command", "shared"}  # a section's name is not its options class's name
    old = str(tmp_path / "old.json")  # as run_config.json was written before: keyed by the options class
    json.dump(
        {"command": "python train.py", "PetConfig": written["shared"], "TrainConfig": {"seed": 3}}, open(old, "w")
    )
    for path in (new, old):
        assert read_run_config(path).options("shared")["val_fraction"] == 0.3
    assert read_run_config(old).options("train") == {"seed": 3}
    assert read_run_config(str(tmp_path / "none.json")) is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"text"'])
def test_an_unreadable_run_config_is_a_warning_and_no_settings(tmp_path, caplog, text):
    path = tmp_path / "run_config.json"
    path.write_text(text)
    assert read_run_config(str(path)) is None
    assert "cannot be read" in caplog.text


def test_the_record_takes_only_values_of_the_right_type(tiny_adapter, tmp_path):
    adapter = adapter_copy(tiny_adapter, tmp_path)
    run = json.load(open(os.path.join(adapter, "run_config.json")))
    edit_json(
        os.path.join(adapter, "run_config.json"),
        shared={**run["shared"], "val_fraction": "0.2", "dataset": 7},
        train={**run["train"], "seed": True},
    )
    record = AdapterRun.read(adapter)
    assert (record.val_fraction, record.dataset, record.seed) == (None, None, None)
    with pytest.raises(UserError, match="needs the adapter's run_config.json"):
        record.split_settings(PetConfig(), "validation", 42)


def test_a_half_saved_adapter_is_refused_and_left_as_it_is(tiny_adapter, tmp_path):
    adapter = adapter_copy(tiny_adapter, tmp_path)
    staging = os.path.join(adapter, ".saving-x")
    os.makedirs(staging)
    open(os.path.join(staging, "README.md"), "w").write("new")
    json.dump({"staging": ".saving-x", "files": ["README.md"], "stale": []}, open(os.path.join(adapter, MOVING), "w"))
    before = {n: open(os.path.join(adapter, n), "rb").read() for n in os.listdir(adapter) if n != ".saving-x"}
    with pytest.raises(UserError, match="stopped while moving its files in"):
        AdapterRun.read(adapter)
    after = {n: open(os.path.join(adapter, n), "rb").read() for n in os.listdir(adapter) if n != ".saving-x"}
    assert after == before and os.listdir(staging) == ["README.md"]  # nothing moved, locked or removed


def test_evaluate_checks_the_adapter_and_reads_its_run_config_once(tiny_adapter, tiny_assets, tmp_path, monkeypatch):
    adapter = tiny_adapter[0]
    checks, reads = [], []
    real_check, real_open = model.check_adapter, open

    def counting_check(folder):
        checks.append(folder)
        return real_check(folder)

    def counting_open(path, *args, **kwargs):
        if os.path.abspath(str(path)) == os.path.abspath(os.path.join(adapter, "run_config.json")):
            reads.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(model, "check_adapter", counting_check)
    monkeypatch.setattr(run_record, "check_adapter", counting_check)
    monkeypatch.setattr("builtins.open", counting_open)
    evaluate.main(
        [
            "--adapter",
            adapter,
            "--output_dir",
            str(tmp_path / "eval"),
            "--max_eval_samples",
            "4",
            "--max_new_tokens",
            "3",
            "--linear_probe",
            "False",
            "--clip_model",
            "none",
            "--bootstrap_samples",
            "10",
        ]
    )
    assert checks == [adapter] and len(reads) == 1
    # the kind of LoRA, from the adapter_config.json that was checked (model.adapter_variant)
    assert f"- adapter `{adapter}` (LoRA) on base model" in (tmp_path / "eval" / "report.md").read_text()


def test_one_rule_for_the_base_model_and_data_of_evaluate_and_explain(tiny_adapter, tiny_assets, tmp_path):
    adapter = tiny_adapter[0]
    trained_on = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
    other, other_data = str(tmp_path / "other"), str(tmp_path / "data")
    shutil.copytree(tiny_assets[0], other)
    for parse in (evaluate.parse_args, explainability.parse_args):
        cfg, _, _ = parse(["--adapter", adapter, "--output_dir", str(tmp_path / "o")])
        # not given: the adapter's own base model and data set
        assert cfg.model_name_or_path == trained_on
        assert cfg.dataset == os.path.abspath(tiny_assets[1])
        cfg, _, _ = parse(
            [
                "--adapter",
                adapter,
                "--output_dir",
                str(tmp_path / "o"),
                "--model_name_or_path",
                other,
                "--dataset",
                other_data,
            ]
        )
        assert (cfg.model_name_or_path, cfg.dataset) == (other, other_data)  # given: those, in both scripts


def test_validation_split_is_rebuilt_from_the_adapters_run_settings(tiny_adapter, tiny_assets):
    cfg = PetConfig(dataset=tiny_assets[1])  # evaluate's defaults: val_fraction 0.1, seed 42
    fraction, seed = AdapterRun.read(tiny_adapter[0]).split_settings(cfg, "validation", 42)
    assert (fraction, seed) == (0.2, TRAIN_SEED)
    trained = load_splits(tiny_assets[1], 0.2, TRAIN_SEED)
    rebuilt = load_splits(tiny_assets[1], fraction, seed)
    assert [r.image_id for r in rebuilt["validation"]] == [r.image_id for r in trained["validation"]]
    assert not {r.image_id for r in rebuilt["validation"]} & {r.image_id for r in trained["train"]}


def test_validation_split_needs_the_adapters_run_config(tiny_adapter, tmp_path):
    copy = adapter_copy(tiny_adapter, tmp_path)
    os.remove(os.path.join(copy, "run_config.json"))
    record = AdapterRun.read(copy)
    with pytest.raises(UserError, match="needs the adapter's run_config.json"):
        record.split_settings(PetConfig(), "validation", 42)
    assert record.split_settings(PetConfig(), "test", 42) == (0.1, 42)


@pytest.mark.parametrize("script", ["evaluate", "explainability", "app"])
def test_demo_with_an_adapter_takes_the_adapters_own_base_and_data(script, tiny_adapter, tiny_assets, tmp_path):
    """--demo --adapter X: the base and data set X was trained on (when still on disk), not the demo's."""
    module = importlib.import_module(script)
    base, data = str(tmp_path / "other-base"), str(tmp_path / "other-pets")
    shutil.copytree(tiny_assets[0], base)
    shutil.copytree(tiny_assets[1], data)
    adapter = adapter_copy(tiny_adapter, tmp_path)
    edit_json(os.path.join(adapter, "adapter_config.json"), base_model_name_or_path=base)
    run = json.load(open(os.path.join(adapter, "run_config.json")))
    edit_json(os.path.join(adapter, "run_config.json"), shared={**run["shared"], "dataset": data})
    cfg, _, _ = module.parse_args(["--demo", "--adapter", adapter, "--output_dir", str(tmp_path / "out")])
    assert (cfg.model_name_or_path, cfg.dataset) == (base, data)
    given = str(tmp_path / "given-base")
    shutil.copytree(tiny_assets[0], given)
    cfg, _, _ = module.parse_args(
        ["--demo", "--adapter", adapter, "--model_name_or_path", given, "--output_dir", str(tmp_path / "out2")]
    )
    assert cfg.model_name_or_path == given  # a typed flag still wins


@pytest.mark.parametrize("script", ["evaluate", "explainability"])
def test_a_scripts_own_run_config_gives_back_its_options(script, tiny_adapter, tmp_path):
    """What evaluate.py / explainability.py record (the options as resolved: the adapter's base model, data and
    template filled in) parses back to the same options, so `python evaluate.py <its run_config.json>` re-runs it."""
    module = importlib.import_module(script)
    flags = ["--adapter", tiny_adapter[0], "--output_dir", str(tmp_path / "o"), "--seed", "3", "--max_new_tokens", "9"]
    cfg, args, _ = module.parse_args(flags)
    path = str(tmp_path / "run_config.json")
    save_run_config(path, **{"shared": cfg, "evaluate" if script == "evaluate" else "explain": args})
    again, args_again, _ = module.parse_args([path])
    assert (again, args_again) == (cfg, args)
