#!/usr/bin/env bash
# Multi-host training on one machine: N processes with M CPU devices each,
# coordinated by jax.distributed over a loopback address.
#
#   launch/local_multiprocess.sh N M -- --config=configs/e.py:demo --workdir=runs/mp
#
# Every process runs `python -m vgg_jax.main ARGS...` with its process id in
# JAX_PROCESS_ID. The script waits for all of them and exits non-zero if any
# failed. Environment:
#   VGG_COORDINATOR_PORT  port of the coordinator (default: a free one)
#   VGG_LOG_DIR           if set, process i writes to $VGG_LOG_DIR/process_i.log
#   PYTHON                interpreter (default: python3)
set -euo pipefail

usage() {
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- MAIN_ARGS..." >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
num_processes=$1
devices_per_process=$2
shift 2
[[ "$num_processes" =~ ^[1-9][0-9]*$ && "$devices_per_process" =~ ^[1-9][0-9]*$ ]] || usage
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi

python_bin=${PYTHON:-python3}
port=${VGG_COORDINATOR_PORT:-$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((process_id = 0; process_id < num_processes; process_id++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}"
    export JAX_NUM_PROCESSES="$num_processes"
    export JAX_PROCESS_ID="$process_id"
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="--xla_force_host_platform_device_count=${devices_per_process} ${XLA_FLAGS:-}"
    if [[ -n "${VGG_LOG_DIR:-}" ]]; then
      mkdir -p "$VGG_LOG_DIR"
      exec "$python_bin" -m vgg_jax.main "$@" >"${VGG_LOG_DIR}/process_${process_id}.log" 2>&1
    else
      exec "$python_bin" -m vgg_jax.main "$@"
    fi
  ) &
  pids+=("$!")
done

status=0
for process_id in "${!pids[@]}"; do
  if ! wait "${pids[$process_id]}"; then
    echo "local_multiprocess: process ${process_id} failed" >&2
    status=1
  fi
done
exit "$status"
