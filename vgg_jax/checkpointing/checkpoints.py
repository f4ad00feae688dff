"""Checkpoints (Orbax) and the paper's warm starts by layer name (§3.1).

A run directory (a training workdir, or what `convert.py` writes) holds ``config.json``,
``config_history.jsonl``, ``class_names.json`` and ``checkpoints/<step>/`` with the Orbax items
'params', 'train_state' (absent in converted weights) and 'meta' (JSON: step, epoch and the
validation metrics that picked the best checkpoint); docs/training.md describes it. A step that no
longer restores (a full disk, a dead node) is passed over: resuming takes the newest complete step
and moves damaged newer ones to ``damaged_checkpoints/``, never deleting them; `restore_params` skips
them without touching the run; a damaged step asked for by number is an error naming it. Warm start
copies named layers into fresh parameters: net A → B…E (conv1_1, conv2_1, conv3_1, conv3_2, fc6,
fc7, fc8), S=256 → S=384 and S=384 → jittered S (all layers).
"""

from __future__ import annotations

import functools
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

from vgg_jax.checkpointing import damage as checkpoint_damage
from vgg_jax.configs import validation
from vgg_jax.configs.tree import set_field
from vgg_jax.runtime import console

CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.json"
CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "top1_error"
# Orbax writes a step to `<step>.orbax-checkpoint-tmp-<time>` and renames it when complete.
UNFINISHED_MARK = ".orbax-checkpoint-tmp"
CheckpointError = checkpoint_damage.CheckpointError


def parse_step(step: int | str | None) -> int | str:
    """None/'latest' → 'latest' (the newest), 'best', or a step number (an int or its digits); else a ValueError."""
    if step is None or step in ("latest", "best"):
        return step or "latest"
    if isinstance(step, int | np.integer) and not isinstance(step, bool) and step >= 0:
        return int(step)
    if isinstance(step, str) and step.strip().isdigit():
        return int(step)
    raise ValueError(f"{step!r} is not a checkpoint step; expected 'latest', 'best' or a step number such as 1200")


def write_atomically(path: epath.Path, text: str) -> None:
    """Writes `text` to a temporary file and renames it over `path`: a kill leaves the old file or the new one."""
    temporary = path.parent / (path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def save_config(directory: str, config: ml_collections.ConfigDict) -> None:
    """Writes `config` as JSON beside the checkpoints (process 0 only)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    write_atomically(path / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(directory: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The run's config.json with `overrides` (dotted field → value) applied, validated before any work."""
    path = epath.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {directory!r} is not a vgg_jax run directory "
            "(a training workdir or the output of `python -m vgg_jax convert`)"
        )
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is damaged ({error}): restore it from a copy, or from the last row of "
            f"{epath.Path(directory) / 'config_history.jsonl'} (its 'config' field)"
        ) from None
    for field, value in (overrides or {}).items():
        set_field(config, field, value)
    try:
        validation.validate(config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return config


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
    try:
        return manager.save(
            step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None, force=force
        )
    except Exception as error:  # Orbax reports an earlier asynchronous save's failure here too
        raise checkpoint_damage.write_error(manager, step, error) from error


def finish_saves(manager: ocp.CheckpointManager, *, close: bool = False) -> None:
    """Waits for the asynchronous saves (and closes the manager); a failed save (a full disk, lost permissions)
    is one `CheckpointError`, raised after closing (Orbax's close would otherwise raise it again)."""
    failure = None
    for finish in (manager.wait_until_finished, manager.close) if close else (manager.wait_until_finished,):
        try:
            finish()
        except Exception as error:
            failure = failure or error
    if failure is not None:
        raise checkpoint_damage.write_error(manager, None, failure) from failure


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
    """The train state saved at `step` (default: the newest that restores), shaped like `like`, placed with `sharding`.

    None when nothing is saved. `like` is a train state (a flax dataclass with params and
    `TRAIN_STATE_FIELDS`, on the host or on device); the result is `like.replace(...)` with the restored
    values, so resuming needs no knowledge of the state's class here. With `step=None`, newer steps that do
    not restore on every process are moved to ``damaged_checkpoints/`` (logged); none restoring is a
    `CheckpointError` listing what was tried.
    """
    target = jax.tree_util.tree_map(lambda x: _abstract(x, sharding), like)
    items = dict(
        params=ocp.args.StandardRestore(target.params),
        train_state=ocp.args.StandardRestore({name: getattr(target, name) for name in TRAIN_STATE_FIELDS}),
    )

    def restore(candidate: int) -> Any:
        restored = manager.restore(candidate, args=ocp.args.Composite(**items))
        return like.replace(params=restored["params"], **restored["train_state"])

    run = manager.directory.parent
    if step is not None:
        return checkpoint_damage.restore_or_explain(restore, step, run)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    resumed, state, damaged = checkpoint_damage.first_restorable(steps, restore, run, everywhere=True)
    checkpoint_damage.set_aside(manager, damaged, resumed)
    return state


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


def is_training_run(directory: str) -> bool:
    """False for parameters only (what `vgg_jax.weights.convert` writes): nothing to resume training from."""
    root = epath.Path(directory) / CHECKPOINT_DIR
    return any(child.name.isdigit() and (child / "train_state").exists() for child in root.iterdir())


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
    """Every saved step of a run directory and its 'meta' JSON ({} where it is missing or damaged)."""
    root = epath.Path(directory) / CHECKPOINT_DIR
    found: dict[int, dict[str, Any]] = {}
    if root.exists():
        for child in root.iterdir():
            meta_file = child / "meta" / "metadata"  # where Orbax's JsonSave writes
            if child.name.isdigit():
                try:
                    found[int(child.name)] = json.loads(meta_file.read_text())
                except (OSError, json.JSONDecodeError):
                    found[int(child.name)] = {}
    return found


def resolve_step(directory: str, step: int | str | None = None) -> int:
    """The step `restore_params(directory, step)` restores: None/'latest' → the newest that restores, 'best' → the
    lowest validation top-1 error that restores, or a saved step number (checked to be saved, not read)."""
    manager = create_manager(directory, read_only=True, async_save=False)
    try:
        if isinstance(parse_step(step), int):
            return _candidates(manager, directory, step)[0]
        return _first_restorable(manager, directory, step)[0]
    finally:
        manager.close()


def _candidates(manager: ocp.CheckpointManager, directory: str, step: int | str | None) -> list[int]:
    """The steps to try for `step`, in order: one for a step number; newest (or best) first otherwise."""
    wanted = parse_step(step)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(str(directory), CHECKPOINT_DIR)}")
    if wanted == "latest":
        return steps
    if wanted == "best":
        metas = steps_with_meta(directory)
        ranked = sorted((metas[s][BEST_METRIC], -s) for s in steps if BEST_METRIC in metas.get(s, {}))
        if not ranked:
            logging.warning("no checkpoint of %s has a validation error; 'best' falls back to the latest", directory)
            return steps
        return [-negative for _, negative in ranked]
    if wanted not in steps:
        raise FileNotFoundError(f"step {wanted} is not saved in {directory}; saved steps: {sorted(steps)}")
    return [wanted]


def _first_restorable(manager: ocp.CheckpointManager, directory: str, step: int | str | None) -> tuple[int, Any]:
    """(step, params) of the first of `_candidates` that restores; a step asked for by number is the only one tried."""
    candidates, run = _candidates(manager, directory, step), epath.Path(directory)
    restore = functools.partial(_restore_params, manager)
    if isinstance(parse_step(step), int):
        return candidates[0], checkpoint_damage.restore_or_explain(restore, candidates[0], run)
    used, params, passed = checkpoint_damage.first_restorable(candidates, restore, run)
    checkpoint_damage.report_passed_over(passed, run, used)
    return used, params


def _restore_params(manager: ocp.CheckpointManager, step: int) -> Any:
    # Restore onto this process's first device whatever topology saved it (e.g. a multi-host run).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)["params"]
    target = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), metadata
    )
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    return jax.tree_util.tree_map(np.asarray, restored["params"])


def restore_params(directory: str, step: int | str | None = None) -> tuple[Any, ml_collections.ConfigDict, int]:
    """(params as NumPy arrays, the run's config, the step restored) — for warm start and inference.

    `step`: None/'latest' (the newest step that restores completely), 'best' or a step number (see `parse_step`).
    """
    config = load_config(directory)
    manager = create_manager(directory, read_only=True, async_save=False)
    try:
        resolved, params = _first_restorable(manager, directory, step)
    finally:
        manager.close()
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
