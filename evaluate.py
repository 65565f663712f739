"""Evaluate the LoRA adapter against zero-shot BLIP on the held-out test split.

    python evaluate.py                      # outputs/blip-lora-pets on the official test split
    python evaluate.py --demo               # offline: the demo adapter on the synthetic pets
    python evaluate.py --dataset /data/oxford-iiit-pet --max_eval_samples 500 --num_beams 3

For every image: a caption from each model (the breed it names), and the log-likelihood of the
templated caption of each of the 37 breeds (a ranking that always names a breed). Writes
metrics.json, predictions.csv, failures.csv, the figures, report.md and run_config.json to --output_dir.
"""

import json
import logging
import os
import time

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import set_seed

from config import (DEMO_EVAL_OVERRIDES, EvalConfig, PetConfig, UserError, check_seed, locked_output_dir, parse_config,
                    pick_device, pick_dtype, run_main, same_path, save_run_config, staged_outputs)
from data import (BREED_NAMES, NUM_BREEDS, SPECIES, UNKNOWN, breed_from_caption, caption_for, load_image,
                  load_splits, pixel_batches, report_bad_images, species_from_caption, subsample)
from demo import use_demo_assets
from model import (adapter_split_settings, base_model_for, breed_candidates, captions_from_embeddings, check_adapter,
                   data_for, image_embeddings, load_base_model, load_lora_for_inference, rank_breeds,
                   same_vision_encoder)

logger = logging.getLogger("evaluate")
MODELS = ("zero_shot", "fine_tuned")
LABELS = BREED_NAMES + ["unknown"]  # confusion-matrix order; UNKNOWN (-1) is the last column


def label_index(labels) -> list:
    """Positions in LABELS: a breed's own index, UNKNOWN (-1) -> the last one."""
    return [NUM_BREEDS if x == UNKNOWN else int(x) for x in labels]


def parse_args(argv=None):
    """(PetConfig, EvalConfig, base model name) with --demo applied and the options checked."""
    cfg, args = parse_config((PetConfig, EvalConfig), argv, DEMO_EVAL_OVERRIDES)
    if args.split not in ("test", "validation", "train"):
        raise UserError(f"--split must be test, validation or train, not {args.split!r}")
    batch = args.per_device_eval_batch_size  # None: chosen by device in main()
    if batch is not None and batch < 1:
        raise UserError("--per_device_eval_batch_size must be at least 1")
    if not 1 <= args.bootstrap_samples <= 100_000:  # the resample matrix is samples x images
        raise UserError(f"--bootstrap_samples must be 1-100000, not {args.bootstrap_samples}")
    check_seed(args.seed)
    if os.path.isfile(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir!r} is a file; pass a folder")
    if os.path.isdir(args.adapter) and same_path(args.output_dir, args.adapter):
        raise UserError(f"--output_dir {args.output_dir!r} is the adapter folder; its files would be overwritten: pass another folder")
    adapter_base = check_adapter(args.adapter)["base_model_name_or_path"]
    if cfg.demo:
        use_demo_assets(cfg)
    base = base_model_for(cfg, args.adapter)
    cfg.dataset = data_for(cfg, args.adapter)
    if not _same_model(base, adapter_base):
        logger.warning("adapter %s was trained on %r; evaluating it on %r", args.adapter, adapter_base, base)
    cfg.model_name_or_path = base
    return cfg, args


def _same_model(a: str, b: str) -> bool:
    return a == b or (os.path.isdir(a) and os.path.isdir(b) and os.path.realpath(a) == os.path.realpath(b))


# ---------------------------------------------------------------------------
# Predictions


@torch.no_grad()
def evaluate_batch(models: dict, processor, pixels: torch.Tensor, candidates, cfg, share_embeddings: bool) -> dict:
    """Captions and breed likelihood scores of one batch of images (pixel values) under each model.

    The vision encoder runs once per batch when the models share it (LoRA on the text decoder only).
    """
    first = next(iter(models.values()))
    param = next(first.parameters())
    pixels = pixels.to(param.device, param.dtype, non_blocking=True)
    shared = image_embeddings(first, pixels) if share_embeddings else None
    out = {}
    for name, model in models.items():
        embeds = shared if share_embeddings else image_embeddings(model, pixels)
        captions = captions_from_embeddings(model, processor, embeds, cfg.max_new_tokens, cfg.num_beams)
        scores, _ = rank_breeds(model, embeds, candidates)
        out[name] = {"captions": captions, "scores": scores.cpu().numpy()}
    return out


def predict(models: dict, processor, records: list, cfg, batch_size: int, share_embeddings: bool,
            show_progress: bool = True):
    """(per-image results, {image_id: reason} of unreadable images), with a progress bar over the images."""
    from tqdm.auto import tqdm

    candidates = breed_candidates(next(iter(models.values())), processor.tokenizer, cfg.caption_template)
    # tokens scored per candidate ([SEP] included): for the per-token ranking
    results = {"image_id": [], "label": [], "record": [], "candidate_tokens": candidates[1][:, 1:].sum(-1).numpy()}
    for name in models:
        results[name] = {"captions": [], "scores": []}
    # images are decoded and preprocessed by worker processes while the GPU works (pixel_batches)
    batches, bad = pixel_batches(records, processor.image_processor, batch_size)
    bar = tqdm(total=len(records), unit="img", desc="evaluating", disable=not show_progress)
    for batch, pixels in batches:
        out = evaluate_batch(models, processor, pixels, candidates, cfg, share_embeddings)
        for record in batch:
            results["image_id"].append(record.image_id)
            results["label"].append(record.label)
            results["record"].append(record)
        for name in models:
            results[name]["captions"] += out[name]["captions"]
            results[name]["scores"].append(out[name]["scores"])
        bar.n = len(results["image_id"]) + len(bad)
        bar.refresh()
    bar.n = len(results["image_id"]) + len(bad)
    bar.close()
    for name in models:
        s = results[name]["scores"]
        results[name]["scores"] = np.concatenate(s) if s else np.zeros((0, NUM_BREEDS))
    return results, bad


def drop_records(results: dict) -> dict:
    """Results without the Record objects (they can hold a whole datasets.Dataset): for gathering."""
    return {k: v for k, v in results.items() if k != "record"}


def merge_shards(shards: list, records: list):
    """Per-process (results, bad) -> one results dict in the order of `records`, each image once."""
    position = {r.image_id: i for i, r in enumerate(records)}
    rows, bad = [], {}
    for results, shard_bad in shards:
        bad.update(shard_bad)
        models = [k for k in results if isinstance(results[k], dict)]
        for j, image_id in enumerate(results["image_id"]):
            rows.append((position[image_id], image_id, results["label"][j],
                         {m: (results[m]["captions"][j], results[m]["scores"][j]) for m in models}))
    rows.sort(key=lambda row: row[0])
    if len({row[0] for row in rows}) != len(rows):
        raise RuntimeError("an image was evaluated by two processes")
    merged = {"image_id": [r[1] for r in rows], "label": [r[2] for r in rows],
              "record": [records[r[0]] for r in rows], "candidate_tokens": shards[0][0]["candidate_tokens"]}
    for m in (rows[0][3] if rows else {}):
        merged[m] = {"captions": [r[3][m][0] for r in rows],
                     "scores": np.stack([r[3][m][1] for r in rows]) if rows else np.zeros((0, NUM_BREEDS))}
    return merged, bad


# ---------------------------------------------------------------------------
# Metrics (plain functions of predictions, tested on hand-made sets)


def bootstrap_ci(correct, samples: int = 1000, seed: int = 42, level: float = 0.95) -> list:
    """Percentile bootstrap interval of the mean of a 0/1 vector."""
    correct = np.asarray(correct, dtype=float)
    if len(correct) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(samples, len(correct)))].mean(axis=1)
    return [float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))]


def mcnemar(a_correct, b_correct) -> dict:
    """Exact McNemar test (two-sided binomial on the discordant pairs) of model b against model a."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_b, n, 0.5).pvalue)
    return {"only_first_correct": only_a, "only_second_correct": only_b, "p_value": p, "test": "exact binomial"}


def confused_pairs(truth, pred, k: int = 10) -> list:
    """The k most frequent (true breed, predicted breed) mistakes; captions naming no breed are not pairs."""
    counts = {}
    for t, p in zip(truth, pred):
        if p != t and p != UNKNOWN:
            counts[(t, p)] = counts.get((t, p), 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], BREED_NAMES[item[0][0]], BREED_NAMES[item[0][1]]))
    return [{"true": BREED_NAMES[t], "predicted": BREED_NAMES[p], "count": c} for (t, p), c in ranked[:k]]


def per_breed_scores(truth, pred) -> dict:
    """Precision, recall (= per-breed accuracy), F1 and support of each breed that occurs in truth or predictions."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = sorted({int(x) for x in truth} | {int(x) for x in pred} - {UNKNOWN})
    p, r, f, s = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    return {BREED_NAMES[b]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, b in enumerate(labels)}


def confusion(truth, pred):
    """38 x 38 counts: rows true breed, columns predicted breed, last row/column 'unknown'."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(label_index(truth), label_index(pred), labels=list(range(NUM_BREEDS + 1)))


def bleu(hypotheses: list, references: list) -> float:
    """Corpus BLEU (sacrebleu, 13a tokens, lower-cased: BLIP's tokenizer is uncased), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references], lowercase=True).score)


def rouge_l(hypotheses: list, references: list) -> float:
    """Mean ROUGE-L F-measure (Google's rouge-score), 0-1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not hypotheses:
        return float("nan")
    return float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]))


def model_metrics(labels, captions, scores, template, samples, seed, candidate_tokens=None) -> dict:
    """Every number for one model: caption accuracy, species, unknown share, ranking, per breed, BLEU, ROUGE-L.

    The ranking uses the summed log-likelihood of each breed's caption; with candidate_tokens it is also
    reported per token (mean log-likelihood), which does not favour breeds with short names when the
    model is unsure (the tiny demo model spreads its probability thinly over the vocabulary).
    """
    labels = np.asarray(labels)
    pred = np.array([breed_from_caption(c) for c in captions], dtype=int)
    correct = pred == labels
    species_ok = np.array([species_from_caption(c) == SPECIES[t] for c, t in zip(captions, labels)])
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    references = [caption_for(t, template) for t in labels]
    f1 = per_breed_scores(labels, pred)
    tokens = np.ones(scores.shape[1]) if candidate_tokens is None else np.asarray(candidate_tokens, float)
    top1_per_token = np.argmax(scores / tokens, axis=1) == labels
    return {
        "breed_accuracy": float(correct.mean()), "breed_accuracy_ci95": bootstrap_ci(correct, samples, seed),
        "species_accuracy": float(species_ok.mean()), "species_accuracy_ci95": bootstrap_ci(species_ok, samples, seed),
        "no_breed_rate": float((pred == UNKNOWN).mean()),
        "likelihood_top1": float(top1.mean()), "likelihood_top1_ci95": bootstrap_ci(top1, samples, seed),
        "likelihood_top5": float(top5.mean()),
        "likelihood_top1_per_token": float(top1_per_token.mean()),
        "macro_f1": float(np.mean([v["f1"] for v in f1.values()])) if f1 else 0.0,
        "bleu": bleu(captions, references), "rougeL": rouge_l(captions, references),
        "mean_caption_words": float(np.mean([len(c.split()) for c in captions])),
        "confused_pairs": confused_pairs(labels, pred),
        "per_breed": f1,
        # per-image values for the tables and figures; not written to metrics.json
        "_pred": pred, "_correct": correct, "_top1": top1, "_order": order,
    }


def compute_metrics(results: dict, template: str, samples: int = 1000, seed: int = 42) -> dict:
    labels = results["label"]
    metrics = {"num_samples": len(labels)}
    for name in MODELS:
        metrics[name] = model_metrics(labels, results[name]["captions"], results[name]["scores"], template, samples, seed,
                                      results.get("candidate_tokens"))
    zs, ft = metrics["zero_shot"], metrics["fine_tuned"]
    metrics["mcnemar_caption"] = mcnemar(zs["_correct"], ft["_correct"])
    metrics["mcnemar_likelihood_top1"] = mcnemar(zs["_top1"], ft["_top1"])
    return metrics


def public(metrics: dict) -> dict:
    """metrics without the per-image arrays."""
    return {k: public(v) if isinstance(v, dict) else v for k, v in metrics.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------
# Tables, figures, report

KEY_ROWS = [  # (label, key, format)
    ("breed accuracy (caption names the breed)", "breed_accuracy", "ci"),
    ("species accuracy (cat/dog)", "species_accuracy", "ci"),
    ("captions naming no breed", "no_breed_rate", "f"),
    ("likelihood ranking top-1", "likelihood_top1", "ci"),
    ("likelihood ranking top-5", "likelihood_top5", "f"),
    ("likelihood ranking top-1, per-token mean", "likelihood_top1_per_token", "f"),
    ("macro F1 over breeds (captions)", "macro_f1", "f"),
    ("BLEU (0-100)", "bleu", "f1"),
    ("ROUGE-L F", "rougeL", "f"),
    ("mean caption length (words)", "mean_caption_words", "f1"),
]


def _fmt(m: dict, key: str, kind: str) -> str:
    if kind == "ci":
        lo, hi = m[key + "_ci95"]
        return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{m[key]:.1f}" if kind == "f1" else f"{m[key]:.3f}"


def key_table(metrics: dict) -> list:
    return [(label, _fmt(metrics["zero_shot"], key, kind), _fmt(metrics["fine_tuned"], key, kind))
            for label, key, kind in KEY_ROWS]


def predictions_frame(results: dict, metrics: dict):
    import pandas as pd

    top5 = lambda order: ["|".join(BREED_NAMES[b] for b in row[:5]) for row in order]
    name = lambda xs: [LABELS[x] for x in xs]  # UNKNOWN (-1) -> "unknown"
    return pd.DataFrame({
        "image_id": results["image_id"],
        "true_breed": name(results["label"]),
        "zero_shot_caption": results["zero_shot"]["captions"],
        "fine_tuned_caption": results["fine_tuned"]["captions"],
        "zero_shot_breed": name(metrics["zero_shot"]["_pred"]),
        "fine_tuned_breed": name(metrics["fine_tuned"]["_pred"]),
        "zero_shot_likelihood_top5": top5(metrics["zero_shot"]["_order"]),
        "fine_tuned_likelihood_top5": top5(metrics["fine_tuned"]["_order"]),
    })


def failures_frame(results: dict, metrics: dict):
    """Every wrong caption prediction of either model, worst first (true breed ranked lowest by likelihood)."""
    import pandas as pd

    rows = []
    for model_name in MODELS:
        m = metrics[model_name]
        for i in np.flatnonzero(~m["_correct"]):
            t, order = results["label"][i], m["_order"][i]
            scores = results[model_name]["scores"][i]
            rows.append({"model": model_name, "image_id": results["image_id"][i], "true_breed": BREED_NAMES[t],
                         "caption": results[model_name]["captions"][i], "predicted_breed": LABELS[m["_pred"][i]],
                         "likelihood_top1": BREED_NAMES[order[0]], "true_breed_rank": int(np.flatnonzero(order == t)[0]) + 1,
                         "margin": float(scores[order[0]] - scores[t]), "_index": int(i)})
    columns = ["model", "image_id", "true_breed", "caption", "predicted_breed", "likelihood_top1", "true_breed_rank", "margin", "_index"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["model", "true_breed_rank", "margin"], ascending=[False, False, False], kind="stable")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix, title: str, path: str) -> None:
    import seaborn as sns

    plt = _plt()
    annot = np.where(matrix > 0, matrix.astype(str), "")
    fig, ax = plt.subplots(figsize=(15, 13))
    sns.heatmap(matrix, annot=annot, fmt="", cmap="Blues", xticklabels=LABELS, yticklabels=LABELS, cbar_kws={"label": "images"},
                linewidths=0.3, linecolor="#eeeeee", annot_kws={"fontsize": 7}, ax=ax)
    ax.set(xlabel="predicted breed (from the caption)", ylabel="true breed", title=title)
    ax.tick_params(labelsize=8)
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distribution(results, metrics, path: str) -> None:
    plt = _plt()
    counts = {"truth": np.bincount(label_index(results["label"]), minlength=NUM_BREEDS + 1)}
    for name in MODELS:
        counts[name.replace("_", "-")] = np.bincount(label_index(metrics[name]["_pred"]), minlength=NUM_BREEDS + 1)
    y = np.arange(len(LABELS))
    fig, ax = plt.subplots(figsize=(9, 12))
    for k, (name, c) in enumerate(counts.items()):
        ax.barh(y + (k - 1) * 0.27, c, height=0.27, label=name)
    ax.set_yticks(y, LABELS, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="images", title="Breeds named by the captions vs the true breeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_caption_lengths(results, template: str, path: str) -> None:
    plt = _plt()
    lengths = {name.replace("_", "-"): [len(c.split()) for c in results[name]["captions"]] for name in MODELS}
    reference = [len(caption_for(t, template).split()) for t in results["label"]]
    top = max([max(v) for v in lengths.values()] + reference) + 1
    fig, ax = plt.subplots(figsize=(8, 4))
    bins = np.arange(0, top + 1) - 0.5
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.6, label=name)
    ax.axvline(np.mean(reference), color="black", linestyle="--", label="reference (mean)")
    ax.set(xlabel="caption length (words)", ylabel="images", title="Caption lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_breed_accuracy(metrics, path: str) -> None:
    plt = _plt()
    breeds = [b for b, v in metrics["fine_tuned"]["per_breed"].items() if v["support"] > 0]
    y = np.arange(len(breeds))
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(breeds) + 1.5))
    for k, name in enumerate(MODELS):
        per = metrics[name]["per_breed"]
        ax.barh(y + (k - 0.5) * 0.4, [per.get(b, {}).get("recall", 0.0) for b in breeds], height=0.4, label=name.replace("_", "-"))
    ax.set_yticks(y, breeds, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="breed accuracy (recall of the breed named in the caption)", xlim=(0, 1.02), title="Per-breed accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_failures(results, failures, path: str, limit: int = 16) -> None:
    """Image grid of the fine-tuned model's worst failures: true breed, caption, predicted breed under each."""
    import textwrap

    plt = _plt()
    worst = failures[failures["model"] == "fine_tuned"].head(limit)
    if worst.empty:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "The fine-tuned model named every breed correctly.", ha="center", va="center")
    else:
        cols = min(4, len(worst))
        rows = (len(worst) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(max(3.6 * cols, 6.0), 4.3 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (_, row) in zip(axes.flat, worst.iterrows()):
            ax.imshow(load_image(results["record"][row["_index"]]))
            caption = "\n".join(textwrap.wrap(row["caption"], 34)[:3])
            ax.set_title(f"true: {row['true_breed']}\npredicted: {row['predicted_breed']}", fontsize=9)
            ax.text(0.5, -0.03, f'"{caption}"\nlikelihood rank of true breed: {row["true_breed_rank"]}', transform=ax.transAxes,
                    ha="center", va="top", fontsize=8)
        fig.suptitle("Worst failures, fine-tuned model\n(true breed ranked lowest by likelihood first)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


FIGURES = {
    "confusion_fine_tuned.png": "Confusion matrix, fine-tuned (rows: true breed; columns: breed named in the caption)",
    "confusion_zero_shot.png": "Confusion matrix, zero-shot",
    "per_breed_accuracy.png": "Per-breed accuracy of both models",
    "breed_distribution.png": "Breeds named by the captions vs the true breeds",
    "caption_lengths.png": "Caption length distributions",
    "failures.png": "Worst failures of the fine-tuned model",
}


def write_figures(results, metrics, failures, template: str, out: str) -> None:
    for name in MODELS:
        title = f"{name.replace('_', '-')}: true vs predicted breed ({metrics['num_samples']} images)"
        plot_confusion(confusion(results["label"], metrics[name]["_pred"]), title, os.path.join(out, f"confusion_{name}.png"))
    plot_per_breed_accuracy(metrics, os.path.join(out, "per_breed_accuracy.png"))
    plot_distribution(results, metrics, os.path.join(out, "breed_distribution.png"))
    plot_caption_lengths(results, template, os.path.join(out, "caption_lengths.png"))
    plot_failures(results, failures, os.path.join(out, "failures.png"))


def write_report(path: str, metrics: dict, info: dict) -> None:
    zs, ft = metrics["zero_shot"], metrics["fine_tuned"]
    rows = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in key_table(metrics))
    mc, mr = metrics["mcnemar_caption"], metrics["mcnemar_likelihood_top1"]
    pairs = "\n".join(f"| {p['true']} | {p['predicted']} | {p['count']} |" for p in ft["confused_pairs"]) or "| - | - | 0 |"
    per_breed = "\n".join(
        f"| {b} | {v['support']} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {zs['per_breed'].get(b, {}).get('recall', 0.0):.3f} |"
        for b, v in ft["per_breed"].items())
    figures = "\n\n".join(f"### {caption}\n\n![{caption}]({name})" for name, caption in FIGURES.items())
    text = f"""# Evaluation: fine-tuned BLIP + LoRA vs zero-shot BLIP

- adapter `{info['adapter']}` on base model `{info['base_model']}`
- data `{info['dataset']}`, split **{info['split']}**: {metrics['num_samples']} images ({info['num_bad_images']} unreadable, skipped)
- captions: {info['decoding']}; reference caption: "{info['template']}"
- {info['runtime_seconds']:.1f} s ({info['images_per_second']:.2f} images/s on {info['device']}); image embeddings shared between the models: {info['shared_image_embeddings']}

## Key numbers

Brackets: 95% bootstrap confidence intervals ({info['bootstrap_samples']} resamples of the images).

| metric | zero-shot | fine-tuned |
|---|---|---|
{rows}

**McNemar** (same images, exact test on the discordant pairs): by caption, the fine-tuned model alone is right on
{mc['only_second_correct']} images and the zero-shot model alone on {mc['only_first_correct']} (p = {mc['p_value']:.3g});
by likelihood top-1, {mr['only_second_correct']} vs {mr['only_first_correct']} (p = {mr['p_value']:.3g}).

The **likelihood ranking** scores the templated caption of each of the 37 breeds under the model given
the image and ranks the breeds by it, so it names a breed for every image; it is the fair zero-shot
baseline, because zero-shot captions rarely name a breed at all. The score is the summed log-probability of
the caption's tokens; the per-token row divides it by the number of tokens, which matters when a model is
unsure of every token (then long breed names lose to short ones).

## Most confused breed pairs (fine-tuned captions)

| true breed | named in caption | images |
|---|---|---|
{pairs}

## Per breed (fine-tuned captions; recall is the per-breed accuracy)

| breed | images | precision | recall | F1 | zero-shot recall |
|---|---|---|---|---|---|
{per_breed}

Every wrong prediction is in `failures.csv`; every image in `predictions.csv`.

## Figures

{figures}
"""
    with open(path, "w") as f:
        f.write(text)


def print_summary(metrics: dict, out: str) -> None:
    table = [("metric", "zero-shot", "fine-tuned")] + key_table(metrics)
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    print(f"\nEvaluation on {metrics['num_samples']} images")
    print(line(table[0]))
    print("  ".join("-" * w for w in widths))
    for r in table[1:]:
        print(line(r))
    mc = metrics["mcnemar_caption"]
    print(f"McNemar (captions): fine-tuned alone right {mc['only_second_correct']}, zero-shot alone right "
          f"{mc['only_first_correct']}, p = {mc['p_value']:.3g}")
    print(f"Report: {os.path.join(out, 'report.md')}")


# ---------------------------------------------------------------------------


def main(argv=None):
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # several CPU processes (torchrun): accelerate joins them into one group only when told it is on
        # CPU; otherwise each process believed it was alone, evaluated every image and wrote the outputs
        PartialState(cpu=True)
    cfg, args = parse_args(argv)
    if PartialState().is_main_process:
        with locked_output_dir(args.output_dir):  # a second evaluation into this folder gets one line, not a mix
            return _evaluate(cfg, args)
    return _evaluate(cfg, args)


def _evaluate(cfg, args):
    set_seed(args.seed)
    # One process, or the group that torchrun / accelerate launch started: each takes every
    # n-th image, the main process gathers the predictions and writes the outputs.
    state = PartialState()
    device = state.device if state.num_processes > 1 else pick_device()
    dtype = pick_dtype(device, cfg.precision)
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)

    records = load_splits(cfg.dataset, *adapter_split_settings(args.adapter, cfg, args.split, args.seed))[args.split]
    records = subsample(records, cfg.max_eval_samples, args.seed)
    if not records:
        raise UserError(f"{cfg.dataset!r} has no images in split {args.split!r}")
    logger.info("data: %d %s images from %s", len(records), args.split, cfg.dataset)

    zero_shot = load_base_model(cfg.model_name_or_path, dtype=dtype)
    fine_tuned, processor = load_lora_for_inference(args.adapter, cfg.model_name_or_path, dtype=dtype, device=device,
                                                    loaded_base=zero_shot)  # merged into a copy: loaded once
    zero_shot = zero_shot.to(device).eval()
    models = {"zero_shot": zero_shot, "fine_tuned": fine_tuned}
    # LoRA on query,value (or the demo's key,dense) leaves the vision encoder as it was: embed each image once
    shared = same_vision_encoder(zero_shot, fine_tuned)
    logger.info("vision encoders %s: image embeddings %s", "identical" if shared else "differ",
                "shared by both models" if shared else "computed per model")

    start = time.perf_counter()
    shard = records[state.process_index::state.num_processes]
    if args.per_device_eval_batch_size is None:  # captions are launch-bound on a GPU: big batches
        args.per_device_eval_batch_size = 256 if device.type == "cuda" else 32
    results, bad = predict(models, processor, shard, cfg, args.per_device_eval_batch_size, shared,
                           show_progress=state.is_main_process)
    if state.num_processes > 1:
        results, bad = merge_shards(gather_object([(drop_records(results), bad)]), records)
        if not state.is_main_process:
            return None
    seconds = time.perf_counter() - start
    report_bad_images(bad)
    if not results["label"]:
        raise UserError("no readable image to evaluate (see the warning above)")

    metrics = compute_metrics(results, cfg.caption_template, args.bootstrap_samples, args.seed)
    info = {
        "adapter": args.adapter, "base_model": cfg.model_name_or_path, "dataset": cfg.dataset, "split": args.split,
        "num_bad_images": len(bad), "bad_images": sorted(bad), "template": cfg.caption_template,
        "decoding": f"{'greedy' if cfg.num_beams == 1 else f'beam search ({cfg.num_beams} beams)'}, up to {cfg.max_new_tokens} new tokens",
        "shared_image_embeddings": shared, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "runtime_seconds": seconds, "images_per_second": len(results["label"]) / seconds,
        "bootstrap_samples": args.bootstrap_samples,
    }

    out = args.output_dir
    with staged_outputs(out) as tmp:  # a full disk or a kill leaves the previous results whole
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump({**public(metrics), **info}, f, indent=2)
        predictions_frame(results, metrics).to_csv(os.path.join(tmp, "predictions.csv"), index=False)
        failures = failures_frame(results, metrics)
        failures.drop(columns="_index").to_csv(os.path.join(tmp, "failures.csv"), index=False)
        write_figures(results, metrics, failures, cfg.caption_template, tmp)
        write_report(os.path.join(tmp, "report.md"), metrics, info)
        save_run_config(os.path.join(tmp, "run_config.json"), cfg, args)
    print_summary(metrics, out)
    return {"output_dir": out, "metrics": metrics, "results": results, "info": info}


if __name__ == "__main__":
    run_main(main)
