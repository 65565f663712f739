"""Train and evaluate a grid of LoRA settings x seeds; summarise them in sweep.md, sweep.json and sweep.png.

    python sweep.py                                  # r 8,32 x query,value / query,key,value,dense x seeds 1,2,3
    python sweep.py --lora_r 8,16,32,64 --seeds 1,2,3
    python sweep.py --max_train_samples 500,1000,all          # a learning curve
    python sweep.py --use_dora false,true                     # LoRA beside DoRA
    python sweep.py --demo --lora_r 8,16 --lora_target_modules query,value,key,dense --seeds 1,2 \\
                    --train_args "--num_train_epochs 4"       # offline, a few minutes on a CPU

Each run is `train.py` then `evaluate.py` in its own folder under --output_dir; rerunning skips finished
runs and redoes unfinished ones, saying why. One run per GPU at a time (--gpus); a job array shares the grid with
--shard i/n. The runs are sweep_runs.py's, the summary sweep_summary.py's.
"""

import logging
import os

from config import parse_options
from run_io import run_main, setup_logging
from run_record import save_run_config
from sweep_runs import Runner, SweepConfig, check_sweep_folder, grid_from, parse_shard, pick_slots, plan, unfinished
from sweep_summary import summarise, write_results, write_summary

logger = logging.getLogger("sweep")


def parse_args(argv=None) -> tuple:
    """(SweepConfig, its checked Grid); a bad flag or value is one UserError line."""
    _, (cfg,) = parse_options((SweepConfig,), argv)
    return cfg, grid_from(cfg)


def main(argv=None) -> dict:
    setup_logging()
    cfg, grid = parse_args(argv)
    check_sweep_folder(cfg, grid)
    runs = plan(cfg, grid)
    save_run_config(os.path.join(cfg.output_dir, "run_config.json"), sweep=cfg)
    if not cfg.summary_only:
        index, count = parse_shard(cfg.shard)
        mine = [r for k, r in enumerate(runs) if k % count == index]
        todo = unfinished(mine, cfg, grid)
        logger.info(
            "%d runs in the grid, %d in this shard: %d finished, %d to run",
            len(runs),
            len(mine),
            len(mine) - len(todo),
            len(todo),
        )
        if todo:
            slots = pick_slots(cfg.gpus)
            logger.info(
                "running on %s",
                "GPUs " + ",".join(map(str, slots)) if slots != [None] else "the default device, one run at a time",
            )
            Runner(cfg, grid, slots).run_all(todo)
    summary = summarise(cfg, grid, runs)
    write_summary(cfg, summary)
    if cfg.results:
        write_results(cfg.results, cfg.eval_dir, cfg.output_dir, summary)
    print(
        f"Sweep: {len(runs) - len(summary['missing_runs'])} of {len(runs)} runs finished; best on validation: "
        f"{summary['best']}. Summary: {os.path.join(cfg.output_dir, 'sweep.md')}"
    )
    return summary


if __name__ == "__main__":
    run_main(main)
