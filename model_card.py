"""The adapter's model card (README.md): the Hub's YAML header, then assets/model_card_template.md filled in."""

import os
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from config import PetConfig, TrainConfig
from labels import OXFORD_PETS, LabelSet
from run_io import is_local

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "model_card_template.md")


def best_metric_name(args: TrainConfig, labels: LabelSet = OXFORD_PETS) -> str:
    """What state.best_metric measures: "validation breed accuracy" by default ("class accuracy" for another label
    set: the key is breed_accuracy for every one), else --metric_for_best_model's."""
    metric = (args.metric_for_best_model or "loss").removeprefix("eval_")
    if metric == "breed_accuracy":
        metric = f"{labels.kind}_accuracy"
    return f"validation {metric.replace('_', ' ')}"


def card_metadata(
    cfg: PetConfig, args: TrainConfig, best: Optional[float], labels: LabelSet = OXFORD_PETS, variant: str = "LoRA"
):
    """The model card's YAML header in the Hub's format (ModelCardData): base model, data set, library, task, tags
    (the adapter's variant among them) and the kept score."""
    dataset_id = None if is_local(cfg.dataset) else cfg.dataset
    pets = labels.is_pets
    name = "Oxford-IIIT Pet" if pets else os.path.basename(os.path.normpath(cfg.dataset))
    results = (
        []
        if best is None
        else [
            EvalResult(
                task_type="image-to-text",
                task_name=f"Image captioning ({labels.kind} named in the caption)",
                dataset_type=dataset_id or ("oxford-iiit-pet" if pets else name),
                dataset_name=name,
                dataset_split="validation",
                metric_type=best_metric_name(args, labels).split()[-1],
                metric_name=best_metric_name(args, labels),
                metric_value=round(float(best), 4),
            )
        ]
    )
    return ModelCardData(
        base_model=None if is_local(cfg.model_name_or_path) else cfg.model_name_or_path,
        datasets=[dataset_id] if dataset_id else None,
        library_name="peft",
        pipeline_tag="image-to-text",
        tags=["blip", "lora"]
        + [v.lower() for v in variant.split(" + ") if v != "LoRA"]
        + ["image-captioning"]
        + (["oxford-iiit-pet"] if pets else []),
        model_name=os.path.basename(os.path.normpath(args.output_dir)),
        eval_results=results or None,
    )


def write_model_card(
    path: str,
    cfg: PetConfig,
    args: TrainConfig,
    splits,
    history: dict,
    best: Optional[float],
    trainable: int,
    state,
    repo_id: Optional[str] = None,
    variant: str = "LoRA",
) -> None:
    """Write the card: what was trained on what, the validation history, and how to use the adapter.

    The usage snippet loads the adapter from --output_dir, or from the Hub repo `repo_id` when it is given.
    `variant`: model.adapter_variant of the saved adapter_config.json (LoRA, DoRA, rsLoRA, DoRA + rsLoRA).
    """
    nan = float("nan")
    length = (
        f"{state.global_step} optimizer steps (--max_steps {args.max_steps}, {state.epoch or 0:.2f} epochs)"
        if args.max_steps > 0
        else f"{args.num_train_epochs:g} epochs ({state.global_step} optimizer steps)"
    )
    patience = args.early_stopping_patience
    if patience:
        metric = best_metric_name(args, splits.labels)
        if state.global_step < state.max_steps:  # the callback ended training before the planned steps
            length += (
                f", stopped early at epoch {state.epoch or 0:.2f}: {patience} evaluations without a better {metric}"
            )
        else:
            length += f", with early stopping after {patience} evaluations without a better {metric} (not reached)"
    base, labels = cfg.model_name_or_path, splits.labels
    placeholder = f"<{labels.kind.title()}>"
    example = cfg.caption_template.format(article="a", breed=placeholder, label=placeholder, group="<group>")
    shown = ", ".join(labels.names[:5]) + (", ..." if len(labels) > 5 else "")
    card = ModelCard.from_template(
        card_metadata(cfg, args, best, labels, variant),
        template_path=TEMPLATE,
        title="Oxford-IIIT Pet breed captions" if labels.is_pets else f"{len(labels)}-class captions",
        subject="pet photos" if labels.is_pets else "images",
        classes="one of 37 cat and dog breeds" if labels.is_pets else f"one of {len(labels)} {labels.plural} ({shown})",
        kind=labels.kind,
        image="pet.jpg" if labels.is_pets else "image.jpg",
        base=base if is_local(base) else f"[{base}](https://huggingface.co/{base})",
        example_caption=example,
        dataset=cfg.dataset,
        train_images=len(splits.train),
        validation_images=len(splits.validation),
        val_fraction=f"{cfg.val_fraction:.0%}",
        seed=args.seed,
        variant=variant,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_target_modules=cfg.lora_target_modules,
        trainable=f"{trainable:,}",
        length=length,
        learning_rate=f"{args.learning_rate:g}",
        batch_size=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        best_metric=best_metric_name(args, labels),
        best=f"{best if best is not None else nan:.3f}",
        validation_rows="\n".join(
            f"| {e['step']} | {e.get('epoch') or 0:.2f} | {e.get('loss', nan):.4f} | "
            f"{e.get('breed_accuracy', nan):.3f} |"
            for e in history["validation"]
        ),
        adapter=repo_id or args.output_dir,
    )
    card.save(path)
