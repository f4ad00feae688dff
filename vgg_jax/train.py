"""Paper §3.1 training and §3.3 data parallelism: `train_and_evaluate(config, workdir)`.

Start-up precedence: resume from the workdir's latest checkpoint, else warm
start from `config.warm_start.checkpoint` (layers by name), else seeded
random init. Randomness is keyed on the step (`fold_in(root, step)`) and the
input stream restarts at the resumed step, so an interrupted run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from vgg_jax import checkpoints, input_pipeline, models, optim, parallel, preprocess
from vgg_jax.protocols import topk_correct


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    plateau: Any  # optax.contrib reduce_on_plateau state (scale, best value, counts)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the last good checkpoint was kept."""


# ---------------------------------------------------------------------------
# The jitted steps.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example multinomial logistic loss (paper §3.1), computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(
    config: ml_collections.ConfigDict, model: models.VGG, tx: optax.GradientTransformation
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """One SGD step on a global batch of uint8 crops: colour shift, mean subtraction, forward, backward, update."""
    mean_rgb = tuple(config.mean_rgb)
    color_shift_std = float(config.color_shift_std)

    def forward(params: Any, images: jax.Array, dropout_key: jax.Array) -> jax.Array:
        return model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key})

    def train_step(
        state: TrainState, batch: dict[str, jax.Array], root_key: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        color_key, dropout_key = jax.random.split(jax.random.fold_in(root_key, state.step))
        images = preprocess.preprocess_for_model(
            batch["image"], mean_rgb=mean_rgb, key=color_key, color_shift_std=color_shift_std, dtype=model.dtype
        )
        labels = batch["label"]

        def loss_fn(params: Any) -> tuple[jax.Array, jax.Array]:
            logits = forward(params, images, dropout_key)
            return jnp.mean(cross_entropy(logits, labels)), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "top1_error": 1.0 - jnp.mean(topk_correct(logits, labels, 1)),
            "top5_error": 1.0 - jnp.mean(topk_correct(logits, labels, 5)),
            "learning_rate": optim.current_learning_rate(state.opt_state),
            # An overflow can leave the loss finite one step before it isn't: check the update too.
            "params_finite": jnp.all(
                jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(params)])
            ).astype(jnp.float32),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(config: ml_collections.ConfigDict, model: models.VGG) -> Callable[..., dict[str, jax.Array]]:
    """Sums (not means) of loss and top-1/top-5 hits over the unmasked examples of a batch."""
    mean_rgb = tuple(config.mean_rgb)

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = preprocess.preprocess_for_model(batch["image"], mean_rgb=mean_rgb, dtype=model.dtype)
        logits = model.apply({"params": params}, images)
        mask = batch["mask"].astype(jnp.float32)
        return {
            "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
            "top1_correct": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
            "top5_correct": jnp.sum(topk_correct(logits, batch["label"], 5) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


# ---------------------------------------------------------------------------
# Set-up.


def _check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Clear errors before any expensive work."""
    if config.model.variant not in models.VARIANTS:
        raise ValueError(f"config.model.variant={config.model.variant!r}; expected one of {models.VARIANTS}")
    if config.crop_size % 32:
        raise ValueError(f"config.crop_size={config.crop_size} must be a multiple of 32 (five 2x2 pools)")
    input_pipeline.check_train_config(config)  # S range, crop inside S, corrupt-record mode
    input_pipeline.check_eval_scale(config, config.eval_scale)
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r}; expected 'float32' or 'bfloat16'")
    if config.eval_method not in ("center_crop", "dense"):
        raise ValueError(f"config.eval_method={config.eval_method!r}; expected 'center_crop' or 'dense'")
    if jax.process_index() == 0:
        try:
            path = epath.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise PermissionError(f"workdir {workdir!r} is not writable: {error}") from error


def _num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * steps_per_epoch))


def _eval_every(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    return int(config.eval_every_steps) if config.eval_every_steps > 0 else steps_per_epoch


def create_train_state(
    config: ml_collections.ConfigDict, model: models.VGG, tx: optax.GradientTransformation, plateau: Any
) -> TrainState:
    """Seeded random init (paper §3.1: N(0, 0.01²) or Glorot, zero biases) on the host."""
    size = config.crop_size
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        variables = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, size, size, 3), jnp.float32))
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params), plateau=plateau.init())


def _apply_warm_start(config: ml_collections.ConfigDict, state: TrainState, tx: Any) -> TrainState:
    source = config.warm_start.checkpoint
    layers = config.warm_start.layers
    if isinstance(layers, str) and layers != "all":
        layers = tuple(name.strip() for name in layers.split(",") if name.strip())
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


# ---------------------------------------------------------------------------
# The loop.


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


@dataclasses.dataclass
class _Progress:
    total_steps: int
    global_batch_size: int
    start_time: float = dataclasses.field(default_factory=time.perf_counter)
    last_time: float = dataclasses.field(default_factory=time.perf_counter)
    last_step: int = 0

    def rates(self, step: int) -> tuple[float, float]:
        now = time.perf_counter()
        images_per_second = (step - self.last_step) * self.global_batch_size / max(now - self.last_time, 1e-9)
        steps_per_second = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.total_steps - step) / max(steps_per_second, 1e-9)
        self.last_time, self.last_step = now, step
        return images_per_second, eta


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def evaluate(
    config: ml_collections.ConfigDict,
    model: models.VGG,
    params: Any,
    mesh: Any,
    eval_step: Callable[..., dict[str, jax.Array]],
    split: str | None = None,
) -> dict[str, float]:
    """Exact validation metrics: every example once (padding masked), the same batch count on every host."""
    if config.eval_method == "dense":
        from vgg_jax import evaluate as paper_evaluation

        result = paper_evaluation.evaluate_params(
            config, params, method="dense", scales=[config.eval_scale], split=split, mesh=mesh
        )
        return {name: float(result[name]) for name in ("loss", "top1_error", "top5_error") if name in result}
    totals: dict[str, float] = {}
    for local_batch in input_pipeline.create_eval_iterator(config, split):
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


def _append_metrics(workdir: str, record: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        with (epath.Path(workdir) / "metrics.jsonl").open("a") as stream:
            stream.write(json.dumps(record) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, evaluating, checkpointing and resuming; returns the final state."""
    parallel.initialize(config.get("distributed"))
    _check_config(config, workdir)
    metadata = input_pipeline.dataset_metadata(config)  # raises early for a missing data set
    if metadata.num_classes != config.model.num_classes:
        logging.info(
            "config.model.num_classes=%d → %d (from data set %s)",
            config.model.num_classes,
            metadata.num_classes,
            config.dataset,
        )
        config.model.num_classes = metadata.num_classes
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.global_batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")

    steps_per_epoch = input_pipeline.steps_per_epoch(config)
    total_steps = _num_train_steps(config, steps_per_epoch)
    eval_every = _eval_every(config, steps_per_epoch)
    model = models.from_config(config)
    tx = optim.create_optimizer(config, steps_per_epoch)
    plateau = optim.PlateauControl(config)

    host_state = create_train_state(config, model, tx, plateau)
    parallel.barrier("setup")
    manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints)
    replicated = parallel.replicated(mesh)
    latest = manager.latest_step()
    if latest is not None:
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated), host_state
        )
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                train_state=ocp.args.StandardRestore(
                    {"step": target.step, "opt_state": target.opt_state, "plateau": target.plateau}
                ),
            ),
        )
        extra = restored["train_state"]
        state = TrainState(
            step=extra["step"], params=restored["params"], opt_state=extra["opt_state"], plateau=extra["plateau"]
        )
        logging.info("resumed from %s at step %d", workdir, latest)
    else:
        state = parallel.replicate(_apply_warm_start(config, host_state, tx), mesh)
    checkpoints.save_config(workdir, config)
    start_step = int(jax.device_get(state.step))

    root_key = jax.random.key(config.seed)
    data_sharding = parallel.data_sharded(mesh)
    train_step = jax.jit(
        make_train_step(config, model, tx),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(config, model), in_shardings=(replicated, data_sharding), out_shardings=replicated
    )

    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief, asynchronous=False)
    if start_step == 0 and is_chief:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
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

    train_iter: Iterator[dict[str, np.ndarray]] = input_pipeline.create_train_iterator(config, start_step=start_step)
    progress = _Progress(total_steps, config.global_batch_size, last_step=start_step)
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # step metrics not yet checked on the host

    def check_finite(step: int) -> list[tuple[int, dict[str, float]]]:
        """Fetches pending metrics; raises before anything non-finite can be saved."""
        nonlocal pending
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending = []
        for s, m in fetched:
            if not math.isfinite(m["loss"]) or m["params_finite"] != 1.0:
                raise NonFiniteLossError(
                    f"non-finite training loss ({m['loss']}) or parameters at step {s}; stopping. The last good "
                    f"checkpoint (step {manager.latest_step()}) in {workdir} is untouched — lower config.learning_rate "
                    "or check the data."
                )
        return fetched

    def save(step: int, metrics: dict[str, float] | None = None, force: bool = False) -> None:
        check_finite(step)
        epoch = step / steps_per_epoch
        meta = {"step": step, "epoch": epoch, **(metrics or {})}
        checkpoints.save(
            manager,
            step,
            params=state.params,
            train_state={"step": state.step, "opt_state": state.opt_state, "plateau": state.plateau},
            meta=meta,
            metrics=metrics,
            force=force,
        )

    with _Preemption() as preemption:
        step = start_step
        try:
            while step < total_steps:
                batch = parallel.global_batch(next(train_iter), mesh)
                state, metrics = train_step(state, batch, root_key)
                step += 1
                pending.append((step, metrics))

                if step % config.log_every_steps == 0 or step == total_steps:
                    fetched = check_finite(step)
                    means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
                    means.pop("params_finite")
                    images_per_second, eta = progress.rates(step)
                    logging.info(
                        "step %d/%d  epoch %.2f  loss %.4f  top-1 err %.3f  top-5 err %.3f  lr %.2g  %.1f img/s  ETA %s",  # noqa: E501
                        step,
                        total_steps,
                        step / steps_per_epoch,
                        means["loss"],
                        means["top1_error"],
                        means["top5_error"],
                        means["learning_rate"],
                        images_per_second,
                        _format_eta(eta),
                    )
                    writer.write_scalars(
                        step, {f"train/{k}": v for k, v in means.items()} | {"images_per_second": images_per_second}
                    )

                eval_metrics = None
                if step % eval_every == 0 or step == total_steps:
                    check_finite(step)
                    eval_metrics = evaluate(config, model, state.params, mesh, eval_step)
                    learning_rate = float(jax.device_get(optim.current_learning_rate(state.opt_state)))
                    if config.lr_schedule == "plateau":
                        new_plateau = plateau.update(jax.device_get(state.plateau), eval_metrics["top1_error"])
                        new_rate = plateau.learning_rate(new_plateau)
                        if new_rate != learning_rate:
                            logging.info("plateau: learning rate %.3g → %.3g", learning_rate, new_rate)
                        state = state.replace(
                            plateau=parallel.replicate(new_plateau, mesh),
                            opt_state=optim.with_learning_rate(state.opt_state, new_rate),
                        )
                    record = {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "split": config.eval_split,
                        **{k: eval_metrics[k] for k in ("loss", "top1_error", "top5_error")},
                        "lr": learning_rate,
                    }
                    logging.info(
                        "eval %s at step %d: loss %.4f  top-1 err %.4f  top-5 err %.4f",
                        config.eval_split,
                        step,
                        record["loss"],
                        record["top1_error"],
                        record["top5_error"],
                    )
                    writer.write_scalars(step, {f"eval/{k}": record[k] for k in ("loss", "top1_error", "top5_error")})
                    _append_metrics(workdir, record)

                if jax.process_count() > 1:  # every process must take the same decision at the same step
                    stop = step % config.log_every_steps == 0 and bool(
                        np.any(multihost_utils.process_allgather(np.asarray(preemption.requested)))
                    )
                else:
                    stop = preemption.requested
                stop = stop or manager.reached_preemption(step)
                stop = stop or (config.get("stop_after_steps", -1) > 0 and step - start_step >= config.stop_after_steps)
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
            writer.flush()
            writer.close()
    return state


def parameter_checksum(state: TrainState) -> float:
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
