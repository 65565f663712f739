"""Train and evaluate a grid of LoRA settings x seeds; summarise them in sweep.md, sweep.json and sweep.png.

    python sweep.py                                           # r 8,32 x query,value / query,key,value,dense x seeds 1,2,3
    python sweep.py --lora_r 8,16,32,64 --seeds 1,2,3
    python sweep.py --max_train_samples 500,1000,all          # a learning curve
    python sweep.py --demo --lora_r 8,16 --lora_target_modules query,value,key,dense --seeds 1,2 \\
                    --train_args "--num_train_epochs 4"       # offline, a few minutes on a CPU

Each run is `train.py` then `evaluate.py` in its own folder under --output_dir; rerunning skips finished
runs and redoes unfinished ones. One run per GPU at a time (--gpus); a job array shares the grid with --shard i/n.
"""

from run_io import run_main
from sweeps import main

if __name__ == "__main__":
    run_main(main)
