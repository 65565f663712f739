"""The ecosystem's own clients: the README's and the model card's pipeline snippet, and Trainer's tracking."""

import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest

import train
from config import DEMO_DIR, OUTPUT_DIR
from data import load_image, load_splits
from helpers import ROOT, caption_images, demo_argv
from model import load_lora_for_inference
from run_io import UserError

MARKER = "<!-- pipeline-snippet -->"
PROJECT_MODULES = ("config", "data", "demo", "model", "metrics", "report", "train", "evaluate", "explainability", "app")


def snippet(markdown: str) -> str:
    """The ```python block right after the marker (so the section can move anywhere in the file)."""
    assert markdown.count(MARKER) == 1, f"expected one {MARKER}"
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", markdown, re.S)
    assert found, f"no ```python block right after {MARKER}"
    return found.group(1)


def run_snippet(code: str, images: list, cwd) -> list:
    """Run `code` verbatim once per image ("pet.jpg" -> that image) in a fresh interpreter without the project."""
    assert code.count('"pet.jpg"') == 1
    body = code.replace('"pet.jpg"', "image_path")
    script = (
        "import sys\nfor image_path in sys.argv[1:]:\n"
        + textwrap.indent(body, "    ")
        + f"\nassert not [m for m in {PROJECT_MODULES!r} if m in sys.modules], 'a project module was imported'\n"
    )
    path = os.path.join(cwd, "snippet_run.py")  # sys.path[0] is then cwd, where no project module lies
    with open(path, "w") as f:
        f.write(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, path, *images], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-len(images) :]


@pytest.fixture(scope="module")
def project_captions(demo_run, demo_adapter):
    """(image paths, captions from the project's own inference) for a few held-out demo images."""
    cwd, _ = demo_run
    records = load_splits(os.path.join(cwd, DEMO_DIR, "pets"))["test"][::7][:4]
    model, processor = load_lora_for_inference(demo_adapter)
    paths = [os.path.join(cwd, DEMO_DIR, "pets", "images", f"{r.image_id}.jpg") for r in records]
    return paths, caption_images(model, processor, [load_image(r) for r in records])


@pytest.mark.slow
def test_readme_pipeline_snippet_gives_the_projects_captions(demo_adapter, project_captions, tmp_path):
    code = snippet(open(os.path.join(ROOT, "README.md")).read())
    assert code.count(f'"{OUTPUT_DIR}"') == 1
    paths, ours = project_captions
    assert len(set(ours)) > 1  # several breeds, so equal captions are not a coincidence
    assert run_snippet(code.replace(f'"{OUTPUT_DIR}"', repr(demo_adapter)), paths, tmp_path) == ours


@pytest.mark.slow
def test_model_card_pipeline_snippet_is_the_readmes_and_works(demo_run, demo_adapter, project_captions):
    cwd, _ = demo_run
    card = open(os.path.join(demo_adapter, "README.md")).read()
    code = snippet(card)
    # the same code as README's, naming this adapter's folder (relative, as --output_dir was given)
    readme = snippet(open(os.path.join(ROOT, "README.md")).read())
    assert code == readme.replace(f'"{OUTPUT_DIR}"', f'"{DEMO_DIR}/blip-lora"')
    assert "from model import" not in card  # Hub users have no checkout of this project
    paths, ours = project_captions
    assert run_snippet(code, paths, cwd) == ours


@pytest.mark.slow
def test_card_pipeline_tag_is_the_hub_task_of_a_captioner(demo_adapter):
    import yaml

    meta = yaml.safe_load(open(os.path.join(demo_adapter, "README.md")).read().split("---")[1])
    # the Hub lists caption models (the base checkpoint too) under image-to-text; image-text-to-text is
    # for models that answer a text prompt, which this adapter never got in training
    assert meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "peft"


def test_report_to_tensorboard_logs_loss_and_breed_accuracy_every_epoch(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    epochs = 3
    result = train.main(
        [
            *demo_argv(tiny_assets, str(out)),
            "--embedding_cache_dir",
            str(tmp_path / "cache"),
            "--report_to",
            "tensorboard",
            "--num_train_epochs",
            str(epochs),
            "--logging_steps",
            "1",
            "--max_train_samples",
            "16",
            "--max_eval_samples",
            "8",
            "--per_device_train_batch_size",
            "8",
        ]
    )
    runs = glob.glob(str(out / "runs" / "*"))
    assert len(runs) == 1, runs
    events = EventAccumulator(runs[0])
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and "eval/loss" in scalars
    accuracy = {s.step: s.value for s in events.Scalars("eval/breed_accuracy")}
    # one per epoch, at the steps and with the values of the run's own history
    validation = result["history"]["validation"]
    assert len(validation) == epochs
    assert sorted(accuracy) == [e["step"] for e in validation]
    assert [accuracy[e["step"]] for e in validation] == pytest.approx([e["breed_accuracy"] for e in validation])
    losses = [s.value for s in events.Scalars("train/loss")]
    assert len(losses) == result["trainer"].state.global_step
    assert losses == pytest.approx([e["loss"] for e in result["history"]["train"]])


@pytest.mark.parametrize(
    "name, message", [("tensorboardz", "not an integration Trainer knows"), ("wandb", "its package is not installed")]
)
def test_report_to_unusable_is_one_line(name, message, monkeypatch):
    import transformers.integrations as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(UserError, match=message):
        train.check_report_to([name])
    train.check_report_to(["tensorboard"])
    train.check_report_to(["none"])


@pytest.mark.slow
def test_readme_snippet_loads_a_dora_rslora_adapter_with_plain_peft(tiny_dora_adapter, tiny_assets, tmp_path):
    """AutoPeftModel reads use_dora / use_rslora from adapter_config.json itself: the snippet needs no change."""
    folder, _ = tiny_dora_adapter
    code = snippet(open(os.path.join(ROOT, "README.md")).read()).replace(f'"{OUTPUT_DIR}"', repr(folder))
    records = load_splits(tiny_assets[1])["test"][::9][:3]
    model, processor = load_lora_for_inference(folder)
    ours = caption_images(model, processor, [load_image(r) for r in records])
    paths = [os.path.join(tiny_assets[1], "images", f"{r.image_id}.jpg") for r in records]
    assert run_snippet(code, paths, tmp_path) == ours
