"""Checkpoints (Orbax) and the paper's warm starts by layer name (§3.1).

A run directory (a training workdir, or what `convert.py` writes) holds::

    config.json          the resolved config of the run (the current one)
    config_history.jsonl every start of a training run: time, step, config
                         (`vgg_jax.resume`)
    class_names.json     the data set's class names (training runs; converted
                         weights keep theirs in config.json's `class_names`)
    checkpoints/<step>/  Orbax items: 'params' (the network), 'train_state'
                         (step, optimiser and plateau state; absent in
                         converted weights), 'meta' (JSON: step, epoch and the
                         validation metrics that picked the best checkpoint)

Warm start copies named layers from another run into freshly initialised
parameters: net A → B…E (conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8),
S=256 → S=384 and S=384 → jittered S (all layers).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vgg_jax import console

CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.json"
CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "top1_error"
# Orbax writes a step to `<step>.orbax-checkpoint-tmp-<time>` and renames it when complete.
UNFINISHED_MARK = ".orbax-checkpoint-tmp"


def save_config(directory: str, config: ml_collections.ConfigDict) -> None:
    """Writes `config` as JSON beside the checkpoints (process 0 only)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(directory: str) -> ml_collections.ConfigDict:
    path = epath.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {directory!r} is not a vgg_jax run directory "
            "(a training workdir or the output of `python -m vgg_jax.convert`)"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def create_manager(
    directory: str,
    *,
    keep: int = 3,
    keep_best: int = 1,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """The run's manager: keeps the last `keep` steps and the `keep_best` with the lowest val error."""
    policies: list[Any] = [ocp.checkpoint_managers.preservation_policy.LatestN(n=keep)]
    if keep_best > 0:
        policies.append(
            ocp.checkpoint_managers.preservation_policy.BestN(
                get_metric_fn=lambda metrics: -metrics[BEST_METRIC],
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    # Orbax warns that a read-only manager is read-only: that is what loading a run asks for.
    with console.without_messages("absl", "read_only=True", "is read only"):
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.preservation_policy.AnyPreservationPolicy(policies),
        )
        return ocp.CheckpointManager(
            epath.Path(directory) / CHECKPOINT_DIR,
            options=options,
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "train_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    params: Any,
    train_state: Any | None,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
) -> bool:
    """Saves one step; `metrics` (with top1_error) ranks it for keep-best."""
    items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta)))
    if train_state is not None:
        items["train_state"] = ocp.args.StandardSave(train_state)
    return manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None, force=force)


# The parts of the train state besides the parameters, saved together as the 'train_state' item.
TRAIN_STATE_FIELDS = ("step", "opt_state", "plateau")


def save_train_state(
    manager: ocp.CheckpointManager,
    state: Any,
    *,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
) -> bool:
    """Saves a train state (params + `TRAIN_STATE_FIELDS`) at `meta['step']`; logs step, path and seconds."""
    step = int(meta["step"])
    start = time.perf_counter()
    extra = {name: getattr(state, name) for name in TRAIN_STATE_FIELDS}
    saved = save(manager, step, params=state.params, train_state=extra, meta=meta, metrics=metrics, force=force)
    if saved and jax.process_index() == 0:
        logging.info(
            "checkpoint: step %d saved to %s (%.1f s)", step, manager.directory / str(step), time.perf_counter() - start
        )
    return saved


def restore_train_state(
    manager: ocp.CheckpointManager, like: Any, sharding: Any, step: int | None = None
) -> Any | None:
    """The train state saved at `step` (default: the latest), shaped like `like` and placed with `sharding`.

    None when nothing is saved. `like` is a train state (a flax dataclass with params and
    `TRAIN_STATE_FIELDS`, on the host or on device); the result is `like.replace(...)` with the restored
    values, so resuming needs no knowledge of the state's class here.
    """
    latest = manager.latest_step() if step is None else step
    if latest is None:
        return None
    target = jax.tree_util.tree_map(lambda x: _abstract(x, sharding), like)
    restored = manager.restore(
        latest,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            train_state=ocp.args.StandardRestore({name: getattr(target, name) for name in TRAIN_STATE_FIELDS}),
        ),
    )
    return like.replace(params=restored["params"], **restored["train_state"])


def _abstract(leaf: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    # Shape and dtype from the leaf itself: no device-to-host copy of a live (on-device) state.
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=sharding)


def latest_step(directory: str) -> int | None:
    """The newest complete step of a run directory (None: none), from a read-only look."""
    if not (epath.Path(directory) / CHECKPOINT_DIR).exists():
        return None
    manager = create_manager(directory, read_only=True, async_save=False)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def has_train_state(directory: str, step: int) -> bool:
    """False for parameters only (what `vgg_jax.convert` writes): nothing to resume training from."""
    return (epath.Path(directory) / CHECKPOINT_DIR / str(step) / "train_state").exists()


def remove_unfinished_saves(directory: str) -> list[str]:
    """Deletes the `<step>.orbax-checkpoint-tmp*` directories a kill during a save left (process 0 only).

    Orbax renames a step's directory only once it is complete, so these hold nothing a resume could use (and up
    to a full checkpoint's size each). Only direct children of this run's checkpoints/ are touched; the caller
    makes the other processes wait (a barrier) before anyone saves.
    """
    root = epath.Path(directory) / CHECKPOINT_DIR
    if jax.process_index() != 0 or not root.exists():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        if UNFINISHED_MARK in child.name and child.is_dir():
            child.rmtree()
            removed.append(child.name)
    if removed:
        logging.warning("removed %d unfinished checkpoint save(s) in %s: %s", len(removed), root, ", ".join(removed))
    return removed


def steps_with_meta(directory: str) -> dict[int, dict[str, Any]]:
    """Every saved step of a run directory and its 'meta' JSON."""
    root = epath.Path(directory) / CHECKPOINT_DIR
    found: dict[int, dict[str, Any]] = {}
    if root.exists():
        for child in root.iterdir():
            meta_file = child / "meta" / "metadata"  # where Orbax's JsonSave writes
            if child.name.isdigit() and meta_file.exists():
                found[int(child.name)] = json.loads(meta_file.read_text())
    return found


def resolve_step(directory: str, step: int | str | None = None) -> int:
    """None/'latest' → the newest step; 'best' → the lowest validation top-1 error; or an int."""
    manager = create_manager(directory, read_only=True, async_save=False)
    try:
        return _resolve_step(manager, directory, step)
    finally:
        manager.close()


def _resolve_step(manager: ocp.CheckpointManager, directory: str, step: int | str | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(str(directory), CHECKPOINT_DIR)}")
    if step is None or step == "latest":
        return steps[-1]
    if step == "best":
        metas = steps_with_meta(directory)
        ranked = [(metas[s][BEST_METRIC], -s) for s in steps if BEST_METRIC in metas.get(s, {})]
        if not ranked:
            logging.warning("no checkpoint of %s has a validation error; 'best' falls back to the latest", directory)
            return steps[-1]
        return -min(ranked)[1]
    if int(step) not in steps:
        raise FileNotFoundError(f"step {step} is not saved in {directory}; saved steps: {steps}")
    return int(step)


def restore_params(directory: str, step: int | str | None = None) -> tuple[Any, ml_collections.ConfigDict, int]:
    """(params as NumPy arrays, the run's config, the step restored) — for warm start and inference."""
    config = load_config(directory)
    manager = create_manager(directory, read_only=True, async_save=False)
    try:
        resolved = _resolve_step(manager, directory, step)
        # Restore onto this process's first device whatever topology saved it (e.g. a multi-host run).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = manager.item_metadata(resolved)["params"]
        target = jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), metadata
        )
        restored = manager.restore(resolved, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    finally:
        manager.close()
    params = jax.tree_util.tree_map(np.asarray, restored["params"])
    return params, config, resolved


def save_params_only(
    directory: str, params: Any, config: ml_collections.ConfigDict, *, meta: Mapping[str, Any] | None = None
) -> None:
    """Writes a run directory holding only parameters (imported weights) at step 0."""
    save_config(directory, config)
    manager = create_manager(directory, keep=1, keep_best=0, async_save=False)
    save(manager, 0, params=params, train_state=None, meta=dict(meta or {}, step=0), force=True)
    manager.wait_until_finished()
    manager.close()


def warm_start(
    fresh_params: Mapping[str, Any],
    source_params: Mapping[str, Any],
    layers: Sequence[str] | str,
) -> tuple[dict[str, Any], list[str]]:
    """Copies `layers` ('all' = every layer of the target) from `source_params` into `fresh_params`.

    Returns the new parameters and the names copied. A layer missing from the
    source, or of another shape, is an error naming it and both shapes.
    """
    names = list(fresh_params) if layers == "all" else list(layers)
    unknown = [name for name in names if name not in fresh_params]
    if unknown:
        raise ValueError(f"warm start: layer(s) {unknown} are not in the target network; it has {list(fresh_params)}")
    result = dict(fresh_params)
    for name in names:
        if name not in source_params:
            raise ValueError(
                f"warm start: layer {name!r} is missing from the source checkpoint (it has {list(source_params)})"
            )
        target_shapes = jax.tree_util.tree_map(np.shape, dict(fresh_params[name]))
        source_shapes = jax.tree_util.tree_map(np.shape, dict(source_params[name]))
        if target_shapes != source_shapes:
            raise ValueError(
                f"warm start: layer {name!r} has shapes {source_shapes} in the source but {target_shapes} in the "
                "target network"
            )
        result[name] = jax.tree_util.tree_map(
            lambda source, target: np.asarray(source, dtype=np.asarray(target).dtype),
            dict(source_params[name]),
            dict(fresh_params[name]),
        )
    for name in fresh_params:
        logging.info("warm start: %-8s %s", name, "copied" if name in names else "fresh (random init)")
    return result, names
