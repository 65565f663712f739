"""Evaluation metrics: plain functions of labels and captions, tested on hand-made sets.

compute_metrics(Predictions) -> Metrics: per-model accuracy with bootstrap intervals, species, likelihood ranking,
per-breed scores, confused pairs, BLEU, ROUGE-L, and McNemar tests between the two models.
"""

from dataclasses import dataclass, field

import numpy as np

from breeds import BREED_NAMES, NUM_BREEDS, SPECIES, UNKNOWN, breed_from_caption, caption_for, species_from_caption

MODELS = ("zero_shot", "fine_tuned")  # the keys of every output: metrics.json, predictions.csv, attention_metrics.json


def display(model_key: str) -> str:
    """How a model key reads in figures and reports: zero_shot -> zero-shot."""
    return model_key.replace("_", "-")


LABELS = BREED_NAMES + ["unknown"]  # confusion-matrix order; UNKNOWN (-1) is the last column


def label_index(labels) -> list:
    """Positions in LABELS: a breed's own index, UNKNOWN (-1) -> the last one."""
    return [NUM_BREEDS if x == UNKNOWN else int(x) for x in labels]


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
    return {
        BREED_NAMES[b]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, b in enumerate(labels)
    }


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


@dataclass
class ModelPredictions:
    """One model's outputs on the evaluated images, in image order."""

    captions: list
    scores: np.ndarray  # (images, NUM_BREEDS): log-likelihood of each breed's templated caption


@dataclass
class Predictions:
    """Both models' outputs on the evaluated images (evaluate.predict and merge_shards)."""

    image_id: list
    label: list
    models: dict  # MODELS name -> ModelPredictions
    candidate_tokens: np.ndarray  # tokens scored per breed's caption, for the per-token ranking
    records: list = field(default_factory=list)  # for the failure figure; not gathered across processes


@dataclass
class ModelMetrics:
    """model_metrics' result: the numbers for metrics.json, and the per-image arrays behind the tables and figures."""

    numbers: dict
    pred: np.ndarray  # the breed each caption names, UNKNOWN if none
    correct: np.ndarray  # pred == label
    top1: np.ndarray  # the likelihood ranking's first breed is right
    order: np.ndarray  # (images, NUM_BREEDS): breeds by likelihood, best first


@dataclass
class Metrics:
    """compute_metrics' result: metrics.json's numbers (without the run's info) and each model's ModelMetrics."""

    numbers: dict
    models: dict  # MODELS name -> ModelMetrics


def breeds_named(captions: list) -> np.ndarray:
    """The breed each caption names (class index, UNKNOWN for none): what every breed accuracy here counts."""
    return np.array([breed_from_caption(c) for c in captions], dtype=int)


def model_metrics(labels, captions, scores, template, samples, seed, candidate_tokens=None) -> ModelMetrics:
    """Every number for one model: caption accuracy, species, unknown share, ranking, per breed, BLEU, ROUGE-L.

    The ranking uses the summed log-likelihood of each breed's caption; with candidate_tokens it is also
    reported per token (mean log-likelihood), which does not favour breeds with short names when the
    model is unsure (the tiny demo model spreads its probability thinly over the vocabulary).
    """
    labels = np.asarray(labels)
    pred = breeds_named(captions)
    correct = pred == labels
    species_ok = np.array([species_from_caption(c) == SPECIES[t] for c, t in zip(captions, labels)])
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    references = [caption_for(t, template) for t in labels]
    f1 = per_breed_scores(labels, pred)
    tokens = np.ones(scores.shape[1]) if candidate_tokens is None else np.asarray(candidate_tokens, float)
    per_token_first = np.argmax(scores / tokens, axis=1)
    top1_per_token = per_token_first == labels
    numbers = {
        "breed_accuracy": float(correct.mean()),
        "breed_accuracy_ci95": bootstrap_ci(correct, samples, seed),
        "species_accuracy": float(species_ok.mean()),
        "species_accuracy_ci95": bootstrap_ci(species_ok, samples, seed),
        "no_breed_rate": float((pred == UNKNOWN).mean()),
        "likelihood_top1": float(top1.mean()),
        "likelihood_top1_ci95": bootstrap_ci(top1, samples, seed),
        "likelihood_top5": float(top5.mean()),
        "likelihood_top1_per_token": float(top1_per_token.mean()),
        # does the ranking's first breed match the breed the caption names (none named: no)? The app draws a ranking
        # next to the caption: the one that agrees more often is the one to show
        "ranking_agrees_with_caption": float((order[:, 0] == pred).mean()),
        "ranking_agrees_with_caption_per_token": float((per_token_first == pred).mean()),
        "macro_f1": float(np.mean([v["f1"] for v in f1.values()])) if f1 else 0.0,
        "bleu": bleu(captions, references),
        "rougeL": rouge_l(captions, references),
        "mean_caption_words": float(np.mean([len(c.split()) for c in captions])),
        "confused_pairs": confused_pairs(labels, pred),
        "per_breed": f1,
    }
    return ModelMetrics(numbers, pred, correct, top1, order)


def compute_metrics(predictions: Predictions, template: str, samples: int = 1000, seed: int = 42) -> Metrics:
    labels = predictions.label
    models = {
        name: model_metrics(
            labels,
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
        "num_samples": len(labels),
        **{name: m.numbers for name, m in models.items()},
        "mcnemar_caption": mcnemar(zs.correct, ft.correct),
        "mcnemar_likelihood_top1": mcnemar(zs.top1, ft.top1),
    }
    return Metrics(numbers, models)
