#!/usr/bin/env bash
# GPU cluster: one task per GPU (or per host), all running the same command.
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sh \
#       --config=configs/d.py --workdir=/shared/runs/d256
#
# jax.distributed.initialize() reads SLURM's environment (SLURM_JOB_ID,
# SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID) to find the
# coordinator, the process count and this task's id; vgg_jax.main calls it in
# a task of an srun step of several tasks. A lone task (plain `python` in an
# salloc shell or a batch script, or `srun --ntasks=1`) trains single-process.
# With one task per host (--ntasks-per-node=1) each process drives all GPUs of
# its host. The workdir must be on a file system every node sees; a
# rerun of the same sbatch line resumes from its latest checkpoint.
#SBATCH --job-name=vgg_jax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=72:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=vgg_jax-%j-%t.log
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: sbatch [SBATCH OPTIONS] $0 --config=CONFIG --workdir=DIR [--config.field=value ...]" >&2
  exit 2
fi

# --signal=TERM@300 sends SIGTERM five minutes before the time limit: vgg_jax
# saves a checkpoint and exits cleanly, and the next job resumes from it.
srun --kill-on-bad-exit=1 python3 -m vgg_jax.main "$@"
