"""Paper §3.1 training and §3.3 data parallelism: `train_and_evaluate(config, workdir)`.

Start-up precedence: resume from the workdir's latest checkpoint, else warm
start from `config.warm_start.checkpoint` (layers by name), else seeded
random init. Randomness is keyed on the step (`fold_in(root, step)`) and the
input stream restarts at the resumed step, so an interrupted run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from vgg_jax import checkpoints, models, optim, parallel, paths, progress, steps
from vgg_jax import evaluate as evaluation
from vgg_jax.configs import validation
from vgg_jax.data import sources, streams


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the last good checkpoint was kept."""


# ---------------------------------------------------------------------------
# Set-up.


def _check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Every field (`vgg_jax.configs.validation`) and a writable workdir, before any expensive work."""
    validation.validate(config)
    if jax.process_index() == 0:
        try:
            path = epath.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise PermissionError(f"workdir {workdir!r} is not writable: {error}") from error


def _adopt_dataset_classes(config: ml_collections.ConfigDict) -> None:
    """The head's width follows the data set (raises early when the data set is missing)."""
    metadata = sources.dataset_metadata(config)
    if metadata.num_classes != config.model.num_classes:
        logging.info(
            "config.model.num_classes=%d → %d (from data set %s)",
            config.model.num_classes,
            metadata.num_classes,
            config.dataset,
        )
        config.model.num_classes = metadata.num_classes


def _num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * steps_per_epoch))


def _eval_every(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    return int(config.eval_every_steps) if config.eval_every_steps > 0 else steps_per_epoch


def _apply_warm_start(config: ml_collections.ConfigDict, state: steps.TrainState, tx: Any) -> steps.TrainState:
    """Paper §3.1: deeper nets (and finer scales) start from named layers of an earlier run."""
    source = config.warm_start.checkpoint
    layers = validation.warm_start_layers(config.warm_start.layers)
    if not source:
        if layers:
            logging.warning(
                "config.warm_start.checkpoint is empty: %s starts from random init. The paper initialises "
                "%s from a trained net A (or the previous scale's net).",
                config.model.variant,
                "all layers" if layers == "all" else ", ".join(layers),
            )
        return state
    source_params, source_config, step = checkpoints.restore_params(source, config.warm_start.step)
    logging.info("warm start from %s (VGG-%s, step %d)", source, source_config.model.variant, step)
    params, _ = checkpoints.warm_start(state.params, source_params, "all" if layers == "all" else list(layers))
    return state.replace(params=params, opt_state=tx.init(params))


# The task decides what the net outputs are scored by and what the streams carry: classification (§3.1), or
# App. A localisation for a config with a box head (`vgg_jax.localise_train`, same four names).
CLASSIFICATION = types.SimpleNamespace(
    make_train_step=steps.make_train_step,
    make_eval_step=steps.make_eval_step,
    create_train_iterator=streams.create_train_iterator,
    create_eval_iterator=streams.create_eval_iterator,
)


def task_for(config: ml_collections.ConfigDict) -> Any:
    if config.model.get("box_head", "none") == "none":
        return CLASSIFICATION
    from vgg_jax import localise_train

    return localise_train


# ---------------------------------------------------------------------------
# Pieces of the loop.


class _Preemption:
    """Turns SIGTERM (preemption) into a request to save and stop at the next step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _FiniteGuard:
    """Step metrics stay on device until needed; fetching them raises before anything non-finite is saved."""

    def __init__(self, manager: ocp.CheckpointManager, workdir: str) -> None:
        self.manager, self.workdir = manager, workdir
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def fetch(self) -> list[dict[str, float]]:
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in self.pending]
        self.pending = []
        for step, metrics in fetched:
            # An overflow can leave the loss finite one step before it isn't: the parameters are checked too.
            if not math.isfinite(metrics["loss"]) or metrics.pop("params_finite") != 1.0:
                raise NonFiniteLossError(
                    f"non-finite training loss ({metrics['loss']}) or parameters at step {step}; stopping. The last "
                    f"good checkpoint (step {self.manager.latest_step()}) in {self.workdir} is untouched — lower "
                    "config.learning_rate or check the data."
                )
        return [metrics for _, metrics in fetched]


class _Reporter:
    """One log line per log step and per evaluation; TensorBoard and metrics.jsonl written by process 0 only.

    metrics.jsonl holds one JSON object per line: `split: "train"` rows (means over the log interval) and
    evaluation rows (`split`: the eval split), so a notebook plots both curves from one file.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, total_steps: int, start_step: int) -> None:
        self.config, self.workdir, self.total_steps = config, workdir, total_steps
        self.steps_per_epoch = streams.steps_per_epoch(config)
        self.is_chief = jax.process_index() == 0
        # TensorBoard only: clu's default writer also logs every scalar, a second line per step.
        self.writer = metric_writers.SummaryWriter(workdir) if self.is_chief else metric_writers.MultiWriter([])
        if start_step == 0 and self.is_chief:
            self.writer.write_hparams(_flatten(config.to_dict()))
        self.progress = progress.Progress(total_steps, done=start_step)

    def train(self, step: int, interval: list[dict[str, float]]) -> None:
        means = {name: float(np.mean([m[name] for m in interval])) for name in interval[-1]}
        steps_per_second, eta = self.progress.measure(step)
        images_per_second = steps_per_second * self.config.global_batch_size
        logging.info(
            "step %d/%d  epoch %.2f  loss %.4f  top-1 err %.3f  top-5 err %.3f  lr %.2g  %.1f img/s  ETA %s",
            step,
            self.total_steps,
            step / self.steps_per_epoch,
            means["loss"],
            means["top1_error"],
            means["top5_error"],
            means["learning_rate"],
            images_per_second,
            progress.format_eta(eta),
        )
        self.writer.write_scalars(
            step, {f"train/{k}": v for k, v in means.items()} | {"images_per_second": images_per_second}
        )
        row = {k: means[k] for k in ("loss", "top1_error", "top5_error")}
        self._append(step, "train", row | {"lr": means["learning_rate"], "images_per_second": images_per_second})

    def eval(self, step: int, metrics: dict[str, float], learning_rate: float) -> None:
        split = self.config.eval_split
        logging.info(
            "eval %s at step %d: loss %.4f  top-1 err %.4f  top-5 err %.4f",
            split,
            step,
            metrics["loss"],
            metrics["top1_error"],
            metrics["top5_error"],
        )
        row = {k: metrics[k] for k in ("loss", "top1_error", "top5_error")}
        self.writer.write_scalars(step, {f"eval/{k}": v for k, v in row.items()})
        self._append(step, split, row | {"lr": learning_rate})

    def _append(self, step: int, split: str, values: dict[str, float]) -> None:
        if self.is_chief:
            record = {"step": step, "epoch": step / self.steps_per_epoch, "split": split, **values}
            with (epath.Path(self.workdir) / "metrics.jsonl").open("a") as stream:
                stream.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def run_validation(
    config: ml_collections.ConfigDict,
    params: Any,
    mesh: Any,
    eval_step: Callable[..., dict[str, jax.Array]],
    split: str | None = None,
) -> dict[str, float]:
    """Exact validation metrics: every example once (padding masked), the same batch count on every host."""
    if config.eval_method == "dense":
        result = evaluation.evaluate_params(
            config, params, method="dense", scales=[config.eval_scale], split=split, mesh=mesh
        )
        return {name: float(result[name]) for name in ("loss", "top1_error", "top5_error") if name in result}
    totals: dict[str, float] = {}
    for local_batch in task_for(config).create_eval_iterator(config, split):
        sums = eval_step(params, parallel.global_batch(local_batch, mesh))
        for name, value in jax.device_get(sums).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    count = max(totals.get("count", 0.0), 1.0)
    return {
        "loss": totals["loss"] / count,
        "top1_error": 1.0 - totals["top1_correct"] / count,
        "top5_error": 1.0 - totals["top5_correct"] / count,
        "num_examples": totals["count"],
    }


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
    learning_rate = float(jax.device_get(optim.current_learning_rate(state.opt_state)))
    new_plateau = plateau.update(jax.device_get(state.plateau), top1_error)
    new_rate = plateau.learning_rate(new_plateau)
    if new_rate != learning_rate:
        logging.info("plateau: learning rate %.3g → %.3g", learning_rate, new_rate)
    return state.replace(
        plateau=parallel.replicate(new_plateau, mesh),
        opt_state=optim.with_learning_rate(state.opt_state, new_rate),
    )


def _should_stop(
    config: ml_collections.ConfigDict,
    step: int,
    start_step: int,
    preemption: _Preemption,
    manager: ocp.CheckpointManager,
) -> bool:
    """Preemption (SIGTERM or Orbax's notice) or `stop_after_steps`: the same decision on every process."""
    if jax.process_count() > 1:  # every process must take the same decision at the same step
        stop = step % config.log_every_steps == 0 and bool(
            np.any(multihost_utils.process_allgather(np.asarray(preemption.requested)))
        )
    else:
        stop = preemption.requested
    stop = stop or manager.reached_preemption(step)
    return stop or (config.get("stop_after_steps", -1) > 0 and step - start_step >= config.stop_after_steps)


# ---------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
    """Trains `config` in `workdir`, evaluating, checkpointing and resuming; returns the final state.

    `workdir`, `config.data_dir` and `config.warm_start.checkpoint` may be relative or start with `~`.
    """
    workdir = paths.resolve(workdir)
    paths.resolve_config_paths(config)
    parallel.initialize(config.get("distributed"))
    _check_config(config, workdir)
    _adopt_dataset_classes(config)
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.global_batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")

    # Build: the network, the optimiser, the schedule.
    steps_per_epoch = streams.steps_per_epoch(config)
    total_steps = _num_train_steps(config, steps_per_epoch)
    eval_every = _eval_every(config, steps_per_epoch)
    model = models.from_config(config)
    tx = optim.create_optimizer(config, steps_per_epoch)
    plateau = optim.PlateauControl(config)
    replicated, data_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
    task = task_for(config)
    train_step = jax.jit(
        task.make_train_step(config, model, tx),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        task.make_eval_step(config, model), in_shardings=(replicated, data_sharding), out_shardings=replicated
    )

    # Restore (resume) > warm start > seeded init.
    host_state = steps.create_train_state(config, model, tx, plateau)
    parallel.barrier("setup")
    manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints)
    state = checkpoints.restore_train_state(manager, host_state, replicated)
    if state is not None:
        logging.info("resumed from %s at step %d", workdir, int(jax.device_get(state.step)))
    else:
        state = parallel.replicate(_apply_warm_start(config, host_state, tx), mesh)
    checkpoints.save_config(workdir, config)
    start_step = int(jax.device_get(state.step))
    logging.info(
        "VGG-%s on %s: %d steps (%d per epoch), global batch %d on %d devices / %d processes",
        config.model.variant,
        config.dataset,
        total_steps,
        steps_per_epoch,
        config.global_batch_size,
        mesh.devices.size,
        jax.process_count(),
    )

    root_key = jax.random.key(config.seed)
    train_iter: Iterator[dict[str, np.ndarray]] = task.create_train_iterator(config, start_step=start_step)
    reporter = _Reporter(config, workdir, total_steps, start_step)
    guard = _FiniteGuard(manager, workdir)

    def save(step: int, metrics: dict[str, float] | None = None, force: bool = False) -> None:
        guard.fetch()  # raises before a non-finite state is written
        meta = {"step": step, "epoch": step / steps_per_epoch, **(metrics or {})}
        checkpoints.save_train_state(manager, state, meta=meta, metrics=metrics, force=force)

    step = start_step
    try:
        with _Preemption() as preemption:
            while step < total_steps:
                state, metrics = train_step(state, parallel.global_batch(next(train_iter), mesh), root_key)
                step += 1
                guard.add(step, metrics)
                if step % config.log_every_steps == 0 or step == total_steps:
                    reporter.train(step, guard.fetch())

                eval_metrics = None
                if step % eval_every == 0 or step == total_steps:
                    guard.fetch()
                    eval_metrics = run_validation(config, state.params, mesh, eval_step)
                    reporter.eval(step, eval_metrics, float(optim.current_learning_rate(state.opt_state)))
                    state = _adjust_learning_rate(config, plateau, state, eval_metrics["top1_error"], mesh)

                stop = _should_stop(config, step, start_step, preemption, manager)
                if eval_metrics is not None:
                    save(step, {"top1_error": eval_metrics["top1_error"]})
                elif step % config.checkpoint_every_steps == 0 or step == total_steps or stop:
                    save(step, force=stop)
                if stop and step < total_steps:
                    logging.warning("stopped early: saved step %d; rerun the same command to resume", step)
                    break
        logging.info(
            "process %d: parameter checksum at step %d: %.17g", jax.process_index(), step, parameter_checksum(state)
        )
    finally:
        manager.wait_until_finished()
        manager.close()
        reporter.close()
    return state


def parameter_checksum(state: steps.TrainState) -> float:
    """Sum of |w| over this process's copy of the replicated parameters: equal on every process."""
    return float(
        sum(
            np.abs(np.asarray(leaf.addressable_data(0), np.float64)).sum()
            for leaf in jax.tree_util.tree_leaves(state.params)
        )
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
