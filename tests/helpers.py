"""What several test files share besides fixtures: running the scripts, copying and editing adapters, test files."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SEED = 7  # tiny_adapter's seed: not the default, so a rebuilt split that ignored it would differ


def run_script(args, cwd, timeout=600, env=None):
    """Run `python <script> ...` from the repository in `cwd`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, args[0]), *args[1:]],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copy_demo(demo_assets, cwd):
    """Copy the session's built demo (base and pets) to `cwd`/outputs/demo, where a --demo run started in `cwd` finds
    it (checked by its recipe) instead of pre-training the base again."""
    from config import DEMO_DIR

    for built in demo_assets:
        shutil.copytree(built, os.path.join(cwd, DEMO_DIR, os.path.basename(built)))


def free_port():
    """A port no one listens on now: a fixed one collides with a concurrent test run on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, cwd, nproc=2, timeout=600):
    """Run a script of the repository under torchrun with `nproc` CPU processes (gloo)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, args[0]),
        *args[1:],
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def demo_argv(assets, out):
    """train.py's or evaluate.py's --demo options on (base, data folder) `assets`, writing to `out`."""
    return ["--demo", "--model_name_or_path", assets[0], "--dataset", assets[1], "--output_dir", str(out)]


def train_argv(assets, out, cache):
    """train.py options for tiny_adapter's run: 2 steps on (base, data folder) `assets`, seed 7, val_fraction 0.2."""
    return [
        *demo_argv(assets, str(out)),
        "--max_steps",
        "2",
        "--seed",
        str(TRAIN_SEED),
        "--val_fraction",
        "0.2",
        "--embedding_cache_dir",
        str(cache),
    ]


def adapter_copy(tiny_adapter, tmp_path, name="adapter"):
    """A copy of tiny_adapter's folder without its checkpoints, to damage."""
    path = str(tmp_path / name)
    shutil.copytree(tiny_adapter[0], path, ignore=shutil.ignore_patterns("checkpoint-*"))
    return path


def checkpoint_copy(tiny_adapter, tmp_path):
    """(run folder, its checkpoint-2): a copy of tiny_adapter's folder with its checkpoint, to resume or damage."""
    out = str(tmp_path / "run")
    shutil.copytree(tiny_adapter[0], out)
    return out, os.path.join(out, "checkpoint-2")


def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def png_with_size(width, height) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb needs no real pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def pngs(folder, names):
    """Small PNGs of different colours at folder/name (sub-folders made); returns their paths."""
    from PIL import Image

    paths = []
    for k, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (16, 16), (20 * k, 100, 200 - 20 * k)).save(path)
        paths.append(path)
    return paths


def saved_dataset(path, splits: dict) -> str:
    """A save_to_disk DatasetDict from {split: {column: values}} (image: file paths, label: breed names)."""
    import datasets

    datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
            for name, columns in splits.items()
        }
    ).save_to_disk(path)
    return path


def exif_rotated_jpeg(path):
    """A 40x20 landscape JPEG whose EXIF orientation 6 says: show it rotated, as 20x40 portrait."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes())


def hostile_images(folder):
    """{name: (path, expected)}: expected is a size for images that must load, None for ones to skip."""
    os.makedirs(folder, exist_ok=True)
    f = lambda n: os.path.join(folder, n)  # noqa: E731
    good = Image.new("RGB", (32, 24), (10, 200, 30))
    good.save(f("ok.jpg"))
    out = {"ok": (f("ok.jpg"), (32, 24))}
    open(f("zero.jpg"), "wb").close()
    out["zero_byte"] = (f("zero.jpg"), None)
    raw = open(f("ok.jpg"), "rb").read()
    open(f("truncated.jpg"), "wb").write(raw[: len(raw) // 2])
    out["truncated_jpeg"] = (f("truncated.jpg"), None)
    open(f("text.jpg"), "w").write("this is a text file, not a picture\n")
    out["text_as_jpg"] = (f("text.jpg"), None)
    good.save(f("png.jpg"), format="PNG")
    out["png_named_jpg"] = (f("png.jpg"), (32, 24))
    good.convert("CMYK").save(f("cmyk.jpg"))
    out["cmyk_jpeg"] = (f("cmyk.jpg"), (32, 24))
    Image.fromarray((np.arange(32 * 24).reshape(24, 32) * 80).astype(np.uint16)).save(f("sixteen.png"))
    out["16bit_png"] = (f("sixteen.png"), (32, 24))
    good.convert("P").save(f("palette.png"))
    out["palette"] = (f("palette.png"), (32, 24))
    good.convert("LA").save(f("la.png"))
    out["la"] = (f("la.png"), (32, 24))
    Image.new("RGB", (1, 1), (5, 5, 5)).save(f("one.jpg"))
    out["1x1"] = (f("one.jpg"), (1, 1))
    exif_rotated_jpeg(f("exif.jpg"))
    out["exif_rotated"] = (f("exif.jpg"), (20, 40))
    open(f("bomb.png"), "wb").write(png_with_size(40000, 40000))
    out["decompression_bomb"] = (f("bomb.png"), None)
    return out


class RunsCode:
    """A pickle payload that creates a file when unpickled (without weights_only): what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def caption_images(model, processor, images: list, max_new_tokens: int = 30, num_beams: int = 1) -> list:
    """Captions of PIL images, the way evaluate.py writes them (image embeddings, then the decoder)."""
    import torch

    from inference import captions_from_embeddings, image_embeddings

    param = next(model.parameters())
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
    with torch.no_grad():
        embeds = image_embeddings(model, pixels)
    return captions_from_embeddings(model, processor, embeds, max_new_tokens, num_beams)
