"""Pre-train a demo base, then fine-tune and evaluate it with several seeds: the README's demo table.

    python benchmarks/demo_seeds.py OUT_DIR [--seeds 1 2 3] [--recipe '{"steps": 500}'] [--base DIR]
        [--train_args "--num_train_epochs 12"] [--explain]

The demo pets are drawn into OUT_DIR/pets and the base pre-trained into OUT_DIR/base (--base reuses
one). Each seed runs train.py and evaluate.py (and with --explain explainability.py) on them as
subprocesses, the demo's defaults plus --train_args. Prints a Markdown table and one JSON line:
pre-training and per-script wall and CPU seconds, and each run's metrics.
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import demo  # noqa: E402
from data import load_image, load_splits  # noqa: E402
from inference import captions_from_embeddings, image_embeddings  # noqa: E402
from labels import BREED_NAMES, OXFORD_PETS, PETS_TEMPLATE, SPECIES, UNKNOWN  # noqa: E402
from model import load_base_model, load_processor  # noqa: E402


def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple:
    """(fn's result, wall seconds, CPU seconds of this process and its children)."""
    wall, cpu = time.time(), cpu_seconds() + cpu_seconds(resource.RUSAGE_CHILDREN)
    out = fn()
    return out, round(time.time() - wall, 1), round(cpu_seconds() + cpu_seconds(resource.RUSAGE_CHILDREN) - cpu, 1)


def script(name: str, args: list) -> None:
    subprocess.run(
        [sys.executable, os.path.join(ROOT, name), "--demo", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_seed(out_dir: str, base: str, pets: str, seed: int, train_args: list, explain: bool) -> dict:
    adapter, evaluation = os.path.join(out_dir, f"lora-{seed}"), os.path.join(out_dir, f"eval-{seed}")
    common = ["--model_name_or_path", base, "--dataset", pets]
    row = {"seed": seed}
    _, row["train_wall_s"], row["train_cpu_s"] = timed(
        lambda: script(
            "train.py",
            [
                *common,
                "--seed",
                str(seed),
                "--output_dir",
                adapter,
                "--embedding_cache_dir",
                os.path.join(out_dir, "cache"),
                *train_args,
            ],
        )
    )
    _, row["evaluate_wall_s"], row["evaluate_cpu_s"] = timed(
        lambda: script(
            "evaluate.py",
            [
                *common,
                "--adapter",
                adapter,
                "--output_dir",
                evaluation,
                "--clip_model",
                "none",  # the real CLIP is not on this disk
                "--classifier_model",
                "none",
                "--classifier_cache_dir",
                os.path.join(out_dir, "classifiers"),
            ],
        )
    )
    with open(os.path.join(evaluation, "metrics.json")) as f:
        metrics = json.load(f)
    for model in ("zero_shot", "fine_tuned"):
        m = metrics[model]
        row[model] = {
            k: m[k]
            for k in (
                "breed_accuracy",
                "species_accuracy",
                "no_breed_rate",
                "ranking_agrees_with_caption",
                "likelihood_top1",
            )
        }
    for baseline in ("linear_probe", "lora_classifier"):
        b = metrics.get(baseline, {})
        row[baseline] = {k: b[k] for k in ("accuracy", "accuracy_ci95", "train_seconds") if k in b}
    if explain:
        explained = os.path.join(out_dir, f"explain-{seed}")
        _, row["explain_wall_s"], row["explain_cpu_s"] = timed(
            lambda: script("explainability.py", [*common, "--adapter", adapter, "--output_dir", explained])
        )
        with open(os.path.join(explained, "attention_metrics.json")) as f:
            summary = json.load(f)["summary"]
        for model in ("zero_shot", "fine_tuned"):
            share = summary[model]["mean_pet_attention_share"]  # None when no image had a subject to score
            row[model]["pet_attention"] = None if share is None else round(share, 3)
        row["pet_area"] = round(summary["zero_shot"]["mean_mask_share"], 3)
    return row


def zero_shot_species(base: str, pets: str) -> dict:
    """The base's zero-shot captions of the demo test set: species accuracy (overall and per breed), no breed named."""
    model, processor = load_base_model(base).eval(), load_processor(base)
    test = load_splits(pets)["test"]
    pixels = processor.image_processor([load_image(r) for r in test], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        captions = captions_from_embeddings(model, processor, image_embeddings(model, pixels), max_new_tokens=16)
    right = [OXFORD_PETS.group_from_caption(c) == SPECIES[r.label] for c, r in zip(captions, test)]
    per_breed = {}
    for ok, r in zip(right, test):
        per_breed.setdefault(BREED_NAMES[r.label], []).append(ok)
    return {
        "species_accuracy": sum(right) / len(test),
        "no_breed_rate": sum(OXFORD_PETS.from_caption(c) == UNKNOWN for c in captions) / len(test),
        "species_per_breed": {k: sum(v) / len(v) for k, v in per_breed.items()},
    }


def table(rows: list) -> str:
    lines = [
        "| seed | zero-shot species / breed / no breed named | zero-shot ranking top-1 | fine-tuned breed "
        "| ranking = caption | linear probe | LoRA classifier | pet attention zs / ft |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        zs, ft = r["zero_shot"], r["fine_tuned"]
        attention = f"{zs['pet_attention']} / {ft['pet_attention']}" if "pet_attention" in zs else "-"
        probe, classifier = (r.get(k, {}).get("accuracy") for k in ("linear_probe", "lora_classifier"))
        probe, classifier = ("-" if v is None else f"{v:.4g}" for v in (probe, classifier))
        lines.append(
            f"| {r['seed']} | {zs['species_accuracy']:.4g} / {zs['breed_accuracy']:.3g} / {zs['no_breed_rate']:.3g} "
            f"| {zs['likelihood_top1']:.4g} | {ft['breed_accuracy']:.4g} | {ft['ranking_agrees_with_caption']:.4g} "
            f"| {probe} | {classifier} "
            f"| {attention} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[1, 2, 3], help="fine-tuning seeds (none: pre-train only)"
    )
    parser.add_argument("--recipe", default="{}", help="JSON overrides of demo.DEMO_BASE_RECIPE")
    parser.add_argument("--base", help="an already pre-trained demo base to reuse")
    parser.add_argument("--train_args", default="", help="extra train.py flags, one string")
    parser.add_argument("--explain", action="store_true", help="also run explainability.py: pet attention")
    args = parser.parse_args()
    template = PETS_TEMPLATE
    pets = demo.prepare_demo_data(args.out_dir)
    result = {"recipe": {**demo.DEMO_BASE_RECIPE, **json.loads(args.recipe)}}
    base = args.base
    if base is None:
        base = os.path.join(args.out_dir, "base")
        os.makedirs(base, exist_ok=True)
        _, result["pretrain_wall_s"], result["pretrain_cpu_s"] = timed(
            lambda: demo.pretrain_demo_blip(base, template, result["recipe"], show_progress=False)
        )
    result["zero_shot"] = zero_shot_species(base, pets)
    print(json.dumps(result["zero_shot"]), flush=True)
    result["runs"] = [
        run_seed(args.out_dir, base, pets, s, shlex.split(args.train_args), args.explain) for s in args.seeds
    ]
    print(table(result["runs"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
