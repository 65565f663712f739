"""Shared fixtures: everything is generated offline (tiny BLIPs, synthetic pets), nothing downloaded.

Two bases: `tiny_assets` is a RANDOM tiny BLIP (the real tokenizer) for tests that need a model of the right
kind; `demo_assets` is the demo's pre-trained base, for the tests marked slow that need a trained model.
"""

import os
import sys

import pytest

from labels import PETS_TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import demo  # noqa: E402
from config import DEMO_DIR  # noqa: E402
from demo import (  # noqa: E402
    DEMO_BREEDS,
    build_tiny_blip,
    prepare_demo_base,
    prepare_demo_data,
    write_synthetic_pets,
)
from helpers import copy_demo, run_script, train_argv  # noqa: E402

PRE_TRAINED = {"demo_assets", "demo_run", "demo_adapter"}  # fixtures that pre-train the demo base or train on it


def pytest_collection_modifyitems(items):
    """The slow mark is written on each test; this only checks that no test needing the pre-trained base lacks it."""
    unmarked = [
        item.nodeid
        for item in items
        if PRE_TRAINED & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "mark these tests @pytest.mark.slow (they need the pre-trained demo base): " + ", ".join(unmarked)
        )


def _tiny_assets(tmp_path_factory):
    """(random tiny base folder, synthetic demo data folder), built on first use in the session."""
    root = tmp_path_factory.getbasetemp() / "tiny-demo"
    model_dir, data_dir = str(root / "tiny-blip"), str(root / "pets")
    if not root.is_dir():
        build_tiny_blip(model_dir)
        write_synthetic_pets(data_dir, breeds=DEMO_BREEDS)
    return model_dir, data_dir


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """(random tiny base folder, synthetic demo data folder): a model of the right kind, not a trained one."""
    return _tiny_assets(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def suite_folder(tmp_path_factory):
    """The suite runs in a temporary folder, so nothing lands in the checkout's outputs/.

    An in-process --demo there must be given --model_name_or_path and --dataset (tiny_assets), or fail
    on an option before it builds anything: building the demo base pre-trains it, which only the slow
    tests' demo_run and demo_assets do, each in its own folder. A test that would build it here fails
    with the reason instead of silently making the fast tier a minute slower.
    """
    folder = tmp_path_factory.mktemp("cwd")
    start = os.getcwd()
    os.chdir(folder)

    real = {"base": prepare_demo_base, "data": prepare_demo_data}

    def refuse(what):
        def build(demo_dir, *args):
            if demo_dir == DEMO_DIR and os.getcwd() == str(folder):
                pytest.fail(
                    f"this test builds the demo {what} in the suite folder: pass --model_name_or_path "
                    "and --dataset (tiny_assets), or use demo_run / demo_assets in a slow test"
                )
            return real[what](demo_dir, *args)

        return build

    with pytest.MonkeyPatch.context() as mp:  # --demo builds through these (demo.use_demo_assets)
        mp.setattr(demo, "prepare_demo_base", refuse("base"))
        mp.setattr(demo, "prepare_demo_data", refuse("data"))
        yield str(folder)
    os.chdir(start)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """(demo base folder, synthetic data folder), built (the base pre-trained) once for the session: slow tests only."""
    root = tmp_path_factory.mktemp("demo")
    return prepare_demo_base(str(root), PETS_TEMPLATE), prepare_demo_data(str(root))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_assets):
    """`python train.py --demo` run once as a subprocess in a fresh folder; returns (cwd, completed process).

    The folder gets copies of the session's demo base and pets, which --demo finds built (and
    checks by its recipe), so the base is pre-trained once per session, not twice.
    """
    cwd = tmp_path_factory.mktemp("demo_run")
    copy_demo(demo_assets, cwd)
    proc = run_script(["train.py", "--demo"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


@pytest.fixture(scope="session")
def demo_adapter(demo_run):
    cwd, _ = demo_run
    return os.path.join(cwd, DEMO_DIR, "blip-lora")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_assets, tmp_path_factory):
    """(folder, train.py argv) of a 2-step adapter on the random tiny base, seed 7 and val_fraction 0.2 (not the
    defaults), with its checkpoint-2."""
    import train

    out = str(tmp_path_factory.mktemp("tiny-adapter") / "adapter")
    argv = train_argv(tiny_assets, out, tmp_path_factory.mktemp("cache"))
    train.main(argv)
    return out, argv


@pytest.fixture(scope="session")
def tiny_dora_adapter(tiny_assets, tmp_path_factory):
    """(folder, train.py argv) of tiny_adapter's run as DoRA with rsLoRA scaling, in bf16 autocast (the frozen
    weights cast for it) on cached embeddings."""
    import train

    out = str(tmp_path_factory.mktemp("tiny-dora") / "adapter")
    argv = train_argv(tiny_assets, out, tmp_path_factory.mktemp("cache")) + [
        "--use_dora",
        "--use_rslora",
        "--precision",
        "bf16",
    ]
    train.main(argv)
    return out, argv


@pytest.fixture
def pets(tmp_path):
    """A small synthetic pet set of two breeds (8 trainval and 4 test images), to damage."""
    return write_synthetic_pets(str(tmp_path / "pets"), breeds=[0, 1], trainval_per_breed=4, test_per_breed=2, size=32)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor saved to a folder, built offline.

    The tokenizer is CLIP's byte-level BPE with no merges: every byte is a token, so the vocabulary is the
    256 byte symbols (plus their end-of-word forms and the two special tokens) and needs no download.
    """
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip import CLIPImageProcessorPil

    out = str(tmp_path_factory.mktemp("tiny-clip"))
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"))
    n = len(vocab)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
