#!/usr/bin/env bash
# One prepared GPU benchmark (issue 8): bf16 matmul rate, then VGG-16 (D) and VGG-19 (E) at 224 px,
# batch 128 and 256, bf16 compute — images/s, MFU against the matmul rate measured in the same
# process, and PyTorch AMP (bf16, channels_last, cudnn.benchmark) on the same card, interleaved.
# Ends with the remat cost (VGG-16, batch 256). Results go to stdout and, as JSON, to $OUT (or ./gpu_results).
#
#   bash bench/gpu.sh            # everything (~6-8 min on an H100)
#   QUICK=1 bash bench/gpu.sh    # VGG-16 batch 256 only
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_results}"
mkdir -p "$OUT_DIR"
export TF_CPP_MIN_LOG_LEVEL=2
# Let JAX take most of the card while the PyTorch worker shares it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"

TORCH=()
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  TORCH=(--torch)
  python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
else
  echo "PyTorch with CUDA is not installed here: ours only (pip install -e .[torch] for the comparison)"
fi

python bench/train_step.py --matmul-only --dtype bfloat16 --json "$OUT_DIR/matmul.json"

COMMON=(--image-size 224 --dtype bfloat16 --warmup 3 --repeats 7 --steps 10)
if [[ "${QUICK:-0}" == "1" ]]; then
  RUNS=("D 256")
else
  RUNS=("D 128" "D 256" "E 128" "E 256")
fi
for run in "${RUNS[@]}"; do
  read -r variant batch <<<"$run"
  python bench/train_step.py --variant "$variant" --batch "$batch" "${COMMON[@]}" "${TORCH[@]}" \
    --json "$OUT_DIR/vgg_${variant}_b${batch}.json"
done
# remat: memory and speed cost (no PyTorch needed).
python bench/train_step.py --variant D --batch 256 "${COMMON[@]}" --remat --json "$OUT_DIR/vgg_D_b256_remat.json"
