"""A sweep's summary: each setting over seeds, the paired test of the best against the default, sweep.md/json/png,
and the results page (the main run's numbers beside the sweep's)."""

import os

import numpy as np

from figures import figure
from metrics import BASELINES, format_ci, mcnemar
from run_io import UserError, write_text_atomic
from sweep_runs import (
    Grid,
    Run,
    SweepConfig,
    default_setting,
    read_json,
    same_setting,
    setting_name,
    write_json,
)


def mean_std(values: list) -> dict:
    """Mean and sample standard deviation (ddof=1; None for a single value) over seeds."""
    v = [x for x in values if x is not None]
    return {
        "mean": float(np.mean(v)) if v else None,
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "n": len(v),
    }


def caption_correct(run: Run):
    """{image_id: fine-tuned caption right} from the run's predictions.csv."""
    import pandas as pd

    frame = pd.read_csv(os.path.join(run.folder, "eval", "predictions.csv"), dtype=str, keep_default_na=False)
    return dict(zip(frame["image_id"], frame["fine_tuned_breed"] == frame["true_breed"]))


def paired_test(best_runs: list, default_runs: list) -> dict:
    """Exact McNemar between two settings on the same test images, pooled over the seeds both have, and per seed.

    Pooled: each (seed, image) is one pair (the default's run and the best's run of that seed on that image).
    """
    by_seed = {r.seed: r for r in default_runs}
    pooled_a, pooled_b, per_seed = [], [], {}
    for run in best_runs:
        if run.seed not in by_seed:
            continue
        a, b = caption_correct(by_seed[run.seed]), caption_correct(run)
        common = sorted(set(a) & set(b))
        pa, pb = [a[i] for i in common], [b[i] for i in common]
        per_seed[str(run.seed)] = {**mcnemar(pa, pb), "images": len(common)}
        pooled_a += pa
        pooled_b += pb
    return {
        "first": "default",
        "second": "best",
        "pooled_over_seeds": {**mcnemar(pooled_a, pooled_b), "pairs": len(pooled_a)},
        "per_seed": per_seed,
    }


def label_kind(runs: list) -> str:
    """What the runs' classes are called ("breed" for pets, "class" for others), from the first adapter that
    recorded its label set (train.py's run_config.json); "breed" when none did."""
    for run in runs:
        record = read_json(os.path.join(run.folder, "adapter", "run_config.json"))
        labels = (record or {}).get("trained_on", {}).get("labels") if isinstance(record, dict) else None
        if isinstance(labels, dict) and isinstance(labels.get("kind"), str):
            return labels["kind"]
    return "breed"


def summarise(cfg: SweepConfig, grid: Grid, runs: list) -> dict:
    default = default_setting()
    state = {r.name: r.result(cfg, grid) for r in runs}
    settings, results = [], {}
    for s in grid.settings:
        mine = [r for r in runs if r.setting == s]
        done = [(r, state[r.name][0]) for r in mine if state[r.name][0] is not None]
        results[setting_name(s)] = [r for r, _ in done]
        settings.append(
            {
                "name": setting_name(s),
                **s,
                "lora_alpha": 2 * s["lora_r"],
                "runs": [res for _, res in done],
                "validation_breed_accuracy": mean_std([res["validation_breed_accuracy"] for _, res in done]),
                "test_breed_accuracy": mean_std([res["test_breed_accuracy"] for _, res in done]),
                "test_likelihood_top1": mean_std([res["test_likelihood_top1"] for _, res in done]),
            }
        )
    ranked = [s for s in settings if s["validation_breed_accuracy"]["mean"] is not None]
    # chosen on validation only; ties go to the earlier setting in the grid
    best = max(ranked, key=lambda s: s["validation_breed_accuracy"]["mean"]) if ranked else None
    default_name = next((setting_name(s) for s in grid.settings if same_setting(s, default)), None)
    baselines = {}
    for key in BASELINES:
        values = [res[key] for s in settings for res in s["runs"] if key in res]
        if values:
            baselines[key] = mean_std(values)
    kind = label_kind([r for r in runs if state[r.name][0] is not None])
    summary = {
        "std": "sample standard deviation (ddof=1) over seeds",
        "kind": kind,  # the keys say breed_accuracy whatever the classes are; the text says `kind`
        "best_chosen_on": f"mean validation {kind} accuracy",
        "settings": settings,
        "best": best["name"] if best else None,
        "default": default_name,
        "baselines": baselines,
        "seeds": grid.seeds,
        "missing_runs": [r.name for r in runs if state[r.name][0] is None],
        "why_missing": {r.name: state[r.name][1] for r in runs if state[r.name][0] is None},
    }
    if best and default_name and best["name"] != default_name and results[default_name] and results[best["name"]]:
        summary["paired_test"] = paired_test(results[best["name"]], results[default_name])
    return summary


def write_summary(cfg: SweepConfig, summary: dict) -> None:
    out = cfg.output_dir
    write_json(os.path.join(out, "sweep.json"), summary)
    plot_sweep(summary, os.path.join(out, "sweep.png"))
    write_text_atomic(os.path.join(out, "sweep.md"), sweep_markdown(summary))


def _ms(m: dict) -> str:
    if m["mean"] is None:
        return "-"
    return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["std"] is not None else f"{m['mean']:.3f}"


def sweep_markdown(summary: dict) -> str:
    kind = summary.get("kind", "breed")
    rows = []
    for s in summary["settings"]:
        mark = " **best**" if s["name"] == summary["best"] else ""
        mark += " (default)" if s["name"] == summary["default"] else ""
        n = "all" if s["max_train_samples"] is None else s["max_train_samples"]
        variant = "DoRA" if s["use_dora"] else "LoRA"
        rows.append(
            f"| {s['lora_r']} | {s['lora_alpha']} | {variant} | {s['lora_target_modules']} | {n} | "
            f"{s['test_breed_accuracy']['n']} | {_ms(s['validation_breed_accuracy'])} | "
            f"{_ms(s['test_breed_accuracy'])} | {_ms(s['test_likelihood_top1'])} |{mark} |"
        )
    header = (
        f"| r | alpha | variant | target modules | train images | seeds | validation {kind} acc. | test {kind} acc. "
        "| test likelihood top-1 | |"
    )
    base = (
        "\n".join(f"| {BASELINES[k]} | {v['n']} | {_ms(v)} |" for k, v in summary["baselines"].items())
        or "| (none scored) | - | - |"
    )
    paired = summary.get("paired_test")
    if paired:
        p = paired["pooled_over_seeds"]
        per = "; ".join(
            f"seed {k}: {v['only_first_correct']} vs {v['only_second_correct']}, p = {v['p_value']:.3g}"
            for k, v in paired["per_seed"].items()
        )
        paired_text = (
            f"Exact McNemar test, best ({summary['best']}) against default ({summary['default']}), on the same "
            f"test images, **pooled over seeds** (each seed x image is one pair, {p['pairs']} pairs): default alone "
            f"right {p['only_first_correct']}, best alone right {p['only_second_correct']}, p = {p['p_value']:.3g}. "
            f"Per seed: {per}. Pooling treats seeds as independent replicates of the same images, so its p "
            "is optimistic when seeds agree image by image; the per-seed tests are the conservative reading."
        )
    elif summary["default"] is None:
        paired_text = "No paired test: the default setting is not in the grid."
    elif summary["best"] == summary["default"]:
        paired_text = "No paired test: the default setting is the best on validation."
    else:
        paired_text = "No paired test yet: the best or the default setting has no finished run."
    missing = [f"{name} ({why})" for name, why in summary["why_missing"].items()]
    return f"""# Sweep: LoRA settings x seeds

Per setting: mean ± sample standard deviation over seeds (ddof = 1) of the validation {kind} accuracy (the best
epoch's, as train.py selects it), the test {kind} accuracy (caption names the {kind}) and the test likelihood top-1.
lora_alpha = 2 x r throughout, so the LoRA scale is the same and only the rank changes; variant: LoRA, or
DoRA (PEFT's use_dora). The best setting is
chosen on **validation only** (ties: the earlier in the grid); its test number is then read, not chosen on.

{header}
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Baselines on the same test images (they do not depend on the LoRA setting: scored in one setting's runs, over seeds):

| baseline | seeds | test top-1 |
|---|---|---|
{base}

{paired_text}

{f"Missing runs (not finished): {', '.join(missing)}." if missing else "Every run finished."}

![validation and test {kind} accuracy per setting](sweep.png)
"""


def plot_sweep(summary: dict, path: str) -> None:
    settings, kind = summary["settings"], summary.get("kind", "breed")
    x = np.arange(len(settings))
    styles = dict(zip(BASELINES, ("--", "-.", (0, (5, 1)), ":")))
    with figure(path, figsize=(max(6, 1.2 * len(settings) + 3), 4.5)) as (fig, ax):
        for offset, key, label in (
            (-0.1, "validation_breed_accuracy", "validation"),
            (0.1, "test_breed_accuracy", "test"),
        ):
            means = [s[key]["mean"] if s[key]["mean"] is not None else np.nan for s in settings]
            stds = [s[key]["std"] or 0.0 for s in settings]
            ax.errorbar(x + offset, means, yerr=stds, fmt="o", capsize=4, label=f"{label} {kind} accuracy (mean ± std)")
        for key, value in summary["baselines"].items():
            ax.axhline(value["mean"], color="gray", linestyle=styles[key], label=f"{BASELINES[key]} (test)")
        ax.set_xticks(x, [s["name"].replace("_", "\n") for s in settings], fontsize=8)
        ax.set(
            ylabel=f"{kind} accuracy",
            ylim=(-0.02, 1.02),
            xlim=(-0.5, len(settings) - 0.5),
            title=f"Sweep over seeds {summary['seeds']}",
        )
        ax.legend(fontsize=8, loc="lower right")


def write_results(path: str, eval_dir: str, sweep_dir: str, summary: dict) -> None:
    """One page of evidence: the main run's numbers with intervals, every baseline, and the sweep over seeds."""
    source = os.path.join(eval_dir, "metrics.json")
    metrics = read_json(source)
    if metrics is None:
        raise UserError(f"--results needs {source} (run evaluate.py first, or pass --eval_dir)")
    try:
        text = results_page(metrics, path, eval_dir, sweep_dir, summary)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # a file anyone can edit or cut short
        raise UserError(
            f"{source} is not a complete evaluate.py metrics.json ({type(e).__name__}: {e}); "
            "run evaluate.py again, or pass another --eval_dir"
        ) from None
    write_text_atomic(path, text)
    print(f"Results: {path}")


def results_page(metrics, path: str, eval_dir: str, sweep_dir: str, summary: dict) -> str:
    here = os.path.dirname(os.path.abspath(path))

    def link(p):
        return os.path.relpath(os.path.abspath(p), here)

    zs, ft, kind = metrics["zero_shot"], metrics["fine_tuned"], summary.get("kind", "breed")
    rows = [
        f"| {label} | {format_ci(m[key], m[key + '_ci95'])} |"
        for label, m, key in (
            (f"zero-shot BLIP, caption names the {kind}", zs, "breed_accuracy"),
            ("zero-shot BLIP, likelihood ranking top-1", zs, "likelihood_top1"),
            (f"**fine-tuned BLIP + LoRA, caption names the {kind}**", ft, "breed_accuracy"),
            ("fine-tuned BLIP + LoRA, likelihood ranking top-1", ft, "likelihood_top1"),
        )
    ]
    for key, label in BASELINES.items():
        b = metrics.get(key) or {}
        if "accuracy" in b:
            mc = b["mcnemar_vs_fine_tuned_caption"]
            rows.append(
                f"| {label} (McNemar vs fine-tuned captions: {mc['only_first_correct']} vs "
                f"{mc['only_second_correct']}, p = {mc['p_value']:.3g}) | "
                f"{format_ci(b['accuracy'], b['accuracy_ci95'])} |"
            )
        elif b:
            rows.append(f"| {label} | skipped: {b.get('skipped')} |")
    sweep = (
        sweep_markdown(summary)
        .split("\n", 2)[2]
        .replace("](sweep.png)", f"]({link(os.path.join(sweep_dir, 'sweep.png'))})")
    )
    report = link(os.path.join(eval_dir, "report.md"))
    return f"""# Results

Main run: adapter `{metrics["adapter"]}` on `{metrics["base_model"]}`, {metrics["num_samples"]} {metrics["split"]}
images of `{metrics["dataset"]}`. Brackets: 95% bootstrap intervals. Full report: [{report}]({report})
(published numbers for context, and which baseline is fair for which question, are there).

| method | {kind} accuracy |
|---|---|
{chr(10).join(rows)}

## Over seeds and settings

{sweep}"""
