"""LoRA fine-tuning of BLIP on Oxford-IIIT Pet, so that captions name the breed.

    python train.py                      # Salesforce/blip-image-captioning-base on timm/oxford-iiit-pet
    python train.py --demo               # offline: tiny BLIP + synthetic pets, about a minute on a CPU
    python train.py --dataset /data/oxford-iiit-pet --num_train_epochs 3 --bf16

Every TrainingArguments flag works. Writes the adapter, processor, model card,
run_config.json, train_history.json and training_curves.png to --output_dir.
"""

import json
import logging
import os
import pickle
import re
import time

import torch
from transformers import Trainer, TrainerCallback, set_seed

from config import (BASE_MODEL, DEFAULT_DATASET, DEMO_TRAIN_OVERRIDES, PetConfig, TrainConfig, UserError,
                    check_seed, inside, is_local, locked_output_dir, parse_config, pick_dtype, run_main, save_run_config,
                    staged_outputs)
from data import (CachedEmbeddingDataset, CaptionCollator, EmbeddingCache, PetCaptionDataset, breed_from_caption,
                  load_splits, longest_caption_tokens, report_bad_images, subsample)
from demo import use_demo_assets
from model import (captions_from_embeddings, cast_frozen_linears, check_fits, check_loaded_keys, create_lora_model,
                   has_vision_lora, image_embeddings, load_base_model, load_processor, save_adapter, vision_fingerprint)

logger = logging.getLogger("train")


def parse_args(argv=None):
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # several CPU processes (torchrun): TrainingArguments sets up (gloo) DDP only when told it is
        # on CPU, and it sets up its devices while parsing, so this must come first
        os.environ["ACCELERATE_USE_CPU"] = "true"
    cfg, args = parse_config((PetConfig, TrainConfig), argv, DEMO_TRAIN_OVERRIDES)
    if cfg.demo:
        use_demo_assets(cfg)
    cfg.model_name_or_path = cfg.model_name_or_path or BASE_MODEL
    cfg.dataset = cfg.dataset or DEFAULT_DATASET
    # Local folders are recorded absolute, so run settings and run_config.json name them from anywhere
    for name in ("model_name_or_path", "dataset"):
        if os.path.isdir(getattr(cfg, name)):
            setattr(cfg, name, os.path.abspath(getattr(cfg, name)))
    check_train_options(cfg, args)
    if args.device.type != "cuda":
        args.dataloader_pin_memory = False  # pinning needs an accelerator; it only warns elsewhere
    # Precision is chosen once: bf16 where the GPU has it, fp16 on other GPUs, fp32 on CPU
    if not (args.bf16 or args.fp16):
        dtype = pick_dtype(args.device, cfg.precision)
        args.bf16, args.fp16 = dtype == torch.bfloat16, dtype == torch.float16
        # TrainingArguments turned the flags into mixed_precision while parsing, and Trainer's autocast
        # follows that alone: without this the step ran in fp32 while validation ran in bf16/fp16
        if args.bf16 or args.fp16:
            args.mixed_precision = "bf16" if args.bf16 else "fp16"
    if args.fp16 and args.device.type == "cpu":
        raise UserError("fp16 (--precision fp16, --fp16) needs a GPU: accelerate has no fp16 loss scaling on a CPU; use bf16 or fp32")
    return cfg, args


def check_train_options(cfg, args) -> None:
    """train.py's own options, before anything heavy loads: one UserError line each."""
    if args.per_device_train_batch_size < 1 or args.per_device_eval_batch_size < 1:
        raise UserError("batch sizes must be at least 1")
    if args.gradient_accumulation_steps < 1:
        raise UserError(f"--gradient_accumulation_steps must be at least 1, not {args.gradient_accumulation_steps}")
    if not args.learning_rate >= 0:  # 0 is allowed: the loss-measurement tests train with it
        raise UserError(f"--learning_rate must be 0 or more, not {args.learning_rate}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"--max_steps must be positive (or -1 to train --num_train_epochs), not {args.max_steps}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise UserError(f"--num_train_epochs must be positive, not {args.num_train_epochs}: it would save an untrained adapter")
    check_seed(args.seed)
    check_report_to(args.report_to)
    if args.cuda_graphs:
        if not graphs_supported(args.device):
            raise UserError(f"--cuda_graphs needs a CUDA GPU (this run is on {args.device.type}); leave it off")
        if args.torch_compile:
            raise UserError("--cuda_graphs and --torch_compile both record the step: pass one of them")
        if args.world_size > 1:
            raise UserError("--cuda_graphs works on one GPU; leave it off under torchrun / accelerate launch")
        if args.gradient_accumulation_steps > 1:
            # the gradients autograd hands over live in the graph's buffers, which the next replay overwrites
            raise UserError("--cuda_graphs cannot accumulate gradients: use a larger --per_device_train_batch_size "
                            "instead of --gradient_accumulation_steps, or leave --cuda_graphs off")
    if os.path.isfile(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir!r} is a file; pass a folder")
    if os.path.isdir(cfg.model_name_or_path) and inside(cfg.model_name_or_path, args.output_dir):
        # the adapter would be saved into the base model's folder, which then loads with it applied
        raise UserError(f"--output_dir {args.output_dir!r} is or contains the base model folder "
                        f"{cfg.model_name_or_path!r}; pass another folder")


def check_report_to(report_to) -> None:
    """--report_to names integrations that are installed: Trainer would fail only after the data and model load."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in (n for n in names if n not in ("none", "all")):
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"--report_to {name}: not an integration Trainer knows; use one of "
                            f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or none)")
        if name not in get_available_reporting_integrations():
            raise UserError(f"--report_to {name}: its package is not installed; `pip install {name}`, "
                            "or leave --report_to out")


# Settings a resumed run must share with the run that wrote the checkpoint (written into each checkpoint)
RUN_SETTINGS_FILE = "pet_run_settings.json"
RESUME_KEYS = {
    "PetConfig": ("model_name_or_path", "dataset", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                  "caption_template", "val_fraction", "max_train_samples", "max_eval_samples"),
    "TrainConfig": ("seed", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type",
                    "use_embedding_cache"),
}


def run_settings(cfg, args) -> dict:
    values = {k: getattr(obj, k) for obj, keys in ((cfg, RESUME_KEYS["PetConfig"]), (args, RESUME_KEYS["TrainConfig"]))
              for k in keys}
    return {k: getattr(v, "value", v) for k, v in values.items()}  # enums (lr_scheduler_type) as their names


class PetTrainer(Trainer):
    """Trainer whose evaluation adds the breed accuracy of greedy captions on the validation split."""

    def __init__(self, *a, processor, pet_config, **kw):
        super().__init__(*a, **kw)
        self.processor, self.pet_config = processor, pet_config
        self.unchecked_losses = []  # (step, loss) not yet checked for NaN/inf
        self.seconds_outside_loop = 0.0  # per-epoch validation and checkpoints, for the timing line
        self.add_callback(FiniteLossCheck(self))
        self.graphed_loss = GraphedLoss(self.model.get_base_model(), autocast_dtype(self.args)) if self.args.cuda_graphs else None

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        # The run settings go in first, so a checkpoint is never resumed by a run with other settings;
        # trainer_state.json, written last by Trainer, still marks the checkpoint complete.
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, RUN_SETTINGS_FILE), "w") as f:
                json.dump(run_settings(self.pet_config, self.args), f, indent=2, default=str)
        super()._save_checkpoint(model, trial)
        self.seconds_outside_loop += time.perf_counter() - start

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = None
        if (self.graphed_loss is not None and model.training and not return_outputs and self.label_smoother is None
                and self.compute_loss_func is None):
            out = self.graphed_loss(inputs)  # None for a batch of another shape (the last one): eager
        if out is None:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        # Checking the loss reads it back from the device, which waits for the step to finish: on a
        # GPU the host could not queue the next step meanwhile. So there the losses are checked in
        # one read before anything is logged, evaluated or saved (FiniteLossCheck); on a CPU at once.
        # a copy: compiled with CUDA graphs (--torch_compile_mode reduce-overhead) the loss lives in the
        # graph's output buffer, which the next step overwrites (and torch refuses to read afterwards)
        self.unchecked_losses.append((self.state.global_step, loss.detach().clone()))
        if loss.device.type == "cpu":
            self.check_losses()
        return out

    def check_losses(self):
        """UserError naming the first step whose loss was NaN or infinite, among those not checked yet."""
        if not self.unchecked_losses:
            return
        steps, losses = zip(*self.unchecked_losses)
        self.unchecked_losses = []
        values = torch.stack([v.float().reshape(()) for v in losses]).cpu()
        bad = torch.nonzero(~torch.isfinite(values))
        if len(bad):
            k = int(bad[0])
            hint = " fp16 overflows easily: try --bf16 or --precision fp32." if self.args.fp16 else ""
            raise UserError(f"the loss became {values[k].item()} at step {steps[k]}; stopped without saving an "
                            f"adapter.{hint} A lower --learning_rate may help.")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        key = f"{metric_key_prefix}_breed_accuracy"
        metrics[key] = self.breed_accuracy(eval_dataset or self.eval_dataset)
        self.log({key: metrics[key]})
        self.seconds_outside_loop += time.perf_counter() - start
        return metrics

    @torch.no_grad()
    def breed_accuracy(self, dataset) -> float:
        model = self.model.eval()
        def collate(items):
            items = [it for it in items if it is not None]
            return self.data_collator(items), [it["label"] for it in items]

        # each process captions every n-th image; the counts are summed over processes below
        world, rank = self.args.world_size, self.args.process_index
        shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
        loader = torch.utils.data.DataLoader(shard, batch_size=self.args.per_device_eval_batch_size, collate_fn=collate)
        correct = total = 0
        for batch, truth in loader:
            with autocast(self.args):
                if "image_embeds" in batch:
                    embeds = batch["image_embeds"].to(self.args.device, model.text_decoder.dtype)
                else:
                    embeds = image_embeddings(model, batch["pixel_values"].to(self.args.device))
                captions = captions_from_embeddings(model, self.processor, embeds, self.pet_config.max_new_tokens)
            correct += sum(breed_from_caption(c) == t for c, t in zip(captions, truth))
            total += len(truth)
        if world > 1:
            counts = torch.tensor([correct, total], dtype=torch.float64, device=self.args.device)
            torch.distributed.all_reduce(counts)
            correct, total = counts.tolist()
        if total == 0:  # an accuracy of 0.000 would be a wrong number, not a result
            raise UserError("no validation image could be read (see the warnings above); check the data set")
        return correct / total


class _LossOf(torch.nn.Module):
    """The model's training loss as a function of tensors only, in its own autocast (no weight cache)."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, image_embeds, input_ids, attention_mask, labels):
        with torch.autocast(image_embeds.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            return self.model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                              labels=labels).loss


def graphs_supported(device) -> bool:
    """Can --cuda_graphs record the training step on `device`? (torch.cuda.make_graphed_callables: CUDA only)."""
    return device.type == "cuda"


def record_graphs(module, sample_args):
    """`module`'s forward and backward recorded as CUDA graphs on `sample_args`; a callable that replays them."""
    return torch.cuda.make_graphed_callables(module, sample_args)


class GraphedLoss:
    """--cuda_graphs: the training loss's forward and backward each replayed as one CUDA graph.

    On a GPU the eager step is launch-bound: ~1,760 kernel launches from Python for 10.6 ms of GPU
    work (H100, batch 16). torch.cuda.make_graphed_callables records the forward and the backward
    once, on the first batch (after three warm-up passes that leave the gradients alone), and
    replays each as a single launch; no compilation, unlike torch.compile. Batches of another shape
    (the epoch's last, partial one) run eagerly; the collator pads every batch to one length. The
    optimizer, clipping and scheduler stay Trainer's. Cached image embeddings only, and no gradient
    accumulation (autograd hands over the gradients in the graph's own buffers, which the next replay
    overwrites; Trainer sets them to None after each optimizer step). If recording fails (an
    operation a graph cannot hold), or the first replay does not give the eager step's loss and
    LoRA gradients (check), one warning and every step runs eagerly.
    """

    KEYS = ("image_embeds", "input_ids", "attention_mask", "labels")
    # Relative difference allowed between the first replay and an eager step, for the loss and for the
    # LoRA gradients (as one vector), by autocast dtype. Replay and eager run the same kernels, so they
    # can differ only by rounding (another reduction order, another cuBLAS algorithm). Measured on the
    # CPU at the first LoRA step of the base-sized decoder (benchmarks/graph_check_tolerance.py,
    # results/cpu-2cores-graph-check.json): the batch reordered moves the gradients by 4e-6 in bf16
    # (2e-7 in fp32); bf16 against fp32, every rounding at bf16's size, the most rounding can do, by
    # 8.2e-3; one other LoRA dropout mask (p=0.05) by 0.09. bf16's bound sits 3.7x above that rounding
    # gap and 3x below that mask error. fp16 rounds 8x finer (3 more mantissa bits); fp32 gets fp16's
    # bound as well, since with --tf32 its matmuls keep 10 mantissa bits, as fp16 does.
    TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 5e-3}

    def __init__(self, model, dtype):
        # model: the PeftModel's base, not accelerate's autocast-wrapped forward. Two wrappers of it:
        # the recorder replaces the forward of the one it records, the other stays eager for the check
        self.eager, self.recorded = _LossOf(model, dtype), _LossOf(model, dtype)
        self.tolerance = self.TOLERANCE[dtype]
        self.replay = None
        self.shapes = None  # the input shapes the graphs were recorded for
        self.checked = False
        self.failed = False

    def __call__(self, inputs: dict):
        """The loss through the graphs, or None where they do not apply to this batch."""
        if self.failed:
            return None
        if set(inputs) != set(self.KEYS):  # pixels (LoRA in the vision encoder, or --use_embedding_cache False)
            return self._eager_from_now("--cuda_graphs applies to cached image embeddings only: the training step runs eagerly")
        args = tuple(inputs[k] for k in self.KEYS)
        shapes = [tuple(a.shape) for a in args]
        if self.replay is None:
            # Recorded on another batch of the same shapes (the images negated, every row the first row's
            # caption), so the checked replay (of this batch) shows whether a replay reads its own inputs.
            # Forked RNG: the warm-up passes draw dropout masks, and the run's random stream stays eager's.
            sample = (-args[0], *(a[:1].expand_as(a).clone() for a in args[1:]))
            try:
                # autocast off: the recorder refuses autocast's weight cache
                with torch.autocast(args[0].device.type, enabled=False), torch.random.fork_rng(**_rng_fork(args[0].device)):
                    self.replay = record_graphs(self.recorded, sample)
            except Exception as e:
                return self._eager_from_now("--cuda_graphs: recording the training step failed (%s: %s); it runs eagerly",
                                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.shapes = shapes
        if shapes != self.shapes:
            return None
        if not self.checked:
            self.checked = True
            if not self.check(args):
                return None
        return self.replay(*args)

    def _eager_from_now(self, message, *args):
        self.failed = True
        logger.warning(message, *args)
        return None

    def check(self, args) -> bool:
        """Do the replayed graphs give the eager step's loss and LoRA gradients on this batch (within tolerance)?

        Both run from the step's own RNG state, forked (torch.random.fork_rng) and put back after
        each, so they draw the same LoRA dropout masks as each other and as the step that follows:
        the run's random stream, and so its results, are the same as without the check. Dropout
        stays on because the graphs were recorded in training mode, and a wrong mask is one of the
        things to catch. Gradients come from torch.autograd.grad, which leaves .grad alone, and no
        optimizer step is taken here. Cost, once per run: one eager forward and backward and one
        replay. If they differ: one warning, and this step and every later one run eagerly.
        """
        params = [p for p in self.eager.parameters() if p.requires_grad]
        results = []
        for loss_of in (self.replay, self.eager):
            with torch.random.fork_rng(**_rng_fork(args[0].device)):
                loss = loss_of(*args)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                # copies: the replay's outputs live in the graph's buffers, which the next replay overwrites
                results.append((loss.detach().float().clone(),
                                torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten()
                                           for g, p in zip(grads, params)])))
        (loss, grads), (eager_loss, eager_grads) = results
        loss_diff, grad_diff = relative_difference(loss, eager_loss), relative_difference(grads, eager_grads)
        name = str(self.eager.dtype).removeprefix("torch.")
        if loss_diff <= self.tolerance and grad_diff <= self.tolerance:
            logger.info("self-check passed: --cuda_graphs' first replayed step matches the eager step (relative "
                        "difference: loss %.2g, LoRA gradients %.2g; tolerance %g in %s)", loss_diff, grad_diff,
                        self.tolerance, name)
            return True
        self._eager_from_now("self-check: --cuda_graphs' first replayed step differs from the eager step (relative "
                             "difference: loss %.2g, LoRA gradients %.2g; tolerance %g in %s): the training step runs "
                             "eagerly", loss_diff, grad_diff, self.tolerance, name)
        return False


def _rng_fork(device) -> dict:
    """torch.random.fork_rng's arguments for the CPU's and `device`'s random state."""
    if device.type != "cuda":
        return {"devices": []}  # the CPU's state is always forked
    return {"devices": [device.index if device.index is not None else torch.cuda.current_device()], "device_type": "cuda"}


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """|value - reference| / |reference| (vector norms); inf where either is not finite."""
    difference = (value - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float32).tiny)
    return float(difference) if torch.isfinite(difference) else float("inf")


class FiniteLossCheck(TrainerCallback):
    """Runs PetTrainer.check_losses before each log, evaluation and checkpoint, and at the end,
    so a diverged run still stops before it saves anything."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self.trainer.check_losses()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.check_losses()


def history_from_logs(log_history: list) -> dict:
    train = [{k: e[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in e} for e in log_history if "loss" in e]
    evals = {}
    for e in log_history:
        for k, v in e.items():
            if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"):
                evals.setdefault(e["step"], {"step": e["step"], "epoch": e.get("epoch")})[k[5:]] = v
    return {"train": train, "validation": [evals[s] for s in sorted(evals)]}


def plot_curves(history: dict, path: str, label_smoothing: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    train, val = history["train"], history["validation"]
    ax_loss.plot([e["epoch"] for e in train], [e["loss"] for e in train], label="train loss", alpha=0.8)
    ax_loss.plot([e["epoch"] for e in val], [e.get("loss") for e in val], "o-", label="validation loss")
    kind = f"cross-entropy, label smoothing {label_smoothing:g}" if label_smoothing else "cross-entropy"
    ax_loss.set(xlabel="epoch", ylabel=f"loss ({kind})", title="Loss")
    ax_loss.legend()
    ax_acc.plot([e["epoch"] for e in val], [e.get("breed_accuracy") for e in val], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="breed accuracy", title="Validation breed accuracy (greedy captions)", ylim=(0, 1.02))
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_metric_name(args) -> str:
    """What state.best_metric measures: "validation breed accuracy" by default, else --metric_for_best_model's."""
    metric = (args.metric_for_best_model or "loss").removeprefix("eval_")
    return f"validation {metric.replace('_', ' ')}"


def card_metadata(cfg, args, best) -> str:
    """The model card's YAML header in the Hub's format (huggingface_hub.ModelCardData)."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset_id = None if is_local(cfg.dataset) else cfg.dataset
    results = [] if best is None else [EvalResult(
        task_type="image-to-text", task_name="Image captioning (breed named in the caption)",
        dataset_type=dataset_id or "oxford-iiit-pet", dataset_name="Oxford-IIIT Pet", dataset_split="validation",
        metric_type=best_metric_name(args).split()[-1], metric_name=best_metric_name(args), metric_value=round(float(best), 4))]
    data = ModelCardData(
        base_model=None if is_local(cfg.model_name_or_path) else cfg.model_name_or_path,
        datasets=[dataset_id] if dataset_id else None, library_name="peft", pipeline_tag="image-to-text",
        tags=["blip", "lora", "image-captioning", "oxford-iiit-pet"],
        model_name=os.path.basename(os.path.normpath(args.output_dir)), eval_results=results or None)
    return data.to_yaml()


def write_model_card(path, cfg, args, splits, history, best, trainable, state):
    rows = "\n".join(
        f"| {e['step']} | {e.get('epoch') or 0:.2f} | {e.get('loss', float('nan')):.4f} | {e.get('breed_accuracy', float('nan')):.3f} |"
        for e in history["validation"]
    )
    length = (f"{state.global_step} optimizer steps (--max_steps {args.max_steps}, {state.epoch or 0:.2f} epochs)"
              if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs ({state.global_step} optimizer steps)")
    base = cfg.model_name_or_path if is_local(cfg.model_name_or_path) else f"[{cfg.model_name_or_path}](https://huggingface.co/{cfg.model_name_or_path})"
    card = f"""---
{card_metadata(cfg, args, best)}
---
# BLIP + LoRA for Oxford-IIIT Pet breed captions

LoRA adapter for `{base}` that captions pet photos as
"{cfg.caption_template.format(article='a', breed='<Breed>')}", naming one of 37 cat and dog breeds.

- **Data**: `{cfg.dataset}`: {len(splits['train'])} training and {len(splits['validation'])} validation images
  (validation is a stratified {cfg.val_fraction:.0%} of trainval, seed {args.seed}); the test split was not used.
- **LoRA**: r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, targets `{cfg.lora_target_modules}`;
  {trainable:,} trainable parameters.
- **Training**: {length}, learning rate {args.learning_rate:g}, batch size
  {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation, seed {args.seed},
  {'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'}.
- **Kept**: the evaluation with the best {best_metric_name(args)}: **{best if best is not None else float('nan'):.3f}**.

## Validation

| step | epoch | loss | breed accuracy |
|---|---|---|---|
{rows}

![training curves](training_curves.png)

## Use

With plain transformers and PEFT: the base model with this LoRA merged in, captioned by the
`image-text-to-text` pipeline (transformers 5 has no `image-to-text` pipeline; `text=""` asks for a
caption with no prompt, exactly like `generate`):

<!-- pipeline-snippet -->
```python
from peft import AutoPeftModel
from PIL import Image
from transformers import AutoProcessor, pipeline

adapter = "{args.output_dir}"  # train.py's --output_dir, or the Hub repo id it was pushed to
model = AutoPeftModel.from_pretrained(adapter).merge_and_unload().eval()  # base model + LoRA, merged
captioner = pipeline("image-text-to-text", model=model, processor=AutoProcessor.from_pretrained(adapter))
print(captioner(Image.open("pet.jpg"), text="", max_new_tokens=30)[0]["generated_text"])
```
"""
    with open(path, "w") as f:
        f.write(card)


def resume_point(cfg, args):
    """--resume_from_checkpoint PATH, or True/last for the newest checkpoint-N in --output_dir; checked against this run."""
    value = args.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no", "none", ""):
        return None
    path = _find_checkpoint(args, value)
    try:
        with open(os.path.join(path, RUN_SETTINGS_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"checkpoint {path!r} has no readable {RUN_SETTINGS_FILE}, so it cannot be checked against this "
                        "run; start afresh (without --resume_from_checkpoint) or in another --output_dir") from None
    current = json.loads(json.dumps(run_settings(cfg, args), default=str))
    differ = [f"--{k} {saved.get(k)!r} there, {v!r} here" for k, v in current.items() if saved.get(k) != v]
    if differ:
        raise UserError(f"checkpoint {path!r} belongs to a run with other settings ({'; '.join(differ[:3])}); "
                        "resume with the same options, or train afresh in another --output_dir")
    return path


# What Trainer unpickles when it resumes (weights_only, so no code runs; rng_state_N.pth per process too)
CHECKPOINT_PICKLES = re.compile(r"(optimizer|scheduler|scaler)\.pt|rng_state(_\d+)?\.pth")


def check_checkpoint(model, path: str) -> None:
    """UserError unless Trainer can resume `model` from checkpoint `path`, read as Trainer reads it.

    Else a hostile or damaged file is an UnpicklingError (weights_only refuses it: good, but a
    traceback), and weights of another shape than the run's LoRA a PEFT state-dict traceback.
    """
    from transformers.trainer_pt_utils import safe_globals

    fix = "start afresh (without --resume_from_checkpoint) or in another --output_dir"
    check_loaded_keys(model, path, fix)
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        try:
            if name == "trainer_state.json":
                with open(file) as f:
                    json.load(f)
            elif CHECKPOINT_PICKLES.fullmatch(name):
                with safe_globals():  # the numpy types Trainer's own loading allows (the RNG state)
                    torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"checkpoint {path!r} cannot be trusted: its {name} holds objects other than tensors and plain "
                            f"values, which could run code (refused unread; nothing ran); {fix}") from None
        except Exception as e:  # truncated or garbled: zip, pickle and json raise their own types
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise UserError(f"checkpoint {path!r} cannot be read: its {name} is damaged ({type(e).__name__}: "
                            f"{first[:150]}); {fix}") from None


def _find_checkpoint(args, value):
    if value.lower() in ("true", "last", "latest"):
        # The newest COMPLETE checkpoint: a run killed while saving leaves a checkpoint-N folder
        # without trainer_state.json (Trainer writes it last), which Trainer cannot resume from.
        found = sorted((int(d.split("-")[1]), d) for d in (os.listdir(args.output_dir) if os.path.isdir(args.output_dir) else [])
                       if d.startswith("checkpoint-") and d.split("-")[1].isdigit())
        for _, name in reversed(found):
            path = os.path.join(args.output_dir, name)
            if os.path.isfile(os.path.join(path, "trainer_state.json")):
                return path
            logger.warning("skipping %s: incomplete (the run was stopped while saving it)", path)
        raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {args.output_dir!r}")
    if not os.path.isdir(value):
        raise UserError(f"--resume_from_checkpoint {value!r} is not a folder; pass a checkpoint-N folder or True")
    return value


def autocast_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def autocast(args):
    """The autocast context of --bf16 / --fp16 (a no-op in fp32), for work done outside Trainer's step."""
    dtype = autocast_dtype(args)
    return torch.autocast(args.device.type, dtype=dtype, enabled=dtype != torch.float32)


def fits_on_gpu(datasets, device, share: float = 0.5) -> bool:
    """Do all cached embeddings of `datasets` take at most `share` of the GPU's free memory?"""
    items = sum(len(d) for d in datasets)
    if not items:
        return False
    first = next(d for d in datasets if len(d))
    nbytes = items * first.cache.get(first.items[0][1]).nbytes
    return nbytes <= share * torch.cuda.mem_get_info(device)[0]


def make_datasets(model, processor, splits, cfg, args):
    """Training and validation datasets: from cached image embeddings when the encoder is frozen, else pixels."""
    if args.use_embedding_cache and has_vision_lora(model):
        logger.info("LoRA targets the vision encoder: image embeddings change during training, so they are not cached")
    elif args.use_embedding_cache:
        def encode(pixels):
            with autocast(args):
                return image_embeddings(model, pixels.to(args.device))

        key = vision_fingerprint(model, processor)
        with args.main_process_first(desc="embedding cache"):
            # the main process encodes what is missing; the others wait, then read its files
            cache = EmbeddingCache(args.embedding_cache_dir, key, args.embedding_cache_dtype)
            if args.process_index == 0:
                model.vision_model.to(args.device).eval()
                cache.build(splits["train"] + splits["validation"], encode, processor.image_processor,
                            args.per_device_eval_batch_size, device=args.device)
        datasets = (CachedEmbeddingDataset(splits["train"], cache, cfg.caption_template),
                    CachedEmbeddingDataset(splits["validation"], cache, cfg.caption_template))
        if args.device.type == "cuda" and fits_on_gpu(datasets, args.device):
            for dataset in datasets:
                dataset.preload(args.device)
            args.dataloader_pin_memory, args.dataloader_num_workers = False, 0  # items are already on the GPU
            logger.info("image embeddings preloaded onto %s", args.device)
        return datasets
    return (PetCaptionDataset(splits["train"], processor.image_processor, cfg.caption_template),
            PetCaptionDataset(splits["validation"], processor.image_processor, cfg.caption_template, substitute_bad=False))


def log_timing(timing: dict, trainer, args) -> None:
    """One `timing: {json}` log line: where the run's seconds went (benchmarks/gpu_recipe.sh reads it)."""
    now = time.perf_counter()
    loop = timing["trained"] - timing["cached"] - trainer.seconds_outside_loop
    images = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    record = {"load_s": timing["loaded"] - timing["start"], "cache_and_setup_s": timing["cached"] - timing["loaded"],
              "train_s": timing["trained"] - timing["cached"], "validation_and_checkpoints_s": trainer.seconds_outside_loop,
              "loop_s": loop, "loop_img_s": images / loop if loop > 0 else None, "save_s": now - timing["trained"],
              "total_s": now - timing["start"], "steps": trainer.state.global_step}
    logger.info("timing: %s", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}))


def main(argv=None):
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    cfg, args = parse_args(argv)
    set_seed(args.seed)
    if not args.should_log:  # under torchrun / accelerate launch only the main process talks
        logging.getLogger().setLevel(logging.WARNING)
    if args.process_index == 0:
        with locked_output_dir(args.output_dir):  # checkpoints and the adapter: one writer at a time
            return _train(cfg, args)
    return _train(cfg, args)


def _train(cfg, args):
    resume = resume_point(cfg, args)

    splits = load_splits(cfg.dataset, cfg.val_fraction, args.seed)
    splits["train"] = subsample(splits["train"], cfg.max_train_samples, args.seed)
    splits["validation"] = subsample(splits["validation"], cfg.max_eval_samples, args.seed)
    if not splits["train"] or not splits["validation"]:
        raise UserError(f"{cfg.dataset!r} gave {len(splits['train'])} training and {len(splits['validation'])} validation images; need both")
    logger.info("data: %d train, %d validation images from %s", len(splits["train"]), len(splits["validation"]), cfg.dataset)

    timing = {"start": time.perf_counter()}
    processor = load_processor(cfg.model_name_or_path)
    base = load_base_model(cfg.model_name_or_path)
    check_fits(base, processor, cfg.model_name_or_path)
    model = create_lora_model(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if resume:
        check_checkpoint(model, resume)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.print_trainable_parameters()

    timing["loaded"] = time.perf_counter()
    train_set, val_set = make_datasets(model, processor, splits, cfg, args)
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) == 0:  # the cached datasets know now; the others find out while reading
            raise UserError(f"no {name} image could be read (see the warnings above); check the data set")
    if args.bf16 or args.fp16:
        # Saves autocast re-casting every frozen weight at every step (same numbers). After
        # make_datasets: the embedding cache's key hashes the weights as loaded (vision_fingerprint).
        cast = cast_frozen_linears(model, autocast_dtype(args))
        logger.info("%d frozen Linear weights and biases stored in %s for autocast", cast, autocast_dtype(args))
    # Compiled or graphed, every batch is padded to one length, so the graphs see one shape (and the last batch's)
    pad_to = longest_caption_tokens(processor.tokenizer, cfg.caption_template) if args.torch_compile or args.cuda_graphs else None
    trainer = PetTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                         data_collator=CaptionCollator(processor.tokenizer, base.config.text_config.bos_token_id, pad_to),
                         processor=processor, pet_config=cfg)
    timing["cached"] = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    timing["trained"] = time.perf_counter()
    report_bad_images({**train_set.bad_images, **val_set.bad_images})

    # The best epoch is loaded back (load_best_model_at_end). Everything is written into a temporary
    # folder first and moved into place, so a kill or a full disk while saving never leaves a
    # half-written adapter where the previous good one was.
    out = args.output_dir
    history = history_from_logs(trainer.state.log_history)
    best = trainer.state.best_metric
    if args.process_index == 0:
        with staged_outputs(out, last=("adapter_config.json",)) as tmp:
            _save_outputs(tmp, trainer, processor, cfg, args, splits, history, best, trainable)
        print(f"Adapter saved to {out}/ (best {best_metric_name(args)} {best if best is not None else float('nan'):.3f})")
        log_timing(timing, trainer, args)
    return {"output_dir": out, "best_breed_accuracy": best, "history": history, "trainer": trainer}


def _save_outputs(tmp, trainer, processor, cfg, args, splits, history, best, trainable):
    """Everything train.py leaves in --output_dir, written into `tmp`."""
    save_adapter(trainer.model, tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "train_history.json"), "w") as f:
        json.dump(history, f, indent=2)
    smoothing = args.label_smoothing_factor or getattr(trainer.model.config.text_config, "label_smoothing", 0.0)
    plot_curves(history, os.path.join(tmp, "training_curves.png"), smoothing)
    write_model_card(os.path.join(tmp, "README.md"), cfg, args, splits, history, best, trainable, trainer.state)
    save_run_config(os.path.join(tmp, "run_config.json"), cfg, args)


if __name__ == "__main__":
    run_main(main)
