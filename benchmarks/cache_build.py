"""The embedding cache's host side: building it (workers decode and preprocess, the main process
receives, encodes, writes) and reading it back onto a device, this checkout against another.

    git archive <commit> | tar -x -C .baseline        # the older copy to compare with
    python benchmarks/cache_build.py [--baseline .baseline] [--images 1024] [--repeats 3]

The encoder is a stand-in that returns the base model's output shape (577 x 768 per image), so a
CPU shows the cost that bounds the build on a GPU box: the main process's own work per image.
Prints per side (runs alternated, medians): build img/s, main-process CPU ms per image (the
workers excluded, the writer thread included) and preload ms per image; ratios baseline / this.
"""

import argparse
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(project, work, n, batch):
    sys.path.insert(0, project)
    import torch

    from data import load_splits
    from embedding_cache import CachedEmbeddingDataset, EmbeddingCache
    from model import load_processor

    processor = load_processor(os.path.join(work, "model"))
    records = load_splits(os.path.join(work, "pets"), 0.0)["train"][:n]  # splits["train"]: old and new checkouts
    out = torch.randn(128, 577, 768)
    encode = lambda px: out[: len(px)] + px[:, :1, :1, :1].flatten()[:, None, None]  # noqa: E731 (reads the pixels)
    cache_dir = os.path.join(work, "cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = EmbeddingCache(cache_dir, "bench")
    cache.keys(records)  # file hashes: the same on both sides, not timed
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731
    start, cpu_start = time.perf_counter(), cpu()
    cache.build(records, encode, processor.image_processor, batch)
    wall, main_cpu = time.perf_counter() - start, cpu() - cpu_start
    start = time.perf_counter()
    # the baseline checkout may predate label sets: the dataset then takes (records, cache, template)
    if "labels" in inspect.signature(CachedEmbeddingDataset).parameters:
        from labels import OXFORD_PETS

        dataset = CachedEmbeddingDataset(records, cache, OXFORD_PETS, "a {breed}")
    else:
        dataset = CachedEmbeddingDataset(records, cache, "a {breed}")
    dataset.preload(torch.device("cpu"))
    preload = time.perf_counter() - start
    print(json.dumps({"img_s": n / wall, "main_cpu_ms": main_cpu / n * 1e3, "preload_ms": preload / n * 1e3}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default=os.path.join(ROOT, ".baseline"))
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
    sys.path.insert(0, ROOT)
    from demo import build_tiny_blip, write_synthetic_pets
    from labels import NUM_BREEDS

    work = tempfile.mkdtemp(prefix="cache-bench-")
    try:
        build_tiny_blip(os.path.join(work, "model"), image_size=384)  # only its processor is used
        write_synthetic_pets(
            os.path.join(work, "pets"), trainval_per_breed=-(-a.images // NUM_BREEDS), test_per_breed=0, size=384
        )
        sides = {"baseline": os.path.abspath(a.baseline), "this": ROOT}
        runs = {name: [] for name in sides}
        for _ in range(a.repeats):  # alternated: a busy machine slows both alike
            for name, project in sides.items():
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", project, work, str(a.images), str(a.batch)],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode:
                    sys.exit(f"{name} ({project}) failed:\n{proc.stderr[-2000:]}")
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        result = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        result["runs"] = runs
        print(f"{a.images} images of 384 px, batches of {a.batch}, {os.cpu_count()} cores, medians of {a.repeats}:")
        for key, label in (
            ("img_s", "build, img/s"),
            ("main_cpu_ms", "build, main-process CPU ms/img"),
            ("preload_ms", "preload, ms/img"),
        ):
            b, t = result["baseline"][key], result["this"][key]
            ratio = t / b if key == "img_s" else b / t
            print(f"  {label:<34} baseline {b:8.2f}   this {t:8.2f}   {ratio:.2f}x")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
