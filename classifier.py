"""The classifier a practitioner would train instead of a captioner: an image encoder with LoRA and a linear head.

BLIP's own vision encoder (blip_backbone), or any transformers image classifier (load_backbone), gets LoRA in its
attention and a new linear head over the label set; both train with cross-entropy on the training split, the epoch
is chosen on the validation split, and the test images are scored (run_classifier). The trained LoRA + head
weights are cached as safetensors, keyed by everything that determines them (cache_key), so a second evaluation
of the same adapter does not train again.

The budget matches the captioner's: r=64 on BLIP's fused vision `qkv` is 12 x 64 x (768 + 2304) = 2,359,296 LoRA
parameters at base size, as many as r=32 on the text decoder's query,value; the head adds hidden x classes + classes.
"""

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import torch

from config import CLASSIFIER_DEFAULT
from data import pixel_batches
from devices import autocast_for, rng_fork_args
from run_io import UserError, atomic_path, folder_model_type, is_local, load_baseline_model, write_json_atomic

logger = logging.getLogger(__name__)

BACKBONE_DEFAULT = CLASSIFIER_DEFAULT
CACHE_VERSION = 1  # bump when training changes what the same settings produce: older cached weights are not read
# LoRA's places in an attention block, by the names transformers gives its projections (first match wins)
ATTENTION_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("qkv",))


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything besides the data and the frozen weights that determines the trained classifier."""

    lora_r: int = 64  # on BLIP's fused qkv: the captioner's LoRA budget (module docstring)
    lora_alpha: int = 128  # alpha / r = 2, the captioner's scale (r=32, alpha=64)
    lora_dropout: float = 0.05
    # One rate for LoRA and the fresh head: AdamW scales each parameter's step by its own gradient's size, so the
    # head is not starved as under SGD; PEFT's image-classification example and the VTAB-1k LoRA recipes train
    # both at one rate (1e-3 there, with AdamW)
    learning_rate: float = 1e-3
    weight_decay: float = 0.01  # the captioner's (config.TrainConfig)
    warmup_ratio: float = 0.05  # linear warm-up then linear decay, the captioner's Trainer schedule
    max_grad_norm: float = 1.0  # the captioner's (Trainer's default)
    epochs: int = 10
    batch_size: int = 32
    seed: int = 42


@dataclass
class Backbone:
    """A frozen image encoder and a new head: `net(pixel_values)` gives (batch, num_classes) logits."""

    name: str  # what reports call it
    net: torch.nn.Module  # its head is the module named `classifier`
    image_processor: Any
    target_modules: tuple  # the attention projections LoRA goes into
    fingerprint: str  # changes when the frozen weights or the preprocessing do

    @property
    def num_classes(self) -> int:
        return _head_linears(self.net)[-1].out_features


@dataclass
class TrainedClassifier:
    """A trained LoRA classifier (`net`, PEFT-wrapped) and what its training measured."""

    net: torch.nn.Module
    best_epoch: int
    validation_accuracy: list  # per epoch, the first epoch's first; [] without validation images
    train_seconds: float  # all of it: decoding and preprocessing the images once, the epochs, the validations
    train_images: int
    validation_images: int
    bad_images: dict  # {image_id: reason} of the unreadable training and validation images, left out
    trainable_parameters: dict


@dataclass
class ClassifierResult:
    """run_classifier's answer; `summary()` is what a metrics file holds."""

    pred: np.ndarray  # (n,) class index per test record, -1 where the image is unreadable
    logits: np.ndarray  # (n, num_classes) float32, NaN rows where the image is unreadable
    best_epoch: int
    validation_accuracy: list
    train_seconds: float
    images_per_second: float  # on the test images: decoding, preprocessing and the forward pass
    trainable_parameters: dict  # {"lora", "head", "total"}
    settings: dict
    backbone: str
    train_images: int
    validation_images: int
    bad_images: dict = field(default_factory=dict)  # {image_id: reason}, training, validation and test
    cached: bool = False  # the weights came from the cache (train_seconds is then the original training's)
    key: str = ""

    def summary(self) -> dict:
        """Everything but the per-image arrays, JSON-ready (bad_images as a sorted list of image ids)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("pred", "logits")}
        out["bad_images"] = sorted(self.bad_images)
        return out


# ---------------------------------------------------------------------------
# Backbones


class BlipVisionClassifier(torch.nn.Module):
    """A linear head on BLIP's pooled image feature (pooler_output: the post-layernormed CLS token)."""

    def __init__(self, vision_model: torch.nn.Module, num_classes: int):
        super().__init__()
        self.vision_model = vision_model
        self.classifier = torch.nn.Linear(vision_model.config.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.vision_model(pixel_values=pixel_values).pooler_output)


class LogitsOf(torch.nn.Module):
    """A transformers image classifier that returns its logits alone, as BlipVisionClassifier does."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def blip_backbone(model, processor, num_classes: int, fingerprint: Optional[str] = None) -> Backbone:
    """BLIP's vision encoder (a copy: `model` stays as it is) with a new head over `num_classes` classes.
    fingerprint: vision_fingerprint(model, processor), when the caller has it already."""
    from embedding_cache import vision_fingerprint
    from model import set_vision_attention

    vision = set_vision_attention(copy.deepcopy(model.vision_model), "sdpa")  # same outputs as eager, faster
    with torch.random.fork_rng(devices=[]):  # the head is initialised again, seeded, when trained
        net = BlipVisionClassifier(vision, num_classes)
    return Backbone(
        "BLIP vision encoder",
        net,
        processor.image_processor,
        ("qkv",),
        fingerprint or vision_fingerprint(model, processor),
    )


def check_backbone_option(name: str) -> None:
    """Fail at parse time (one line) for a --classifier_model folder that is missing or holds no image classifier."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if name.lower() == "none":
        return
    if os.path.isdir(name):
        if folder_model_type(name) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            raise UserError(
                f"--classifier_model {name!r} holds no image classifier (a config.json whose model_type "
                f"AutoModelForImageClassification loads); pass such a folder, a Hub id such as {BACKBONE_DEFAULT}, "
                "or none"
            )
    elif is_local(name):
        raise UserError(f"--classifier_model folder {name!r} does not exist; pass an image-classifier folder or none")


def load_backbone(name: str, num_classes: int) -> Optional[Backbone]:
    """An AutoModelForImageClassification folder or Hub id with a new `num_classes` head, or None with one warning
    when the default cannot be reached offline. Any other failure is one UserError line."""
    from transformers import AutoModelForImageClassification

    # From its module: transformers 5.9's top-level name asks for torchvision, which the Pil processors do not need
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    check_backbone_option(name)
    if name.lower() == "none":
        return None
    labels = {i: str(i) for i in range(num_classes)}

    def load(**kwargs):
        image_processor = AutoImageProcessor.from_pretrained(name, **kwargs)
        with torch.random.fork_rng(devices=[]):  # the replaced head's random initialisation
            model = AutoModelForImageClassification.from_pretrained(
                name,
                num_labels=num_classes,
                id2label=labels,
                label2id={v: k for k, v in labels.items()},
                ignore_mismatched_sizes=True,  # a new head of num_classes rows in place of the checkpoint's
                dtype=torch.float32,
                **kwargs,
            )
        return model, image_processor

    loaded = load_baseline_model(name, BACKBONE_DEFAULT, "image classifier", "--classifier_model", load)
    if loaded is None:
        return None
    model, image_processor = loaded
    if not isinstance(getattr(model, "classifier", None), torch.nn.Module) or not _head_linears(model):
        raise UserError(f"{name!r} has no linear head named `classifier` to replace; pass another image classifier")
    linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = next((t for t in ATTENTION_TARGETS if set(t) <= linears), None)
    if targets is None:
        raise UserError(f"{name!r} has no attention projections ({ATTENTION_TARGETS}) for LoRA; pass a transformer")
    from embedding_cache import tensors_fingerprint

    body = {k: t for k, t in model.state_dict().items() if not k.startswith("classifier.")}  # the head is made anew
    fingerprint = tensors_fingerprint(
        body, model.config.to_json_string(), json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    )
    return Backbone(name, LogitsOf(model), image_processor, targets, fingerprint)


def _head_linears(net: torch.nn.Module) -> list:
    head = net.classifier if hasattr(net, "classifier") else net.model.classifier
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear)]


# ---------------------------------------------------------------------------
# LoRA, training, prediction


def add_lora(net: torch.nn.Module, target_modules, settings: ClassifierSettings) -> torch.nn.Module:
    """PEFT's image-classification recipe: LoRA on the attention projections, the head trained in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(target_modules),
        modules_to_save=["classifier"],
        bias="none",
    )
    return get_peft_model(net, config)


def trainable_parameters(net: torch.nn.Module) -> dict:
    """{"lora", "head", "total"}: trainable parameters of a PEFT-wrapped classifier."""
    lora = sum(p.numel() for n, p in net.named_parameters() if p.requires_grad and "lora_" in n)
    total = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"lora": lora, "head": total - lora, "total": total}


def trained_weights(net: torch.nn.Module) -> dict:
    """{name: tensor on the CPU} of the trainable parameters: all that training changes."""
    return {n: p.detach().to("cpu", copy=True) for n, p in net.named_parameters() if p.requires_grad}


def _build(backbone: Backbone, settings: ClassifierSettings, device, dtype) -> torch.nn.Module:
    """A fresh copy of the backbone with the head initialised from the current RNG and LoRA added, in fp32; for
    bfloat16 or float16 (autocast) its frozen linears are stored in that dtype, which autocast would cast them to
    at every step."""
    from model import cast_frozen_linears

    net = copy.deepcopy(backbone.net).float()
    for linear in _head_linears(net):  # transformers' initialisation of a new head
        torch.nn.init.normal_(linear.weight, std=0.02)
        torch.nn.init.zeros_(linear.bias)
    net = add_lora(net, backbone.target_modules, settings).to(device)
    if dtype in (torch.bfloat16, torch.float16):
        cast_frozen_linears(net, dtype)
    return net


def pixel_tensor(records: list, image_processor, batch_size: int):
    """(pixel_values float16 (n, 3, H, W), labels (n,), {image_id: reason}) of the readable records, in order.

    Decoded and preprocessed once for every epoch. float16 halves the memory (3,680 images at 384 px: 3.3 GB,
    not 6.5); its rounding (under 0.002 here) is far below the step of an 8-bit image after normalisation (~0.015).
    """
    batches, bad = pixel_batches(records, image_processor, batch_size)
    pixels, labels = [], []
    for batch, px in batches:
        pixels.append(px.half())
        labels += [r.label for r in batch]
    if not pixels:
        return None, torch.zeros(0, dtype=torch.long), bad
    return torch.cat(pixels), torch.tensor(labels, dtype=torch.long), bad


@torch.no_grad()
def logits_of(net, pixels: torch.Tensor, batch_size: int, device, dtype) -> torch.Tensor:
    """(n, num_classes) float32 logits on the CPU, in eval mode (no LoRA dropout)."""
    net.eval()
    out = []
    with autocast_for(device, dtype):
        for start in range(0, len(pixels), batch_size):
            out.append(net(pixels[start : start + batch_size].to(device, torch.float32)).float().cpu())
    return torch.cat(out)


def accuracy(net, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int, device, dtype) -> float:
    return int((logits_of(net, pixels, batch_size, device, dtype).argmax(1) == labels).sum()) / len(labels)


def train_classifier(
    backbone: Backbone,
    train: list,
    validation: list,
    settings: ClassifierSettings = ClassifierSettings(),
    device="cpu",
    dtype: torch.dtype = torch.float32,
) -> TrainedClassifier:
    """Train LoRA + head on `train` for settings.epochs; keep the epoch of the best validation accuracy (ties: the
    earlier; without validation images, the last). Seeded; the caller's random state is left as it was.

    dtype: bfloat16 or float16 trains under autocast (frozen linears stored in it, LoRA and head in fp32).
    ValueError when the training images hold fewer than two classes or a label outside the head's classes.
    """
    from transformers import get_linear_schedule_with_warmup

    device = torch.device(device)
    start = time.perf_counter()
    for name, records in (("training", train), ("validation", validation)):
        outside = sorted({r.label for r in records if not 0 <= r.label < backbone.num_classes})
        if outside:
            raise ValueError(f"{name} labels {outside[:5]} lie outside the {backbone.num_classes} classes")
    train_x, train_y, bad = pixel_tensor(train, backbone.image_processor, settings.batch_size)
    val_x, val_y, val_bad = pixel_tensor(validation, backbone.image_processor, settings.batch_size)
    if len(set(train_y.tolist())) < 2:
        raise ValueError(f"the training images hold {len(set(train_y.tolist()))} class(es); a classifier needs two")
    steps_per_epoch = -(-len(train_y) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    with torch.random.fork_rng(**rng_fork_args(device)):
        torch.manual_seed(settings.seed)  # the head's and LoRA's initialisation, LoRA's dropout
        net = _build(backbone, settings, device, dtype)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        schedule = get_linear_schedule_with_warmup(optimizer, round(settings.warmup_ratio * total_steps), total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        order = torch.Generator().manual_seed(settings.seed)
        accuracies, best, best_weights = [], None, None
        for epoch in range(1, settings.epochs + 1):
            net.train()
            losses = []
            for idx in torch.randperm(len(train_y), generator=order).split(settings.batch_size):
                x, y = train_x[idx].to(device, torch.float32), train_y[idx].to(device)
                with autocast_for(device, dtype):
                    logits = net(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                losses.append(loss.detach())
            loss = float(torch.stack(losses).mean())
            if not np.isfinite(loss):
                raise ValueError(f"the classifier's training loss is {loss} in epoch {epoch}; lower its learning rate")
            if len(val_y):
                accuracies.append(accuracy(net, val_x, val_y, settings.batch_size, device, dtype))
                if best is None or accuracies[-1] > accuracies[best - 1]:
                    best, best_weights = epoch, trained_weights(net)
            logger.info(
                "LoRA classifier epoch %d/%d: training loss %.4f%s",
                epoch,
                settings.epochs,
                loss,
                f", validation accuracy {accuracies[-1]:.4f}" if accuracies else "",
            )
    if best is None:
        logger.warning("LoRA classifier: no readable validation image, so the last epoch is kept")
        best = settings.epochs
    else:
        net.load_state_dict(best_weights, strict=False)
    return TrainedClassifier(
        net.eval(),
        best,
        accuracies,
        time.perf_counter() - start,
        len(train_y),
        len(val_y),
        {**bad, **val_bad},
        trainable_parameters(net),
    )


@torch.no_grad()
def predict(trained: TrainedClassifier, image_processor, records: list, batch_size: int, device="cpu", dtype=None):
    """(pred (n,) with -1 for unreadable images, logits (n, classes) float32 with NaN rows there, images/s, bad).

    The LoRA weights are merged into a copy of the encoder first, as the captioner is merged for inference; the
    images/s covers decoding, preprocessing and the forward pass, as evaluate.py's captioning figure does.
    """
    device = torch.device(device)
    dtype = dtype or torch.float32
    net = copy.deepcopy(trained.net).merge_and_unload().eval()
    if dtype not in (torch.bfloat16, torch.float16):
        net.float()  # trained under autocast, its frozen linears are stored in half precision
    start = time.perf_counter()
    num_classes = _head_linears(net)[-1].out_features
    logits = np.full((len(records), num_classes), np.nan, np.float32)
    where = {id(r): i for i, r in enumerate(records)}
    batches, bad = pixel_batches(records, image_processor, batch_size, device=device)
    with autocast_for(device, dtype):
        for batch, pixels in batches:
            logits[[where[id(r)] for r in batch]] = net(pixels.to(device, torch.float32)).float().cpu().numpy()
    seconds = time.perf_counter() - start
    readable = ~np.isnan(logits).any(1)
    pred = np.where(readable, np.nan_to_num(logits).argmax(1), -1)
    return pred, logits, int(readable.sum()) / seconds if seconds > 0 else float("nan"), bad


# ---------------------------------------------------------------------------
# The cache: trained weights keyed by what determines them


def cache_key(backbone: Backbone, train: list, validation: list, settings: ClassifierSettings) -> str:
    """Changes with the frozen weights and preprocessing, the training and validation images and their labels,
    the number of classes, the settings (the seed among them) and this module's CACHE_VERSION."""
    described = {
        "version": CACHE_VERSION,
        "backbone": backbone.fingerprint,
        "num_classes": backbone.num_classes,
        "settings": asdict(settings),
        "train": [[r.identity, r.label] for r in train],
        "validation": [[r.identity, r.label] for r in validation],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _paths(folder: str, key: str) -> tuple:
    return os.path.join(folder, f"classifier-{key}.safetensors"), os.path.join(folder, f"classifier-{key}.json")


def save_classifier(folder: str, key: str, trained: TrainedClassifier) -> None:
    """The trained LoRA + head weights (safetensors) and what training measured (JSON), each written whole or not
    at all; the JSON, written last, names the key the weights were saved under."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    weights_path, info_path = _paths(folder, key)
    with atomic_path(weights_path, ".classifier-", ".safetensors.tmp") as tmp:
        save_file(trained_weights(trained.net), tmp, metadata={"key": key})
    info = {
        "key": key,
        "best_epoch": trained.best_epoch,
        "validation_accuracy": trained.validation_accuracy,
        "train_seconds": trained.train_seconds,
        "train_images": trained.train_images,
        "validation_images": trained.validation_images,
        "bad_images": trained.bad_images,
        "trainable_parameters": trained.trainable_parameters,
    }
    write_json_atomic(info_path, info, prefix=".classifier-", suffix=".json.tmp", indent=2)


def load_classifier(
    folder: str, key: str, backbone: Backbone, settings: ClassifierSettings, device="cpu", dtype=torch.float32
) -> Optional[TrainedClassifier]:
    """The classifier save_classifier stored under `key`, or None (absent, or unusable: then with a warning)."""
    from safetensors import safe_open

    weights_path, info_path = _paths(folder, key)
    if not (os.path.isfile(weights_path) and os.path.isfile(info_path)):
        return None
    try:
        with open(info_path) as f:
            info = json.load(f)
        with safe_open(weights_path, framework="pt") as f:
            stored_key = (f.metadata() or {}).get("key")
            weights = {name: f.get_tensor(name) for name in f.keys()}
        if info.get("key") != key or stored_key != key:
            raise ValueError("its files were saved under another key")
        with torch.random.fork_rng(**rng_fork_args(torch.device(device))):
            net = _build(backbone, settings, device, dtype)
        expected = {n: tuple(p.shape) for n, p in net.named_parameters() if p.requires_grad}
        if {n: tuple(t.shape) for n, t in weights.items()} != expected:
            raise ValueError("its tensors are not this classifier's")
        if not all(torch.isfinite(t).all() for t in weights.values()):
            raise ValueError("it holds NaN or infinite weights")
        net.load_state_dict(weights, strict=False)
        return TrainedClassifier(
            net.eval(),
            int(info["best_epoch"]),
            list(info["validation_accuracy"]),
            float(info["train_seconds"]),
            int(info["train_images"]),
            int(info["validation_images"]),
            dict(info["bad_images"]),
            trainable_parameters(net),
        )
    except Exception as e:  # truncated or edited files: safetensors, json and torch raise their own types
        logger.warning(
            "cached LoRA classifier %s is unusable (%s: %s): training it again",
            weights_path,
            type(e).__name__,
            str(e)[:150],
        )
        return None


# ---------------------------------------------------------------------------
# All of it, for evaluate.py


def run_classifier(
    backbone: Backbone,
    train: list,
    validation: list,
    test: list,
    settings: ClassifierSettings = ClassifierSettings(),
    device="cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Optional[str] = None,
    retrain: bool = False,
    eval_batch_size: Optional[int] = None,
) -> ClassifierResult:
    """Train (or load from `cache_dir`) the LoRA classifier on train/validation and score `test`.

    retrain=True trains even when `cache_dir` holds this classifier (and replaces it there).
    """
    key = cache_key(backbone, train, validation, settings)
    trained = (
        None if cache_dir is None or retrain else load_classifier(cache_dir, key, backbone, settings, device, dtype)
    )
    cached = trained is not None
    if trained is None:
        trained = train_classifier(backbone, train, validation, settings, device, dtype)
        if cache_dir is not None:
            save_classifier(cache_dir, key, trained)
    else:
        logger.info(
            "LoRA classifier %s loaded from %s (trained before: epoch %d kept)", key, cache_dir, trained.best_epoch
        )
    pred, logits, images_per_second, bad = predict(
        trained, backbone.image_processor, test, eval_batch_size or settings.batch_size, device, dtype
    )
    return ClassifierResult(
        pred=pred,
        logits=logits,
        best_epoch=trained.best_epoch,
        validation_accuracy=trained.validation_accuracy,
        train_seconds=trained.train_seconds,
        images_per_second=images_per_second,
        trainable_parameters=trained.trainable_parameters,
        settings=asdict(settings),
        backbone=backbone.name,
        train_images=trained.train_images,
        validation_images=trained.validation_images,
        bad_images={**trained.bad_images, **bad},
        cached=cached,
        key=key,
    )
