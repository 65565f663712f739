#!/usr/bin/env bash
# The benchmark on one GPU in bf16, a few minutes: training and evaluation images per second,
# peak memory, on the base-sized random BLIP and the tiny demo model. Writes bench-gpu.json.
#   bash benchmarks/gpu.sh            (OUT=folder to write elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/bench.py --models base,tiny --device cuda --dtype bf16 --repeats 5 --out "${OUT:-.}/bench-gpu.json"
