"""app.py: the handler called directly, and the page in a real (headless) Chromium."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from data import Record, load_image, load_splits
from helpers import ROOT, caption_images, png_with_size
from labels import BREED_NAMES, OXFORD_PETS, UNKNOWN
from run_io import UserError

pytest.importorskip("gradio")
import app  # noqa: E402


@pytest.fixture(scope="module")
def captioner(demo_run):
    """The app's models on the demo adapter, loaded as `python app.py --demo` does, from the demo run's folder."""
    cwd, _ = demo_run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        cfg, args, adapter_run = app.parse_args(["--demo"])
        yield app.PetCaptioner(cfg, args, adapter_run)


@pytest.fixture(scope="module")
def test_images(demo_run):
    """[(path, true label)] of the demo test split, one image of each of 3 breeds."""
    cwd, _ = demo_run
    records = load_splits(os.path.join(cwd, "outputs/demo/pets"))["test"]
    picked = {}
    for r in records:
        picked.setdefault(r.label, r)
    return [(r.source, r.label) for r in list(picked.values())[:3]]


@pytest.mark.slow
def test_result_matches_an_independent_computation(captioner, test_images):
    from inference import image_embeddings, label_candidates, rank_labels

    right = 0
    for path, label in test_images:
        result = captioner.analyse(path)
        assert set(result) == {"zero_shot", "fine_tuned"}
        image = load_image(Record("x", -1, path))
        processor = captioner.processor
        for key, model in captioner.models.items():
            r = result[key]
            # Captions: the batched-from-pixels path, each model embedding the image itself
            assert (
                r["caption"]
                == caption_images(model, processor, [image], max_new_tokens=captioner.cfg.max_new_tokens)[0]
            )
            # Top 5: a softmax over all 37 rank_labels scores, recomputed here without sharing embeddings
            pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
            scores, _ = rank_labels(
                model,
                image_embeddings(model, pixels),
                label_candidates(model, processor.tokenizer, OXFORD_PETS, captioner.cfg.caption_template),
            )
            probs = np.exp(scores[0].numpy() - scores[0].numpy().max())
            probs /= probs.sum()
            top = np.argsort(-probs, kind="stable")[:5]
            assert [name for name, _ in r["top"]] == [BREED_NAMES[i] for i in top]
            # float32 from two paths (the app shares one image embedding between the models): their last bits
            # can differ from run to run (CPU kernels can depend on memory alignment); 5.6e-5 seen once
            np.testing.assert_allclose([p for _, p in r["top"]], probs[top], rtol=5e-4)
            assert len(probs) == 37 and sum(p for _, p in r["top"]) < 1
            # the per-token ranking is named only where its first breed is not the summed ranking's
            tokens = (
                label_candidates(model, processor.tokenizer, OXFORD_PETS, captioner.cfg.caption_template)[1][:, 1:].sum(
                    -1
                )
            ).numpy()
            per_token = int(np.argmax(scores[0].numpy() / tokens))
            assert r["per_token_first"] == (None if per_token == top[0] else BREED_NAMES[per_token])
            # The map: the input enlarged to the display size with a colour overlay on it
            assert r["heatmap"].shape == (app.DISPLAY_SIDE, app.DISPLAY_SIDE, 3) and r["heatmap"].dtype == np.uint8
        # The fine-tuned caption names a breed, the page says that breed, and its map is that breed word's
        tuned = result["fine_tuned"]
        named = OXFORD_PETS.from_caption(tuned["caption"])
        assert named != UNKNOWN and tuned["breed"] == BREED_NAMES[named]
        assert tuned["map_word"] == f"breed: {BREED_NAMES[named].lower()}"
        right += named == label
        plain = np.asarray(image.resize((app.DISPLAY_SIDE, app.DISPLAY_SIDE), Image.Resampling.BICUBIC)).astype(int)
        assert np.abs(tuned["heatmap"].astype(int) - plain).mean() > 20  # coloured, not the bare image
    # the demo adapter is right on about 95% of the test images (the evaluate test checks >= 0.9 on all 80)
    assert right >= 2, right


@pytest.mark.slow
def test_one_image_is_embedded_once_for_both_models(captioner, test_images, monkeypatch):
    assert captioner.shared  # LoRA on the text decoder: identical vision encoders
    calls = []
    real = inference.image_embeddings  # what embeddings_per_model, the app's one way to embed, calls
    monkeypatch.setattr(inference, "image_embeddings", lambda model, pixels: calls.append(1) or real(model, pixels))
    captioner.analyse(test_images[0][0])
    assert len(calls) == 1
    captioner.shared = False  # different encoders: each model embeds the image itself
    try:
        captioner.analyse(test_images[0][0])
    finally:
        captioner.shared = True
    assert len(calls) == 3


@pytest.mark.slow
def test_handler_fills_every_output(captioner, test_images):
    path, label = test_images[0]
    values = app.handle(captioner, path)
    assert len(values) == 1 + 4 * 2
    assert values[0].startswith("Answered in") and "embedded once" in values[0]
    for k in range(len(app.MODELS)):
        caption, breed, top, heatmap = values[1 + 4 * k : 5 + 4 * k]
        assert caption and isinstance(breed, str)
        bars = top["value"]
        assert isinstance(bars, dict) and len(bars) == 5 and all(0 < p < 1 for p in bars.values())
        assert top["label"].startswith(app.RANKING_LABEL) and "summed" in top["label"]
        assert (
            heatmap["value"].shape == (app.DISPLAY_SIDE, app.DISPLAY_SIDE, 3) and "Cross-attention" in heatmap["label"]
        )
    assert values[6] == BREED_NAMES[label]  # fine-tuned "breed named"
    assert values[8]["label"] == f"Cross-attention of “{BREED_NAMES[label].lower()}”"


@pytest.mark.slow
def test_bad_input_is_a_message_not_an_exception(captioner, tmp_path, monkeypatch):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_size(40000, 40000))  # 1.6 G pixels, over PIL's default limit
    cases = {
        None: "No image",
        "": "No image",
        str(notes): "not an image",
        str(tmp_path / "missing.jpg"): "not an image",
        str(bomb): "too large",
    }
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


def _request_image(payload):
    """What the app's image input hands its callback for a request's file object (as Gradio validated it)."""
    from gradio.data_classes import ImageData

    return app.image_input().preprocess(ImageData(**payload))


def test_requests_reach_the_callback_unopened(tmp_path, monkeypatch):
    """A data: URL is bytes judged by load_image (pixel limit read from the header, nothing decoded); a path
    outside Gradio's upload folder (a file object sent without its "meta") is refused, not opened."""
    import base64

    from PIL import ImageFile

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    bomb = Image.new("1", (13000, 13000))  # 169 M pixels: 21 KB as a PNG, 2.4 GB in Gradio's decoder
    buffer = io.BytesIO()
    bomb.save(buffer, "PNG")
    del bomb
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    start = time.perf_counter()
    image = _request_image({"path": "x.png", "url": url})
    assert isinstance(image, io.BytesIO) and decoded == []
    with pytest.raises(UserError, match="too large"):
        app.read_image(image)
    assert decoded == [] and time.perf_counter() - start < 2  # refused from the header
    small = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(small, "PNG")
    image = _request_image(
        {"path": "x.png", "url": "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()}
    )
    assert app.read_image(image).getpixel((3, 3)) == (200, 10, 10)  # a small data: URL still works
    for url, message in [
        ("data:image/png,rawbytes", "not an image"),
        ("data:image/png;base64,@@@", "not an image"),
        ("data:image/png;base64," + "A" * (app.MAX_UPLOAD_BYTES * 4 // 3 + 8), "larger than"),
    ]:
        with pytest.raises(UserError, match=message):
            app.read_image(_request_image({"path": "x.png", "url": url}))
    # Paths: only files in Gradio's upload folder, symbolic links resolved
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    uploaded = tmp_path / "uploads" / "abc" / "photo.png"
    uploaded.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(uploaded)
    (uploaded.parent / "link.png").symlink_to(secret)
    assert _request_image({"path": str(uploaded)}) == str(uploaded)
    for path in [str(secret), str(uploaded.parent / "link.png"), str(uploaded.parent / ".." / ".." / "secret.png"), ""]:
        with pytest.raises(UserError, match="not uploaded here"):
            app.read_image(_request_image({"path": path}))
    assert set(decoded) == {(30, 20)}  # only the small image was ever decoded


def test_urls_are_refused_before_gradio_fetches_them(tmp_path, monkeypatch):
    import asyncio

    looked_up = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or 1 / 0)
    image = app.image_input()
    for url in ["http://example.com/cat.png", "https://127.0.0.1.nip.io/a.jpg", "ftp://example.com/a.png"]:
        assert asyncio.run(image.async_move_resource_to_block_cache(url)) == app.REFUSED_URL
        assert image.move_resource_to_block_cache(url) == app.REFUSED_URL
        for payload in [{"path": app.REFUSED_URL}, {"path": url}, {"path": "x.png", "url": url}]:
            with pytest.raises(UserError, match="not as links"):
                app.read_image(_request_image(payload))
    assert looked_up == [] and image.temp_files == set()


@pytest.mark.slow
def test_a_bug_is_one_line_in_the_page(captioner, test_images, monkeypatch):
    monkeypatch.setattr(app, "rank_labels", lambda *a: 1 / 0)
    values = app.handle(captioner, test_images[0][0])
    assert (
        values[0] == "**error:** something went wrong on the server (see its log)."
        and values[1:] == app.EMPTY_RESULT * 2
    )


def test_options_are_checked():
    with pytest.raises(UserError, match="--port"):
        app.parse_args(["--port", "70000"])
    with pytest.raises(UserError, match="no_such_flag"):
        app.parse_args(["--no_such_flag", "1"])


@pytest.mark.slow
def test_demo_trains_a_missing_adapter_then_serves_on_loopback(demo_run, demo_adapter, tmp_path, monkeypatch):
    """`app.py --demo` on a fresh clone: train.py --demo runs first (a stand-in here), then the app launches."""
    import gradio as gr

    cwd, _ = demo_run
    monkeypatch.chdir(cwd)
    new_adapter, out = tmp_path / "adapter", tmp_path / "app"
    trained, launched = [], {}

    def train_script(command):  # `python train.py --demo --output_dir X` in a process of its own
        trained.append(command[2:])
        assert command[:2] == [sys.executable, os.path.join(ROOT, "train.py")]
        shutil.copytree(demo_adapter, command[-1])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(app.subprocess, "run", train_script)
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
    assert json.load(open(out / "run_config.json"))["app"]["adapter"] == str(new_adapter)
    trained.clear()
    app.main(["--demo", "--adapter", str(new_adapter), "--output_dir", str(out)])
    assert trained == []  # an adapter that exists is served as it is
    monkeypatch.setattr(app.subprocess, "run", lambda command: subprocess.CompletedProcess(command, 1))
    with pytest.raises(UserError, match="training the demo adapter failed"):
        app.main(["--demo", "--adapter", str(tmp_path / "other"), "--output_dir", str(out)])


# ---------------------------------------------------------------------------
# In a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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


OUTSIDE_GUARD = """
import errno, os, socket
LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "", None}


def record(what, host):
    with open(os.environ["APP_OUTSIDE_LOG"], "a") as f:
        f.write(f"{what} {host}\\n")


real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def getaddrinfo(host, *args, **kwargs):
    if host not in LOCAL:
        record("getaddrinfo", host)
        raise socket.gaierror(socket.EAI_NONAME, "this test lets the app look up no outside name")
    return real_getaddrinfo(host, *args, **kwargs)


def outside(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
        record("connect", address[0])
        return True
    return False


def connect(self, address):
    if outside(self, address):
        raise OSError(errno.ENETUNREACH, "this test lets the app connect nowhere outside")
    return real_connect(self, address)


def connect_ex(self, address):
    return errno.ENETUNREACH if outside(self, address) else real_connect_ex(self, address)


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
"""


@pytest.fixture
def served(demo_run, tmp_path):
    """`python app.py --demo` on a free loopback port, from the demo run's folder, with every outside name
    lookup and connection of the server refused and recorded (a sitecustomize module); yields
    (URL, server pid, the file that records outside lookups and connections)."""
    cwd, _ = demo_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guard, outside = tmp_path / "guard", tmp_path / "outside.log"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(OUTSIDE_GUARD)
    log = open(tmp_path / "app.log", "w")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "APP_OUTSIDE_LOG": str(outside),
        "PYTHONPATH": os.pathsep.join([str(guard)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "app.py"),
            "--demo",
            "--port",
            str(port),
            "--output_dir",
            str(tmp_path / "app"),
        ],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
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
        yield url, proc.pid, outside
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert not outside.exists(), f"the server reached outside: {outside.read_text()}"


@pytest.fixture
def server(served):
    return served[0]


def _caption_request(url: str, file_object) -> str:
    """The status line the running app answers to one request of its API with this file object."""
    api = url + "gradio_api/call/caption"
    request = urllib.request.Request(
        api, data=json.dumps({"data": [file_object]}).encode(), headers={"Content-Type": "application/json"}
    )
    event = json.load(urllib.request.urlopen(request, timeout=30))["event_id"]
    stream = urllib.request.urlopen(f"{api}/{event}", timeout=120).read().decode()
    kind, data = stream.rstrip().split("\n")[-2:]
    assert kind == "event: complete", stream[-500:]
    return json.loads(data.removeprefix("data: "))[0]


def _upload(url: str, name: str, content: bytes) -> str:
    boundary = "----petcaption-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    [path] = json.load(urllib.request.urlopen(request, timeout=30))
    return path


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's peak memory from Linux's /proc")
def test_hostile_requests_to_the_running_app(served, test_images, tmp_path):
    """Through the launched app's HTTP API: a small request carrying a huge-dimension PNG is refused from its
    header, in bounded memory; a URL is refused without a name lookup; a file object naming a server file
    without being uploaded is refused; an upload still works."""
    import base64

    url, pid, outside = served
    meta = {"_type": "gradio.FileData"}
    bomb = io.BytesIO()
    Image.new("1", (13000, 13000)).save(bomb, "PNG")  # 169 M pixels in 21 KB
    bomb = bomb.getvalue()
    data_url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    before = _peak_rss_mb(pid)
    start = time.perf_counter()
    for file_object in [
        {"path": "x.png", "url": data_url},  # a data: URL (what Gradio decoded in full)
        {"path": _upload(url, "bomb.png", bomb), "meta": meta},
    ]:  # an upload
        assert "too large" in _caption_request(url, file_object)
    seconds, grown = time.perf_counter() - start, _peak_rss_mb(pid) - before
    assert seconds < 10 and grown < 300, (seconds, grown)  # Gradio's decoder took 2.4 GB and 9-18 s
    for file_object in [
        {"path": "http://example.com/cat.png", "meta": meta},
        {"path": "x.png", "url": "https://example.com/cat.png"},
    ]:
        assert "not as links" in _caption_request(url, file_object)
    server_image = str(test_images[0][0])  # a file on the server, never uploaded
    assert "not uploaded here" in _caption_request(url, {"path": server_image})
    with open(server_image, "rb") as f:
        uploaded = _upload(url, "pet.png", f.read())
    assert _caption_request(url, {"path": uploaded, "meta": meta}).startswith("Answered in")
    assert not outside.exists(), outside.read_text()


@pytest.mark.slow
def test_page_in_chromium(server, test_images, tmp_path):
    sync_playwright = _browser_or_skip()
    path, label = test_images[0]
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 900},
        )
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
            page.wait_for_function(
                "document.querySelector('#status').innerText.includes('not an image')", timeout=60_000
            )
            assert page.locator("#fine_tuned-caption textarea").input_value() == ""  # the old result is gone
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "app-error.png"), full_page=True)
        finally:
            browser.close()
    hosts = {u.split("/")[2] for u in requests if u.startswith(("http:", "https:", "ws:", "wss:"))}
    assert hosts == {server.split("/")[2]}, f"the page fetched from {hosts}"  # nothing but the app itself


def test_example_images_are_named_by_a_safe_form_of_their_ids(tmp_path):
    """Ids are data: '../../victim/x' must not write outside the app's folder, and 'cats/1' must not crash it."""
    from helpers import pngs, saved_dataset

    ids = ["../../victim/pwn7", "cats/1", "/abs/dogs/1", "plain"]
    paths = pngs(str(tmp_path / "png"), [f"{k}.png" for k in range(4)])
    breeds = ["abyssinian", "beagle", "pug", "boxer"]
    data = saved_dataset(
        str(tmp_path / "hf"), {s: {"image": paths, "image_id": ids, "label": breeds} for s in ("train", "test")}
    )
    cfg, args = app.PetConfig(dataset=data), app.AppConfig(output_dir=str(tmp_path / "app" / "out"), num_examples=4)
    examples = app.write_examples(cfg, args)
    folder = app.example_folder(args)
    assert len(examples) == 4 and sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p, _ in examples)
    for path, _ in examples:
        assert os.path.dirname(path) == folder and os.path.isfile(path) and ".." not in os.path.basename(path)
    assert sorted(os.listdir(tmp_path)) == ["app", "hf", "png"]  # nothing written beside the app's folder


def test_the_page_names_models_without_server_paths():
    assert app.shown_name("/home/someone/outputs/demo/tiny-blip") == "tiny-blip"
    assert app.shown_name("outputs/demo/tiny-blip/") == "tiny-blip"
    assert app.shown_name("Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"
    captioner = type("Captioner", (), {"base_name": "/home/someone/models/base", "labels": OXFORD_PETS})()
    page = app.build_ui(captioner, [])
    markdown = " ".join(str(getattr(b, "value", "")) for b in page.blocks.values())
    assert "`base`" in markdown and "/home/someone" not in markdown


def test_an_error_keeps_the_ranking_title_of_the_adapters_own_classes():
    from types import SimpleNamespace

    from labels import from_class_names

    birds = from_class_names(["Blue Jay", "Snowy Owl", "Barn Owl"])

    def refuse(image):
        raise UserError("not an image")

    values = app.handle(SimpleNamespace(analyse=refuse, labels=birds), None)
    titles = [v["label"] for v in values[1:] if isinstance(v, dict) and v["label"] != app.MAP_LABEL]
    assert titles == ["Top 5 of 3 classes (softmax of summed caption log-likelihoods)"] * 2
