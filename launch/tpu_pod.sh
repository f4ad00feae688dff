#!/usr/bin/env bash
# Cloud TPU VM pod: install vgg_jax on every worker and start the same
# training command on all of them (jax.distributed finds its peers itself).
#
#   TPU_NAME=my-pod ZONE=us-central2-b BUCKET=gs://my-bucket \
#     launch/tpu_pod.sh [--dry-run] -- --config=configs/d.py
#
# Variables:
#   TPU_NAME   name of the TPU VM pod (required)
#   ZONE       its zone (required)
#   PROJECT    GCP project (optional; gcloud's default otherwise)
#   BUCKET     gs:// bucket holding data and runs (required)
#   RUN_NAME   run directory under $BUCKET/runs (default: vgg)
#   DATA_DIR   TFDS data_dir (default: $BUCKET/tensorflow_datasets)
#   NUM_WORKERS  number of hosts; when set, one ssh command per worker
#              (--worker=0 … N-1, run in parallel), else one --worker=all
#   REPO_URL   git URL workers pip-install the code from (default: this
#              checkout, copied to every worker with scp)
# Orbax writes checkpoints and TFDS reads data directly from gs:// paths.
set -euo pipefail

dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

: "${TPU_NAME:?set TPU_NAME to the TPU VM pod name}"
: "${ZONE:?set ZONE to the pod zone}"
: "${BUCKET:?set BUCKET to a gs:// bucket for data and runs}"
run_name=${RUN_NAME:-vgg}
data_dir=${DATA_DIR:-${BUCKET}/tensorflow_datasets}
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project="$PROJECT")
fi

quoted_args=""
for arg in "${args[@]}"; do
  quoted_args+=" $(printf '%q' "$arg")"
done

if [[ -n "${REPO_URL:-}" ]]; then
  install="python3 -m pip install -q 'git+${REPO_URL}' 'jax[tpu]'"
else
  install="python3 -m pip install -q -e ~/vgg_jax 'jax[tpu]'"
fi
train="cd ~/vgg_jax 2>/dev/null || cd ~; python3 -m vgg_jax.main${quoted_args} --workdir=${BUCKET}/runs/${run_name} --config.data_dir=${data_dir}"
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

ssh_all() {
  if [[ -z "${NUM_WORKERS:-}" ]]; then
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker=all --command="$1"
    return
  fi
  local worker pids=()
  for ((worker = 0; worker < NUM_WORKERS; worker++)); do
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker="$worker" \
      --command="$1" &
    pids+=("$!")
  done
  local status=0
  for pid in "${pids[@]}"; do
    wait "$pid" || status=1
  done
  return "$status"
}

if [[ -z "${REPO_URL:-}" ]]; then
  run gcloud compute tpus tpu-vm scp --recurse "$repo_root" "${TPU_NAME}:~/vgg_jax" --zone="$ZONE" \
    "${project_flag[@]}" --worker=all
fi
ssh_all "$install"
ssh_all "$train"
