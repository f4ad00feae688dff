#!/usr/bin/env bash
# The GPU benchmark (paper §3.1's train step on one accelerator), ready for a bare GPU box: bf16 matmul rate,
# then VGG-16 (D) and VGG-19 (E) at 224 px, batch 256 and 128, bf16 compute — images/s, MFU against the
# matmul rate measured in the same process, and PyTorch AMP (bf16, channels_last, cudnn.benchmark) on the
# same card, interleaved; then the cost of resampling the crops on the device (config.resample_on_device)
# and of remat. Synthetic uint8 batches are made on the device. Results: stdout, and JSON in $OUT (or
# ./gpu_results). Stops starting new runs after GPU_BENCH_BUDGET_S seconds (default 420: ≤ 8 min in all).
#
# What it needs — a common GPU image has all of it: Python ≥ 3.11, jax with its CUDA plugin (0.11 / CUDA 13
# or any jax ≥ 0.10), flax, optax, orbax-checkpoint, torch with CUDA (optional: without it, ours only),
# absl-py, numpy. Not TensorFlow, TFDS, ml_collections or clu: nothing on this path imports them
# (--bare fails a run that did; the recipe is read without ml_collections, bench/common.py). Extra wheels
# to bring along: none, so there is nothing to fetch; vgg_jax runs from this checkout, uninstalled.
# tests/test_gpu_bench.py (slow tier) runs --dry-run in a venv of exactly that package set, made by the test.
#
#   bash bench/gpu.sh             # everything, ≤ 8 min on an H100
#   QUICK=1 bash bench/gpu.sh     # VGG-16 batch 256 only
#   bash bench/gpu.sh --dry-run   # the same sequence on the CPU with a tiny net and CPU PyTorch (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-gpu_results}"
BUDGET="${GPU_BENCH_BUDGET_S:-420}"
mkdir -p "$OUT_DIR"
# Let JAX take most of the card while the PyTorch worker shares it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"

SIZE=(--image-size 224 --dtype bfloat16 --warmup 3 --repeats 5 --steps 10)
MATMUL=(--matmul-only --dtype bfloat16)
if [[ "${1:-}" == "--dry-run" ]]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  SIZE=(--tiny)
  MATMUL+=(--tiny)
  BUDGET="${GPU_BENCH_BUDGET_S:-100000}"  # every step of the sequence, however slow this CPU
  echo "dry run: tiny net on the CPU (checks the environment and the script, measures nothing)"
fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"

TORCH=()
if "$PYTHON" -c "import torch" 2>/dev/null; then
  TORCH=(--torch)
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA' if torch.cuda.is_available() else 'CPU')"
else
  echo "PyTorch is not installed here: ours only"
fi

run() {  # one bench/train_step.py run unless the time budget is spent
  local name="$1"
  shift
  if ((SECONDS > BUDGET)); then
    echo "skipped $name: ${SECONDS}s spent of the ${BUDGET}s budget"
    return 0
  fi
  "$PYTHON" bench/train_step.py --bare "$@" --json "$OUT_DIR/$name.json"
}

run matmul "${MATMUL[@]}"
if [[ "${QUICK:-0}" == "1" ]]; then
  RUNS=("D 256")
else
  RUNS=("D 256" "E 256" "D 128" "E 128")
fi
for spec in "${RUNS[@]}"; do
  read -r variant batch <<<"$spec"
  run "vgg_${variant}_b${batch}" --variant "$variant" --batch "$batch" "${SIZE[@]}" "${TORCH[@]}"
done
# The device resampling's cost (ours only; compare with vgg_D_b256), then remat's (memory and speed).
run vgg_D_b256_resample --variant D --batch 256 "${SIZE[@]}" --resample-on-device
run vgg_D_b256_remat --variant D --batch 256 "${SIZE[@]}" --remat
echo "gpu.sh: done in ${SECONDS}s; JSON in $OUT_DIR"
