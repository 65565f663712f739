"""The frozen vision encoder's outputs, computed once per image and memory-mapped from disk.

The cache is keyed by the encoder's weights and the preprocessing, written in chunks under a lock,
and read by training through CachedEmbeddingDataset (optionally preloaded to the GPU).
"""

import hashlib
import json
import logging
import os
import re
import warnings
from collections import defaultdict
from typing import Optional

import numpy as np
import torch

from data import Record, pixel_batches
from devices import device_setting
from run_io import exclusive_lock, write_json_atomic

logger = logging.getLogger(__name__)


def image_key(record: Record) -> Optional[str]:
    """Identifies an image's content: a hash of the file's bytes, or the dataset fingerprint + row; None if unreadable.

    Not the path, size and mtime: a file replaced by another of the same size and mtime must not
    reuse the old embedding.
    """
    src = record.source
    if isinstance(src, tuple):
        dataset, row = src
        return f"{dataset._fingerprint}:{row}"
    h = hashlib.blake2b(digest_size=20)
    try:
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:  # deleted or unreadable since the listing: counted as a bad image
        return None
    return h.hexdigest()


class EmbeddingCache:
    """Vision-encoder outputs on disk, memory-mapped, keyed by model and image content.

    cache_dir/<model_key>/index.json maps image keys to (chunk, row); each build appends one
    chunk file (N, tokens, hidden) holding only the images not cached yet. Unreadable images are
    recorded in `bad` and never cached.

    Several runs may share the folder: a build holds an exclusive lock (run_io.exclusive_lock on
    .lock) while it re-reads the index, removes what killed builds left, encodes what is missing
    and writes a uniquely named chunk and the new index, each complete or absent (temporary file +
    rename). A corrupt index or chunk is dropped with a warning and its images are encoded again,
    and so is a chunk of another dtype or embedding shape than `embed_shape`, the encoder's
    (tokens, hidden): given, or learnt by a build from the encoder, or else the shape of most rows.
    """

    def __init__(self, cache_dir: str, model_key: str, dtype: str = "float16", embed_shape: Optional[tuple] = None):
        if dtype not in ("float16", "float32"):  # the command line offers only these (config.TrainConfig)
            raise ValueError(f"embedding cache dtype must be float16 or float32, not {dtype!r}")
        # the layout's version in the folder name: a cache of another layout is never read
        self.dir = os.path.join(cache_dir, f"{model_key}-{dtype}-v2")
        self.dtype = dtype
        self.embed_shape = tuple(embed_shape) if embed_shape is not None else None
        self.index_path = os.path.join(self.dir, "index.json")
        self._chunks = {}
        self._keys = {}
        self.bad = {}
        self.index = self._read_index()

    def _read_index(self) -> dict:
        """The index without entries that are malformed or whose chunk is missing, truncated, too short, or of
        another dtype or embedding shape; warns about what it drops."""
        if not os.path.isfile(self.index_path):
            return {}
        try:
            with open(self.index_path) as f:
                index = json.load(f)
            if not isinstance(index, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            logger.warning("embedding cache index %s is corrupt (%s): rebuilding the cache", self.index_path, e)
            return {}
        rows = defaultdict(list)
        for key, entry in index.items():
            # [chunk file name, row]: a row that is a float or a bool is not one (JSON has no other check)
            valid = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and type(entry[1]) is int
            rows[entry[0] if valid else None].append(key)
        chunks, rows_of_shape = {}, defaultdict(int)
        for chunk, keys in rows.items():
            try:
                if chunk is None or os.sep in chunk:
                    raise ValueError("malformed entry")
                data = self._chunks.get(chunk)
                if data is None:
                    data = np.load(os.path.join(self.dir, chunk), mmap_mode="r")
                if data.ndim != 3 or data.dtype != self.dtype or not all(0 <= index[k][1] < len(data) for k in keys):
                    raise ValueError(f"a {data.dtype} array of shape {data.shape} does not hold the indexed rows")
                chunks[chunk] = data
                rows_of_shape[data.shape[1:]] += len(keys)
            except (OSError, ValueError, TypeError) as e:
                self._drop(index, chunk, keys, f"missing or corrupt ({e})")
        # every embedding has the encoder's (tokens, hidden): a chunk of another shape is not this encoder's
        expected = self.embed_shape or max(rows_of_shape, key=rows_of_shape.get, default=None)
        for chunk, data in chunks.items():
            if data.shape[1:] == expected:
                self._chunks[chunk] = data
            else:
                self._drop(index, chunk, rows[chunk], f"of embeddings {data.shape[1:]}, not the encoder's {expected}")
        return index

    def _drop(self, index: dict, chunk, keys: list, reason: str) -> None:
        logger.warning("embedding cache chunk %s is %s: its %d images will be encoded again", chunk, reason, len(keys))
        self._chunks.pop(chunk, None)
        for k in keys:
            del index[k]

    def keys(self, records: list) -> list:
        """image_key of each record, computed once per record for this cache's lifetime."""
        out = []
        for r in records:
            memo = (r.image_id, str(r.source) if not isinstance(r.source, tuple) else r.source[1])
            if memo not in self._keys:
                self._keys[memo] = image_key(r)
            out.append(self._keys[memo])
        return out

    def build(self, records: list, encode, image_processor, batch_size: int = 32, device=None) -> int:
        """Encode and store every record not cached yet; returns how many were encoded.

        `encode` gets batches of pixel values, on `device` when one is given (pixel_batches)."""
        keys = self.keys(records)
        self.bad.update(
            {r.image_id: "unreadable (missing since the listing)" for r, k in zip(records, keys) if k is None}
        )
        os.makedirs(self.dir, exist_ok=True)

        def wait(holder):
            logger.info("waiting for another run (%s) that is writing the embedding cache %s", holder, self.dir)

        with exclusive_lock(os.path.join(self.dir, ".lock"), wait):
            if self.embed_shape is None and os.path.isfile(self.index_path):
                self._learn_embed_shape(
                    [r for r, k in zip(records, keys) if k is not None], encode, image_processor, device
                )
            self.index = self._read_index()  # another run may have added chunks meanwhile
            self._remove_leftovers()
            todo = [(r, k) for r, k in zip(records, keys) if k is not None and k not in self.index]
            return self._encode(todo, encode, image_processor, batch_size, device) if todo else 0

    def _learn_embed_shape(self, records: list, encode, image_processor, device) -> None:
        """Encode one image to learn the encoder's embedding shape, which cached chunks must have (_read_index).

        The chunks alone cannot tell: a folder whose chunks all have another hidden size would otherwise be
        read as this encoder's embeddings."""
        batches, _ = pixel_batches(records[:8], image_processor, 1, num_workers=0, device=device)
        for _, pixels in batches:  # the first readable image
            self.embed_shape = tuple(encode(pixels).shape[1:])
            return

    def _remove_leftovers(self) -> None:
        """Delete what killed builds left: temporary chunks and indexes, and chunks no index entry points at.

        Called under the lock, so no live builder owns any of them (each writes only while holding it).
        """
        used = {entry[0] for entry in self.index.values()}
        for name in os.listdir(self.dir):
            temporary = name.startswith((".chunk-", ".index-")) and name.endswith(".tmp")
            if temporary or (re.fullmatch(r"chunk-[0-9a-f]{32}\.npy", name) and name not in used):
                try:
                    os.remove(os.path.join(self.dir, name))
                except OSError as e:  # e.g. a read-only cache shared by others: what is left only wastes space
                    logger.warning("could not remove %s from the embedding cache: %s", name, e)
                    continue
                self._chunks.pop(name, None)
                logger.info("removed %s, left in the embedding cache by a run that did not finish", name)

    def _encode(self, todo: list, encode, image_processor, batch_size: int, device) -> int:
        import tempfile
        import uuid
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        chunk = f"chunk-{uuid.uuid4().hex}.npy"
        fd, tmp_chunk = tempfile.mkstemp(prefix=".chunk-", suffix=".npy.tmp", dir=self.dir)
        key_of = {id(r): k for r, k in todo}
        rows, shape, writing = {}, None, None
        # images are decoded and preprocessed in worker processes, in order (pixel_batches)
        batches, pending = pixel_batches([r for r, _ in todo], image_processor, batch_size, device=device)
        bar = tqdm(total=len(todo), desc="caching image embeddings", unit="img")
        # The chunk is an .npy file written front to back by a second thread while the next batch is
        # encoded: stores into a fresh memory map cost the main process ~2 ms an image (page faults)
        with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(1) as writer:
            try:
                for batch, pixels in batches:
                    # converted on the device: half the bytes to copy back, and no slow numpy cast on the host
                    # (torch's and numpy's float16 rounding agree: both round to nearest even)
                    emb = encode(pixels).to(getattr(torch, self.dtype)).cpu().numpy()
                    if shape is None:  # sized for every image still to do; rows of unreadable ones stay zero
                        shape = (len(todo),) + emb.shape[1:]
                        np.lib.format.write_array_header_1_0(
                            f,
                            {"descr": np.lib.format.dtype_to_descr(emb.dtype), "fortran_order": False, "shape": shape},
                        )
                        data_start = f.tell()
                    if writing is not None:
                        writing.result()  # one batch in flight: a slow disk holds the loop, not memory
                    writing = writer.submit(f.write, memoryview(np.ascontiguousarray(emb)).cast("B"))
                    start = len(rows)
                    for k, record in enumerate(batch):
                        rows[key_of[id(record)]] = start + k
                    bar.update(len(batch))
                if writing is not None:
                    writing.result()
                bar.close()
                self.bad.update(pending)
                if shape is not None:
                    f.truncate(data_start + emb.itemsize * int(np.prod(shape)))
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the index points at it
            except BaseException:
                os.remove(tmp_chunk)
                raise
        if shape is None:  # not one image could be read
            os.remove(tmp_chunk)
            return 0
        os.replace(tmp_chunk, os.path.join(self.dir, chunk))  # complete or absent
        self.index.update({key: [chunk, row] for key, row in rows.items()})
        write_json_atomic(self.index_path, self.index, prefix=".index-", suffix=".json.tmp")
        return len(rows)

    def chunk(self, name: str) -> np.ndarray:
        """The memory map of one chunk file of the index (opened once, read-only)."""
        if name not in self._chunks:
            self._chunks[name] = np.load(os.path.join(self.dir, name), mmap_mode="r")
        return self._chunks[name]

    def get(self, key: str) -> torch.Tensor:
        """The stored embedding of the image with this image_key (which must be cached)."""
        chunk, row = self.index[key]
        # stays in the stored (half) precision: half the bytes to copy and move; the model casts on its device
        return torch.from_numpy(np.array(self.chunk(chunk)[row]))


class CachedEmbeddingDataset(torch.utils.data.Dataset):
    """Like data.CaptionDataset, but yields cached `image_embeds` instead of pixel_values."""

    def __init__(self, records: list, cache: EmbeddingCache, labels, template: str):
        keys = cache.keys(records)  # hashed once (during the build), not per item per epoch
        self.items = [(r, k) for r, k in zip(records, keys) if k in cache.index]  # unreadable ones were never cached
        self.cache, self.labels, self.template = cache, labels, template
        self.bad_images = {r.image_id: "unreadable" for r, k in zip(records, keys) if k not in cache.index}
        self.preloaded = None

    def preload(self, device) -> "CachedEmbeddingDataset":
        """Read every embedding into one tensor on `device` (3,330 base-model images: 2.9 GB in fp16).

        On a GPU a training step is short, and reading 16 rows from the memory map, stacking them,
        pinning and copying them each step costs the main process as much; indexing a tensor
        already on the GPU costs nothing. Items then come back on `device` (no pinning, no workers).
        """
        if not self.items:
            return self
        preload_rows = device_setting("preload_rows", device)
        first = self.cache.get(self.items[0][1])
        out = torch.empty((len(self.items),) + tuple(first.shape), dtype=first.dtype, device=device)
        by_chunk = defaultdict(list)
        for pos, (_, key) in enumerate(self.items):
            chunk, row = self.cache.index[key]
            by_chunk[chunk].append((pos, row))
        for chunk, pairs in by_chunk.items():
            array = self.cache.chunk(chunk)
            # Runs of consecutive rows (a set cached in one build is one run per split) are copied
            # straight from the memory map; a gather through a host copy took twice as long
            pairs.sort(key=lambda pair: pair[1])
            start = 0
            for k in range(1, len(pairs) + 1):
                if (
                    k < len(pairs)
                    and k - start < preload_rows
                    and pairs[k][0] == pairs[k - 1][0] + 1
                    and pairs[k][1] == pairs[k - 1][1] + 1
                ):
                    continue
                (p0, r0), n = pairs[start], k - start
                with warnings.catch_warnings():  # read-only map: only read here, never written
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    out[p0 : p0 + n].copy_(torch.from_numpy(array[r0 : r0 + n]))
                start = k
        self.preloaded = out
        return self

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        r, key = self.items[i]
        embeds = self.preloaded[i] if self.preloaded is not None else self.cache.get(key)
        return {"image_embeds": embeds, "caption": self.labels.caption(r.label, self.template), "label": r.label}


def vision_fingerprint(model, processor) -> str:
    """A short key that changes when the image embeddings would: vision config, preprocessing, every weight.

    All of the encoder's tensors (parameters and buffers, by name, dtype and shape), not a sample: two
    encoders that differ in one middle layer must not share cached embeddings.
    """
    return tensors_fingerprint(
        model.vision_model.state_dict(),
        model.config.vision_config.to_json_string(),
        json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str),
    )


def tensors_fingerprint(state_dict: dict, *texts: str) -> str:
    """A short key over `texts` and every tensor of `state_dict` (by name, dtype, shape and raw bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
    tensors = sorted(state_dict.items())
    # hashlib lets go of the GIL on big buffers: the tensors are hashed side by side (~0.7 GB/s a core)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = pool.map(_tensor_digest, [t for _, t in tensors])
        for (name, t), digest in zip(tensors, digests):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{digest}".encode())
    return h.hexdigest()[:16]


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes, whatever its dtype (bfloat16 has no numpy type)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw).hexdigest()
