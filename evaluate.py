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
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import set_seed

from baselines import check_clip_option, load_baselines, run_baselines
from classifier import check_backbone_option
from config import DEMO_EVAL_OVERRIDES, EvalConfig, PetConfig, check_seed, parse_config
from data import load_run_splits, pixel_batches, report_bad_images, subsample
from demo import use_demo_assets
from devices import pick_device, pick_dtype
from inference import evaluate_batch, label_candidates
from metrics import ModelPredictions, Predictions, compute_metrics
from model import adapter_variant, load_model_pair
from report import failures_frame, predictions_frame, print_summary, write_figures, write_report
from run_io import (
    UserError,
    check_output_dir,
    join_cpu_processes,
    locked_output_dir,
    run_main,
    setup_logging,
    staged_outputs,
)
from run_record import AdapterRun, save_run_config

logger = logging.getLogger("evaluate")


def parse_args(argv=None):
    """(PetConfig, EvalConfig, AdapterRun) with --demo applied, the options checked and the adapter's record read."""
    cfg, args = parse_config((PetConfig, EvalConfig), argv, DEMO_EVAL_OVERRIDES)
    if args.per_device_eval_batch_size < 1:
        raise UserError("--per_device_eval_batch_size must be at least 1")
    if not 1 <= args.bootstrap_samples <= 100_000:  # the resample matrix is samples x images
        raise UserError(f"--bootstrap_samples must be 1-100000, not {args.bootstrap_samples}")
    check_seed(args.seed)
    check_clip_option(args.clip_model)
    check_backbone_option(args.classifier_model)
    if args.classifier_epochs < 1 or not args.classifier_learning_rate > 0:
        raise UserError("--classifier_epochs must be at least 1 and --classifier_learning_rate positive")
    check_output_dir(args.output_dir, args.adapter)
    adapter_run = AdapterRun.read(args.adapter)
    if cfg.demo:
        use_demo_assets(cfg, adapter_run)
    adapter_run.fill(cfg)
    return cfg, args, adapter_run


def decoding_text(cfg) -> str:
    """How the captions were decoded, for metrics.json and the report."""
    text = f"{'greedy' if cfg.num_beams == 1 else f'beam search ({cfg.num_beams} beams)'}, "
    text += f"up to {cfg.max_new_tokens} new tokens"
    if cfg.repetition_penalty != 1.0:
        text += f", repetition penalty {cfg.repetition_penalty:g}"
    if cfg.no_repeat_ngram_size:
        text += f", no repeated {cfg.no_repeat_ngram_size}-grams"
    return text


# ---------------------------------------------------------------------------
# Predictions


def predict(
    models: dict,
    processor,
    records: list,
    labels,
    cfg,
    batch_size: int,
    share_embeddings: bool,
    show_progress: bool = True,
):
    """(Predictions, {image_id: reason} of unreadable images), with a progress bar over the images."""
    from tqdm.auto import tqdm

    candidates = label_candidates(next(iter(models.values())), processor.tokenizer, labels, cfg.caption_template)
    # tokens scored per candidate ([SEP] included): for the per-token ranking
    out = Predictions([], [], {name: ModelPredictions([], []) for name in models}, candidates[1][:, 1:].sum(-1).numpy())
    scores = {name: [] for name in models}
    # images are decoded and preprocessed by worker processes while the GPU works (pixel_batches)
    device = next(next(iter(models.values())).parameters()).device
    batches, bad = pixel_batches(records, processor.image_processor, batch_size, device=device)
    bar = tqdm(total=len(records), unit="img", desc="evaluating", disable=not show_progress)
    for batch, pixels in batches:
        batch_out = evaluate_batch(models, processor, pixels, candidates, cfg, share_embeddings)
        out.image_id += [r.image_id for r in batch]
        out.label += [r.label for r in batch]
        out.records += batch
        for name in models:
            out.models[name].captions += batch_out[name]["captions"]
            scores[name].append(batch_out[name]["scores"])
        bar.n = len(out.image_id) + len(bad)
        bar.refresh()
    bar.n = len(out.image_id) + len(bad)
    bar.close()
    for name in models:
        out.models[name].scores = np.concatenate(scores[name]) if scores[name] else np.zeros((0, len(labels)))
    return out, bad


def merge_shards(shards: list, records: list, num_classes: int):
    """Per-process (positions in `records`, Predictions, bad) -> one Predictions in the order of `records`, each once.

    By position, not by image_id: a data set may give two images one id (cats/1.jpg, dogs/1.jpg).
    """
    rows, bad = [], {}
    for positions, shard, shard_bad in shards:
        bad.update(shard_bad)
        for j, position in enumerate(positions):
            rows.append((position, shard.label[j], {m: (p.captions[j], p.scores[j]) for m, p in shard.models.items()}))
    rows.sort(key=lambda row: row[0])
    if len({row[0] for row in rows}) != len(rows):
        raise RuntimeError("an image was evaluated by two processes")
    models = {
        m: ModelPredictions(
            [r[2][m][0] for r in rows], np.stack([r[2][m][1] for r in rows]) if rows else np.zeros((0, num_classes))
        )
        for m in shards[0][1].models
    }
    merged = Predictions(
        [records[r[0]].image_id for r in rows],
        [r[1] for r in rows],
        models,
        shards[0][1].candidate_tokens,
        records=[records[r[0]] for r in rows],
    )
    return merged, bad


# ---------------------------------------------------------------------------


def main(argv=None):
    setup_logging()
    join_cpu_processes()
    cfg, args, adapter_run = parse_args(argv)
    if PartialState().is_main_process:
        with locked_output_dir(args.output_dir):  # a second evaluation into this folder gets one line, not a mix
            return _evaluate(cfg, args, adapter_run)
    return _evaluate(cfg, args, adapter_run)


def _evaluate(cfg, args, adapter_run):
    set_seed(args.seed)
    # One process, or the group that torchrun / accelerate launch started: each takes every
    # n-th image, the main process gathers the predictions and writes the outputs.
    state = PartialState()
    device = state.device if state.num_processes > 1 else pick_device()
    dtype = pick_dtype(device, cfg.precision)
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)

    splits = load_run_splits(cfg, *adapter_run.split_settings(cfg, args.split, args.seed), labels=adapter_run.labels)
    labels = splits.labels
    records = splits[args.split]
    records = subsample(records, cfg.max_eval_samples, args.seed)
    if not records:
        raise UserError(f"{cfg.dataset!r} has no images in split {args.split!r}")
    logger.info(
        "data: %d %s images of %d %s from %s", len(records), args.split, len(labels), labels.plural, cfg.dataset
    )

    pair = load_model_pair(
        cfg.model_name_or_path,
        args.adapter,
        device,
        dtype,
        adapter_run.adapter_config,
        adapter_run.base_fingerprint,
    )
    zero_shot, processor, models, shared = pair.zero_shot, pair.processor, pair.models, pair.shared_vision
    # every baseline's model loaded and checked now: a broken one costs seconds, not the whole evaluation
    loaded = load_baselines(args, labels, device, dtype) if state.is_main_process else None
    logger.info(
        "vision encoders %s: image embeddings %s",
        "identical" if shared else "differ",
        "shared by both models" if shared else "computed per model",
    )

    start = time.perf_counter()
    positions = range(state.process_index, len(records), state.num_processes)
    shard = [records[i] for i in positions]
    predictions, bad = predict(
        models,
        processor,
        shard,
        labels,
        cfg,
        args.per_device_eval_batch_size,
        shared,
        show_progress=state.is_main_process,
    )
    if state.num_processes > 1:
        # Records can hold a whole datasets.Dataset: gather their positions instead, the main process has them all
        position_of = {id(r): i for i, r in zip(positions, shard)}
        evaluated = [position_of[id(r)] for r in predictions.records]  # unreadable images left out
        predictions.records = []
        predictions, bad = merge_shards(gather_object([(evaluated, predictions, bad)]), records, len(labels))
        if not state.is_main_process:
            return None
    seconds = time.perf_counter() - start
    report_bad_images(bad)
    if not predictions.label:
        raise UserError("no readable image to evaluate (see the warning above)")

    metrics = compute_metrics(predictions, labels, cfg.caption_template, args.bootstrap_samples, args.seed)
    # the baselines on the same images, each against the fine-tuned captions
    baselines = run_baselines(
        args,
        adapter_run,
        zero_shot,
        processor,
        splits,
        predictions,
        metrics.models["fine_tuned"].correct,
        device,
        dtype,
        loaded,
    )
    metrics.numbers.update(baselines.numbers)
    info = {
        "adapter": args.adapter,
        "adapter_variant": adapter_variant(adapter_run.adapter_config),
        "base_model": cfg.model_name_or_path,
        "dataset": cfg.dataset,
        "split": args.split,
        "num_bad_images": len(bad),
        "bad_images": sorted(bad),
        "template": cfg.caption_template,
        "decoding": decoding_text(cfg),
        "shared_image_embeddings": shared,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "runtime_seconds": seconds,
        "images_per_second": len(predictions.label) / seconds,
        "bootstrap_samples": args.bootstrap_samples,
    }

    out = args.output_dir
    with staged_outputs(out) as tmp:  # a full disk or a kill leaves the previous results whole
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump({**metrics.numbers, **info}, f, indent=2)
        predictions_frame(predictions, metrics, labels).assign(**baselines.columns).to_csv(
            os.path.join(tmp, "predictions.csv"), index=False
        )
        failures = failures_frame(predictions, metrics, labels)
        failures.drop(columns="_index").to_csv(os.path.join(tmp, "failures.csv"), index=False)
        tables = write_figures(predictions, metrics, failures, labels, cfg.caption_template, tmp)
        write_report(os.path.join(tmp, "report.md"), metrics, info, labels, tables)
        save_run_config(os.path.join(tmp, "run_config.json"), shared=cfg, evaluate=args)
    print_summary(metrics, labels, out)
    return {"output_dir": out, "metrics": metrics.numbers, "predictions": predictions, "info": info}


if __name__ == "__main__":
    run_main(main)
