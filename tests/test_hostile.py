"""Hostile inputs: bad image files, broken annotations, broken adapters, interrupted and diverging runs."""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from PIL import Image

import train
from data import BadImage, Record, load_image, load_splits
from demo import build_tiny_blip, write_synthetic_pets
from model import load_lora_for_inference
from run_io import UserError, run_main

# ---------------------------------------------------------------------------
# Image files


def _png_with_size(width, height) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no real pixels)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg(path):
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
    _exif_rotated_jpeg(f("exif.jpg"))
    out["exif_rotated"] = (f("exif.jpg"), (20, 40))
    open(f("bomb.png"), "wb").write(_png_with_size(40000, 40000))
    out["decompression_bomb"] = (f("bomb.png"), None)
    return out


@pytest.mark.parametrize("case", ["ok", "zero_byte", "truncated_jpeg", "text_as_jpg", "png_named_jpg", "cmyk_jpeg",
                                  "16bit_png", "palette", "la", "1x1", "exif_rotated", "decompression_bomb"])
def test_hostile_image(case, tmp_path):
    path, expected = hostile_images(str(tmp_path))[case]
    record = Record(case, 0, path)
    if expected is None:
        with pytest.raises(BadImage, match=case):
            load_image(record)
    else:
        img = load_image(record)
        assert img.mode == "RGB" and img.size == expected


def test_exif_rotation_is_applied(tmp_path):
    path, _ = hostile_images(str(tmp_path))["exif_rotated"]
    img = np.asarray(load_image(Record("x", 0, path)))
    # orientation 6 = rotate 90 deg clockwise: the stored left strip ends up on top
    assert img[2, 10, 2] > 200 and img[-3, 10, 0] > 200


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    path, _ = hostile_images(str(tmp_path))["16bit_png"]
    arr = np.asarray(load_image(Record("x", 0, path)))[..., 0]
    assert arr.min() == 0 and arr.max() == 255  # scaled, not clipped to white


# ---------------------------------------------------------------------------
# Annotations in the official layout


@pytest.fixture
def pets(tmp_path):
    return write_synthetic_pets(str(tmp_path / "pets"), breeds=[0, 1], trainval_per_breed=4, test_per_breed=2, size=32)


def test_missing_list_txt_is_a_clear_error(pets):
    os.remove(os.path.join(pets, "annotations", "list.txt"))
    with pytest.raises(UserError, match="list.txt is missing"):
        load_splits(pets)


def test_bad_annotation_lines_are_skipped_and_counted(pets, caplog):
    path = os.path.join(pets, "annotations", "trainval.txt")
    lines = open(path).read().splitlines()
    lines[0] = lines[0].split()[0]  # malformed: no class id
    lines[1] = f"{lines[1].split()[0]} 99 1 1"  # unknown class id
    lines.append("Abyssinian_999 1 1 1")  # listed, but the image is missing
    open(path, "w").write("\n".join(lines) + "\n")
    os.remove(os.path.join(pets, "annotations", "list.txt"))
    open(os.path.join(pets, "annotations", "list.txt"), "w").write("# header\n")
    shutil.copy(os.path.join(pets, "images", "Abyssinian_1.jpg"), os.path.join(pets, "images", "Abyssinian_500.jpg"))
    with caplog.at_level(logging.INFO):
        splits = load_splits(pets, 0.0)
    assert len(splits["train"]) == 8 - 2
    text = caplog.text
    assert "Skipped 2 malformed annotation lines, unknown class ids or unsafe names" in text
    assert "Skipped 1 listed images that are missing (first: Abyssinian_999)" in text
    assert "3 images are in neither trainval.txt nor test.txt" in text  # the two bad lines' images + the extra one


@pytest.mark.slow
def test_training_skips_unreadable_images_and_reports_them(pets, demo_assets, tmp_path, caplog):
    hostile = hostile_images(str(tmp_path / "h"))
    images = os.path.join(pets, "images")
    shutil.copy(hostile["truncated_jpeg"][0], os.path.join(images, "Abyssinian_1.jpg"))
    shutil.copy(hostile["text_as_jpg"][0], os.path.join(images, "american_bulldog_2.jpg"))
    shutil.copy(hostile["cmyk_jpeg"][0], os.path.join(images, "Abyssinian_3.jpg"))
    for cached in ("True", "False"):
        with caplog.at_level(logging.WARNING):
            train.main(["--demo", "--model_name_or_path", demo_assets[0], "--dataset", pets, "--val_fraction", "0.25",
                        "--output_dir", str(tmp_path / cached), "--num_train_epochs", "1", "--use_embedding_cache", cached,
                        "--embedding_cache_dir", str(tmp_path / "cache")])
        assert os.path.isfile(tmp_path / cached / "adapter_model.safetensors")
        assert "Skipped 2 unreadable images" in caplog.text and "Abyssinian_1" in caplog.text
        caplog.clear()


# ---------------------------------------------------------------------------
# Adapters


def _broken_adapter(demo_adapter, tmp_path, case):
    path = tmp_path / case
    if case == "missing":
        return str(path)
    shutil.copytree(demo_adapter, path, ignore=shutil.ignore_patterns("checkpoint-*"))
    if case == "no_config":
        os.remove(path / "adapter_config.json")
    elif case == "no_weights":
        os.remove(path / "adapter_model.safetensors")
    elif case == "pickle_only":
        os.remove(path / "adapter_model.safetensors")
        torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    elif case == "corrupt":
        raw = open(path / "adapter_model.safetensors", "rb").read()
        open(path / "adapter_model.safetensors", "wb").write(raw[: len(raw) // 3])
    elif case == "other_base":
        other = build_tiny_blip(str(tmp_path / "other-base"), image_size=32)
        cfg = json.load(open(path / "adapter_config.json"))
        # same module names, another hidden size
        json.dump({**cfg, "base_model_name_or_path": _wider(other)}, open(path / "adapter_config.json", "w"))
    elif case == "base_moved":  # trained elsewhere: the recorded base folder is not on this machine
        cfg = json.load(open(path / "adapter_config.json"))
        json.dump({**cfg, "base_model_name_or_path": "outputs/elsewhere/tiny-blip"}, open(path / "adapter_config.json", "w"))
    return str(path)


def _wider(path):
    cfg = json.load(open(os.path.join(path, "config.json")))
    from transformers import BlipConfig

    from model import BlipForPetCaptioning
    cfg["text_config"]["hidden_size"] = 96
    model = BlipForPetCaptioning(BlipConfig(text_config=cfg["text_config"], vision_config=cfg["vision_config"]))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"), ("no_config", "no adapter_config.json"), ("no_weights", "no adapter_model.safetensors"),
    ("pickle_only", "refused: only safetensors"), ("corrupt", "corrupt or truncated"),
    ("other_base", "another shape|does not fit the base model|starts captions with"),
    ("base_moved", "outputs/elsewhere/tiny-blip' does not exist; pass an existing folder to --model_name_or_path"),
])
def test_broken_adapter_is_one_clear_error(case, message, demo_adapter, tmp_path):
    with pytest.raises(UserError, match=message):
        load_lora_for_inference(_broken_adapter(demo_adapter, tmp_path, case))


# ---------------------------------------------------------------------------
# Runs that die or diverge


@pytest.mark.slow
def test_nan_loss_stops_training_without_saving(demo_assets, tmp_path, monkeypatch):
    import model as model_module

    real = model_module.BlipForPetCaptioning.forward
    calls = {"n": 0}

    def diverging(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += kw.get("labels") is not None  # training steps only, not load_base_model's probe
        if calls["n"] >= 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_module.BlipForPetCaptioning, "forward", diverging)
    with pytest.raises(UserError, match="loss became nan at step 2"):
        train.main(["--demo", "--model_name_or_path", demo_assets[0], "--dataset", demo_assets[1],
                    "--output_dir", str(tmp_path), "--embedding_cache_dir", str(tmp_path / "cache")])
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")


def _adapter_weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter(demo_assets, tmp_path):
    """SIGKILL after the first checkpoint, resume, and end where an uninterrupted run ends."""
    common = ["--demo", "--model_name_or_path", demo_assets[0], "--dataset", demo_assets[1], "--num_train_epochs", "4",
              "--max_train_samples", "64", "--embedding_cache_dir", str(tmp_path / "cache")]  # 4 steps an epoch
    full = run_script(["train.py", *common, "--output_dir", str(tmp_path / "full")], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]

    final = _last_trainer_state(tmp_path / "full")
    per_epoch = final["max_steps"] // final["num_train_epochs"]  # from the run itself, not the demo's size

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, "--output_dir", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / f"checkpoint-{2 * per_epoch}").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / f"checkpoint-{per_epoch}").is_dir() and not (out / "adapter_model.safetensors").exists()

    resumed = run_script(["train.py", *common, "--output_dir", str(out), "--resume_from_checkpoint", "True"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _adapter_weights(tmp_path / "full"), _adapter_weights(out)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a)
    assert worst < 1e-4, worst
    assert final["global_step"] == final["max_steps"] and final["num_train_epochs"] == 4
    assert _last_trainer_state(out)["global_step"] == final["max_steps"]  # the resumed run reached the final step too


def _last_trainer_state(run):
    last = max((p for p in run.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name.split("-")[1]))
    return json.load(open(last / "trainer_state.json"))


# ---------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("argv,message", [
    (["--per_device_train_batch_size", "-4"], "batch"),
    (["--dataset", "nobody/no-such-pets"], "--demo"),
    (["--dataset", "./no/such/folder"], "does not exist"),
])
def test_nonsense_options_are_one_clear_line(argv, message, tmp_path, capsys):
    # In-process: test_train's offline test runs the script itself for the real stderr and exit code
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(["--output_dir", str(tmp_path / "o"), *argv]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_image_over_the_pixel_limit_but_under_twice_it_is_bad(tmp_path, monkeypatch):
    # PIL only warns between MAX_IMAGE_PIXELS and twice that, and it checks in Image.open
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "big.png")  # 1,600 pixels: 1.6x the limit
    with pytest.raises(BadImage, match="DecompressionBomb"):
        load_image(Record("big", 0, str(tmp_path / "big.png")))
    Image.new("RGB", (30, 30)).save(tmp_path / "ok.png")  # 900 pixels: under it
    assert load_image(Record("ok", 0, str(tmp_path / "ok.png"))).size == (30, 30)
