"""Where does the caption decoder look? Cross-attention heatmaps, zero-shot BLIP vs the LoRA model.

    python explainability.py                                  # 8 test images, adapter in outputs/blip-lora-pets
    python explainability.py --image my_cat.jpg --image dog.png
    python explainability.py --demo                           # offline: tiny BLIP + synthetic pets
    python explainability.py --layers 8,9,10,11 --num_images 20

Each caption is generated, then run again teacher-forced through the text decoder to read its
cross-attention (attention.cross_attention_maps). Per image, one figure: the original, the map of
the breed name (all its word pieces together) and maps of the other words, for both models.
Where the data set has trimaps, attention_metrics.json says how much of the breed-token
attention falls on the pet and how often its peak does (pointing game). Writes to --output_dir:
one PNG per image, attention_metrics.json, attention_metrics.png, index.md, run_config.json.
"""

import json
import logging
import os
import re

import numpy as np
from PIL import Image
from transformers import set_seed

from attention import explain, load_pet_mask, overlay, pet_share, pointing_hit, subject_words
from config import DEMO_EXPLAIN_OVERRIDES, ExplainConfig, PetConfig, check_seed, parse_config
from data import BadImage, Record, load_image, load_run_splits, report_bad_images, subsample
from demo import use_demo_assets
from devices import device_setting, pick_device, pick_dtype
from figures import figure
from inference import embeddings_per_model
from labels import OXFORD_PETS, LabelSet
from metrics import MODELS, display
from model import load_model_pair
from run_io import (
    UserError,
    check_output_dir,
    locked_output_dir,
    run_main,
    setup_logging,
    staged_outputs,
)
from run_record import AdapterRun, save_run_config

logger = logging.getLogger("explain")


def parse_layers(text: str):
    """'all' -> None (every layer); '-1' or '8,9,10,11' -> list of ints."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise UserError(
            f"--layers must be 'all' or comma-separated integers like '-1' or '8,9,10,11', not {text!r}"
        ) from e


def parse_args(argv=None):
    cfg, ex = parse_config((PetConfig, ExplainConfig), argv, DEMO_EXPLAIN_OVERRIDES)
    if ex.num_images is None:
        ex.num_images = 0 if ex.image else 8
    if ex.num_images < 0:
        raise UserError("--num_images must be 0 or more")
    check_output_dir(ex.output_dir, ex.adapter)
    check_seed(ex.seed)
    parse_layers(ex.layers)  # fail before loading anything
    adapter_run = AdapterRun.read(ex.adapter)
    if cfg.demo:  # after every option check (use_demo_assets may pre-train the base)
        use_demo_assets(cfg, adapter_run)
    adapter_run.fill(cfg)
    return cfg, ex, adapter_run


# ---------------------------------------------------------------------------
# Images


def collect_images(cfg, ex, adapter_run) -> tuple:
    """([(name, PIL image, Record or None)]: data set samples, then --image files; the label set they belong to)."""
    items, labels = [], adapter_run.labels or OXFORD_PETS  # adapters of runs that did not record it are pets
    if ex.num_images > 0:
        splits = load_run_splits(cfg, *adapter_run.split_settings(cfg, ex.split, ex.seed), labels=adapter_run.labels)
        labels = splits.labels
        records = subsample(splits[ex.split], ex.num_images, ex.seed)
        bad = {}
        for r in records:
            try:
                items.append((r.image_id, load_image(r), r))
            except BadImage as e:
                bad[r.image_id] = str(e)
        report_bad_images(bad)
    for path in ex.image:
        if not os.path.isfile(path):
            logger.warning("skipping --image %s: no such file", path)
            continue
        try:
            image = load_image(Record(path, -1, path))
        except BadImage as e:
            logger.warning("skipping --image %s: not a readable image (%s)", path, str(e).split(": ", 1)[-1])
            continue
        items.append((os.path.splitext(os.path.basename(path))[0], image, None))
    if not items:
        raise UserError("no readable image to explain: pass --num_images N or --image PATH (see the warnings above)")
    return items, labels


# ---------------------------------------------------------------------------
# Figures and report


def draw_figure(path: str, name: str, image: Image.Image, rows: dict) -> None:
    rgb = np.asarray(image)
    cols = 1 + max(len(r["panels"]) for r in rows.values())
    size = (2.3 * cols, 2.9 * len(rows) + 0.6)
    with figure(path, dpi=100, nrows=len(rows), ncols=cols, figsize=size, squeeze=False) as (fig, axes):
        for ax_row, (label, r) in zip(axes, rows.items()):
            ax_row[0].imshow(rgb)
            ax_row[0].set_title(display(label), fontsize=10, fontweight="bold")
            for ax, (word, grid_map) in zip(ax_row[1:], r["panels"]):
                ax.imshow(overlay(rgb, grid_map))
                # peak / mean: 1.0 is a flat map, whatever the colours suggest
                colour = "darkred" if word.startswith(("breed:", "animal:")) else "black"
                ax.set_title(f"{word}\npeak {grid_map.max() * grid_map.size:.1f}x uniform", fontsize=9, color=colour)
            if not r["panels"]:
                ax_row[1].text(0.5, 0.5, "no words", ha="center", va="center")
            for ax in ax_row:
                ax.axis("off")
        title = "\n".join(f"{display(label)}: \u201c{r['caption']}\u201d" for label, r in rows.items())
        fig.suptitle(f"{name}\n{title}", fontsize=11)


def summarise(per_image: list) -> dict:
    """Mean pet-attention share, mean mask share and pointing-game hit rate per model."""
    summary = {}
    for m in MODELS:
        rows = [r[m] for r in per_image if r[m].get("pet_attention_share") is not None]
        kinds = [r[m]["subject_kind"] or "none" for r in per_image if r["has_trimap"]]

        def mean(key, rows=rows):
            return float(np.mean([r[key] for r in rows])) if rows else None

        summary[m] = {
            "images_with_trimap": sum(r["has_trimap"] for r in per_image),
            "images_scored": len(rows),
            "mean_pet_attention_share": mean("pet_attention_share"),
            "mean_mask_share": mean("mask_share"),
            "pointing_game_hits": sum(r["pointing_hit"] for r in rows),
            "pointing_game_hit_rate": mean("pointing_hit"),
            "subject_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        }
    return summary


def plot_metrics(summary: dict, labels: LabelSet, path: str) -> None:
    keys = [
        ("mean_pet_attention_share", "attention on pet"),
        ("mean_mask_share", "pet area (chance)"),
        ("pointing_game_hit_rate", "pointing game"),
    ]
    x = np.arange(len(keys))
    with figure(path, figsize=(6.5, 3.6)) as (fig, ax):
        for k, m in enumerate(MODELS):
            values = [summary[m][key] or 0.0 for key, _ in keys]
            bars = ax.bar(x + (k - 0.5) * 0.38, values, 0.38, label=f"{display(m)} (n={summary[m]['images_scored']})")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(x, [label for _, label in keys])
        title = f"{labels.kind.title()}-token cross-attention on the pet (trimap)"
        ax.set(ylim=(0, 1.1), ylabel="share / hit rate", title=title)
        if not any(summary[m]["images_scored"] for m in MODELS):
            subject = "a breed or animal word" if labels.is_pets else f"a {labels.kind} word"
            ax.text(1, 0.55, f"no image with a trimap and {subject}", ha="center", color="gray")
        ax.legend(fontsize=8)


def write_index(path: str, ex, base_name, summary: dict, per_image: list, labels: LabelSet) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    subject_kinds = [labels.kind, subject_words(labels)[1], "none"]  # breed / animal / none for pets
    kinds = [f"{k} word" if k == subject_kinds[1] else k for k in subject_kinds]
    lines = [
        "# Where the caption decoder looks",
        "",
        f"Cross-attention of the text decoder over the image patches (layers `{ex.layers}`, heads averaged), "
        f"teacher-forced over each generated caption. Zero-shot: `{base_name}`; fine-tuned: adapter `{ex.adapter}`. "
        "Red is where the step that writes the word attends most; each panel is stretched to its own range, "
        "so read its contrast from the title (peak / uniform: 1.0 is a flat map).",
        "",
        "## How much attention falls on the pet",
        "",
        f"| model | images scored | attention on pet | pet area (chance) | pointing game | {' / '.join(kinds)} |",
        "|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        s = summary[m]
        counts = " / ".join(str(s["subject_kinds"].get(k, 0)) for k in subject_kinds)
        lines.append(
            f"| {display(m)} | {s['images_scored']} | {fmt(s['mean_pet_attention_share'])} | "
            f"{fmt(s['mean_mask_share'])} | {fmt(s['pointing_game_hit_rate'])} | {counts} |"
        )
    lines += ["", "![attention metrics](attention_metrics.png)", "", "## Images", ""]
    for r in per_image:
        truth = f" (true {labels.kind}: {r['true_breed']})" if r["true_breed"] else ""
        lines += [f"### {r['name']}{truth}", ""]
        lines += [f"- {display(m)}: \u201c{r[m]['caption']}\u201d" for m in MODELS]
        lines += ["", f"![{r['name']}]({r['figure']})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------


def main(argv=None):
    setup_logging()
    cfg, ex, adapter_run = parse_args(argv)
    with locked_output_dir(ex.output_dir):  # a second run into this folder gets one line, not a mix
        with staged_outputs(ex.output_dir) as tmp:  # a full disk or a kill leaves the previous outputs whole
            result = _explain(cfg, ex, adapter_run, tmp)
    print(f"Wrote {len(result['metrics']['images'])} figures, attention_metrics.json and index.md to {ex.output_dir}/")
    return {"output_dir": ex.output_dir, "metrics": result["metrics"]}


def _explain(cfg, ex, adapter_run, out):
    set_seed(ex.seed)
    layers = parse_layers(ex.layers)
    device = pick_device()
    dtype = pick_dtype(device, cfg.precision)

    base_name = cfg.model_name_or_path  # --model_name_or_path, else the adapter's own base (AdapterRun.fill)
    pair = load_model_pair(
        base_name, ex.adapter, device, dtype, adapter_run.adapter_config, adapter_run.base_fingerprint
    )
    processor = pair.processor
    items, labels = collect_images(cfg, ex, adapter_run)
    logger.info(
        "explaining %d images; zero-shot %s, fine-tuned %s, layers %s", len(items), base_name, ex.adapter, ex.layers
    )

    # every image through each model at once, in batches: decoding is launch-bound on a GPU
    explained = {m: [] for m in MODELS}
    batch = device_setting("explain_batch", device)
    for start in range(0, len(items), batch):
        images = [image for _, image, _ in items[start : start + batch]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device, dtype)
        embeds = embeddings_per_model(pair.models, pixels, pair.shared_vision)
        for m, model in pair.models.items():
            explained[m] += explain(model, processor, embeds[m], cfg, layers, labels)

    per_image = []
    for k, (name, image, record) in enumerate(items, 1):
        rows = {m: explained[m][k - 1] for m in MODELS}
        figure = f"{k:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        draw_figure(os.path.join(out, figure), name, image, rows)

        mask = load_pet_mask(record.trimap, image.size) if record is not None and record.trimap else None
        entry = {
            "name": name,
            "figure": figure,
            "has_trimap": mask is not None,
            "true_breed": labels.names[record.label] if record is not None else None,
        }
        for m, r in rows.items():
            entry[m] = {"caption": r["caption"], "subject_kind": r["subject_kind"]}
            if mask is not None and r["subject_map"] is not None:
                share, area = pet_share(r["subject_map"], mask)
                entry[m].update(
                    pet_attention_share=share, mask_share=area, pointing_hit=pointing_hit(r["subject_map"], mask)
                )
        per_image.append(entry)
        logger.info(
            "%d/%d %s: zero-shot %r, fine-tuned %r",
            k,
            len(items),
            name,
            rows[MODELS[0]]["caption"],
            rows[MODELS[1]]["caption"],
        )

    summary = summarise(per_image)
    metrics = {
        "summary": summary,
        "definitions": {
            "subject": "the breed-name tokens (all word pieces), or the first cat/dog-like word when no breed is named",
            "pet_attention_share": "share of the subject's cross-attention over patches that falls on the pet "
            "(trimap pet + border)",
            "mask_share": "share of the image the pet covers: what attention spread evenly would score",
            "pointing_game": "the centre of the most-attended patch lies on the pet",
        },
        "layers": ex.layers,
        "zero_shot_model": base_name,
        "adapter": ex.adapter,
        "images": per_image,
    }
    with open(os.path.join(out, "attention_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_metrics(summary, labels, os.path.join(out, "attention_metrics.png"))
    write_index(os.path.join(out, "index.md"), ex, base_name, summary, per_image, labels)
    save_run_config(os.path.join(out, "run_config.json"), shared=cfg, explain=ex)
    for m in MODELS:
        s = summary[m]
        if s["images_scored"]:
            print(
                f"{display(m)}: attention on pet {s['mean_pet_attention_share']:.3f} vs pet area "
                f"{s['mean_mask_share']:.3f}, pointing game {s['pointing_game_hit_rate']:.3f} "
                f"({s['images_scored']} images)"
            )
    return {"metrics": metrics}


if __name__ == "__main__":
    run_main(main)
