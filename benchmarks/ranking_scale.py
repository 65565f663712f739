"""The likelihood ranking's cost per image at 37, 100 and 200 classes: time and peak memory, grouped or in one pass.

    python benchmarks/ranking_scale.py                     # demo-sized model (hidden 128), CPU, a few minutes
    python benchmarks/ranking_scale.py --model base --images 2 --classes 37,100,200
    python benchmarks/ranking_scale.py --device cuda --model base --images 32

Each configuration runs in a child process of its own, so its peak memory is its own: on a CPU the peak
resident set size above what the loaded model held, on a GPU torch's peak allocated memory. Classes are
made-up names of 1-4 words from the tokenizer's vocabulary (as long as real fine-grained names); the
caption template is the generic one. Ratios against 37 classes are taken in the same run.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def class_names(tokenizer, n: int, seed: int = 0) -> list:
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3]
    rng = random.Random(seed)
    names = set()
    while len(names) < n:
        names.add(" ".join(rng.sample(words, rng.randint(1, 4))))
    return sorted(names)


def child(model_dir: str, classes: int, per_pass: int, images: int, repeats: int, device: str) -> dict:
    import torch

    from inference import caption_log_likelihoods, label_candidates
    from labels import GENERIC_TEMPLATE, LabelSet
    from model import load_base_model, load_processor

    torch.set_num_threads(1)
    model, processor = load_base_model(model_dir).to(device).eval(), load_processor(model_dir)
    names = class_names(processor.tokenizer, classes)
    candidates = label_candidates(model, processor.tokenizer, LabelSet(names, names), GENERIC_TEMPLATE)
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    embeds = torch.randn(images, tokens, vision.hidden_size, device=device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, before any ranking
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            caption_log_likelihoods(model, embeds, *candidates, max_rows=128, candidates_per_pass=per_pass)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    )
    return {"seconds_per_image": statistics.median(times) / images, "peak_mib": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["demo", "base"], default="demo")
    p.add_argument("--classes", default="37,100,200")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        model_dir, classes, per_pass, images, repeats = a.child
        print(json.dumps(child(model_dir, int(classes), int(per_pass), int(images), int(repeats), a.device)))
        return
    from demo import build_tiny_blip
    from inference import CANDIDATES_PER_PASS

    model_dir = tempfile.mkdtemp()
    if a.model == "base":
        build_tiny_blip(model_dir, base_sized=True)
    else:
        build_tiny_blip(model_dir, image_size=64, hidden=128)
    rows = []
    for classes in (int(c) for c in a.classes.split(",")):
        for name, per_pass in (("grouped", CANDIDATES_PER_PASS), ("one pass", classes)):
            if name == "one pass" and classes <= CANDIDATES_PER_PASS:
                continue  # the same as grouped
            cmd = [sys.executable, __file__, "--device", a.device, "--child", model_dir, str(classes), str(per_pass),
                   str(a.images), str(a.repeats)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append({"classes": classes, "path": name, **json.loads(out)})
            print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["classes"] == rows[0]["classes"] and r["path"] == "grouped")
    print(f"\n{a.model} model, {a.device}, {a.images} images; ratios against {base['classes']} classes, grouped")
    print("| classes | path | ms / image | x time | x classes | peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['classes']} | {r['path']} | {1e3 * r['seconds_per_image']:.1f} | "
            f"{r['seconds_per_image'] / base['seconds_per_image']:.2f} | {r['classes'] / base['classes']:.2f} | "
            f"{r['peak_mib']:.0f} |"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "device": a.device, "images": a.images, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
