#!/usr/bin/env bash
# Cloud TPU VM pod: install vgg_jax on every worker and start the same
# training command on all of them (jax.distributed finds its peers itself).
#
#   TPU_NAME=my-pod ZONE=us-central2-b BUCKET=gs://my-bucket \
#     launch/tpu_pod.sh [--dry-run] -- --config=configs/d.py
#   launch/tpu_pod.sh [--dry-run] --follow [WORKER]   # follow a worker's log (default 0)
#   launch/tpu_pod.sh [--dry-run] --stop              # stop the run on every worker
#
# Variables:
#   TPU_NAME   name of the TPU VM pod (required)
#   ZONE       its zone (required)
#   PROJECT    GCP project (optional; gcloud's default otherwise)
#   BUCKET     gs:// bucket holding data and runs (required to start a run)
#   RUN_NAME   run directory under $BUCKET/runs (default: vgg)
#   DATA_DIR   TFDS data_dir (default: $BUCKET/tensorflow_datasets)
#   NUM_WORKERS  number of hosts; when set, one ssh command per worker
#              (--worker=0 … N-1, run in parallel), else one --worker=all
#   REPO_URL   git URL workers pip-install the code from (default: this
#              checkout, copied to every worker with scp)
# Orbax writes checkpoints and TFDS reads data directly from gs:// paths.
#
# Training runs detached on every worker (setsid nohup), so a dropped ssh
# connection does not stop it; this script returns once all workers have
# started. Each worker writes its output to ~/vgg_jax_train.log (appended
# on every start) and the training pid to ~/vgg_jax_train.pid; a start is
# refused on a worker where that pid is still running. Follow the log with
# `--follow` (or: gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE"
# --worker=0 --command='tail -F ~/vgg_jax_train.log'). `--stop` sends SIGTERM
# to the pid on every worker: vgg_jax saves a checkpoint and exits, and
# starting the same command again resumes from it.
#
# Every value that reaches the workers' shell (BUCKET, RUN_NAME, DATA_DIR,
# REPO_URL, the training arguments) is quoted with printf %q, so it arrives
# as one word whatever it contains. The workers' login shell must be bash
# (the TPU VM images' default): %q may use bash's $'…' quoting.
set -euo pipefail

dry_run=0
action=train
follow_worker=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --stop) action=stop; shift ;;
    --follow)
      action=follow
      shift
      if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
        follow_worker=$1
        shift
      fi
      ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

: "${TPU_NAME:?set TPU_NAME to the TPU VM pod name}"
: "${ZONE:?set ZONE to the pod zone}"
if [[ -n "${NUM_WORKERS:-}" && ! "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_WORKERS=${NUM_WORKERS} is not a positive number of hosts" >&2
  exit 2
fi
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project="$PROJECT")
fi

# Paths on the workers, expanded by their shell (hence the literal ~).
# shellcheck disable=SC2088
log_file='~/vgg_jax_train.log'
# shellcheck disable=SC2088
pid_file='~/vgg_jax_train.pid'
# True on a worker whose recorded training process still runs (sets $pid there); a pid reused by
# another program since does not count.
running="pid=\$(cat ${pid_file} 2>/dev/null) && grep -qsa vgg_jax.main /proc/\$pid/cmdline"

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

ssh_worker() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker="$1" --command="$2"
}

ssh_all() {
  if [[ -z "${NUM_WORKERS:-}" ]]; then
    ssh_worker all "$1"
    return
  fi
  local worker pids=()
  for ((worker = 0; worker < NUM_WORKERS; worker++)); do
    ssh_worker "$worker" "$1" &
    pids+=("$!")
  done
  local status=0
  for pid in "${pids[@]}"; do
    wait "$pid" || status=1
  done
  return "$status"
}

case "$action" in
  follow)
    ssh_worker "$follow_worker" "tail -n 100 -F ${log_file}"
    exit
    ;;
  stop)
    # The pid the start recorded, and only while it is still vgg_jax: nothing else is signalled.
    ssh_all "if ${running}; then kill -TERM \"\$pid\" && echo \"\$(hostname): SIGTERM sent to \$pid; the run saves a checkpoint and exits\"; else echo \"\$(hostname): no vgg_jax run going\"; fi"
    exit
    ;;
esac

: "${BUCKET:?set BUCKET to a gs:// bucket for data and runs}"
run_name=${RUN_NAME:-vgg}
data_dir=${DATA_DIR:-${BUCKET}/tensorflow_datasets}

main_args=""
for arg in "${args[@]}" "--workdir=${BUCKET}/runs/${run_name}" "--config.data_dir=${data_dir}"; do
  main_args+=" $(printf '%q' "$arg")"
done

if [[ -n "${REPO_URL:-}" ]]; then
  install="python3 -m pip install -q $(printf '%q' "git+${REPO_URL}") 'jax[tpu]'"
  # Run from the home directory, not from a checkout a previous copy may have left in ~/vgg_jax
  # (python -m would import that instead of the installed package); vgg_jax.main finds
  # configs/<net>.py in the package.
  workdir_cd="cd ~"
else
  install="python3 -m pip install -q -e ~/vgg_jax 'jax[tpu]'"
  workdir_cd="cd ~/vgg_jax"
fi
# Detached from the ssh session (setsid: own session, no SIGHUP; nohup: belt and braces; all three
# standard streams redirected so that ssh does not wait for them).
train="${workdir_cd} || exit 1; if ${running}; then echo \"\$(hostname): a run is already going (pid \$pid); stop it first (--stop)\" >&2; exit 1; fi; setsid nohup python3 -m vgg_jax.main${main_args} >>${log_file} 2>&1 </dev/null & echo \$! >${pid_file}; echo \"\$(hostname): started pid \$!; log in ${log_file}\""
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -z "${REPO_URL:-}" ]]; then
  run gcloud compute tpus tpu-vm scp --recurse "$repo_root" "${TPU_NAME}:~/vgg_jax" --zone="$ZONE" \
    "${project_flag[@]}" --worker=all
fi
ssh_all "$install"
ssh_all "$train"
if [[ $dry_run -eq 0 ]]; then
  echo "Training runs detached on every worker. Follow it: $0 --follow [WORKER]; stop it: $0 --stop"
fi
