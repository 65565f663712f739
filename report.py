"""evaluate.py's outputs besides metrics.json: tables, predictions/failures frames, figures, report.md.

The text says what the label set calls its classes ("breed" for pets); the CSV columns keep their pets names
(true_breed, ...) for every label set, as metrics.json's keys do.
"""

import os

import numpy as np

from baselines import report_section, summary_lines
from data import load_image
from figures import figure
from labels import LabelSet
from metrics import BASELINES, MODELS, Metrics, Predictions, confusion, display, format_ci, label_index, matrix_labels

# A confusion matrix of more classes than this is drawn for its most confused classes only (the whole one
# goes to a CSV file): 200 rows of labels and counts would be unreadable
MAX_MATRIX_CLASSES = 40


def key_rows(labels: LabelSet) -> list:
    """(label, metrics.json key, format) of the key-numbers table, in the words of `labels`."""
    kind = labels.kind
    group = (
        [("species accuracy (cat/dog)" if labels.is_pets else f"{labels.group_kind} accuracy",
          f"{labels.group_kind}_accuracy", "ci")]
        if labels.groups
        else []
    )  # fmt: skip
    return [
        (f"{kind} accuracy (caption names the {kind})", "breed_accuracy", "ci"),
        *group,
        (f"captions naming no {kind}", "no_breed_rate", "f"),
        ("empty captions", "empty_caption_rate", "f"),
        ("likelihood ranking top-1", "likelihood_top1", "ci"),
        ("likelihood ranking top-5", "likelihood_top5", "f"),
        ("likelihood ranking top-1, per-token mean", "likelihood_top1_per_token", "f"),
        (f"ranking top-1 = {kind} the caption names", "ranking_agrees_with_caption", "f"),
        ("the same, per-token ranking", "ranking_agrees_with_caption_per_token", "f"),
        (f"macro F1 over {labels.plural} (captions)", "macro_f1", "f"),
        ("BLEU (0-100)", "bleu", "f1"),
        ("ROUGE-L F", "rougeL", "f"),
        ("mean caption length (words)", "mean_caption_words", "f1"),
    ]


def _fmt(m: dict, key: str, kind: str) -> str:
    if kind == "ci":
        return format_ci(m[key], m[key + "_ci95"])
    return f"{m[key]:.1f}" if kind == "f1" else f"{m[key]:.3f}"


def key_table(metrics: Metrics, labels: LabelSet) -> list:
    zs, ft = metrics.numbers["zero_shot"], metrics.numbers["fine_tuned"]
    return [(label, _fmt(zs, key, kind), _fmt(ft, key, kind)) for label, key, kind in key_rows(labels)]


def predictions_frame(predictions: Predictions, metrics: Metrics, labels: LabelSet):
    import pandas as pd

    names = matrix_labels(labels)

    def top5(order):
        return ["|".join(names[b] for b in row[:5]) for row in order]

    def name(classes):
        return [names[x] for x in classes]  # UNKNOWN (-1) -> "unknown"

    return pd.DataFrame(
        {
            "image_id": predictions.image_id,
            "true_breed": name(predictions.label),
            "zero_shot_caption": predictions.models["zero_shot"].captions,
            "fine_tuned_caption": predictions.models["fine_tuned"].captions,
            "zero_shot_breed": name(metrics.models["zero_shot"].pred),
            "fine_tuned_breed": name(metrics.models["fine_tuned"].pred),
            "zero_shot_likelihood_top5": top5(metrics.models["zero_shot"].order),
            "fine_tuned_likelihood_top5": top5(metrics.models["fine_tuned"].order),
        }
    )


def failures_frame(predictions: Predictions, metrics: Metrics, labels: LabelSet):
    """Every wrong caption prediction of either model, worst first (true class ranked lowest by likelihood)."""
    import pandas as pd

    names = matrix_labels(labels)
    rows = []
    for model_name in MODELS:
        m, p = metrics.models[model_name], predictions.models[model_name]
        for i in np.flatnonzero(~m.correct):
            t, order, scores = predictions.label[i], m.order[i], p.scores[i]
            rows.append(
                {
                    "model": model_name,
                    "image_id": predictions.image_id[i],
                    "true_breed": names[t],
                    "caption": p.captions[i],
                    "predicted_breed": names[m.pred[i]],
                    "likelihood_top1": names[order[0]],
                    "true_breed_rank": int(np.flatnonzero(order == t)[0]) + 1,
                    "margin": float(scores[order[0]] - scores[t]),
                    "_index": int(i),
                }
            )
    columns = [
        "model",
        "image_id",
        "true_breed",
        "caption",
        "predicted_breed",
        "likelihood_top1",
        "true_breed_rank",
        "margin",
        "_index",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["model", "true_breed_rank", "margin"], ascending=[False, False, False], kind="stable")


def most_confused(matrix, keep: int) -> list:
    """Indices of the `keep` classes with the most mistakes (as the true class or as the one named), in their
    order, and the "unknown" column last: the part of a big confusion matrix worth drawing."""
    errors = matrix.sum(0) + matrix.sum(1) - 2 * np.diag(matrix)
    classes = len(matrix) - 1
    chosen = sorted(np.argsort(-errors[:classes], kind="stable")[:keep].tolist())
    return chosen + [classes]


def plot_confusion(matrix, names: list, title: str, path: str, kind: str = "breed") -> None:
    import seaborn as sns
    from seaborn.utils import relative_luminance

    side = min(15, 4 + 0.3 * len(names))
    with figure(path, figsize=(side, side - 2)) as (fig, ax):
        mesh = sns.heatmap(
            matrix,
            cmap="Blues",
            xticklabels=names,
            yticklabels=names,
            cbar_kws={"label": "images"},
            linewidths=0.3,
            linecolor="#eeeeee",
            ax=ax,
        ).collections[0]
        # Counts written only where there are any, in seaborn's contrasting colour: its own annotation
        # makes a text for each of the 1,444 cells, empty ones too, most of the figure's time
        for row, col in zip(*np.nonzero(matrix)):
            dark = relative_luminance(mesh.cmap(mesh.norm(matrix[row, col]))) <= 0.408
            ax.text(
                col + 0.5,
                row + 0.5,
                str(matrix[row, col]),
                ha="center",
                va="center",
                fontsize=7,
                color="w" if dark else ".15",
            )
        ax.set(xlabel=f"predicted {kind} (from the caption)", ylabel=f"true {kind}", title=title)
        ax.tick_params(labelsize=8)
        for label in ax.get_xticklabels():
            label.set(rotation=60, ha="right", rotation_mode="anchor")


def plot_distribution(predictions: Predictions, metrics: Metrics, labels: LabelSet, path: str) -> None:
    n, names = len(labels), matrix_labels(labels)
    counts = {"truth": np.bincount(label_index(predictions.label, n), minlength=n + 1)}
    for name in MODELS:
        counts[display(name)] = np.bincount(label_index(metrics.models[name].pred, n), minlength=n + 1)
    y = np.arange(len(names))
    with figure(path, figsize=(9, max(12, 0.3 * len(names)))) as (fig, ax):
        for k, (name, c) in enumerate(counts.items()):
            ax.barh(y + (k - 1) * 0.27, c, height=0.27, label=name)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="images", title=f"{labels.plural.title()} named by the captions vs the true {labels.plural}")
        ax.legend()


def plot_caption_lengths(predictions: Predictions, labels: LabelSet, template: str, path: str) -> None:
    lengths = {name.replace("_", "-"): [len(c.split()) for c in predictions.models[name].captions] for name in MODELS}
    reference = [len(labels.caption(t, template).split()) for t in predictions.label]
    top = max([max(v) for v in lengths.values()] + reference) + 1
    bins = np.arange(0, top + 1) - 0.5
    with figure(path, figsize=(8, 4)) as (fig, ax):
        for name, values in lengths.items():
            ax.hist(values, bins=bins, alpha=0.6, label=name)
        ax.axvline(np.mean(reference), color="black", linestyle="--", label="reference (mean)")
        ax.set(xlabel="caption length (words)", ylabel="images", title="Caption lengths")
        ax.legend()


def plot_per_class_accuracy(metrics, kind: str, path: str) -> None:
    breeds = [b for b, v in metrics.numbers["fine_tuned"]["per_breed"].items() if v["support"] > 0]
    y = np.arange(len(breeds))
    with figure(path, figsize=(8, 0.3 * len(breeds) + 1.5)) as (fig, ax):
        for k, name in enumerate(MODELS):
            per = metrics.numbers[name]["per_breed"]
            ax.barh(
                y + (k - 0.5) * 0.4,
                [per.get(b, {}).get("recall", 0.0) for b in breeds],
                height=0.4,
                label=name.replace("_", "-"),
            )
        ax.set_yticks(y, breeds, fontsize=8)
        ax.invert_yaxis()
        ax.set(
            xlabel=f"{kind} accuracy (recall of the {kind} named in the caption)",
            xlim=(0, 1.02),
            title=f"Per-{kind} accuracy",
        )
        ax.legend(loc="lower right")


def plot_failures(predictions: Predictions, failures, path: str, kind: str = "breed", limit: int = 16) -> None:
    """Image grid of the fine-tuned model's worst failures: true class, caption, predicted class under each."""
    import textwrap

    worst = failures[failures["model"] == "fine_tuned"].head(limit)
    if worst.empty:
        with figure(path, dpi=100, figsize=(6, 2)) as (fig, ax):
            ax.axis("off")
            ax.text(0.5, 0.5, f"The fine-tuned model named every {kind} correctly.", ha="center", va="center")
        return
    cols = min(4, len(worst))
    rows = (len(worst) + cols - 1) // cols
    with figure(path, dpi=100, nrows=rows, ncols=cols, figsize=(max(3.6 * cols, 6.0), 4.3 * rows), squeeze=False) as (
        fig,
        axes,
    ):
        for ax in axes.flat:
            ax.axis("off")
        for ax, (_, row) in zip(axes.flat, worst.iterrows()):
            ax.imshow(load_image(predictions.records[row["_index"]]))
            caption = "\n".join(textwrap.wrap(row["caption"], 34)[:3])
            ax.set_title(f"true: {row['true_breed']}\npredicted: {row['predicted_breed']}", fontsize=9)
            ax.text(
                0.5,
                -0.03,
                f'"{caption}"\nlikelihood rank of true {kind}: {row["true_breed_rank"]}',
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=8,
            )
        fig.suptitle(f"Worst failures, fine-tuned model\n(true {kind} ranked lowest by likelihood first)", fontsize=11)


def figure_captions(labels: LabelSet) -> dict:
    """{file name: caption} of write_figures' figures, in the words of the label set."""
    kind = labels.kind
    return {
        "confusion_fine_tuned.png": f"Confusion matrix, fine-tuned (rows: true {kind}; columns: {kind} named in the "
        "caption)",
        "confusion_zero_shot.png": "Confusion matrix, zero-shot",
        "per_breed_accuracy.png": f"Per-{kind} accuracy of both models",
        "breed_distribution.png": f"{labels.plural.title()} named by the captions vs the true {labels.plural}",
        "caption_lengths.png": "Caption length distributions",
        "failures.png": "Worst failures of the fine-tuned model",
    }


def write_figures(
    predictions: Predictions, metrics: Metrics, failures, labels: LabelSet, template: str, out: str
) -> list:
    """The figures of figure_captions, and the full confusion matrices as CSV where the figure shows a part;
    returns the CSV files' names."""
    import pandas as pd

    kind, names, written = labels.kind, matrix_labels(labels), []
    for name in MODELS:
        matrix = confusion(predictions.label, metrics.models[name].pred, len(labels))
        title = f"{display(name)}: true vs predicted {kind} ({metrics.numbers['num_samples']} images)"
        shown = list(range(len(names)))
        if len(labels) > MAX_MATRIX_CLASSES:
            frame = pd.DataFrame(matrix, index=names, columns=names)
            frame.to_csv(os.path.join(out, f"confusion_{name}.csv"))
            written.append(f"confusion_{name}.csv")
            shown = most_confused(matrix, MAX_MATRIX_CLASSES)
            title += f", the {MAX_MATRIX_CLASSES} most confused {labels.plural} of {len(labels)}"
        plot_confusion(
            matrix[np.ix_(shown, shown)], [names[i] for i in shown], title, os.path.join(out, f"confusion_{name}.png"),
            kind,
        )  # fmt: skip
    plot_per_class_accuracy(metrics, kind, os.path.join(out, "per_breed_accuracy.png"))
    plot_distribution(predictions, metrics, labels, os.path.join(out, "breed_distribution.png"))
    plot_caption_lengths(predictions, labels, template, os.path.join(out, "caption_lengths.png"))
    plot_failures(predictions, failures, os.path.join(out, "failures.png"), kind)
    return written


def write_report(path: str, metrics: Metrics, info: dict, labels: LabelSet, tables: list = ()) -> None:
    """report.md; `tables`: the CSV files write_figures wrote beside it."""
    numbers = metrics.numbers
    zs, ft = numbers["zero_shot"], numbers["fine_tuned"]
    kind, n = labels.kind, len(labels)
    rows = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in key_table(metrics, labels))
    mc, mr = numbers["mcnemar_caption"], numbers["mcnemar_likelihood_top1"]
    pairs = (
        "\n".join(f"| {p['true']} | {p['predicted']} | {p['count']} |" for p in ft["confused_pairs"]) or "| - | - | 0 |"
    )
    per_breed = "\n".join(
        f"| {b} | {v['support']} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | "
        f"{zs['per_breed'].get(b, {}).get('recall', 0.0):.3f} |"
        for b, v in ft["per_breed"].items()
    )
    baselines = (
        report_section(numbers, labels, info)
        if "fine_tuned" in numbers and any(k in numbers for k in BASELINES)
        else ""
    )
    figures = "\n\n".join(f"### {caption}\n\n![{caption}]({name})" for name, caption in figure_captions(labels).items())
    if tables:
        figures += "\n\nThe confusion matrices show their most confused classes; the whole ones: " + ", ".join(
            f"`{t}`" for t in tables
        )
    classes = f"the {n} {labels.plural}"
    text = f"""# Evaluation: fine-tuned BLIP + LoRA vs zero-shot BLIP

- adapter `{info["adapter"]}` ({info["adapter_variant"]}) on base model `{info["base_model"]}`
- data `{info["dataset"]}`, split **{info["split"]}**: {numbers["num_samples"]} images
  ({info["num_bad_images"]} unreadable, skipped)
- captions: {info["decoding"]}; reference caption: "{info["template"]}"
- {info["runtime_seconds"]:.1f} s ({info["images_per_second"]:.2f} images/s on {info["device"]}); image embeddings
  shared between the models: {info["shared_image_embeddings"]}

## Key numbers

Brackets: 95% bootstrap confidence intervals ({info["bootstrap_samples"]} resamples of the images).

| metric | zero-shot | fine-tuned |
|---|---|---|
{rows}

**McNemar** (same images, exact test on the discordant pairs): by caption, the fine-tuned model alone is right on
{mc["only_second_correct"]} images and the zero-shot model alone on {mc["only_first_correct"]}
(p = {mc["p_value"]:.3g}); by likelihood top-1, {mr["only_second_correct"]} vs {mr["only_first_correct"]}
(p = {mr["p_value"]:.3g}).

The **likelihood ranking** scores the templated caption of each of {classes} under the model given
the image and ranks the {labels.plural} by it, so it names a {kind} for every image; it is the fair zero-shot
baseline, because zero-shot captions rarely name a {kind} at all. The score is the summed log-probability of
the caption's tokens; the per-token row divides it by the number of tokens, which matters when a model is
unsure of every token (then long {kind} names lose to short ones).

{baselines}
## Most confused {kind} pairs (fine-tuned captions)

| true {kind} | named in caption | images |
|---|---|---|
{pairs}

## Per {kind} (fine-tuned captions; recall is the per-{kind} accuracy)

| {kind} | images | precision | recall | F1 | zero-shot recall |
|---|---|---|---|---|---|
{per_breed}

Every wrong prediction is in `failures.csv`; every image in `predictions.csv`.

## Figures

{figures}
"""
    with open(path, "w") as f:
        f.write(text)


def print_summary(metrics: Metrics, labels: LabelSet, out: str) -> None:
    table = [("metric", "zero-shot", "fine-tuned")] + key_table(metrics, labels)
    widths = [max(len(r[i]) for r in table) for i in range(3)]

    def line(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths))

    print(f"\nEvaluation on {metrics.numbers['num_samples']} images")
    print(line(table[0]))
    print("  ".join("-" * w for w in widths))
    for r in table[1:]:
        print(line(r))
    mc = metrics.numbers["mcnemar_caption"]
    print(
        f"McNemar (captions): fine-tuned alone right {mc['only_second_correct']}, zero-shot alone right "
        f"{mc['only_first_correct']}, p = {mc['p_value']:.3g}"
    )
    for line in summary_lines(metrics.numbers):
        print(line)
    print(f"Report: {os.path.join(out, 'report.md')}")
