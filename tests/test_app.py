"""app.py: the handler called directly, and the page in a real (headless) Chromium."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from config import UserError
from data import BREED_NAMES, Record, load_image, load_splits

from conftest import ROOT

pytest.importorskip("gradio")
import app  # noqa: E402


@pytest.fixture(scope="module")
def captioner(demo_run):
    """The app's models on the demo adapter, loaded as `python app.py --demo` does, from the demo run's folder."""
    cwd, _ = demo_run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cfg, args = app.parse_args(["--demo"])
        yield app.PetCaptioner(cfg, args)


@pytest.fixture(scope="module")
def test_images(demo_run):
    """[(path, true label)] of the demo test split, one image of each of 3 breeds."""
    cwd, _ = demo_run
    records = load_splits(os.path.join(cwd, "outputs/demo/pets"))["test"]
    picked = {}
    for r in records:
        picked.setdefault(r.label, r)
    return [(r.source, r.label) for r in list(picked.values())[:3]]


def test_result_matches_an_independent_computation(captioner, test_images):
    from model import breed_candidates, generate_caption, image_embeddings, rank_breeds

    for path, label in test_images:
        result = captioner.analyse(path)
        assert set(result) == {"zero_shot", "fine_tuned"}
        image = load_image(Record("x", -1, path))
        processor = captioner.processor
        for key, model in captioner.models.items():
            r = result[key]
            # Captions: the batched-from-pixels path, each model embedding the image itself
            assert r["caption"] == generate_caption(model, processor, [image], max_new_tokens=captioner.cfg.max_new_tokens)[0]
            # Top 5: a softmax over all 37 rank_breeds scores, recomputed here without sharing embeddings
            pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
            scores, _ = rank_breeds(model, image_embeddings(model, pixels), breed_candidates(model, processor.tokenizer, captioner.cfg.caption_template))
            probs = np.exp(scores[0].numpy() - scores[0].numpy().max())
            probs /= probs.sum()
            top = np.argsort(-probs, kind="stable")[:5]
            assert [name for name, _ in r["top"]] == [BREED_NAMES[i] for i in top]
            np.testing.assert_allclose([p for _, p in r["top"]], probs[top], rtol=1e-5)
            assert len(probs) == 37 and sum(p for _, p in r["top"]) < 1
            # the per-token ranking is named only where its first breed is not the summed ranking's
            tokens = (breed_candidates(model, processor.tokenizer, captioner.cfg.caption_template)[1][:, 1:].sum(-1)).numpy()
            per_token = int(np.argmax(scores[0].numpy() / tokens))
            assert r["per_token_first"] == (None if per_token == top[0] else BREED_NAMES[per_token])
            # The map: the input enlarged to the display size with a colour overlay on it
            assert r["heatmap"].shape == (app.DISPLAY_SIDE, app.DISPLAY_SIDE, 3) and r["heatmap"].dtype == np.uint8
        # The demo adapter names the right breed, and its map is that breed word's
        tuned = result["fine_tuned"]
        assert tuned["breed"] == BREED_NAMES[label]
        assert BREED_NAMES[label].lower() in tuned["caption"]
        assert tuned["map_word"] == f"breed: {BREED_NAMES[label].lower()}"
        plain = np.asarray(image.resize((app.DISPLAY_SIDE, app.DISPLAY_SIDE), Image.Resampling.BICUBIC)).astype(int)
        assert np.abs(tuned["heatmap"].astype(int) - plain).mean() > 20  # coloured, not the bare image


def test_one_image_is_embedded_once_for_both_models(captioner, test_images, monkeypatch):
    assert captioner.shared  # LoRA on the text decoder: identical vision encoders
    calls = []
    real = app.image_embeddings
    monkeypatch.setattr(app, "image_embeddings", lambda model, pixels: calls.append(1) or real(model, pixels))
    captioner.analyse(test_images[0][0])
    assert len(calls) == 1
    captioner.shared = False  # different encoders: each model embeds the image itself
    try:
        captioner.analyse(test_images[0][0])
    finally:
        captioner.shared = True
    assert len(calls) == 3


def test_handler_fills_every_output(captioner, test_images):
    path, label = test_images[0]
    values = app.handle(captioner, path)
    assert len(values) == 1 + 4 * 2
    assert values[0].startswith("Answered in") and "embedded once" in values[0]
    for k, key in enumerate(app.MODELS):
        caption, breed, top, heatmap = values[1 + 4 * k:5 + 4 * k]
        assert caption and isinstance(breed, str)
        bars = top["value"]
        assert isinstance(bars, dict) and len(bars) == 5 and all(0 < p < 1 for p in bars.values())
        assert top["label"].startswith(app.RANKING_LABEL) and "summed" in top["label"]
        assert heatmap["value"].shape == (app.DISPLAY_SIDE, app.DISPLAY_SIDE, 3) and "Cross-attention" in heatmap["label"]
    assert values[6] == BREED_NAMES[label]  # fine-tuned "breed named"
    assert values[8]["label"] == f"Cross-attention of “{BREED_NAMES[label].lower()}”"


def _png_with_size(width, height) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb needs no real pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_bad_input_is_a_message_not_an_exception(captioner, tmp_path, monkeypatch):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_size(40000, 40000))  # 1.6 G pixels, over PIL's default limit
    cases = {None: "No image", "": "No image", str(notes): "not an image", str(tmp_path / "missing.jpg"): "not an image",
             str(bomb): "too large"}
    for image, message in cases.items():
        values = app.handle(captioner, image)
        assert values[0].startswith("**error:**") and message in values[0], (image, values[0])
        assert values[1:] == app.EMPTY_RESULT * 2  # no stale result from an earlier image
        assert app.EMPTY_RESULT[3]["value"] is None and app.EMPTY_RESULT[3]["label"] == "Cross-attention"
    # The project's own pixel limit, including the band where PIL only warns (1x-2x)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    assert "too large" in app.handle(captioner, str(tmp_path / "big.png"))[0]
    assert "1,000 pixels" in app.handle(captioner, str(tmp_path / "big.png"))[0]
    with pytest.raises(UserError, match="too large"):
        captioner.analyse(str(tmp_path / "big.png"))


def test_a_bug_is_one_line_in_the_page(captioner, test_images, monkeypatch):
    monkeypatch.setattr(app, "rank_breeds", lambda *a: 1 / 0)
    values = app.handle(captioner, test_images[0][0])
    assert values[0] == "**error:** something went wrong on the server (see its log)." and values[1:] == app.EMPTY_RESULT * 2


def test_options_are_checked():
    with pytest.raises(UserError, match="--port"):
        app.parse_args(["--port", "70000"])
    with pytest.raises(UserError, match="no_such_flag"):
        app.parse_args(["--no_such_flag", "1"])


def test_demo_trains_a_missing_adapter_then_serves_on_loopback(demo_run, demo_adapter, tmp_path, monkeypatch):
    """`app.py --demo` on a fresh clone: train.py --demo runs first (stubbed here), then the app launches."""
    import gradio as gr
    import train

    cwd, _ = demo_run
    monkeypatch.chdir(cwd)
    new_adapter, out = tmp_path / "adapter", tmp_path / "app"
    trained, launched = [], {}
    monkeypatch.setattr(train, "main", lambda argv: trained.append(argv) or shutil.copytree(demo_adapter, argv[-1]))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # not for the rest of the session
    app.main(["--demo", "--adapter", str(new_adapter), "--output_dir", str(out), "--port", "0"])
    assert trained == [["--demo", "--output_dir", str(new_adapter)]]
    assert threads == [1]  # the tiny model on one CPU thread
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False and launched["server_port"] > 0
    theme = launched["theme"]  # system fonts: no web font to fetch, not even from the app
    assert theme.font.startswith("ui-sans-serif") and "Source Sans" not in theme._get_theme_css()
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert not os.path.exists(os.path.join(ROOT, "app.pyi"))  # Gradio stubs every Component subclass's source file
    examples = sorted(os.listdir(out / "examples"))
    assert len(examples) == 4 and len({e.rsplit("_", 1)[0] for e in examples}) == 4  # one per breed
    assert json.load(open(out / "run_config.json"))["AppConfig"]["adapter"] == str(new_adapter)
    trained.clear()
    app.main(["--demo", "--adapter", str(new_adapter), "--output_dir", str(out)])
    assert trained == []  # an adapter that exists is served as it is


# ---------------------------------------------------------------------------
# In a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_or_skip():
    """Playwright's sync API, or a skip with the reason; under CI (CI=true) a missing browser fails instead."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright Python package is not installed (pip install -r requirements-dev.txt)"
    if missing is None and not os.path.exists(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture
def server(demo_run, tmp_path):
    """`python app.py --demo` on a free loopback port, from the demo run's folder; yields its URL."""
    cwd, _ = demo_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--demo", "--port", str(port),
                             "--output_dir", str(tmp_path / "app")], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, open(tmp_path / "app.log").read()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline, "the app did not start in 180 s"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_page_in_chromium(server, test_images, tmp_path):
    sync_playwright = _browser_or_skip()
    path, label = test_images[0]
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 900})
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server)

            page.locator("#input-image input[type=file]").set_input_files(path)
            page.locator("#input-image img").wait_for()  # the upload finished: its preview is shown
            page.click("#submit")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Answered')", timeout=60_000)
            captions = {key: page.locator(f"#{key}-caption textarea").input_value() for key in app.MODELS}
            assert all(captions.values()), captions
            assert BREED_NAMES[label].lower() in captions["fine_tuned"]
            assert page.locator("#fine_tuned-breed textarea").input_value() == BREED_NAMES[label]
            for key in app.MODELS:
                bars = page.locator(f"#{key}-top [data-testid$='-confidence-set']")
                assert bars.count() == 5
                assert all(t.strip().endswith("%") for t in page.locator(f"#{key}-top .confidence").all_inner_texts())
                heatmap = page.locator(f"#{key}-map img")
                heatmap.wait_for()
                assert heatmap.evaluate("img => img.complete && img.naturalWidth") == app.DISPLAY_SIDE
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            assert Image.open(tmp_path / "app.png").size[0] == 1200

            page.locator("#input-image input[type=file]").set_input_files(str(notes))
            page.click("#submit")
            page.wait_for_function("document.querySelector('#status').innerText.includes('not an image')", timeout=60_000)
            assert page.locator("#fine_tuned-caption textarea").input_value() == ""  # the old result is gone
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "app-error.png"), full_page=True)
        finally:
            browser.close()
    hosts = {u.split("/")[2] for u in requests if u.startswith(("http:", "https:", "ws:", "wss:"))}
    assert hosts == {server.split("/")[2]}, f"the page fetched from {hosts}"  # nothing but the app itself
