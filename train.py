"""LoRA fine-tuning of BLIP on Oxford-IIIT Pet, so that captions name the breed.

    python train.py                      # Salesforce/blip-image-captioning-base on timm/oxford-iiit-pet
    python train.py --demo               # offline: tiny BLIP + synthetic pets, about a minute on a CPU
    python train.py --dataset /data/oxford-iiit-pet --num_train_epochs 3 --bf16
    python train.py run.yaml --learning_rate 2e-4  # options from a file (or a run's run_config.json), then flags
    python train.py --use_dora --early_stopping_patience 3 --push_to_hub --hub_model_id you/blip-lora-pets

Every TrainingArguments flag works. Writes the adapter, processor, model card,
run_config.json, train_history.json and training_curves.png to --output_dir.
"""

import json
import logging
import os
import time
from typing import Optional

import torch
from transformers import BlipProcessor, EarlyStoppingCallback, set_seed

from config import BASE_MODEL, DEFAULT_DATASET, DEMO_TRAIN_OVERRIDES, PetConfig, TrainConfig, check_seed, parse_config
from data import CaptionCollator, CaptionDataset, load_run_splits, longest_caption_tokens, report_bad_images, subsample
from demo import use_demo_assets
from devices import pick_dtype
from embedding_cache import CachedEmbeddingDataset, EmbeddingCache, vision_fingerprint
from figures import figure
from hub import check_hub_options, hub_repo_id, push_folder
from inference import image_embeddings
from model import (
    adapter_variant,
    cast_frozen_linears,
    check_fits,
    create_lora_model,
    has_vision_lora,
    load_base_model,
    load_processor,
    save_adapter,
    weights_fingerprint,
)
from model_card import best_metric_name, write_model_card
from run_io import (
    UserError,
    check_output_dir,
    inside,
    join_cpu_processes,
    locked_output_dir,
    run_main,
    setup_logging,
    staged_outputs,
)
from run_record import save_run_config
from trainer import PetTrainer, autocast, autocast_dtype, check_checkpoint, fits_on_gpu, graphs_supported, resume_point

logger = logging.getLogger("train")


def parse_args(argv: Optional[list] = None) -> tuple[PetConfig, TrainConfig]:
    join_cpu_processes()  # TrainingArguments sets up its devices while parsing
    cfg, args = parse_config((PetConfig, TrainConfig), argv, DEMO_TRAIN_OVERRIDES)
    check_train_options(args)
    if args.device.type != "cuda":
        args.dataloader_pin_memory = False  # pinning needs an accelerator; it only warns elsewhere
    # Precision is chosen once: bf16 where the GPU has it, fp16 on other GPUs, fp32 on CPU. --precision records
    # the choice (run_config.json): a re-run of this run takes it, not the flags the machine's choice set
    typed = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if typed and cfg.precision not in ("auto", typed):
        raise UserError(f"--precision {cfg.precision} and --{typed} disagree: pass one of them")
    cfg.precision = typed or cfg.precision
    if not (args.bf16 or args.fp16):
        dtype = pick_dtype(args.device, cfg.precision)
        args.bf16, args.fp16 = dtype == torch.bfloat16, dtype == torch.float16
        # TrainingArguments turned the flags into mixed_precision while parsing, and Trainer's autocast
        # follows that alone: without this the step ran in fp32 while validation ran in bf16/fp16
        if args.bf16 or args.fp16:
            args.mixed_precision = "bf16" if args.bf16 else "fp16"
    if args.fp16 and args.device.type == "cpu":
        raise UserError(
            "fp16 (--precision fp16, --fp16) needs a GPU: accelerate has no fp16 loss scaling on a CPU; "
            "use bf16 or fp32"
        )
    if args.push_to_hub:  # the login, before anything heavy
        args.hub_model_id = hub_repo_id(args)
    if cfg.demo:  # after every option check (use_demo_assets may pre-train the base)
        use_demo_assets(cfg)
    cfg.model_name_or_path = cfg.model_name_or_path or BASE_MODEL
    cfg.dataset = cfg.dataset or DEFAULT_DATASET
    # Local folders are recorded absolute, so run settings and run_config.json name them from anywhere
    for name in ("model_name_or_path", "dataset"):
        if os.path.isdir(getattr(cfg, name)):
            setattr(cfg, name, os.path.abspath(getattr(cfg, name)))
    if os.path.isdir(cfg.model_name_or_path) and inside(cfg.model_name_or_path, args.output_dir):
        # the adapter would be saved into the base model's folder, which then loads with it applied
        raise UserError(
            f"--output_dir {args.output_dir!r} is or contains the base model folder "
            f"{cfg.model_name_or_path!r}; pass another folder"
        )
    return cfg, args


def check_train_options(args: TrainConfig) -> None:
    """train.py's own options, before anything heavy loads (the demo's base included): one UserError line each."""
    if args.per_device_train_batch_size < 1 or args.per_device_eval_batch_size < 1:
        raise UserError("batch sizes must be at least 1")
    if args.gradient_accumulation_steps < 1:
        raise UserError(f"--gradient_accumulation_steps must be at least 1, not {args.gradient_accumulation_steps}")
    if not args.learning_rate >= 0:  # 0 is allowed: the loss-measurement tests train with it
        raise UserError(f"--learning_rate must be 0 or more, not {args.learning_rate}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"--max_steps must be positive (or -1 to train --num_train_epochs), not {args.max_steps}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise UserError(
            f"--num_train_epochs must be positive, not {args.num_train_epochs}: it would save an untrained adapter"
        )
    check_seed(args.seed)
    check_report_to(args.report_to)
    check_hub_options(args)
    if args.early_stopping_patience is not None:
        if args.early_stopping_patience < 1:
            raise UserError(f"--early_stopping_patience must be at least 1, not {args.early_stopping_patience}")
        if args.eval_strategy == "no":
            raise UserError("--early_stopping_patience watches the validation each epoch: leave --eval_strategy out")
        if not args.load_best_model_at_end:
            raise UserError(
                "--early_stopping_patience needs --load_best_model_at_end (the default): else the adapter saved is "
                "the last evaluation's, after the ones that did not improve"
            )
    if args.cuda_graphs:
        if not graphs_supported(args.device):
            raise UserError(f"--cuda_graphs needs a CUDA GPU (this run is on {args.device.type}); leave it off")
        if args.torch_compile:
            raise UserError("--cuda_graphs and --torch_compile both record the step: pass one of them")
        if args.world_size > 1:
            raise UserError("--cuda_graphs works on one GPU; leave it off under torchrun / accelerate launch")
        if args.gradient_accumulation_steps > 1:
            # the gradients autograd hands over live in the graph's buffers, which the next replay overwrites
            raise UserError(
                "--cuda_graphs cannot accumulate gradients: use a larger --per_device_train_batch_size "
                "instead of --gradient_accumulation_steps, or leave --cuda_graphs off"
            )
    check_output_dir(args.output_dir)


def check_report_to(report_to: str | list | None) -> None:
    """--report_to names integrations that are installed: Trainer would fail only after the data and model load."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in (n for n in names if n not in ("none", "all")):
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(
                f"--report_to {name}: not an integration Trainer knows; use one of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or none)"
            )
        if name not in get_available_reporting_integrations():
            raise UserError(
                f"--report_to {name}: its package is not installed; `pip install {name}`, or leave --report_to out"
            )


def history_from_logs(log_history: list) -> dict:
    train = [
        {k: e[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in e}
        for e in log_history
        if "loss" in e
    ]
    evals = {}
    for e in log_history:
        for k, v in e.items():
            if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"):
                evals.setdefault(e["step"], {"step": e["step"], "epoch": e.get("epoch")})[k[5:]] = v
    return {"train": train, "validation": [evals[s] for s in sorted(evals)]}


def plot_curves(history: dict, path: str, label_smoothing: float = 0.0, kind: str = "breed") -> None:
    train, val = history["train"], history["validation"]
    with figure(path, dpi=120, ncols=2, figsize=(11, 4)) as (fig, (ax_loss, ax_acc)):
        ax_loss.plot([e["epoch"] for e in train], [e["loss"] for e in train], label="train loss", alpha=0.8)
        ax_loss.plot([e["epoch"] for e in val], [e.get("loss") for e in val], "o-", label="validation loss")
        loss = f"cross-entropy, label smoothing {label_smoothing:g}" if label_smoothing else "cross-entropy"
        ax_loss.set(xlabel="epoch", ylabel=f"loss ({loss})", title="Loss")
        ax_loss.legend()
        ax_acc.plot([e["epoch"] for e in val], [e.get("breed_accuracy") for e in val], "o-", color="tab:green")
        ax_acc.set(
            xlabel="epoch",
            ylabel=f"{kind} accuracy",
            title=f"Validation {kind} accuracy (greedy captions)",
            ylim=(0, 1.02),
        )
        ax_acc.grid(alpha=0.3)


def make_datasets(model, processor: BlipProcessor, splits: dict, cfg: PetConfig, args: TrainConfig) -> tuple:
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
                cache.build(
                    splits.train + splits.validation,
                    encode,
                    processor.image_processor,
                    args.per_device_eval_batch_size,
                    device=args.device,
                )
        datasets = (
            CachedEmbeddingDataset(splits.train, cache, splits.labels, cfg.caption_template),
            CachedEmbeddingDataset(splits.validation, cache, splits.labels, cfg.caption_template),
        )
        if args.device.type == "cuda" and fits_on_gpu(datasets, args.device):
            for dataset in datasets:
                dataset.preload(args.device)
            args.dataloader_pin_memory, args.dataloader_num_workers = False, 0  # items are already on the GPU
            logger.info("image embeddings preloaded onto %s", args.device)
        return datasets
    return (
        CaptionDataset(splits.train, processor.image_processor, splits.labels, cfg.caption_template),
        CaptionDataset(
            splits.validation, processor.image_processor, splits.labels, cfg.caption_template, substitute_bad=False
        ),
    )


def log_timing(timing: dict, trainer: PetTrainer, args: TrainConfig) -> None:
    """One `timing: {json}` log line: where the run's seconds went (benchmarks/gpu_recipe.sh reads it)."""
    now = time.perf_counter()
    loop = timing["trained"] - timing["cached"] - trainer.seconds_outside_loop
    images = (
        trainer.state.global_step
        * args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size
    )
    record = {
        "load_s": timing["loaded"] - timing["start"],
        "cache_and_setup_s": timing["cached"] - timing["loaded"],
        "train_s": timing["trained"] - timing["cached"],
        "validation_and_checkpoints_s": trainer.seconds_outside_loop,
        "loop_s": loop,
        "loop_img_s": images / loop if loop > 0 else None,
        "save_s": now - timing["trained"],
        "total_s": now - timing["start"],
        "steps": trainer.state.global_step,
    }
    logger.info("timing: %s", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}))


def main(argv: Optional[list] = None) -> dict:
    setup_logging()
    cfg, args = parse_args(argv)
    set_seed(args.seed)
    if not args.should_log:  # under torchrun / accelerate launch only the main process talks
        logging.getLogger().setLevel(logging.WARNING)
    if args.process_index == 0:
        with locked_output_dir(args.output_dir):  # checkpoints and the adapter: one writer at a time
            return _train(cfg, args)
    return _train(cfg, args)


def _train(cfg, args):
    splits = load_run_splits(cfg, cfg.val_fraction, args.seed)  # sets the label set's template where none was given
    resume = resume_point(cfg, args)
    splits.train = subsample(splits.train, cfg.max_train_samples, args.seed)
    splits.validation = subsample(splits.validation, cfg.max_eval_samples, args.seed)
    if not splits.train or not splits.validation:
        raise UserError(
            f"{cfg.dataset!r} gave {len(splits.train)} training and {len(splits.validation)} validation "
            "images; need both"
        )
    logger.info(
        "data: %d train, %d validation images of %d %s from %s",
        len(splits.train),
        len(splits.validation),
        len(splits.labels),
        splits.labels.plural,
        cfg.dataset,
    )

    timing = {"start": time.perf_counter()}
    processor = load_processor(cfg.model_name_or_path)
    base = load_base_model(cfg.model_name_or_path)
    check_fits(base, processor, cfg.model_name_or_path)
    model = create_lora_model(
        base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.use_dora, cfg.use_rslora
    )
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
    pad_to = (
        longest_caption_tokens(processor.tokenizer, splits.labels, cfg.caption_template)
        if args.torch_compile or args.cuda_graphs
        else None
    )
    trainer = PetTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=CaptionCollator(processor.tokenizer, base.config.text_config.bos_token_id, pad_to),
        processor=processor,
        pet_config=cfg,
        labels=splits.labels,
        callbacks=[EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else None,
    )
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
            files = sorted(os.listdir(tmp))
        score = best if best is not None else float("nan")
        print(f"Adapter saved to {out}/ (best {best_metric_name(args, splits.labels)} {score:.3f})")
        log_timing(timing, trainer, args)
        if args.push_to_hub:  # the complete folder, once it is in place
            print(f"Pushed to {push_folder(out, files, args)}")
    return {"output_dir": out, "best_breed_accuracy": best, "history": history, "trainer": trainer}


def _save_outputs(tmp, trainer, processor, cfg, args, splits, history, best, trainable):
    """Everything train.py leaves in --output_dir, written into `tmp`."""
    save_adapter(trainer.model, tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "train_history.json"), "w") as f:
        json.dump(history, f, indent=2)
    smoothing = args.label_smoothing_factor or getattr(trainer.model.config.text_config, "label_smoothing", 0.0)
    plot_curves(history, os.path.join(tmp, "training_curves.png"), smoothing, splits.labels.kind)
    with open(os.path.join(tmp, "adapter_config.json")) as f:
        variant = adapter_variant(json.load(f))
    write_model_card(
        os.path.join(tmp, "README.md"),
        cfg,
        args,
        splits,
        history,
        best,
        trainable,
        trainer.state,
        repo_id=args.hub_model_id if args.push_to_hub else None,
        variant=variant,
    )
    base = weights_fingerprint(cfg.model_name_or_path, trainer.model.get_base_model())
    trained_on = {"base_fingerprint": base, "labels": splits.labels.to_json()}
    save_run_config(os.path.join(tmp, "run_config.json"), shared=cfg, train=args, trained_on=trained_on)


if __name__ == "__main__":
    run_main(main)
