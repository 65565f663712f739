"""embedding_cache.py: cached embeddings give the stock loss; the cache is keyed by content, shared, locked, and
rebuilt when corrupt or of another embedding shape."""

import copy
import json
import logging
import os
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from data import CaptionCollator, CaptionDataset, Record, load_image, load_splits
from devices import DEVICE_DEFAULTS
from embedding_cache import CachedEmbeddingDataset, EmbeddingCache, vision_fingerprint
from inference import image_embeddings
from labels import OXFORD_PETS, PETS_TEMPLATE
from model import create_lora_model, has_vision_lora, load_base_model, load_processor

TEMPLATE = PETS_TEMPLATE


@pytest.fixture(scope="module")
def setup(tiny_assets):
    model_dir, data_dir = tiny_assets
    model = load_base_model(model_dir).eval()
    processor = load_processor(model_dir)
    records = load_splits(data_dir)["validation"][:12]
    return model, processor, records


def _build(cache_dir, model, processor, records, dtype):
    cache = EmbeddingCache(str(cache_dir), vision_fingerprint(model, processor), dtype)
    n = cache.build(records, lambda px: image_embeddings(model, px), processor.image_processor, batch_size=5)
    return cache, n


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_loss_equals_stock_loss(setup, tmp_path, dtype, tol):
    model, processor, records = setup
    lora = create_lora_model(
        copy.deepcopy(model), 4, 8, 0.0, "query,value"
    )  # PEFT wraps in place: spare the shared model
    cache, n = _build(tmp_path, model, processor, records, dtype)
    assert n == len(records)
    collate = CaptionCollator(processor.tokenizer, processor.tokenizer.bos_token_id)
    stock = collate(
        [CaptionDataset(records, processor.image_processor, OXFORD_PETS, TEMPLATE)[i] for i in range(len(records))]
    )
    cached = collate([CachedEmbeddingDataset(records, cache, OXFORD_PETS, TEMPLATE)[i] for i in range(len(records))])
    assert "pixel_values" not in cached and cached["image_embeds"].shape[0] == len(records)
    assert torch.equal(stock["input_ids"], cached["input_ids"])
    with torch.no_grad():
        a = lora(**stock).loss
        b = lora(**cached).loss
    assert abs(a.item() - b.item()) <= tol * abs(a.item())
    # gradients of the LoRA weights agree too
    grads = []
    for batch in (stock, cached):
        lora.zero_grad()
        lora(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], rtol=50 * tol, atol=50 * tol * grads[0].abs().max().item())
    lora.unload()


def test_cache_is_reused_and_invalidated_by_image_changes(setup, tmp_path):
    model, processor, records = setup
    _, n = _build(tmp_path, model, processor, records[:6], "float16")
    cache, n2 = _build(tmp_path, model, processor, records, "float16")
    assert (n, n2) == (6, len(records) - 6)  # only the new images are encoded
    assert len([n for n in os.listdir(cache.dir) if n.startswith("chunk-")]) == 2
    path = records[0].source
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content: still cached
    _, n3 = _build(tmp_path, model, processor, records, "float16")
    assert n3 == 0
    with open(path, "ab") as f:  # the content changed: its key changes
        f.write(b"\0")
    _, n4 = _build(tmp_path, model, processor, records, "float16")
    assert n4 == 1


def test_unreadable_images_are_never_cached(setup, tmp_path):
    model, processor, records = setup
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    bad = Record("broken", 0, str(broken))
    cache, n = _build(tmp_path / "c", model, processor, records[:3] + [bad], "float16")
    assert n == 3 and list(cache.bad) == ["broken"]
    dataset = CachedEmbeddingDataset(records[:3] + [bad], cache, OXFORD_PETS, TEMPLATE)
    assert len(dataset) == 3 and list(dataset.bad_images) == ["broken"]


def test_vision_lora_disables_the_cache_and_fingerprint_tracks_weights(setup):
    model, processor, _ = setup
    before = vision_fingerprint(model, processor)
    fresh = load_base_model(model.name_or_path)
    assert vision_fingerprint(fresh, processor) == before
    with torch.no_grad():
        fresh.vision_model.post_layernorm.weight.add_(0.01)
    assert vision_fingerprint(fresh, processor) != before
    assert not has_vision_lora(create_lora_model(load_base_model(model.name_or_path), 4, 8, 0.0, "query,value"))
    assert has_vision_lora(create_lora_model(load_base_model(model.name_or_path), 4, 8, 0.0, "qkv"))


@pytest.mark.parametrize("rows_per_copy", [256, 2])
def test_preload_gives_each_item_its_stored_embedding(setup, tmp_path, monkeypatch, rows_per_copy):

    model, processor, records = setup
    monkeypatch.setitem(DEVICE_DEFAULTS["cpu"], "preload_rows", rows_per_copy)
    _build(tmp_path, model, processor, records[3:9], "float16")
    missing = Record("missing", 0, str(tmp_path / "nope.jpg"))
    cache, _ = _build(tmp_path, model, processor, records + [missing], "float16")  # a second chunk, one bad image
    # items in another order than their rows, across both chunks, with runs of consecutive rows
    order = records[9:] + records[:2] + [missing] + records[3:7] + [records[8], records[7], records[2]]
    dataset = CachedEmbeddingDataset(order, cache, OXFORD_PETS, TEMPLATE)
    assert len(dataset) == len(records) and list(dataset.bad_images) == ["missing"]
    stored = [dataset[i]["image_embeds"] for i in range(len(dataset))]
    dataset.preload(torch.device("cpu"))
    assert dataset.preloaded.shape == (len(records),) + stored[0].shape
    for i in range(len(dataset)):
        assert torch.equal(dataset[i]["image_embeds"], stored[i]), i
    # and the stored rows are the encoder's outputs for those images (fp16 rounding)
    with torch.no_grad():
        pixels = processor.image_processor([load_image(dataset.items[-1][0])], return_tensors="pt")
        expected = image_embeddings(model, pixels["pixel_values"])[0]
    assert torch.allclose(dataset[-1]["image_embeds"].float(), expected, atol=2e-3, rtol=2e-3)


def test_a_failed_chunk_write_raises_and_leaves_nothing_behind(setup, tmp_path, monkeypatch):
    import errno

    model, processor, records = setup
    real_fdopen = os.fdopen

    class FullDisk:  # the chunk file: its third write (the second batch's rows) finds the disk full
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(
        os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)) if "b" in mode else real_fdopen(fd, mode)
    )
    with pytest.raises(OSError, match="No space left"):
        _build(tmp_path, model, processor, records, "float16")
    monkeypatch.undo()
    cache_dir = EmbeddingCache(str(tmp_path), vision_fingerprint(model, processor), "float16").dir
    assert [n for n in os.listdir(cache_dir) if n != ".lock"] == []  # no chunk, no temporary file, no index
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")  # hashed, then unreadable: the build has nothing to write
    cache, n = _build(tmp_path, model, processor, [Record("broken", 0, str(tmp_path / "broken.jpg"))], "float16")
    assert n == 0 and "broken" in cache.bad and [n for n in os.listdir(cache_dir) if n != ".lock"] == []
    _, n = _build(tmp_path, model, processor, records, "float16")
    assert n == len(records)


def test_encoders_that_differ_in_one_middle_layer_share_no_embeddings(setup, tmp_path):
    """The key covers every tensor of the encoder, not a sample of them."""
    model, processor, records = setup
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.vision_model.encoder.layers[0].mlp.fc1.weight[3, 5] += 0.5  # one weight of a layer not at either end
    assert vision_fingerprint(other, processor) != vision_fingerprint(model, processor)
    cache_a, n_a = _build(tmp_path, model, processor, records, "float32")
    cache_b, n_b = _build(tmp_path, other, processor, records, "float32")
    assert n_a == n_b == len(records) and cache_a.dir != cache_b.dir  # the second encoder encoded every image itself
    key = cache_b.keys(records[:1])[0]
    with torch.no_grad():
        pixels = processor.image_processor([load_image(records[0])], return_tensors="pt")["pixel_values"]
        expected_b, expected_a = image_embeddings(other, pixels)[0], image_embeddings(model, pixels)[0]
    assert (expected_a - expected_b).abs().max() > 1e-3  # the change reaches the embeddings
    assert torch.allclose(cache_b.get(key), expected_b, atol=1e-5)
    assert torch.allclose(cache_a.get(key), expected_a, atol=1e-5)
    # any dtype is hashed (bfloat16 has no numpy type), and a cast is another key
    assert vision_fingerprint(copy.deepcopy(model).to(torch.bfloat16), processor) != vision_fingerprint(
        model, processor
    )


KILLED_BUILDER = r"""
import os, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import torch
import data
from run_io import locked_output_dir
from data import Record
from embedding_cache import EmbeddingCache

out, cache_dir, ready = sys.argv[2:5]
data.image_workers = lambda n: 2  # image workers even on a one-core machine


def preprocess(image, return_tensors):
    return {"pixel_values": torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]}


def encode(pixels):
    open(ready, "w").close()  # the workers are running: kill me now
    time.sleep(120)


records = [Record(f"img{i}", 0, os.path.join(sys.argv[5], f"{i}.png")) for i in range(96)]
with locked_output_dir(out):  # as train.py holds its output folder during the build
    EmbeddingCache(cache_dir, "k").build(records, encode, preprocess, batch_size=4)
"""


def _children(pid: int) -> set:
    kids = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids |= {int(k) for k in f.read().split()}
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, waiting to be reaped
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads worker processes from Linux's /proc")
def test_a_killed_build_holds_no_lock_and_leaves_no_temporary_chunk(tmp_path):
    """kill -9 of a run during the cache build: its image workers die with it, and a rerun at once is not refused."""
    import fcntl
    import signal
    import subprocess
    import sys

    from PIL import Image

    from helpers import ROOT
    from run_io import UserError, locked_output_dir

    images = tmp_path / "images"
    images.mkdir()
    for i in range(96):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images / f"{i}.png")
    script, out, cache_dir, ready = tmp_path / "build.py", tmp_path / "out", tmp_path / "cache", tmp_path / "ready"
    script.write_text(KILLED_BUILDER)
    proc = subprocess.Popen([sys.executable, str(script), ROOT, str(out), str(cache_dir), str(ready), str(images)])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "the build did not start"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [folder] = [os.path.join(cache_dir, d) for d in os.listdir(cache_dir)]
    assert [n for n in os.listdir(folder) if n.endswith(".tmp")]  # what the killed build was writing
    try:
        with locked_output_dir(str(out)):  # refused while a worker of the killed run held the folder's lock
            with open(os.path.join(folder, ".lock")) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nor does anything hold the cache's lock
    except (UserError, BlockingIOError) as e:
        pytest.fail(f"a rerun right after the kill was refused: {e}")
    deadline = time.time() + 2
    while any(_alive(w) for w in workers):
        assert time.time() < deadline, "the killed run's image workers outlived it"
        time.sleep(0.05)
    # The rerun removes the killed build's temporary chunk and caches every image
    preprocess = lambda image, return_tensors: {  # noqa: E731  (the script's, without running it)
        "pixel_values": torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    }
    records = [Record(f"img{i}", 0, str(images / f"{i}.png")) for i in range(96)]
    cache = EmbeddingCache(str(cache_dir), "k")
    assert cache.build(records, lambda px: px.flatten(2), preprocess, batch_size=4) == 96
    assert [n for n in os.listdir(folder) if n.endswith(".tmp")] == []
    assert torch.equal(cache.get(cache.keys(records[5:6])[0]).float(), torch.tensor([5.0, 0, 0])[:, None].expand(3, 64))


def test_leftovers_of_killed_builds_are_removed_under_the_lock(setup, tmp_path):
    """Temporary chunks and indexes, and a chunk renamed into place but never indexed, go; indexed chunks stay."""
    model, processor, records = setup
    cache, _ = _build(tmp_path, model, processor, records[:4], "float16")
    [kept] = [n for n in os.listdir(cache.dir) if n.startswith("chunk-")]
    leftovers = [".chunk-abc123.npy.tmp", ".index-def456.json.tmp", "chunk-" + "0" * 32 + ".npy"]
    for name in leftovers:
        (tmp_path / cache.dir / name).write_bytes(b"\0" * 1000)
    (tmp_path / cache.dir / "notes.txt").write_text("not the cache's")
    cache, n = _build(tmp_path, model, processor, records[:6], "float16")
    assert n == 2
    names = set(os.listdir(cache.dir))
    assert not names & set(leftovers) and {kept, "notes.txt", "index.json"} <= names
    assert (
        len(CachedEmbeddingDataset(records[:6], cache, OXFORD_PETS, TEMPLATE)) == 6
    )  # the indexed rows are all still there


def test_a_busy_lock_names_the_process_that_holds_it(tmp_path, caplog):
    import logging
    import threading

    from run_io import UserError, exclusive_lock, locked_output_dir

    out = str(tmp_path / "out")
    with locked_output_dir(out):
        with pytest.raises(UserError, match=f"another run is writing to .* \\(pid {os.getpid()}\\)"):
            with locked_output_dir(out):
                pass
    cache = EmbeddingCache(str(tmp_path / "cache"), "k")
    os.makedirs(cache.dir)
    held, release = threading.Event(), threading.Event()

    def holder():  # another builder, busy until told to stop
        with exclusive_lock(os.path.join(cache.dir, ".lock"), busy=None):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    threading.Timer(1.0, release.set).start()
    with caplog.at_level(logging.INFO, logger="embedding_cache"):
        assert cache.build([], None, None) == 0  # waits for the other builder, then finds nothing to do
    thread.join()
    assert f"waiting for another run (pid {os.getpid()})" in caplog.text


# ---------------------------------------------------------------------------
# Shared by several builders, keyed by content, rebuilt when corrupt


@pytest.fixture(scope="module")
def encoder(setup):
    model, processor, _ = setup
    return model, processor


def _cache(folder, encoder):
    model, processor = encoder
    return EmbeddingCache(str(folder), vision_fingerprint(model, processor), "float32")


def _fill(cache, encoder, records):
    model, processor = encoder
    return cache.build(records, lambda px: image_embeddings(model, px), processor.image_processor, batch_size=3)


def _assert_cached_correctly(cache, encoder, records):
    model, processor = encoder
    for r in records:
        [key] = cache.keys([r])
        pixels = processor.image_processor(load_image(r), return_tensors="pt")["pixel_values"]
        assert torch.allclose(cache.get(key), image_embeddings(model, pixels)[0], atol=1e-5), r.image_id


def test_two_builders_sharing_the_cache_do_not_mix_rows(tiny_assets, encoder, tmp_path):
    records = load_splits(tiny_assets[1])["validation"][:10]
    a, b = _cache(tmp_path, encoder), _cache(tmp_path, encoder)  # both opened before either built
    assert _fill(a, encoder, records[:5]) == 5
    assert _fill(b, encoder, records[5:]) == 5  # b's index is stale: it must not reuse a's chunk name or drop a's rows
    fresh = _cache(tmp_path, encoder)
    assert len(fresh.index) == 10
    _assert_cached_correctly(fresh, encoder, records)
    assert _fill(fresh, encoder, records) == 0


def test_cache_is_keyed_by_content_not_size_and_mtime(pets, encoder, tmp_path):
    records = load_splits(pets, 0.0)["train"][:2]
    path = records[0].source
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path, format="BMP")  # BMP: the byte size depends only on the shape
    cache = _cache(tmp_path / "c", encoder)
    assert _fill(cache, encoder, records) == 2
    stat = os.stat(path)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(path, format="BMP")  # another picture, same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same mtime
    assert os.path.getsize(path) == stat.st_size
    cache = _cache(tmp_path / "c", encoder)
    assert _fill(cache, encoder, records) == 1
    _assert_cached_correctly(cache, encoder, records)


@pytest.mark.parametrize("damage", ["index", "chunk"])
def test_corrupt_cache_is_rebuilt_with_a_warning(pets, encoder, tmp_path, damage, caplog):
    records = load_splits(pets, 0.0)["train"][:4]
    cache = _cache(tmp_path, encoder)
    _fill(cache, encoder, records)
    if damage == "index":
        open(cache.index_path, "w").write('{"broken": ')
    else:
        [chunk] = [n for n in os.listdir(cache.dir) if n.startswith("chunk-")]
        path = os.path.join(cache.dir, chunk)
        os.truncate(path, os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING):
        cache = _cache(tmp_path, encoder)
        assert _fill(cache, encoder, records) == 4
    assert "corrupt" in caplog.text
    _assert_cached_correctly(_cache(tmp_path, encoder), encoder, records)


def _edit_index(cache, **entries):
    """index.json with `entries` (image key -> entry) replaced, as a damaged or foreign cache might hold them."""
    with open(cache.index_path) as f:
        index = json.load(f)
    index.update(entries)
    with open(cache.index_path, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize(
    "entry",
    [
        lambda chunk: [chunk, 1.5],
        lambda chunk: [chunk, True],  # Python would take it for row 1: another image's
        lambda chunk: [[chunk], 0],
    ],
    ids=["float row", "bool row", "list for a chunk name"],
)
def test_index_rows_that_are_not_integers_are_dropped_and_encoded_again(pets, encoder, tmp_path, entry, caplog):
    records = load_splits(pets, 0.0)["train"][:3]
    cache = _cache(tmp_path, encoder)
    _fill(cache, encoder, records)
    keys = cache.keys(records)
    [chunk] = {cache.index[k][0] for k in keys}
    assert [cache.index[k][1] for k in keys] == [0, 1, 2]
    _edit_index(cache, **{keys[0]: entry(chunk)})
    with caplog.at_level(logging.WARNING):
        cache = _cache(tmp_path, encoder)
        assert sorted(cache.index) == sorted(keys[1:])
        assert _fill(cache, encoder, records) == 1
    assert "malformed entry" in caplog.text
    _assert_cached_correctly(_cache(tmp_path, encoder), encoder, records)


def _foreign_chunk(cache, keys, shape, dtype="float32"):
    """A chunk of `shape` (rows, tokens, hidden) that index.json says holds the images of `keys`."""
    name = f"chunk-{uuid.uuid4().hex}.npy"
    np.save(os.path.join(cache.dir, name), np.random.default_rng(0).standard_normal(shape).astype(dtype))
    _edit_index(cache, **{k: [name, row] for row, k in enumerate(keys)})


@pytest.mark.parametrize("differs", ["hidden size", "token count", "dtype"])
@pytest.mark.parametrize("which", ["one chunk", "every chunk"])
def test_chunks_of_another_embedding_shape_are_dropped_and_encoded_again(pets, encoder, tmp_path, which, differs):
    """'one chunk': it differs from the others; 'every chunk': only the encoder can tell (a build asks it)."""
    model, processor = encoder
    records = load_splits(pets, 0.0)["train"][:6]
    cache = _cache(tmp_path, encoder)
    _fill(cache, encoder, records[:4])
    [[tokens, hidden]] = {tuple(cache.get(k).shape) for k in cache.index}
    assert hidden == model.config.vision_config.hidden_size
    foreign = records[4:] if which == "one chunk" else records
    shape = {"hidden size": (tokens, hidden + 8), "token count": (tokens - 1, hidden), "dtype": (tokens, hidden)}
    _foreign_chunk(
        cache, cache.keys(foreign), (len(foreign),) + shape[differs], "float64" if differs == "dtype" else "float32"
    )
    if which == "one chunk":  # without a build too: what the baselines' linear probe reads (baselines.pooled_features)
        from baselines import pooled_features

        features, positions = pooled_features(
            model, processor.image_processor, records, 4, cache=_cache(tmp_path, encoder)
        )
        expected, _ = pooled_features(model, processor.image_processor, records, 4)
        assert positions == list(range(6)) and np.allclose(features, expected, atol=1e-5)
    cache = _cache(tmp_path, encoder)
    assert _fill(cache, encoder, records) == len(foreign)
    _assert_cached_correctly(_cache(tmp_path, encoder), encoder, records)
    dataset = CachedEmbeddingDataset(records, _cache(tmp_path, encoder), OXFORD_PETS, TEMPLATE)
    assert len(dataset) == 6 and {tuple(dataset[i]["image_embeds"].shape) for i in range(6)} == {(tokens, hidden)}


def test_a_known_embedding_shape_drops_a_foreign_cache_without_a_build(pets, encoder, tmp_path):
    records = load_splits(pets, 0.0)["train"][:2]
    cache = _cache(tmp_path, encoder)
    _fill(cache, encoder, records)
    [[tokens, hidden]] = {tuple(cache.get(k).shape) for k in cache.index}
    _foreign_chunk(cache, cache.keys(records), (2, tokens, hidden + 8))
    model, processor = encoder
    key = vision_fingerprint(model, processor)
    assert len(EmbeddingCache(str(tmp_path), key, "float32").index) == 2  # every chunk agrees: only the shape tells
    assert EmbeddingCache(str(tmp_path), key, "float32", embed_shape=(tokens, hidden)).index == {}


def test_image_deleted_after_listing_is_a_counted_bad_image(pets, encoder, tmp_path):
    records = load_splits(pets, 0.0)["train"][:3]
    os.remove(records[1].source)
    cache = _cache(tmp_path, encoder)
    assert _fill(cache, encoder, records) == 2
    dataset = CachedEmbeddingDataset(records, cache, OXFORD_PETS, PETS_TEMPLATE)
    assert len(dataset) == 2 and list(dataset.bad_images) == [records[1].image_id]
