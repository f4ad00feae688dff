"""Paper §3.1 optimisation: SGD + momentum 0.9, L2 5e-4, lr 1e-2 ÷10 on plateaus.

``optax.chain(add_decayed_weights(5e-4, mask), sgd(lr, 0.9))``: the L2 penalty is coupled (wd·w joins
the gradient before momentum, as Caffe's weight_decay) and skips biases (Caffe's decay_mult 0)
[choice, `decay_biases`]. The rate lives in the optimiser state, but every step sets it to
schedule(step) × plateau scale from the current config (`step_learning_rate`), so a rate changed on
resume, a plateau drop or the spike guard's rollback applies at once. Schedules: 'plateau' (the
paper; `optax.contrib.reduce_on_plateau` on the validation top-1 error, `PlateauControl`) or 'step'
(÷10 at fixed epochs). optax keeps the momentum of raw gradients where Caffe accumulates lr·gradient:
they differ only for a few steps after each rate drop. Fine-tuning gives each layer a rate multiplier
(Caffe's ``lr_mult``, `layer_rate_multipliers`); frozen layers get no update, decay or momentum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from vgg_jax import models
from vgg_jax.configs import specs

if TYPE_CHECKING:  # the bench's bare-GPU import path has no ml_collections
    import ml_collections


def weight_decay_mask(params: Any, decay_biases: bool = False) -> Any:
    """True for the leaves the L2 penalty applies to: kernels, and biases if asked."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        return name != "bias" or decay_biases

    return jax.tree_util.tree_map_with_path(decays, params)


def _sgd_with_l2(learning_rate: Any, momentum: float, weight_decay: float, decay_biases: bool) -> Any:
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=lambda p: weight_decay_mask(p, decay_biases)),
        optax.sgd(learning_rate, momentum=momentum),
    )


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule | float:
    """The base rate: a constant for 'plateau' (the control scales it), a step schedule for 'step'."""
    if config.lr_schedule == "plateau":
        return float(config.learning_rate)
    boundaries = {int(round(epoch * steps_per_epoch)): 0.1 for epoch in config.step_boundaries_epochs}
    return optax.piecewise_constant_schedule(float(config.learning_rate), boundaries)


def layer_rate_multipliers(config: ml_collections.ConfigDict, layers: Sequence[str]) -> dict[str, float] | None:
    """{layer: multiplier of the rate} under ``config.finetune`` (0: frozen); None without it (all at 1×).

    `layers` are the network's layers in forward order; a ``freeze_through`` or head layer not among them
    raises a ValueError naming the field.
    """
    finetune = config.get("finetune")
    if not finetune:
        return None
    layers = list(layers)
    through = finetune.freeze_through
    heads = list(specs.warm_start_layers(finetune.head_layers))  # the command line's forms of a layer list
    for field, names in (("freeze_through", [through] if through else []), ("head_layers", heads)):
        unknown = [name for name in names if name not in layers]
        if unknown:
            raise ValueError(f"config.finetune.{field}: {unknown} not a layer of VGG-{config.model.variant} {layers}")
    frozen = layers[: layers.index(through) + 1] if through else []
    body = float(finetune.body_lr_multiplier)
    return {layer: 0.0 if layer in frozen else 1.0 if layer in heads else body for layer in layers}


def _scale_by_layer(multipliers: dict[str, float]) -> optax.GradientTransformation:
    """Each layer's update × its multiplier (the per-layer rate; momentum is of raw gradients, as in optax)."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda path, u: u * multipliers[path[0].key], updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _finetune_sgd(
    learning_rate: Any, momentum: float, weight_decay: float, decay_biases: bool, multipliers: tuple
) -> optax.GradientTransformation:
    rates = dict(multipliers)
    training = optax.chain(_sgd_with_l2(learning_rate, momentum, weight_decay, decay_biases), _scale_by_layer(rates))

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if rates[path[0].key] == 0 else "train", params
        )

    return optax.multi_transform({"train": training, "frozen": optax.set_to_zero()}, labels)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The paper's SGD; its state carries the learning rate the last step used (`current_learning_rate`).

    The injected rate is a number that the train step overwrites with `step_learning_rate` before each
    update: the schedule lives in the step. With a ``finetune`` group, the network's layers get
    `layer_rate_multipliers`.
    """
    hyper = dict(
        learning_rate=float(config.learning_rate),
        momentum=float(config.momentum),
        weight_decay=float(config.weight_decay),
        decay_biases=bool(config.decay_biases),
    )
    static = ("momentum", "weight_decay", "decay_biases")
    multipliers = layer_rate_multipliers(config, models.layer_names(config.model.variant))
    if multipliers is None:
        return optax.inject_hyperparams(_sgd_with_l2, static_args=static)(**hyper)
    # A tuple of pairs: hashable, so inject_hyperparams passes it through as a static argument.
    sgd = optax.inject_hyperparams(_finetune_sgd, static_args=(*static, "multipliers"))
    return sgd(**hyper, multipliers=tuple(multipliers.items()))


def step_learning_rate(schedule: optax.Schedule | float, step: jax.Array, plateau_state: Any) -> jax.Array:
    """The rate of one update: the schedule at `step` times the plateau scale (both rules, see module doc)."""
    base = schedule(step) if callable(schedule) else jnp.asarray(schedule, jnp.float32)
    return base * plateau_state.scale


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The rate the last update used."""
    return opt_state.hyperparams["learning_rate"]


def with_learning_rate(opt_state: Any, learning_rate: float | jax.Array) -> Any:
    """`opt_state` with its injected rate replaced (the train step sets it before each update)."""
    current = opt_state.hyperparams["learning_rate"]
    hyperparams = dict(opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, current.dtype))
    return opt_state._replace(hyperparams=hyperparams)


class PlateauControl:
    """The paper's rule: divide the rate by 10 when validation top-1 error stops improving."""

    def __init__(self, config: ml_collections.ConfigDict):
        plateau = config.plateau
        self.base_learning_rate = float(config.learning_rate)
        self.max_reductions = int(plateau.max_reductions)
        self._transform = contrib.reduce_on_plateau(
            factor=float(plateau.factor),
            patience=int(plateau.patience),
            rtol=0.0,
            atol=float(plateau.threshold),
            cooldown=int(plateau.cooldown),
            accumulation_size=1,
            min_scale=float(plateau.factor) ** self.max_reductions,
        )

    def init(self) -> Any:
        return self._transform.init({})

    def update(self, state: Any, validation_error: float) -> Any:
        """Feeds one validation result; returns the new control state.

        The rule only ever lowers the scale: optax clamps it up to `min_scale`, which would undo a
        reduction made by the spike guard (`lowered`) below the rule's own floor.
        """
        _, new = self._transform.update({}, state, value=jnp.asarray(validation_error, jnp.float32))
        return new._replace(scale=jnp.minimum(new.scale, jnp.asarray(state.scale, new.scale.dtype)))

    def learning_rate(self, state: Any) -> float:
        return self.base_learning_rate * float(state.scale)


def lowered(plateau_state: Any, factor: float) -> Any:
    """The plateau state with its scale × `factor`: the rate drops as after a plateau (spike-guard rollback)."""
    scale = jnp.asarray(plateau_state.scale)
    return plateau_state._replace(scale=(scale * factor).astype(scale.dtype))


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, in float32 (non-finite if any value is)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def update_norm(opt_state: Any) -> jax.Array | None:
    """‖update‖ of the step that produced `opt_state`, from its momentum: SGD's update is −rate × trace.

    Cheaper than the norm of the updates themselves: XLA then fuses the update into the parameters'
    write instead of storing it for a second read (bench/RESULTS.md, "The step's own work"). None for
    the fine-tuning optimiser (per-layer rates, frozen layers): the caller takes the updates' norm.
    """
    if isinstance(opt_state.inner_state, optax.MultiTransformState):
        return None
    trace = opt_state.inner_state[1][0].trace
    return current_learning_rate(opt_state) * global_norm(trace)


def update_statistics(
    grads: Any, updates: Any, params: Any, per_layer: bool = False, update_size: jax.Array | None = None
) -> dict[str, jax.Array]:
    """What a divergence looks like from inside one step: the gradient's L2 norm and the update's norm
    relative to the parameters' (the fraction by which the step moves the weights; the train step passes the
    parameters after the update, and `update_size`, the update's norm from `update_norm`), over the whole net
    and, with `per_layer`, for each layer's kernel (``grad_norm/conv1_1``, ``update_ratio/conv1_1``, …)."""
    size = global_norm(updates) if update_size is None else update_size  # `update_norm` gives it cheaply
    stats = {"grad_norm": global_norm(grads), "update_ratio": size / global_norm(params)}
    if per_layer:
        for layer in params:
            stats[f"grad_norm/{layer}"] = global_norm(grads[layer]["kernel"])
            stats[f"update_ratio/{layer}"] = global_norm(updates[layer]["kernel"]) / global_norm(
                params[layer]["kernel"]
            )
    return stats
