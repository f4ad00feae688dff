"""Paper §3.3 synchronous data parallelism, over every device of every host.

One `Mesh` with a single 'data' axis spans all devices of all processes.
Parameters and optimiser state are replicated; each global batch is sharded
along 'data', each process contributing its own rows
(`jax.make_array_from_process_local_data`). `jax.jit` then computes the mean
loss over the *global* batch, so the gradient all-reduce is implied by the
shardings and the result equals single-device training on the same batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Environment that means "this process is one of several": set by our launch
# scripts (JAX_COORDINATOR_ADDRESS) or Cloud TPU pods. SLURM is judged apart
# (`_slurm_processes`): SLURM_JOB_ID alone is also set for a lone `python` in
# an `salloc` shell or a batch script, where there are no peers to wait for.
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
# What JAX's SlurmCluster.is_env_present needs (jax/_src/clusters/slurm_cluster.py): only `srun`
# sets the step's node list and the task's rank, so these mark a task of a job step.
_SLURM_STEP_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def initialize(distributed: ml_collections.ConfigDict | None) -> None:
    """Starts `jax.distributed` when asked ('yes') or when the environment says so ('auto').

    'auto' starts it for a coordinator address (config.distributed or
    JAX_COORDINATOR_ADDRESS), a Cloud TPU pod, or a task of a SLURM `srun`
    step of several tasks; any other SLURM process runs single-process.

    The coordinator address, process count and id come from the config when
    set, else from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID), else JAX's cluster detection (SLURM, TPU pods).
    `heartbeat_timeout_seconds` bounds how long the survivors wait when one
    process dies before they fail with an error.
    """
    settings = dict(distributed or {})
    mode = str(settings.get("initialize", "auto"))
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize must be 'auto', 'yes' or 'no', got {mode!r}")
    if mode == "no" or _already_initialized():
        return
    address = settings.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if mode == "auto" and not (
        address or any(os.environ.get(name) for name in _MULTIPROCESS_ENV) or _slurm_processes(os.environ) > 1
    ):
        return
    num_processes = _int_or_none(settings.get("num_processes"), "JAX_NUM_PROCESSES")
    process_id = _int_or_none(settings.get("process_id"), "JAX_PROCESS_ID")
    logging.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)", address, num_processes, process_id)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=int(settings.get("heartbeat_timeout_seconds", 60)),
        initialization_timeout=int(settings.get("initialization_timeout_seconds", 300)),
    )


def _slurm_processes(environ: Mapping[str, str]) -> int:
    """How many processes a SLURM job step runs (0 outside SLURM); logs why a SLURM job runs alone.

    Multi-process only inside an `srun` step of several tasks, with every variable JAX's
    SLURM detection reads. A lone task — `python` in an `salloc` shell or an sbatch script,
    or `srun --ntasks=1` — runs single-process: jax.distributed would otherwise fail (no step
    node list) or wait for peers that never start.
    """
    if not environ.get("SLURM_JOB_ID"):
        return 0
    job = environ["SLURM_JOB_ID"]
    missing = [name for name in _SLURM_STEP_ENV if not environ.get(name)]
    if missing:
        tasks = environ.get("SLURM_NTASKS", "")
        if tasks.isdigit() and int(tasks) > 1:
            logging.warning(
                "SLURM job %s has %s tasks but this process is not a task of an srun step (%s unset): running "
                "single-process. Start every task with `srun` (launch/slurm.sh) to train on all of them.",
                job,
                tasks,
                ", ".join(missing),
            )
        else:
            logging.info("SLURM job %s outside an srun step: running single-process", job)
        return 1
    tasks = environ["SLURM_NTASKS"]
    if not tasks.isdigit():
        raise ValueError(f"SLURM_NTASKS={tasks!r} is not a task count")
    if int(tasks) == 1:
        logging.info("SLURM job %s, step of one task: running single-process", job)
    return int(tasks)


def barrier(name: str, timeout_seconds: int = 600) -> None:
    """Waits until every process gets here, over the coordination service (not a collective).

    XLA:CPU's gloo collectives give up if a peer is more than ~30 s late to its
    first collective; a slow host (data preparation, compilation) must not
    break the run, so processes line up here first.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _distributed  # no public barrier on the client exists

    _distributed.global_state.client.wait_at_barrier(f"vgg_jax_{name}", timeout_seconds * 1000)


_AGREEMENTS = iter(range(1 << 62))  # key-value keys are write-once: each agreement gets fresh ones


def agree(name: str, value: bool, timeout_seconds: int = 600) -> bool:
    """True when `value` is true on every process (over the coordination service's key-value store).

    Every process must call it, in the same order. Like `barrier`, it is not an XLA collective, so a process
    that is late (or failed to read a file the others read) cannot break one.
    """
    if jax.process_count() == 1:
        return value
    from jax._src import distributed as _distributed  # no public key-value store on the client exists

    client = _distributed.global_state.client
    key = f"vgg_jax_agree_{next(_AGREEMENTS)}_{name}"
    client.key_value_set(f"{key}/{jax.process_index()}", "1" if value else "0")
    return all(
        client.blocking_key_value_get(f"{key}/{index}", timeout_seconds * 1000) == "1"
        for index in range(jax.process_count())
    )


def _already_initialized() -> bool:
    try:
        from jax._src import distributed as _distributed  # no public query exists

        return _distributed.global_state.client is not None
    except (ImportError, AttributeError):
        return False


def _int_or_none(value: Any, env_name: str) -> int | None:
    if value is not None and int(value) >= 0:
        return int(value)
    if os.environ.get(env_name):
        return int(os.environ[env_name])
    return None


def create_mesh() -> Mesh:
    """All devices of all processes on one 'data' axis."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "global_batch_size") -> None:
    """A global batch must split evenly over devices and processes; say which field is wrong."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch_size % devices or global_batch_size % processes:
        raise ValueError(
            f"config.{field}={global_batch_size} must be divisible by the number of devices ({devices}) "
            f"and of processes ({processes})"
        )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded along 'data'."""
    sharding = data_sharded(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (identical on every process) on every device."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree
    )
