"""Shared fixtures: everything is generated offline (tiny BLIPs, synthetic pets), nothing downloaded."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from config import DEMO_DIR, PetConfig  # noqa: E402
from demo import prepare_demo  # noqa: E402


def run_script(args, cwd, timeout=600, env=None):
    """Run `python <script> ...` from the repository in `cwd`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(items):
    """Every test that needs the trained demo adapter is slow: `train.py --demo` alone takes a minute or more."""
    for item in items:
        if "demo_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """(demo base folder, synthetic data folder), built (the base pre-trained) once for the session."""
    root = tmp_path_factory.mktemp("demo")
    return prepare_demo(str(root), PetConfig().caption_template)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_assets):
    """`python train.py --demo` run once as a subprocess in a fresh folder; returns (cwd, completed process).

    The folder gets copies of the session's demo base and pets, which --demo finds built (and
    checks by its recipe), so the base is pre-trained once per session, not twice.
    """
    cwd = tmp_path_factory.mktemp("demo_run")
    for built in demo_assets:
        shutil.copytree(built, os.path.join(cwd, DEMO_DIR, os.path.basename(built)))
    proc = run_script(["train.py", "--demo"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


@pytest.fixture(scope="session")
def demo_adapter(demo_run):
    cwd, _ = demo_run
    return os.path.join(cwd, DEMO_DIR, "blip-lora")


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
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
