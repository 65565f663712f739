"""The recipe's numbers side by side, today's path (.baseline/) against the project's; for gpu_recipe.sh.

    python benchmarks/compare_recipe.py WORK_DIR OUT_DIR

Reads the stage times (OUT_DIR/timings.txt), the `timing:` lines of both train.py logs, both
evaluations' metrics.json and predictions.csv; checks that the two paths name the same top-1 breed
(likelihood ranking and captions, both models) on the images both evaluated; collects the CUDA-graph
self-checks' lines (decoding, --cuda_graphs training) from every stage's log; prints a table and
writes OUT_DIR/recipe.json.
"""

import csv
import json
import os
import re
import sys

work, out = sys.argv[1], sys.argv[2]


def stage_seconds():
    found = {}
    path = os.path.join(out, "timings.txt")
    for line in open(path) if os.path.isfile(path) else []:
        m = re.match(r"(\S+) rc=(\d+) ([\d.]+) s", line)
        if m:
            found[m.group(1)] = {"rc": int(m.group(2)), "seconds": float(m.group(3))}
    return found


def timing_line(log):
    path = os.path.join(work, log)
    for line in open(path, errors="replace") if os.path.isfile(path) else []:
        if "timing: " in line:
            return json.loads(line.split("timing: ", 1)[1])
    return {}


def trainer_metrics(log):
    """train_runtime / train_samples_per_second from the Trainer's final log dict (both paths print it)."""
    path = os.path.join(work, log)
    text = open(path, errors="replace").read() if os.path.isfile(path) else ""
    m = re.findall(r"'train_runtime': '?([\d.]+)'?, 'train_samples_per_second': '?([\d.]+)'?", text)
    return {"train_runtime": float(m[-1][0]), "train_samples_per_second": float(m[-1][1])} if m else {}


SELF_CHECK = re.compile(r"(INFO|WARNING) \S+: self-check")  # a log line of model.GraphSelfCheck or train.GraphedLoss


def self_checks():
    """{stage: [its "self-check" log lines]}: passed, or failed and turned off (GraphSelfCheck, GraphedLoss)."""
    found = {}
    for name in sorted(os.listdir(work)):
        if name.endswith(".log"):
            with open(os.path.join(work, name), errors="replace") as f:
                lines = [line.strip() for line in f if SELF_CHECK.match(line)]
            if lines:
                found[name.removesuffix(".log")] = lines
    return found


def metrics(folder):
    path = os.path.join(work, folder, "metrics.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


def predictions(folder):
    path = os.path.join(work, folder, "predictions.csv")
    if not os.path.isfile(path):
        return {}
    return {row["image_id"]: row for row in csv.DictReader(open(path))}


def main():
    stages = stage_seconds()
    new_m, old_m = metrics("eval"), metrics("bl_eval")
    new_p, old_p = predictions("eval"), predictions("bl_eval")
    common = sorted(set(new_p) & set(old_p))
    same = {}
    for col in (
        "fine_tuned_likelihood_top5",
        "zero_shot_likelihood_top5",
        "fine_tuned_breed",
        "zero_shot_breed",
        "fine_tuned_caption",
        "zero_shot_caption",
    ):
        pick = (lambda v: v.split("|")[0]) if col.endswith("top5") else (lambda v: v)
        same[col.replace("_top5", "_top1")] = sum(pick(new_p[i][col]) == pick(old_p[i][col]) for i in common)
    record = {
        "stages": stages,
        "train_new": {**timing_line("train.log"), **trainer_metrics("train.log")},
        "train_baseline": {**timing_line("bl_train.log"), **trainer_metrics("bl_train.log")},
        "train_graphs": {**timing_line("train_graphs.log"), **trainer_metrics("train_graphs.log")},
        "train_compiled": {**timing_line("train_compiled.log"), **trainer_metrics("train_compiled.log")},
        "train_cudagraphs": {**timing_line("train_cudagraphs.log"), **trainer_metrics("train_cudagraphs.log")},
        "evaluate_new": {k: new_m.get(k) for k in ("num_samples", "runtime_seconds", "images_per_second")},
        "evaluate_baseline": {k: old_m.get(k) for k in ("num_samples", "runtime_seconds", "images_per_second")},
        "common_images": len(common),
        "identical_on_common_images": same,
        "self_checks": self_checks(),
        "accuracy_new": {
            m: {k: new_m.get(m, {}).get(k) for k in ("breed_accuracy", "likelihood_top1")}
            for m in ("zero_shot", "fine_tuned")
        },
    }
    b = record["train_baseline"]
    base_loop = b.get("train_samples_per_second")  # the baseline has no timing line: 1 epoch, no validation
    n = record["train_new"]
    rows = [
        ("train loop img/s", base_loop, n.get("loop_img_s")),
        ("train.py wall s", stages.get("bl_train", {}).get("seconds"), stages.get("train", {}).get("seconds")),
        (
            "evaluate img/s",
            record["evaluate_baseline"]["images_per_second"],
            record["evaluate_new"]["images_per_second"],
        ),
        ("evaluate.py wall s", stages.get("bl_evaluate", {}).get("seconds"), stages.get("evaluate", {}).get("seconds")),
        ("explain wall s", stages.get("bl_explain", {}).get("seconds"), stages.get("explain", {}).get("seconds")),
    ]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"{'':<22}{'baseline (reduced)':>20}{'new (full recipe)':>20}")
    for name, old, new in rows:
        print(f"{name:<22}{fmt(old):>20}{fmt(new):>20}")
    print("new train.py:", json.dumps(n))
    print("baseline train.py:", json.dumps(b))
    print(
        f"train.py --cuda_graphs True ({stages.get('train_graphs', {}).get('seconds', '-')} s):",
        json.dumps(record["train_graphs"]),
    )
    print("compiled train.py (1 epoch, reduce-overhead):", json.dumps(record["train_compiled"]))
    print("compiled train.py (1 epoch, cudagraphs backend):", json.dumps(record["train_cudagraphs"]))
    ends = sum(stages.get(s, {}).get("seconds", 0.0) for s in ("train", "evaluate", "explain"))
    print(f"three scripts end to end (new): {ends:.1f} s")
    if "train_graphs" in stages:
        # that run found the cache built: the first run's cache build is added back
        build = n.get("cache_and_setup_s", 0.0) - record["train_graphs"].get("cache_and_setup_s", 0.0)
        graphed = (
            ends - stages.get("train", {}).get("seconds", 0.0) + stages["train_graphs"].get("seconds", 0.0) + build
        )
        print(f"three scripts end to end with train.py --cuda_graphs True (its cache build added): {graphed:.1f} s")
        record["end_to_end_cuda_graphs_s"] = graphed
    print(f"identical on {len(common)} common test images: {json.dumps(same)}")
    checks = record["self_checks"]
    failed = sum("passed" not in line for lines in checks.values() for line in lines)
    print(
        f"self-checks: {sum(map(len, checks.values()))} ran, {failed} failed"
        if checks
        else "self-checks: none ran (no CUDA graph was used: no GPU, or graphs off)"
    )
    for stage, lines in checks.items():
        for line in lines:
            print(f"  {stage}: {line}")
    record["end_to_end_new_s"] = ends
    with open(os.path.join(out, "recipe.json"), "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
