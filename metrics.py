"""Evaluation metrics: plain functions of labels and captions, tested on hand-made sets.

compute_metrics(Predictions, LabelSet) -> Metrics: per-model accuracy with bootstrap intervals, group accuracy
(species for pets), likelihood ranking, per-class scores, confused pairs, BLEU, ROUGE-L, and McNemar tests
between the two models. metrics.json keeps the keys it has for pets ("breed_accuracy", "per_breed", ...)
for every label set, so that whatever reads one run's numbers reads every run's.
"""

from dataclasses import dataclass, field

import numpy as np

from labels import UNKNOWN, LabelSet

MODELS = ("zero_shot", "fine_tuned")  # the keys of every output: metrics.json, predictions.csv, attention_metrics.json
# evaluate.py's baselines: their keys in metrics.json (and a sweep's summary), and what the reports call them
BASELINES = {
    "linear_probe": "linear probe on frozen BLIP image features",
    "lora_classifier": "LoRA classifier on BLIP's vision encoder (r=64 on qkv, linear head)",
    "hub_classifier": "LoRA classifier on an image classifier backbone",
    "clip_zero_shot": "CLIP zero-shot",
}


def display(model_key: str) -> str:
    """How a model key reads in figures and reports: zero_shot -> zero-shot."""
    return model_key.replace("_", "-")


def matrix_labels(labels: LabelSet) -> list:
    """The confusion matrix's rows and columns: every class, then "unknown" (captions naming none) last."""
    return list(labels.names) + ["unknown"]


def label_index(predicted, num_classes: int) -> list:
    """Positions in matrix_labels: a class's own index, UNKNOWN (-1) -> the last one."""
    return [num_classes if x == UNKNOWN else int(x) for x in predicted]


def bootstrap_ci(correct, samples: int = 1000, seed: int = 42, level: float = 0.95) -> list:
    """Percentile bootstrap interval of the mean of a 0/1 vector."""
    correct = np.asarray(correct, dtype=float)
    if len(correct) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(samples, len(correct)))].mean(axis=1)
    return [float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))]


def format_ci(value: float, interval) -> str:
    """A number with its interval, as every report writes it: 0.912 [0.894, 0.929]."""
    lo, hi = interval
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def mcnemar(a_correct, b_correct) -> dict:
    """Exact McNemar test (two-sided binomial on the discordant pairs) of model b against model a."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_b, n, 0.5).pvalue)
    return {"only_first_correct": only_a, "only_second_correct": only_b, "p_value": p, "test": "exact binomial"}


def confused_pairs(truth, pred, names, k: int = 10) -> list:
    """The k most frequent (true class, predicted class) mistakes; captions naming no class are not pairs."""
    counts = {}
    for t, p in zip(truth, pred):
        if p != t and p != UNKNOWN:
            counts[(t, p)] = counts.get((t, p), 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], names[item[0][0]], names[item[0][1]]))
    return [{"true": names[t], "predicted": names[p], "count": c} for (t, p), c in ranked[:k]]


def per_class_scores(truth, pred, names) -> dict:
    """Precision, recall (= per-class accuracy), F1 and support of each class that occurs in truth or predictions."""
    from sklearn.metrics import precision_recall_fscore_support

    present = sorted({int(x) for x in truth} | {int(x) for x in pred} - {UNKNOWN})
    p, r, f, s = precision_recall_fscore_support(truth, pred, labels=present, zero_division=0)
    return {
        names[c]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(present)
    }


def confusion(truth, pred, num_classes: int):
    """(N + 1) x (N + 1) counts: rows true class, columns the class the caption names, last row/column 'unknown'."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(
        label_index(truth, num_classes), label_index(pred, num_classes), labels=list(range(num_classes + 1))
    )


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


@dataclass
class ModelPredictions:
    """One model's outputs on the evaluated images, in image order."""

    captions: list
    scores: np.ndarray  # (images, classes): log-likelihood of each class's templated caption


@dataclass
class Predictions:
    """Both models' outputs on the evaluated images (evaluate.predict and merge_shards)."""

    image_id: list
    label: list
    models: dict  # MODELS name -> ModelPredictions
    candidate_tokens: np.ndarray  # tokens scored per class's caption, for the per-token ranking
    records: list = field(default_factory=list)  # for the failure figure; not gathered across processes


@dataclass
class ModelMetrics:
    """model_metrics' result: the numbers for metrics.json, and the per-image arrays behind the tables and figures."""

    numbers: dict
    pred: np.ndarray  # the class each caption names, UNKNOWN if none
    correct: np.ndarray  # pred == label
    top1: np.ndarray  # the likelihood ranking's first class is right
    order: np.ndarray  # (images, classes): classes by likelihood, best first


@dataclass
class Metrics:
    """compute_metrics' result: metrics.json's numbers (without the run's info) and each model's ModelMetrics."""

    numbers: dict
    models: dict  # MODELS name -> ModelMetrics


def model_metrics(
    labels: LabelSet, truth, captions, scores, template, samples, seed, candidate_tokens=None
) -> ModelMetrics:
    """Every number for one model: caption accuracy, group, unknown and empty shares, ranking, per class, BLEU,
    ROUGE-L.

    The ranking uses the summed log-likelihood of each class's caption; with candidate_tokens it is also
    reported per token (mean log-likelihood), which does not favour classes with short names when the
    model is unsure (the tiny demo model spreads its probability thinly over the vocabulary).
    """
    truth = np.asarray(truth)
    pred = labels.from_captions(captions)
    correct = pred == truth
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == truth
    top5 = (order[:, :5] == truth[:, None]).any(axis=1)
    references = [labels.caption(t, template) for t in truth]
    f1 = per_class_scores(truth, pred, labels.names)
    tokens = np.ones(scores.shape[1]) if candidate_tokens is None else np.asarray(candidate_tokens, float)
    per_token_first = np.argmax(scores / tokens, axis=1)
    top1_per_token = per_token_first == truth
    numbers = {"breed_accuracy": float(correct.mean()), "breed_accuracy_ci95": bootstrap_ci(correct, samples, seed)}
    if labels.groups:  # "species_accuracy" for pets
        group_ok = np.array([labels.group_from_caption(c) == labels.group_of(t) for c, t in zip(captions, truth)])
        numbers[f"{labels.group_kind}_accuracy"] = float(group_ok.mean())
        numbers[f"{labels.group_kind}_accuracy_ci95"] = bootstrap_ci(group_ok, samples, seed)
    numbers |= {
        "no_breed_rate": float((pred == UNKNOWN).mean()),
        "empty_caption_rate": float(np.mean([not c.strip() for c in captions])) if len(captions) else 0.0,
        "likelihood_top1": float(top1.mean()),
        "likelihood_top1_ci95": bootstrap_ci(top1, samples, seed),
        "likelihood_top5": float(top5.mean()),
        "likelihood_top1_per_token": float(top1_per_token.mean()),
        # does the ranking's first class match the class the caption names (none named: no)? The app draws a
        # ranking next to the caption: the one that agrees more often is the one to show
        "ranking_agrees_with_caption": float((order[:, 0] == pred).mean()),
        "ranking_agrees_with_caption_per_token": float((per_token_first == pred).mean()),
        "macro_f1": float(np.mean([v["f1"] for v in f1.values()])) if f1 else 0.0,
        "bleu": bleu(captions, references),
        "rougeL": rouge_l(captions, references),
        "mean_caption_words": float(np.mean([len(c.split()) for c in captions])),
        "confused_pairs": confused_pairs(truth, pred, labels.names),
        "per_breed": f1,
    }
    return ModelMetrics(numbers, pred, correct, top1, order)


def compute_metrics(
    predictions: Predictions, labels: LabelSet, template: str, samples: int = 1000, seed: int = 42
) -> Metrics:
    models = {
        name: model_metrics(
            labels,
            predictions.label,
            predictions.models[name].captions,
            predictions.models[name].scores,
            template,
            samples,
            seed,
            predictions.candidate_tokens,
        )
        for name in MODELS
    }
    zs, ft = models["zero_shot"], models["fine_tuned"]
    numbers = {
        "num_samples": len(predictions.label),
        **{name: m.numbers for name, m in models.items()},
        "mcnemar_caption": mcnemar(zs.correct, ft.correct),
        "mcnemar_likelihood_top1": mcnemar(zs.top1, ft.top1),
    }
    return Metrics(numbers, models)
