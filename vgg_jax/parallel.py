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
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Environment that means "this process is one of several": set by our launch
# scripts (JAX_COORDINATOR_ADDRESS), SLURM, or Cloud TPU pods.
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(distributed: ml_collections.ConfigDict | None) -> None:
    """Starts `jax.distributed` when asked ('yes') or when the environment says so ('auto').

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
    if mode == "auto" and not any(os.environ.get(name) for name in _MULTIPROCESS_ENV):
        return
    address = settings.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
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
