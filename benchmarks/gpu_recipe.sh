#!/usr/bin/env bash
# The whole recipe at real shapes on one GPU (issue 13): base-sized random BLIP (224M, 384 px),
# synthetic 37-breed pets at the official split sizes (3,700 trainval / 3,663 test); train.py
# defaults (5 epochs, batch 16), evaluate.py on the whole test split, explainability.py on 8 images;
# train.py again with --cuda_graphs True; a torch.profiler summary of one training step and one
# evaluation batch; one epoch of training compiled with CUDA graphs, by inductor and by the
# cudagraphs backend (SKIP="train_compiled train_cudagraphs" leaves them out); and, where .baseline/
# holds an older copy of the project (`git archive <commit> | tar -x -C .baseline`), that path on a
# reduced run (1 epoch of 1,024 images; evaluation of 512 test images with the NEW adapter) for
# img/s side by side and the top-1 breeds compared on the common images.
#
#   OUT=/tmp/out bash benchmarks/gpu_recipe.sh            # from the repository root; ~5 min on an H100
#   TV=10 TE=14 BL_EVAL=518 SKIP="explain profile bl_train bl_explain" bash benchmarks/gpu_recipe.sh  # old vs new top-1 only
#   TV=2 TE=2 SIZE=64 MODEL=tiny BL_TRAIN=32 BL_EVAL=16 TSCALE=10 BUDGET=3600 bash benchmarks/gpu_recipe.sh  # CPU dry run
#   MODEL=tiny IMAGE_SIZE=384 SKIP="profile train_compiled" TSCALE=20 BUDGET=7200 bash benchmarks/gpu_recipe.sh
#       # the host side at full size on a CPU: a narrow model at 384 px (577 image tokens), real split sizes
#
# Writes flat files to $OUT: timings.txt, stages.log, summary.txt, recipe.json, profile.txt,
# metrics.json, train_history.json, attention_metrics.json. The CUDA-graph self-checks (the decoder's
# first graphed batch against the plain loop; --cuda_graphs' first replayed step against an eager
# one) log a "self-check" line each: summary.txt lists them by stage, recipe.json under "self_checks". Wheels in $WHL (default .whl) are
# installed first (datasets, rouge-score, ... where the machine lacks them).
set -u
P=$(pwd); W=$(mktemp -d); OUT=${OUT:-$W/out}; mkdir -p "$OUT"
TV=${TV:-100}; TE=${TE:-99}; SIZE=${SIZE:-384}; MODEL=${MODEL:-base}; IMAGE_SIZE=${IMAGE_SIZE:-64}; PY=${PY:-python3}; WHL=${WHL:-.whl}
BL_TRAIN=${BL_TRAIN:-1024}; BL_EVAL=${BL_EVAL:-512}
# Every stage has its own limit (TSCALE multiplies them, for slow dry runs), and all of them
# together end BUDGET seconds after the start, so the summary is always written
TSCALE=${TSCALE:-1}; END=$(( $(date +%s) + ${BUDGET:-450} ))
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$WHL"/*.whl \
    && export PYTHONPATH="$W/site"
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; nproc; df -h /dev/shm | tail -1
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/summary.txt"

# stage NAME TIMEOUT_S command...: runs it with a time limit, logs to $W/NAME.log, appends "NAME rc=R S s"
stage() {
  local name=$1 lim=$(( $2 * TSCALE )); shift 2; local s; s=$(date +%s.%N)
  case " ${SKIP:-} " in *" $name "*) echo "$name skipped (SKIP)" | tee -a "$OUT/timings.txt"; return;; esac
  local left=$(( END - $(date +%s) - 20 )); [ "$left" -lt "$lim" ] && lim=$left
  if [ "$lim" -lt 10 ]; then echo "$name skipped (time budget spent)" | tee -a "$OUT/timings.txt"; return; fi
  timeout "$lim" "$@" > "$W/$name.log" 2>&1; local rc=$?
  { echo "=== $name"; tr "\r" "\n" < "$W/$name.log" | grep -v "^\s*$" | grep -v "it/s]$" | tail -40; } >> "$OUT/stages.log"
  awk -v n="$name" -v r=$rc -v s="$s" -v e="$(date +%s.%N)" 'BEGIN{printf "%s rc=%s %.1f s\n", n, r, e - s}' | tee -a "$OUT/timings.txt"
}
BASE=$([ "$MODEL" = base ] && echo True || echo False)
# --cuda_graphs is refused without a GPU (a CPU dry run skips that stage)
$PY -c "import torch; raise SystemExit(not torch.cuda.is_available())" 2>/dev/null || SKIP="${SKIP:-} train_graphs"
stage build 60 $PY -c "
from demo import build_tiny_blip
build_tiny_blip('$W/base', image_size=$IMAGE_SIZE, base_sized=$BASE); print('built')"
stage data 90 $PY benchmarks/gen_pets.py "$W/pets" "$TV" "$TE" "$SIZE"

# The new path: the full recipe, three scripts as a user runs them
stage train 240 $PY train.py --model_name_or_path "$W/base" --dataset "$W/pets" --output_dir "$W/run" \
  --embedding_cache_dir "$W/cache" --logging_steps 50
stage evaluate 120 $PY evaluate.py --adapter "$W/run" --dataset "$W/pets" --output_dir "$W/eval" \
  --classifier_baseline none
cp "$W/run/train_history.json" "$W/eval/metrics.json" "$OUT/" 2>/dev/null
# The LoRA classifier baseline on BLIP's vision encoder alone (its training time and images/s are in metrics.json)
stage classifier 180 $PY evaluate.py --adapter "$W/run" --dataset "$W/pets" --output_dir "$W/eval_classifier" \
  --linear_probe False --clip_model none --classifier_model none --classifier_cache_dir "$W/classifiers" \
  --max_eval_samples 512
cp "$W/eval_classifier/metrics.json" "$OUT/classifier_metrics.json" 2>/dev/null
stage explain 60 $PY explainability.py --adapter "$W/run" --dataset "$W/pets" --output_dir "$W/explain" --num_images 8
# train.py's defaults again with the training step recorded as CUDA graphs (--cuda_graphs: no compilation),
# on the cache the first run built (its build time is in the first run's timing line)
stage train_graphs 240 $PY train.py --model_name_or_path "$W/base" --dataset "$W/pets" --output_dir "$W/run_graphs" \
  --embedding_cache_dir "$W/cache" --logging_steps 50 --cuda_graphs True
stage profile 150 $PY benchmarks/profile_gpu.py "$W/base"
cp "$W/profile.log" "$OUT/profile.txt"
# The training loop compiled with CUDA graphs (torch.compile reduce-overhead; batches padded to one
# length): one epoch without validation or checkpoints, for the loop's img/s and the compile time
stage train_compiled 180 $PY train.py --model_name_or_path "$W/base" --dataset "$W/pets" --output_dir "$W/run_compiled" \
  --embedding_cache_dir "$W/cache" --logging_steps 50 --num_train_epochs 1 --eval_strategy no --save_strategy no \
  --load_best_model_at_end False --torch_compile True --torch_compile_mode reduce-overhead
# The same with the cudagraphs backend: CUDA graphs of AOTAutograd's graphs, no Triton compilation
stage train_cudagraphs 120 $PY train.py --model_name_or_path "$W/base" --dataset "$W/pets" --output_dir "$W/run_cudagraphs" \
  --embedding_cache_dir "$W/cache" --logging_steps 50 --num_train_epochs 1 --eval_strategy no --save_strategy no \
  --load_best_model_at_end False --torch_compile True --torch_compile_backend cudagraphs

# Today's path (.baseline/), reduced: one epoch of BL_TRAIN images without validation or checkpoints
# (the loop's img/s), and evaluate.py on BL_EVAL test images with the new adapter (img/s; same predictions?)
if [ -f .baseline/train.py ]; then
  # that path needs a tokenizer with [DEC] in its files (issue 10): its own build of the same model
  stage bl_build 60 bash -c "cd .baseline && $PY -c \"
try: from demo import build_tiny_blip
except ImportError: from model import build_tiny_blip  # copies older than demo.py
from data import caption_for
words = ' '.join(caption_for(i, 'A photo of {article} {breed}, a type of pet.') for i in range(37)).replace(',', ' ').replace('.', ' ').split() + ['cat','dog']
build_tiny_blip('$W/bl_base', words, base_sized=$BASE); print('built')\""
  stage bl_train 120 $PY .baseline/train.py --model_name_or_path "$W/bl_base" --dataset "$W/pets" --output_dir "$W/bl_run" \
    --embedding_cache_dir "$W/bl_cache" --max_train_samples "$BL_TRAIN" --max_eval_samples 64 --num_train_epochs 1 \
    --eval_strategy no --save_strategy no --load_best_model_at_end False --logging_steps 50
  stage bl_evaluate 120 $PY .baseline/evaluate.py --adapter "$W/run" --dataset "$W/pets" --output_dir "$W/bl_eval" \
    --max_eval_samples "$BL_EVAL"
  stage bl_explain 60 $PY .baseline/explainability.py --adapter "$W/run" --dataset "$W/pets" --output_dir "$W/bl_explain" --num_images 8
fi

cp "$W/explain/attention_metrics.json" "$OUT/" 2>/dev/null
$PY benchmarks/compare_recipe.py "$W" "$OUT" 2>&1 | tee -a "$OUT/summary.txt"
cat "$OUT/timings.txt"
