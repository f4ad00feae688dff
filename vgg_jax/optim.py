"""Paper §3.1 optimisation: SGD + momentum 0.9, L2 5e-4, lr 1e-2 ÷10 on plateaus.

The update is ``optax.chain(add_decayed_weights(5e-4, mask), sgd(lr, 0.9))``:
the L2 penalty is coupled (its gradient, wd·w, joins the loss gradient before
momentum, as Caffe's weight_decay does), and by default it skips biases
(Caffe's decay_mult 0) [choice, `decay_biases`].

The learning rate is an injected hyper-parameter of the chain (it lives in
the optimiser state and is checkpointed with it), but it is never a source of
truth: every train step sets it to

    rate(step) = schedule(step) × plateau scale

(`step_learning_rate`), with the schedule built from the *current* config. So
a `config.learning_rate` changed on resume takes effect at the next step under
either rule, and lowering the plateau scale (the plateau rule, or the spike
guard's rollback) lowers the rate at once. Two schedules:

* 'plateau' (the paper): a constant config.learning_rate; after each
  validation `PlateauControl` feeds the top-1 error to
  `optax.contrib.reduce_on_plateau`, whose scale drops ÷10 after `patience`
  evaluations without an improvement of at least `threshold`, at most
  `max_reductions` times.
* 'step': ÷10 at fixed epochs (`step_boundaries_epochs`), the usual
  reproducible alternative (the plateau scale stays 1 unless the spike guard
  lowers it).

Note: optax's SGD keeps the momentum of raw gradients and multiplies by the
current rate, while Caffe accumulates lr·gradient; the two only differ for a
few steps after each of the (three) rate drops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from optax import contrib

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
    if config.lr_schedule == "step":
        boundaries = {int(round(epoch * steps_per_epoch)): 0.1 for epoch in config.step_boundaries_epochs}
        return optax.piecewise_constant_schedule(float(config.learning_rate), boundaries)
    raise ValueError(f"config.lr_schedule must be 'plateau' or 'step', got {config.lr_schedule!r}")


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """The paper's SGD; its state carries the learning rate the last step used (`current_learning_rate`).

    The injected rate is a number that the train step overwrites with `step_learning_rate` before each
    update (`steps_per_epoch` is kept for callers; the schedule is applied there).
    """
    del steps_per_epoch
    return optax.inject_hyperparams(_sgd_with_l2, static_args=("momentum", "weight_decay", "decay_biases"))(
        learning_rate=float(config.learning_rate),
        momentum=float(config.momentum),
        weight_decay=float(config.weight_decay),
        decay_biases=bool(config.decay_biases),
    )


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
        if plateau.patience < 1 or not 0 < plateau.factor < 1:
            raise ValueError(
                f"config.plateau needs patience >= 1 and 0 < factor < 1, got {plateau.patience}, {plateau.factor}"
            )
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


def update_norm(opt_state: Any) -> jax.Array:
    """‖update‖ of the step that produced `opt_state`, from its momentum: SGD's update is −rate × trace.

    Cheaper than the norm of the updates themselves: XLA then fuses the update into the parameters'
    write instead of storing it for a second read (bench/RESULTS.md, "The step's own work").
    """
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
