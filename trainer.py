"""The Trainer and what training needs around it: the loss on the real next-token targets, validation breed
accuracy, the CUDA-graph training step that checks itself, the finite-loss check, autocast, and
reading a checkpoint to resume from.
"""

import copy
import json
import logging
import os
import pickle
import re
import time

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from devices import autocast_for, rng_fork_args
from inference import captions_from_embeddings, decoding_options, image_embeddings
from model import (
    check_loaded_keys,
)
from run_io import UserError, first_line

logger = logging.getLogger(__name__)


# Settings a resumed run must share with the run that wrote the checkpoint (written into each checkpoint)
RUN_SETTINGS_FILE = "pet_run_settings.json"
RESUME_KEYS = {
    "PetConfig": (
        "model_name_or_path",
        "dataset",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "use_dora",
        "use_rslora",
        "caption_template",
        "val_fraction",
        "max_train_samples",
        "max_eval_samples",
    ),
    "TrainConfig": (
        "seed",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "weight_decay",
        "warmup_steps",
        "lr_scheduler_type",
        "use_embedding_cache",
    ),
}


# What a checkpoint written before a setting existed ran with: it matches a run with that setting's default
SETTINGS_BEFORE = {"use_dora": False, "use_rslora": False}


def run_settings(cfg, args) -> dict:
    values = {
        k: getattr(obj, k)
        for obj, keys in ((cfg, RESUME_KEYS["PetConfig"]), (args, RESUME_KEYS["TrainConfig"]))
        for k in keys
    }
    return {k: getattr(v, "value", v) for k, v in values.items()}  # enums (lr_scheduler_type) as their names


class PetTrainer(Trainer):
    """Trainer whose evaluation adds the accuracy of greedy captions on the validation split: the share that
    name the right class (logged as breed_accuracy, whatever the label set, so that every run's logs and
    --metric_for_best_model read alike).

    It never pushes to the Hub: with --push_to_hub Trainer would upload at every checkpoint, while train.py
    uploads the finished folder once (hub.py).
    """

    def __init__(self, *a, args, processor, pet_config, labels, **kw):
        if args.push_to_hub:
            args = copy.copy(args)
            args.push_to_hub = False
        super().__init__(*a, args=args, **kw)
        self.processor, self.pet_config, self.labels = processor, pet_config, labels
        self.unchecked_losses = []  # (step, loss) not yet checked for NaN/inf
        self.seconds_outside_loop = 0.0  # per-epoch validation and checkpoints, for the timing line
        self.add_callback(FiniteLossCheck(self))
        self.graphed_loss = (
            GraphedLoss(self.model.get_base_model(), autocast_dtype(self.args)) if self.args.cuda_graphs else None
        )

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
        if (
            self.graphed_loss is not None
            and model.training
            and not return_outputs
            and self.label_smoother is None
            and self.compute_loss_func is None
        ):
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
            raise UserError(
                f"the loss became {values[k].item()} at step {steps[k]}; stopped without saving an "
                f"adapter.{hint} A lower --learning_rate may help."
            )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self.seconds_outside_loop += time.perf_counter() - start
        return metrics

    def evaluation_loop(self, dataloader, *a, metric_key_prefix="eval", **kw):
        """Trainer's (the validation loss) and the breed accuracy, in the metrics that evaluate() logs and hands to
        the callbacks (EarlyStoppingCallback among them) and that pick the best checkpoint."""
        output = super().evaluation_loop(dataloader, *a, metric_key_prefix=metric_key_prefix, **kw)
        output.metrics[f"{metric_key_prefix}_breed_accuracy"] = self.breed_accuracy(dataloader.dataset)
        return output

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
                options = {**decoding_options(self.pet_config), "num_beams": 1}  # greedy, as the loop is fast
                captions = captions_from_embeddings(model, self.processor, embeds, **options)
            correct += int((self.labels.from_captions(captions) == np.asarray(truth)).sum())
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
        with torch.autocast(
            image_embeds.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False
        ):
            return self.model(
                image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask, labels=labels
            ).loss


def graphs_supported(device) -> bool:
    """Can --cuda_graphs record the training step on `device`? (torch.cuda.make_graphed_callables: CUDA only)."""
    return device.type == "cuda"


class GraphedLoss:
    """--cuda_graphs: the training loss's forward and backward each replayed as one CUDA graph.

    On a GPU the eager step is launch-bound (thousands of small kernels launched from Python; the
    profile is in benchmarks/README.md). torch.cuda.make_graphed_callables records the forward and the backward
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
    # can differ only by rounding; each bound sits between the most rounding can do and what one other
    # dropout mask does (benchmarks/graph_check_tolerance.py; the figures are in benchmarks/results/README.md).
    # fp32 gets fp16's bound: with --tf32 its matmuls keep 10 mantissa bits, as fp16 does.
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
            return self._eager_from_now(
                "--cuda_graphs applies to cached image embeddings only: the training step runs eagerly"
            )
        args = tuple(inputs[k] for k in self.KEYS)
        shapes = [tuple(a.shape) for a in args]
        if self.replay is None:
            # Recorded on another batch of the same shapes (the images negated, every row the first row's
            # caption), so the checked replay (of this batch) shows whether a replay reads its own inputs.
            # Forked RNG: the warm-up passes draw dropout masks, and the run's random stream stays eager's.
            sample = (-args[0], *(a[:1].expand_as(a).clone() for a in args[1:]))
            try:
                # autocast off: the recorder refuses autocast's weight cache
                with (
                    torch.autocast(args[0].device.type, enabled=False),
                    torch.random.fork_rng(**rng_fork_args(args[0].device)),
                ):
                    self.replay = torch.cuda.make_graphed_callables(self.recorded, sample)
            except Exception as e:
                return self._eager_from_now(
                    "--cuda_graphs: recording the training step failed (%s: %s); it runs eagerly",
                    type(e).__name__,
                    first_line(e)[:200],
                )
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
            with torch.random.fork_rng(**rng_fork_args(args[0].device)):
                loss = loss_of(*args)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                # copies: the replay's outputs live in the graph's buffers, which the next replay overwrites
                results.append(
                    (
                        loss.detach().float().clone(),
                        torch.cat(
                            [(torch.zeros_like(p) if g is None else g).float().flatten() for g, p in zip(grads, params)]
                        ),
                    )
                )
        (loss, grads), (eager_loss, eager_grads) = results
        loss_diff, grad_diff = relative_difference(loss, eager_loss), relative_difference(grads, eager_grads)
        name = str(self.eager.dtype).removeprefix("torch.")
        if loss_diff <= self.tolerance and grad_diff <= self.tolerance:
            logger.info(
                "self-check passed: --cuda_graphs' first replayed step matches the eager step (relative "
                "difference: loss %.2g, LoRA gradients %.2g; tolerance %g in %s)",
                loss_diff,
                grad_diff,
                self.tolerance,
                name,
            )
            return True
        self._eager_from_now(
            "self-check: --cuda_graphs' first replayed step differs from the eager step (relative "
            "difference: loss %.2g, LoRA gradients %.2g; tolerance %g in %s): the training step runs "
            "eagerly",
            loss_diff,
            grad_diff,
            self.tolerance,
            name,
        )
        return False


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


def resume_point(cfg, args):
    """--resume_from_checkpoint PATH, or True/last: the newest checkpoint-N in --output_dir; checked against the run."""
    value = args.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no", "none", ""):
        return None
    path = _find_checkpoint(args, value)
    try:
        with open(os.path.join(path, RUN_SETTINGS_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(
            f"checkpoint {path!r} has no readable {RUN_SETTINGS_FILE}, so it cannot be checked against this "
            "run; start afresh (without --resume_from_checkpoint) or in another --output_dir"
        ) from e
    current = json.loads(json.dumps(run_settings(cfg, args), default=str))
    saved = {**SETTINGS_BEFORE, **saved}
    differ = [f"--{k} {saved.get(k)!r} there, {v!r} here" for k, v in current.items() if saved.get(k) != v]
    if differ:
        raise UserError(
            f"checkpoint {path!r} belongs to a run with other settings ({'; '.join(differ[:3])}); "
            "resume with the same options, or train afresh in another --output_dir"
        )
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
        except pickle.UnpicklingError as e:
            raise UserError(
                f"checkpoint {path!r} cannot be trusted: its {name} holds objects other than tensors and plain "
                f"values, which could run code (refused unread; nothing ran); {fix}"
            ) from e
        except Exception as e:  # truncated or garbled: zip, pickle and json raise their own types
            first = first_line(e)
            raise UserError(
                f"checkpoint {path!r} cannot be read: its {name} is damaged ({type(e).__name__}: {first[:150]}); {fix}"
            ) from e


def _find_checkpoint(args, value):
    if value.lower() in ("true", "last", "latest"):
        # The newest COMPLETE checkpoint: a run killed while saving leaves a checkpoint-N folder
        # without trainer_state.json (Trainer writes it last), which Trainer cannot resume from.
        found = sorted(
            (int(d.split("-")[1]), d)
            for d in (os.listdir(args.output_dir) if os.path.isdir(args.output_dir) else [])
            if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
        )
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
    return autocast_for(args.device, autocast_dtype(args))


def fits_on_gpu(datasets, device, share: float = 0.5) -> bool:
    """Do all cached embeddings of `datasets` take at most `share` of the GPU's free memory?"""
    items = sum(len(d) for d in datasets)
    if not items:
        return False
    first = next(d for d in datasets if len(d))
    nbytes = items * first.cache.get(first.items[0][1]).nbytes
    return nbytes <= share * torch.cuda.mem_get_info(device)[0]
