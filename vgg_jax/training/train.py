"""Paper §3.1 training and §3.3 data parallelism: `train_and_evaluate(config, workdir)`.

Start-up precedence: resume from the workdir's latest checkpoint, else warm
start from `config.warm_start.checkpoint` (layers by name), else seeded
random init. Randomness is keyed on the step (`fold_in(root, step)`) and the
input stream restarts at the resumed step, so an interrupted run ends with the
same parameters as an uninterrupted one. Process 0 holds the workdir's lock
(`vgg_jax.checkpointing.run_lock`) for the whole run, so a second start on it is refused.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vgg_jax import models
from vgg_jax.checkpointing import checkpoints, run_lock
from vgg_jax.configs import specs, validation
from vgg_jax.data import sources, streams
from vgg_jax.evaluation import evaluate as evaluation
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.runtime import console, devices, parallel, paths
from vgg_jax.training import guard, optim, reporting, resume, steps, warm_start

# ---------------------------------------------------------------------------
# Set-up.


def _check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Every field (`vgg_jax.configs.validation`) and a writable workdir, before any expensive work."""
    validation.validate(config)
    if jax.process_index() == 0:
        _check_writable(workdir)


# What a run writes into an existing workdir: each must accept writes before the run starts.
_RUN_FILES = (resume.METRICS_FILE, resume.HISTORY_FILE, checkpoints.CONFIG_FILE, checkpoints.CLASS_NAMES_FILE)


def _check_writable(workdir: str) -> None:
    """The workdir, its checkpoints/ and the files a run appends to accept writes (a read-only copy is refused)."""
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"workdir {workdir!r} is not writable: {error}") from error
    for place in (path, path / checkpoints.CHECKPOINT_DIR, *(path / name for name in _RUN_FILES)):
        if place != path and not place.exists():
            continue
        try:
            if place.is_dir():
                probe = place / ".write_test"
                probe.write_text("ok")
                probe.unlink()
            else:
                place.open("a").close()  # opened for appending, nothing written
        except OSError as error:
            what = f"workdir {workdir!r}" if place == path else str(place)
            raise PermissionError(
                f"{what} is not writable ({error}): a run writes its checkpoints, metrics and config there. Make it "
                f"writable again, or train in a new --workdir from this run's weights: "
                f"--config.warm_start.checkpoint={workdir}"
            ) from error


def _lock_workdir(workdir: str) -> run_lock.Lock | None:
    """Process 0 takes the workdir's lock (`vgg_jax.checkpointing.run_lock`); every process learns whether it could."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = run_lock.acquire(workdir)
        except run_lock.WorkdirInUseError as error:
            refused = error
    if not parallel.agree("workdir_lock", refused is None):
        raise refused or run_lock.WorkdirInUseError(f"--workdir={workdir} is in use by another run (see process 0)")
    return lock


def _adopt_dataset_classes(config: ml_collections.ConfigDict) -> list[str] | None:
    """The head's width follows the data set (raises early when the data set is missing); returns its class names."""
    metadata = sources.dataset_metadata(config)
    if metadata.num_classes != config.model.num_classes:
        logging.info(
            "config.model.num_classes=%d → %d (from data set %s)",
            config.model.num_classes,
            metadata.num_classes,
            config.dataset,
        )
        config.model.num_classes = metadata.num_classes
    return metadata.class_names


def _num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * steps_per_epoch))


def _eval_every(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    return int(config.eval_every_steps) if config.eval_every_steps > 0 else steps_per_epoch


def _apply_warm_start(config: ml_collections.ConfigDict, state: steps.TrainState, tx: Any) -> steps.TrainState:
    """Paper §3.1: deeper nets (and finer scales) start from named layers of an earlier run.

    Layers without a checkpoint never get here: `validation` refuses that config before any work.
    """
    source = config.warm_start.checkpoint
    layers = specs.warm_start_layers(config.warm_start.layers)
    if not source or not layers:
        return state
    source_params, source_config, step, directory = warm_start.restore(source, config.warm_start.step)
    logging.info("warm start from %s (VGG-%s, step %d)", directory, source_config.model.variant, step)
    warm_start.check_mean_rgb(config, source_config)
    params, _ = checkpoints.warm_start(
        state.params, source_params, warm_start.layers_to_copy(state.params, source_params, layers)
    )
    return state.replace(params=params, opt_state=tx.init(params))


def task_for(config: ml_collections.ConfigDict) -> Any:
    """What the net's outputs are scored by and what the streams carry (the same four names either way):
    classification (§3.1), or App. A localisation for a config with a box head (`vgg_jax.localisation.train`)."""
    if config.model.get("box_head", "none") != "none":
        from vgg_jax.localisation import train as localise_train

        return localise_train
    return types.SimpleNamespace(  # looked up per call, so a test may substitute a step
        make_train_step=steps.make_train_step,
        make_eval_step=steps.make_eval_step,
        create_train_iterator=streams.create_train_iterator,
        eval_batches=streams.eval_batches,
    )


# ---------------------------------------------------------------------------
# Pieces of the loop.


def run_validation(
    config: ml_collections.ConfigDict,
    params: Any,
    mesh: Any,
    eval_step: Callable[..., dict[str, jax.Array]],
    split: str | None = None,
    batches: Iterable[dict[str, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Exact validation metrics: every example once (padding masked), the same batch count on every host.

    `batches`: the task's `eval_batches` of `split`, when the caller keeps them for every evaluation.

    Records that cannot be decoded (config.corrupt_images='skip') are not in the denominator; how many were
    skipped is returned ('skipped' = examples in the split − 'num_examples') and logged, never silent.
    """
    split = split or config.eval_split
    if config.eval_method == "dense":
        protocol = TestProtocol(method="dense", scales=[int(config.eval_scale)])
        result = evaluation.evaluate_params(config, params, protocol, split=split, mesh=mesh)
        metrics = {name: float(result[name]) for name in ("loss", "top1_error", "top5_error") if name in result}
        return metrics | _counts(config, split, float(result.get("num_examples", 0)))
    totals: dict[str, float] = {}
    for local_batch in batches if batches is not None else task_for(config).eval_batches(config, split):
        sums = eval_step(params, parallel.global_batch(local_batch, mesh))
        for name, value in jax.device_get(sums).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    count = max(totals.get("count", 0.0), 1.0)
    return {
        "loss": totals["loss"] / count,
        "top1_error": 1.0 - totals["top1_correct"] / count,
        "top5_error": 1.0 - totals["top5_correct"] / count,
    } | _counts(config, split, totals["count"])


def _counts(config: ml_collections.ConfigDict, split: str, evaluated: float) -> dict[str, float]:
    """num_examples evaluated and skipped (the split's size minus those): the same on every process."""
    expected = sources.num_examples(sources.split_builder(config, split, "eval_split"), split)
    skipped = max(expected - int(evaluated), 0)
    if skipped:
        logging.warning(
            "eval %s: %d of %d records could not be decoded and were skipped; the errors are over the other %d",
            split,
            skipped,
            expected,
            int(evaluated),
        )
    return {"num_examples": float(evaluated), "skipped": float(skipped)}


def _adjust_learning_rate(
    config: ml_collections.ConfigDict,
    plateau: optim.PlateauControl,
    state: steps.TrainState,
    top1_error: float,
    mesh: Any,
) -> steps.TrainState:
    """Paper §3.1: under 'plateau', the validation error decides the next rate (÷10 when it stalls)."""
    if config.lr_schedule != "plateau":
        return state
    old = jax.device_get(state.plateau)
    new = plateau.update(old, top1_error)
    if float(new.scale) != float(old.scale):
        logging.info("plateau: learning rate %.3g → %.3g", plateau.learning_rate(old), plateau.learning_rate(new))
    return state.replace(plateau=parallel.replicate(new, mesh))


def _save(
    manager: ocp.CheckpointManager,
    state: steps.TrainState,
    epoch: float,
    eval_metrics: dict[str, float] | None,
    force: bool,
) -> None:
    """A checkpoint at the state's step; with validation top-1 error when just evaluated (it ranks keep-best)."""
    ranking = {checkpoints.BEST_METRIC: eval_metrics[checkpoints.BEST_METRIC]} if eval_metrics else None
    meta = {"step": int(jax.device_get(state.step)), "epoch": epoch, **(ranking or {})}
    checkpoints.save_train_state(manager, state, meta=meta, metrics=ranking, force=force)


def _roll_back(
    config: ml_collections.ConfigDict,
    verdict: guard.Verdict,
    losses: guard.LossGuard,
    manager: ocp.CheckpointManager,
    state: steps.TrainState,
    mesh: Any,
    workdir: str,
) -> steps.TrainState:
    """Spike guard: back to the newest checkpoint the evidence trusts, the rate × plateau.factor (or raise)."""
    checkpoints.finish_saves(manager)
    saved = sorted(manager.all_steps())
    good = max((s for s in saved if s <= verdict.trusted_step), default=None)
    losses.allow_retry(verdict, good, workdir)  # raises when no retry is left
    for step in saved:
        if step > good:  # saved before the problem showed: not to be resumed from, nor to block later saves
            manager.delete(step)
    restored = checkpoints.restore_train_state(manager, state, parallel.replicated(mesh), step=good)
    lowered = optim.lowered(jax.device_get(restored.plateau), float(config.plateau.factor))
    logging.warning(
        "spike guard: %s; back to step %d, learning rate × %g (scale %.4g), retry %d of %d",
        verdict.message,
        good,
        config.plateau.factor,
        float(lowered.scale),
        losses.retries,
        losses.max_retries,
    )
    resume.truncate_metrics(workdir, good)
    return restored.replace(plateau=parallel.replicate(lowered, mesh))


# ---------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
    """Trains `config` in `workdir`, evaluating, checkpointing and resuming; returns the final state.

    `workdir`, `config.data_dir` and `config.warm_start.checkpoint` may be relative or start with `~`.
    """
    workdir = paths.resolve(workdir)
    paths.resolve_config_paths(config)
    parallel.initialize(config.get("distributed"))  # before anything touches a JAX backend
    if jax.process_index() == 0:
        print(console.format_config(config), flush=True)
    _check_config(config, workdir)
    lock = _lock_workdir(workdir)
    try:
        return _train(config, workdir)
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
    shards = int(config.input_shards) or jax.process_count()
    changes = resume.check(config, workdir, shards)  # a resume may not change what the run is
    class_names = _adopt_dataset_classes(config)
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.global_batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")

    # Build: the network, the optimiser, the schedule.
    steps_per_epoch = streams.steps_per_epoch(config)
    total_steps = _num_train_steps(config, steps_per_epoch)
    eval_every = _eval_every(config, steps_per_epoch)
    model = models.from_config(config)
    tx = optim.create_optimizer(config)
    plateau = optim.PlateauControl(config)
    replicated, data_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
    task = task_for(config)
    train_step = jax.jit(
        task.make_train_step(config, model, tx, steps_per_epoch),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        task.make_eval_step(config, model), in_shardings=(replicated, data_sharding), out_shardings=replicated
    )

    # Restore (resume) > warm start > seeded init.
    host_state = steps.create_train_state(config, model, tx, plateau)
    checkpoints.remove_unfinished_saves(workdir)  # process 0; the barrier below holds the others
    parallel.barrier("setup")
    losses = guard.LossGuard(config)
    keep = max(config.keep_checkpoints, 2) if losses.max_retries else config.keep_checkpoints  # a rollback target
    manager = checkpoints.create_manager(workdir, keep=keep, keep_best=config.keep_best_checkpoints)
    state = checkpoints.restore_train_state(manager, host_state, replicated)
    if state is not None:
        logging.info("resumed from %s at step %d", workdir, int(jax.device_get(state.step)))
        resume.announce(changes or [], config, float(jax.device_get(state.plateau.scale)), int(state.step))
    else:
        state = parallel.replicate(_apply_warm_start(config, host_state, tx), mesh)
    del host_state
    start_step = int(jax.device_get(state.step))
    resume.record_start(workdir, config, step=start_step, shards=shards, changes=changes, class_names=class_names)
    logging.info(
        "VGG-%s on %s: %d steps (%d per epoch), global batch %d on %s / %d processes",
        config.model.variant,
        config.dataset,
        total_steps,
        steps_per_epoch,
        config.global_batch_size,
        devices.describe(mesh.devices.flat),
        jax.process_count(),
    )
    devices.warn_if_gpu_unused(jax.default_backend())

    root_key = jax.random.key(config.seed)
    train_iter: Iterator[dict[str, np.ndarray]] = task.create_train_iterator(config, start_step=start_step)
    reporter = reporting.Reporter(config, workdir, total_steps, start_step, steps_per_epoch)
    eval_batches = None  # built at the first evaluation; every later one is a new pass over them
    step = start_step
    try:
        with guard.Stopper(config, start_step) as stopper:
            while step < total_steps:
                state, metrics = train_step(state, parallel.global_batch(next(train_iter), mesh), root_key)
                step += 1
                losses.add(step, metrics)
                stop = stopper.should_stop(step)
                log = step % config.log_every_steps == 0 or step == total_steps
                evaluate = step % eval_every == 0 or step == total_steps
                save = evaluate or step % config.checkpoint_every_steps == 0 or step == total_steps or stop
                # Nothing is logged, evaluated or saved before the guard has checked the steps behind it.
                if (log or save) and (verdict := losses.check()) is not None:
                    state = _roll_back(config, verdict, losses, manager, state, mesh, workdir)
                    step = int(jax.device_get(state.step))
                    train_iter = task.create_train_iterator(config, start_step=step)
                    reporter.restart(step)
                    continue
                if log:
                    reporter.train(step, losses.take())

                eval_metrics = None
                if evaluate:
                    if eval_batches is None and config.eval_method != "dense":
                        eval_batches = task.eval_batches(config)
                    eval_metrics = run_validation(config, state.params, mesh, eval_step, batches=eval_batches)
                    reporter.eval(step, eval_metrics, float(optim.current_learning_rate(state.opt_state)))
                    state = _adjust_learning_rate(config, plateau, state, eval_metrics["top1_error"], mesh)
                if save:
                    _save(manager, state, step / steps_per_epoch, eval_metrics, force=stop)
                if stop and step < total_steps:
                    logging.warning("stopped early: saved step %d; rerun the same command to resume", step)
                    break
        logging.info(
            "process %d: parameter checksum at step %d: %.17g", jax.process_index(), step, parameter_checksum(state)
        )
    finally:
        try:
            checkpoints.finish_saves(manager, close=True)
        finally:
            reporter.close()
    if step >= total_steps:
        reporter.summary()
    return state


def parameter_checksum(state: steps.TrainState) -> float:
    """Sum of |w| over this process's copy of the replicated parameters: equal on every process."""
    return float(
        sum(
            np.abs(np.asarray(leaf.addressable_data(0), np.float64)).sum()
            for leaf in jax.tree_util.tree_leaves(state.params)
        )
    )
