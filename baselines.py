"""The baselines evaluate.py puts next to the fine-tuned captions, on the same images.

- linear probe: multinomial logistic regression on BLIP's frozen, pooled image features (the
  vision encoder's pooler_output: the post-layernormed CLS token) of the training split, its
  regularisation chosen on the validation split. How much of the breed the frozen encoder already
  separates linearly: the cheap, strong reference a practitioner tries first.
- CLIP zero-shot (transformers' CLIPModel): the 37 prompts "a photo of a {breed}, a type of pet."
  against the image, top-1 and mean per-class recall (OpenCLIP's metric for Pets).
- published numbers, for context only (not measured here).

Each gets a 95% bootstrap interval and an exact McNemar test against the fine-tuned captions.
"""

import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from config import CLIP_DEFAULT
from data import pixel_batches
from embedding_cache import EmbeddingCache
from labels import LabelSet
from metrics import BASELINES, bootstrap_ci, format_ci, mcnemar
from run_io import UserError, folder_model_type, is_local, load_baseline_model

logger = logging.getLogger(__name__)

CLIP_PROMPT = "a photo of a {breed}, a type of pet."  # the CLIP paper's prompt for Oxford-IIIT Pet
CLIP_GENERIC_PROMPT = "a photo of a {breed}."  # the CLIP paper's plain prompt, for other label sets


def clip_prompt(labels: LabelSet) -> str:
    return CLIP_PROMPT if labels.is_pets else CLIP_GENERIC_PROMPT


PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strength, on standardised features

# (model, Oxford-IIIT Pet test accuracy %, source): the papers' tables and open_clip's results file
PUBLISHED = [
    ("CLIP ViT-B/32 zero-shot", 87.0, "Radford et al. 2021, Table 11"),
    ("CLIP ViT-B/16 zero-shot", 88.9, "Radford et al. 2021, Table 11"),
    ("CLIP ViT-L/14 zero-shot", 93.5, "Radford et al. 2021, Table 11"),
    ("CLIP ViT-L/14@336 zero-shot", 93.5, "Radford et al. 2021, Table 11"),
    ("CLIP ViT-B/16 linear probe", 93.1, "Radford et al. 2021, Table 10"),
    ("CLIP ViT-L/14 linear probe", 95.1, "Radford et al. 2021, Table 10"),
    ("OpenCLIP DFN ViT-H/14-378 zero-shot (mean per-class recall)", 96.96, "open_clip docs/openclip_results.csv"),
    ("ViT-B/16 (ImageNet-21k), fine-tuned", 93.7, "Dosovitskiy et al. 2021, Table 2 (about)"),
    ("ViT-L/16 (ImageNet-21k), fine-tuned", 94.67, "Dosovitskiy et al. 2021, Table 2"),
    ("ViT-H/14 (JFT-300M), fine-tuned", 97.56, "Dosovitskiy et al. 2021, Table 2"),
]


@dataclass
class Baselines:
    """run_baselines' result: metrics.json's entries and predictions.csv's extra columns."""

    numbers: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Scores shared by every baseline


def mean_per_class_recall(labels, pred) -> float:
    labels, pred = np.asarray(labels), np.asarray(pred)
    return float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)])) if len(labels) else float("nan")


def score(labels, pred, reference_correct, samples: int, seed: int) -> dict:
    """Accuracy with its interval, mean per-class recall, McNemar against `reference_correct` (fine-tuned captions)."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    correct = pred == labels
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci95": bootstrap_ci(correct, samples, seed),
        "mean_per_class_recall": mean_per_class_recall(labels, pred),
        "num_samples": int(len(labels)),
        # first = this baseline, second = the fine-tuned captions
        "mcnemar_vs_fine_tuned_caption": mcnemar(correct, np.asarray(reference_correct, bool)),
    }


# ---------------------------------------------------------------------------
# Linear probe on BLIP's frozen pooled features


def adapter_cache(adapter_run, model, processor, fingerprint=None):
    """The embedding cache train.py filled for this adapter (run_record.AdapterRun says where), or None.
    fingerprint: a function giving vision_fingerprint(model, processor), when the caller has it already."""
    from embedding_cache import vision_fingerprint

    folder = adapter_run.embedding_cache_dir
    if folder is None or not os.path.isdir(folder):
        return None
    # the key hashes the weights as loaded: a model loaded in bf16 has another key than training's fp32 one
    vision = model.config.vision_config
    shape = ((vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)  # CLS + patches, as encoded
    key = fingerprint() if fingerprint else vision_fingerprint(model, processor)
    return EmbeddingCache(folder, key, adapter_run.embedding_cache_dtype, shape)


@torch.no_grad()
def pooled_features(model, image_processor, records: list, batch_size: int, cache=None, desc: str = "features"):
    """(features (n, hidden) float32, positions in `records` they belong to): BLIP's pooler_output per image.

    pooler_output is post_layernorm(last_hidden_state[:, 0]), where last_hidden_state is already
    post-layernormed, so an image in the embedding cache (which stores last_hidden_state) needs only
    that layer norm; the rest go through the vision encoder. Unreadable images are left out.
    """
    from tqdm.auto import tqdm

    param = next(model.vision_model.parameters())
    norm = model.vision_model.post_layernorm
    feats, positions, todo = {}, [], []
    keys = cache.keys(records) if cache is not None else [None] * len(records)
    for i, key in enumerate(keys):
        if key is not None and key in cache.index:
            feats[i] = norm(cache.get(key)[0].to(param.device, param.dtype)).float().cpu()
        else:
            todo.append(i)
    if todo:
        batches, _ = pixel_batches([records[i] for i in todo], image_processor, batch_size, device=param.device)
        where = {id(records[i]): i for i in todo}
        with tqdm(total=len(todo), desc=desc, unit="img") as bar:
            for batch, pixels in batches:
                out = model.vision_model(pixel_values=pixels.to(param.device, param.dtype)).pooler_output.float().cpu()
                for record, row in zip(batch, out):
                    feats[where[id(record)]] = row
                bar.update(len(batch))
    positions = sorted(feats)
    if not positions:
        return np.zeros((0, model.config.vision_config.hidden_size), np.float32), []
    return torch.stack([feats[i] for i in positions]).numpy(), positions


def fit_linear_probe(train_x, train_y, val_x, val_y, cs=PROBE_C) -> dict:
    """Logistic regression (multinomial, L-BFGS) on standardised features; C chosen by validation accuracy.

    Returns the fitted pipeline, the chosen C and the validation accuracy of every C tried (ties go to
    the smaller C, the stronger regularisation). Without validation images C = 1.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(c):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a probe at large C on few images stops at max_iter
            return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(train_x, train_y)

    if len(val_y) == 0:
        return {"model": fit(1.0), "C": 1.0, "validation_accuracy": {}}
    tried = {}
    best = None
    for c in cs:
        model = fit(c)
        tried[c] = float((model.predict(val_x) == np.asarray(val_y)).mean())
        if best is None or tried[c] > tried[best[0]]:
            best = (c, model)
    return {"model": best[1], "C": best[0], "validation_accuracy": {str(c): a for c, a in tried.items()}}


def linear_probe(model, processor, splits: dict, test_records: list, batch_size: int, cache=None) -> dict:
    """The probe's predictions on `test_records`: {"pred": (n,) with -1 for unreadable images, "C", ...}."""
    xs, ys = {}, {}
    for name, records in (("train", splits["train"]), ("validation", splits["validation"]), ("test", test_records)):
        x, positions = pooled_features(
            model, processor.image_processor, records, batch_size, cache, f"probe features, {name}"
        )
        xs[name], ys[name] = x, (np.array([records[i].label for i in positions]), positions)
    train_y = ys["train"][0]
    if len(set(train_y.tolist())) < 2:
        raise ValueError(f"the training split has {len(set(train_y.tolist()))} class(es); a probe needs two or more")
    fitted = fit_linear_probe(xs["train"], train_y, xs["validation"], ys["validation"][0])
    pred = np.full(len(test_records), -1)
    if len(ys["test"][1]):
        pred[ys["test"][1]] = fitted["model"].predict(xs["test"])
    return {
        "pred": pred,
        "C": fitted["C"],
        "validation_accuracy": fitted["validation_accuracy"],
        "train_images": int(len(train_y)),
        "validation_images": int(len(ys["validation"][0])),
    }


# ---------------------------------------------------------------------------
# CLIP zero-shot


def check_clip_option(name: str) -> None:
    """Fail at parse time (one line) for a --clip_model folder that does not exist or holds no CLIP model."""
    if name.lower() == "none":
        return
    if os.path.isdir(name):
        if folder_model_type(name) != "clip":
            raise UserError(
                f'--clip_model {name!r} holds no CLIP model (config.json with model_type "clip"); '
                f"pass a CLIP folder, a Hub id such as {CLIP_DEFAULT}, or none"
            )
    elif is_local(name):
        raise UserError(f"--clip_model folder {name!r} does not exist; pass a CLIP folder, a Hub id, or none")


def load_clip(name: str, device, dtype, labels: LabelSet):
    """(CLIPModel, CLIPProcessor), checked (check_clip); None with one warning when the default model cannot be
    reached offline."""
    from transformers import CLIPModel, CLIPProcessor

    def load(**kwargs):
        processor = CLIPProcessor.from_pretrained(name, **kwargs)
        model, info = CLIPModel.from_pretrained(name, dtype=dtype, output_loading_info=True, **kwargs)
        return model, processor, info

    loaded = load_baseline_model(name, CLIP_DEFAULT, "CLIP model", "--clip_model", load)
    if loaded is None:
        return None
    model, processor, info = loaded
    model = model.to(device).eval()
    check_clip(model, processor, name, labels, info.get("missing_keys") or [])
    return model, processor


@torch.no_grad()
def check_clip(model, processor, name: str, labels: LabelSet, missing_keys=()) -> None:
    """UserError unless the CLIP model is whole and fits its processor, with the checks BLIP's models get: no
    missing weights (transformers fills them with random ones and only logs it), finite weights and logit scale,
    a tokenizer of the model's vocabulary (missing tokenizer files give a tokenizer of a few tokens; a larger one
    gives ids the model has no row for), images of the model's size, and finite logits on a probe."""
    fix = "download it again, or pass --clip_model none"
    missing = sorted(k for k in missing_keys if not k.endswith("position_ids"))
    if missing:
        raise UserError(f"the CLIP model {name!r} lacks {len(missing)} weights (first: {missing[0]}); {fix}")
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"the CLIP model {name!r} has NaN or infinite weights (first: {key}); {fix}")
    if not torch.isfinite(model.logit_scale.float().exp()):
        raise UserError(f"the CLIP model {name!r} has a logit scale of {model.logit_scale.item():g}, whose exp "
                        f"overflows; {fix}")  # fmt: skip
    vocab, tokens = model.config.text_config.vocab_size, len(processor.tokenizer)
    if tokens > vocab or tokens < 0.9 * vocab:
        raise UserError(
            f"the tokenizer of the CLIP model {name!r} has {tokens} tokens and the model {vocab}: its tokenizer "
            f"files are missing or belong to another model; {fix}"
        )
    crop = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size or {}
    side = crop.get("height") or crop.get("shortest_edge")
    if side is not None and side != model.config.vision_config.image_size:
        raise UserError(
            f"the CLIP processor of {name!r} makes {side}px images, the model takes "
            f"{model.config.vision_config.image_size}px; {fix}"
        )
    param = next(model.parameters())
    blank = torch.zeros(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    prompts = [clip_prompt(labels).format(breed=n) for n in labels.names[:8]]
    text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    logits = model(
        input_ids=text["input_ids"].to(param.device),
        attention_mask=text["attention_mask"].to(param.device),
        pixel_values=blank.to(param.device, param.dtype),
    ).logits_per_image
    if not torch.isfinite(logits.float()).all():
        raise UserError(f"the CLIP model {name!r} computes NaN or infinite logits; {fix}")


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4, an output whose pooler_output is projected in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_scores(model, processor, records: list, batch_size: int, labels: LabelSet):
    """(logits (n, classes) float32, positions in `records`): CLIP's image-text logits against each class's prompt."""
    from tqdm.auto import tqdm

    param = next(model.parameters())
    prompt = clip_prompt(labels)
    text = processor.tokenizer([prompt.format(breed=name) for name in labels.names], padding=True, return_tensors="pt")
    text_emb = _features(
        model.get_text_features(
            input_ids=text["input_ids"].to(param.device), attention_mask=text["attention_mask"].to(param.device)
        )
    ).float()
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp().float()
    rows, positions = [], []
    where = {id(r): i for i, r in enumerate(records)}
    batches, _ = pixel_batches(records, processor.image_processor, batch_size, device=param.device)
    with tqdm(total=len(records), desc="CLIP zero-shot", unit="img") as bar:
        for batch, pixels in batches:
            emb = _features(model.get_image_features(pixel_values=pixels.to(param.device, param.dtype))).float()
            rows.append((scale * (emb / emb.norm(dim=-1, keepdim=True)) @ text_emb.T).cpu())
            positions += [where[id(r)] for r in batch]
            bar.update(len(batch))
    logits = torch.cat(rows).numpy() if rows else np.zeros((0, len(labels)), np.float32)
    return logits, positions


# ---------------------------------------------------------------------------
# All of them, for evaluate.py


@dataclass
class LoadedBaselines:
    """The baselines' own models, loaded and checked before any caption is written (load_baselines)."""

    clip: Optional[tuple] = None  # (CLIPModel, CLIPProcessor)
    hub_backbone: Optional[Any] = None  # classifier.Backbone of --classifier_model
    skipped: dict = field(default_factory=dict)  # baseline key -> why it does not run


def load_baselines(args, labels: LabelSet, device, dtype) -> LoadedBaselines:
    """Load and check every baseline model the options ask for, so that a broken one costs seconds, not an
    evaluation: CLIP (check_clip) and the --classifier_model backbone. The linear probe and the classifier on
    BLIP's encoder use the zero-shot model, checked with it."""
    from classifier import load_backbone

    out = LoadedBaselines()
    if args.clip_model.lower() == "none":
        out.skipped["clip_zero_shot"] = "--clip_model none"
    else:
        out.clip = load_clip(args.clip_model, device, dtype, labels)
        if out.clip is None:
            out.skipped["clip_zero_shot"] = f"{args.clip_model} could not be loaded (offline?)"
    trains = args.split == "test"
    if args.classifier_baseline == "none" or args.classifier_model.lower() == "none":
        out.skipped["hub_classifier"] = "--classifier_baseline none" if args.classifier_baseline == "none" else (
            "--classifier_model none"
        )  # fmt: skip
    elif trains:
        out.hub_backbone = load_backbone(args.classifier_model, len(labels))
        if out.hub_backbone is None:
            out.skipped["hub_classifier"] = f"{args.classifier_model} could not be loaded (offline?)"
    return out


def classifier_settings(args, seed: int):
    """The LoRA classifiers' settings from evaluate.py's options; `seed`: the adapter's training seed, so a sweep
    over seeds repeats the classifier over the same seeds."""
    from classifier import ClassifierSettings

    return ClassifierSettings(learning_rate=args.classifier_learning_rate, epochs=args.classifier_epochs, seed=seed)


def run_baselines(
    args, adapter_run, zero_shot, processor, splits, predictions, fine_tuned_correct, device, dtype, loaded=None
) -> Baselines:
    """Every baseline on predictions' images, scored against the fine-tuned captions (fine_tuned_correct)."""
    from classifier import blip_backbone
    from embedding_cache import vision_fingerprint

    # the encoder's weights hashed once, when the probe's cache or the classifier's cache key first needs them
    vision_key = functools.cache(lambda: vision_fingerprint(zero_shot, processor))
    loaded = loaded or LoadedBaselines()
    out = Baselines()
    names = splits.labels.names
    labels = np.asarray(predictions.label)
    records = predictions.records
    batch = args.per_device_eval_batch_size
    test_only = f"trained on train and chosen on validation, so scored on test only (not {args.split})"
    if not args.linear_probe:
        out.numbers["linear_probe"] = {"skipped": "--linear_probe False"}
    elif args.split != "test":
        out.numbers["linear_probe"] = {"skipped": test_only}
    else:
        try:
            probe = linear_probe(
                zero_shot,
                processor,
                splits,
                records,
                batch,
                adapter_cache(adapter_run, zero_shot, processor, vision_key),
            )
        except ValueError as e:
            logger.warning("linear probe skipped: %s", e)
            out.numbers["linear_probe"] = {"skipped": str(e)}
        else:
            out.numbers["linear_probe"] = _scored(probe["pred"], labels, fine_tuned_correct, args)
            out.numbers["linear_probe"].update(
                {k: probe[k] for k in ("C", "validation_accuracy", "train_images", "validation_images")}
            )
            out.columns["linear_probe_breed"] = _names(probe["pred"], names)
    seed = adapter_run.seed if adapter_run.seed is not None else args.seed
    backbones = {"lora_classifier": None, "hub_classifier": loaded.hub_backbone}
    if args.classifier_baseline == "none":
        out.numbers["lora_classifier"] = {"skipped": "--classifier_baseline none"}
    elif args.split != "test":
        out.numbers["lora_classifier"] = {"skipped": test_only}
    else:
        backbones["lora_classifier"] = blip_backbone(zero_shot, processor, len(splits.labels), vision_key())
    for key, backbone in backbones.items():
        if backbone is None:
            if key in loaded.skipped:
                out.numbers[key] = {"skipped": loaded.skipped[key], "model": args.classifier_model}
            continue
        try:
            result = run_classifier_baseline(args, backbone, splits, records, seed, device, dtype)
        except ValueError as e:
            logger.warning("%s skipped: %s", BASELINES[key], e)
            out.numbers[key] = {"skipped": str(e)}
            continue
        out.numbers[key] = {**_scored(result.pred, labels, fine_tuned_correct, args), **result.summary()}
        out.columns[f"{key}_breed"] = _names(result.pred, names)
    if loaded.clip is None:
        out.numbers["clip_zero_shot"] = {"skipped": loaded.skipped.get("clip_zero_shot"), "model": args.clip_model}
    else:
        logits, positions = clip_scores(*loaded.clip, records, batch, splits.labels)
        pred = np.full(len(records), -1)
        pred[positions] = logits.argmax(1)
        out.numbers["clip_zero_shot"] = {
            **_scored(pred, labels, fine_tuned_correct, args),
            "model": args.clip_model,
            "prompt": clip_prompt(splits.labels),
        }
        out.columns["clip_zero_shot_breed"] = _names(pred, names)
    return out


def run_classifier_baseline(args, backbone, splits, records, seed, device, dtype):
    """classifier.run_classifier on the evaluation's images with evaluate.py's options (cached in
    --classifier_cache_dir unless --classifier_baseline retrain)."""
    from classifier import run_classifier

    return run_classifier(
        backbone,
        splits.train,
        splits.validation,
        records,
        classifier_settings(args, seed),
        device,
        dtype,
        cache_dir=args.classifier_cache_dir,
        retrain=args.classifier_baseline == "retrain",
        eval_batch_size=args.per_device_eval_batch_size,
    )


def _scored(pred, labels, fine_tuned_correct, args) -> dict:
    """score() over the images this baseline could read (an image unreadable here is left out of both sides)."""
    ok = pred >= 0
    numbers = score(labels[ok], pred[ok], np.asarray(fine_tuned_correct)[ok], args.bootstrap_samples, args.seed)
    numbers["num_unreadable"] = int((~ok).sum())
    return numbers


def _names(pred, names) -> list:
    return [names[p] if p >= 0 else "unreadable" for p in pred]


# ---------------------------------------------------------------------------
# Report text


def _measured(numbers: dict):
    """(label, the baseline's numbers or None, its reason when skipped) for each baseline that was asked for."""
    for key, label in BASELINES.items():
        b = numbers.get(key)
        if b:
            if key == "hub_classifier":
                label = f"LoRA classifier on {b.get('backbone') or b.get('model')}"
            yield label, (None if "skipped" in b else b), b.get("skipped")


def _costs(numbers: dict, info: Optional[dict]) -> str:
    """What each trained baseline costs beside the captioner: parameters trained, training time, images/s."""
    rows = []
    for key in ("lora_classifier", "hub_classifier"):
        b = numbers.get(key) or {}
        if "accuracy" not in b:
            continue
        trained = f"{b['train_seconds']:.1f} s" + (" (cached: not trained again)" if b.get("cached") else "")
        rows.append(
            f"| {next(label for label, m, _ in _measured({key: b}))} | {b['trainable_parameters']['total']:,} | "
            f"{trained}, epoch {b['best_epoch']} of {b['settings']['epochs']} kept | {b['images_per_second']:.1f} | "
            "a class name |"
        )
    if not rows:
        return ""
    if info:
        rows.insert(
            0,
            f"| fine-tuned BLIP + LoRA (evaluate.py's pass: both models' captions and rankings) | see the model "
            f"card | see the model card | {info['images_per_second']:.1f} | a caption, and where it looked |",
        )
    return (
        "\nWhat each costs (images/s: decoding, preprocessing and the model, on this run's device):\n\n"
        "| method | trained parameters | training | images/s | gives |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def summary_lines(numbers: dict) -> list:
    """One line per baseline for the printed summary."""
    lines = []
    for label, b, skipped in _measured(numbers):
        if b is None:
            lines.append(f"{label}: skipped ({skipped})")
            continue
        mc = b["mcnemar_vs_fine_tuned_caption"]
        lines.append(
            f"{label}: top-1 {format_ci(b['accuracy'], b['accuracy_ci95'])}, mean per-class recall "
            f"{b['mean_per_class_recall']:.3f}; McNemar vs fine-tuned captions: baseline alone right "
            f"{mc['only_first_correct']}, fine-tuned alone {mc['only_second_correct']}, p = {mc['p_value']:.3g}"
        )
    return lines


def report_section(numbers: dict, labels: LabelSet, info: Optional[dict] = None) -> str:
    """The report's "Baselines" section: measured baselines, published numbers (pets), which comparison is fair."""
    ft, kind = numbers["fine_tuned"], labels.kind
    rows = [
        f"| fine-tuned BLIP + LoRA, {kind} named in the caption | "
        f"{format_ci(ft['breed_accuracy'], ft['breed_accuracy_ci95'])} | - | - |"
    ]
    for label, b, skipped in _measured(numbers):
        if b is None:
            rows.append(f"| {label} | skipped: {skipped} | - | - |")
            continue
        mc = b["mcnemar_vs_fine_tuned_caption"]
        rows.append(
            f"| {label} | {format_ci(b['accuracy'], b['accuracy_ci95'])} | {b['mean_per_class_recall']:.3f} | "
            f"{mc['only_first_correct']} vs {mc['only_second_correct']}, p = {mc['p_value']:.3g} |"
        )
    probe = numbers.get("linear_probe", {})
    probe_note = (
        f" The probe's C = {probe['C']:g} was chosen on {probe['validation_images']} validation images "
        f"and fitted on {probe['train_images']} training images."
        if "C" in probe
        else ""
    )
    published = "\n".join(f"| {name} | {acc:.2f} | {source} |" for name, acc, source in PUBLISHED)
    published = (
        f"""
Published Oxford-IIIT Pet numbers, for context (**not measured here**; official test split, 3,669 images;
OpenCLIP scores Pets by mean per-class recall; the CLIP paper's metric for Pets was not verified here):

| model | accuracy (%) | source |
|---|---|---|
{published}
"""
        if labels.is_pets
        else ""
    )
    table = "\n".join(rows)
    classifier = (
        "\n- *Why caption at all, rather than fine-tune a classifier?* The **LoRA classifier**: BLIP's own vision "
        "encoder with LoRA\n  (r=64 on its `qkv`: the captioner's LoRA budget) and a linear head, trained on the same "
        "split, its epoch\n  chosen on the same validation split. It only names a class; the captioner writes a "
        "sentence and shows where\n  it looked."
        if "lora_classifier" in numbers or "hub_classifier" in numbers
        else ""
    )
    trained_on = "Pets" if labels.is_pets else "these classes"
    return f"""## Baselines on the same images

Brackets: 95% bootstrap intervals. McNemar: exact test on the images where exactly one of the two is right
(baseline alone right vs fine-tuned captions alone right).{probe_note}

| method | top-1 accuracy | mean per-class recall | McNemar vs fine-tuned captions |
|---|---|---|---|
{table}

Which comparison answers which question:

- *Is fine-tuning worth it for this captioner?* The zero-shot BLIP **likelihood ranking** above (the same
  model, no training) is the fair reference; zero-shot captions rarely name a {kind} at all, a low bar.
- *Does LoRA teach the decoder more than the frozen encoder already knows?* The **linear probe** on BLIP's own
  frozen pooled image features: same encoder, trained on the same training split.
- *Should one caption at all, rather than classify zero-shot?* **CLIP zero-shot**: a different model,
  no training on {trained_on}; it only names a {kind}, it writes no caption.{classifier}
{_costs(numbers, info)}{published}"""
