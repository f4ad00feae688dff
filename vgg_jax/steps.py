"""Paper §3.1 the training step: loss, L2-coupled SGD update, on-device augmentation; and the eval step.

`make_train_step` is the pure function `train.py` jits with the data sharded
over the mesh (paper §3.3: gradients averaged across devices by the sharding);
`bench/train_step.py` times exactly this function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vgg_jax import models, optim, preprocess, resample
from vgg_jax.protocols import topk_correct

if TYPE_CHECKING:  # the bench's bare-GPU import path has no ml_collections
    import ml_collections


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    plateau: Any  # optax.contrib reduce_on_plateau state (scale, best value, counts)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example multinomial logistic loss (paper §3.1), computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


# objective(outputs, batch) → (per-example loss (N,), per-example loss weight (N,), {'top1_correct', 'top5_correct'}
# as (N,) floats): what the net's outputs are scored by. Classification by default; App. A localisation plugs in
# its box loss (`vgg_jax.localise_train`).
Objective = Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def classification_objective(
    logits: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Paper §3.1: multinomial logistic loss, top-1 / top-5 hits."""
    labels = batch["label"]
    hits = {f"top{k}_correct": topk_correct(logits, labels, k) for k in (1, 5)}
    return cross_entropy(logits, labels), jnp.ones(labels.shape, jnp.float32), hits


def make_train_step(
    config: ml_collections.ConfigDict,
    model: models.VGG,
    tx: optax.GradientTransformation,
    steps_per_epoch: int | None = None,
    objective: Objective = classification_objective,
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """One SGD step on a global batch of uint8 crops: colour shift, mean subtraction, forward, backward, update.

    A batch with a 'geometry' entry holds decoded source windows on canvases instead of crops
    (``config.resample_on_device``): the step first resamples and flips them (`vgg_jax.resample`).

    The update uses `optim.step_learning_rate`: the config's schedule at this step times the plateau scale
    (`steps_per_epoch` places the 'step' schedule's boundaries; required for it).
    """
    if config.lr_schedule == "step" and steps_per_epoch is None:
        raise ValueError("make_train_step: lr_schedule='step' needs steps_per_epoch to place its boundaries")
    schedule = optim.learning_rate_schedule(config, steps_per_epoch or 1)
    mean_rgb = tuple(config.mean_rgb)
    color_shift_std = float(config.color_shift_std)
    layer_stats = bool(config.get("log_layer_stats", False))

    def forward(params: Any, images: jax.Array, dropout_key: jax.Array) -> jax.Array:
        return model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key})

    def train_step(
        state: TrainState, batch: dict[str, jax.Array], root_key: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        color_key, dropout_key = jax.random.split(jax.random.fold_in(root_key, state.step))
        images = batch["image"]
        if "geometry" in batch:  # config.resample_on_device: the host sent decoded windows on canvases
            with jax.named_scope("resample"):
                images = resample.crops_from_canvas(images, batch["geometry"], model.crop_size)
        with jax.named_scope("preprocess"):
            images = preprocess.preprocess_for_model(
                images, mean_rgb=mean_rgb, key=color_key, color_shift_std=color_shift_std, dtype=model.dtype
            )

        def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            losses, weights, hits = objective(forward(params, images, dropout_key), batch)
            return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0), hits

        (loss, hits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        with jax.named_scope("optimizer"):
            learning_rate = optim.step_learning_rate(schedule, state.step, state.plateau)
            opt_state = optim.with_learning_rate(state.opt_state, learning_rate)
            updates, opt_state = tx.update(grads, opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        with jax.named_scope("statistics"):
            # Over the updated parameters: reading the old ones after the in-place (donated) update would make
            # XLA copy every parameter first. The norm also checks them: it is finite only if every value is.
            update_size = optim.update_norm(opt_state)
            metrics = optim.update_statistics(grads, updates, params, layer_stats, update_size) | {
                "loss": loss,
                "top1_error": 1.0 - jnp.mean(hits["top1_correct"]),
                "top5_error": 1.0 - jnp.mean(hits["top5_correct"]),
                "learning_rate": learning_rate,
                # An overflow can leave the loss finite one step before it isn't: check the update too.
                "params_finite": jnp.isfinite(optim.global_norm(params)).astype(jnp.float32),
            }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(
    config: ml_collections.ConfigDict, model: models.VGG, objective: Objective = classification_objective
) -> Callable[..., dict[str, jax.Array]]:
    """Sums (not means) of loss and top-1/top-5 hits over the unmasked examples of a batch."""
    mean_rgb = tuple(config.mean_rgb)

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = preprocess.preprocess_for_model(batch["image"], mean_rgb=mean_rgb, dtype=model.dtype)
        losses, weights, hits = objective(model.apply({"params": params}, images), batch)
        mask = batch["mask"].astype(jnp.float32)
        return {
            "loss": jnp.sum(losses * weights * mask),
            **{name: jnp.sum(value * mask) for name, value in hits.items()},
            "count": jnp.sum(mask),
        }

    return eval_step


def create_train_state(
    config: ml_collections.ConfigDict, model: models.VGG, tx: optax.GradientTransformation, plateau: Any
) -> TrainState:
    """Seeded random init (paper §3.1: N(0, 0.01²) or Glorot, zero biases) on the host."""
    size = config.crop_size
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        variables = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, size, size, 3), jnp.float32))
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    return TrainState(step=np.int32(0), params=params, opt_state=tx.init(params), plateau=plateau.init())
