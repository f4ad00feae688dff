"""Paper App. A training: the localisation net through the classification loop of `vgg_jax.training.train`.

`vgg_jax.training.train.task_for` picks this module for a config whose ``model.box_head`` is 'scr' or 'pcr'
(`vgg_jax/configs/loc.py`); the loop, checkpoints, multi-host sharding, logging and resume are the
classification ones. What differs, as in the paper:

* the last layer ``fc8_box`` regresses boxes; the loss is Euclidean on (cx, cy, w, h)
  (`vgg_jax.localisation.arithmetic`: targets relative to the crop, ½‖p − t‖², only the ground-truth class's
  box for PCR);
* the batches carry boxes that followed the crop, rescale and flip (`vgg_jax.localisation.boxes`);
* the net starts from the classifier trained at the same S (``warm_start``: every layer but the
  new, random last one; lr 1e-3), and ``loc.finetune='fc6-fc7'`` trains only fc6, fc7 and fc8_box
  (OverFeat's way; the convolutional layers keep the classifier's weights, weight decay included).

Metrics: in a localisation run, ``top1_error`` (and ``top5_error``, the same number: one box per
crop) is the localisation error of the ground-truth class's box on the centre crop at Q — the
paper's protocol 1 (Table 8) — so the best checkpoint and the plateau rule follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vgg_jax import models
from vgg_jax.localisation import arithmetic as localise
from vgg_jax.localisation import boxes
from vgg_jax.training import steps

create_train_iterator = boxes.create_train_iterator
eval_batches = boxes.eval_batches


def box_objective(regression: str) -> steps.Objective:
    """`steps.Objective` of App. A: per-crop Euclidean loss, weight 1 where the crop shows a box, hits."""

    def objective(outputs: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict]:
        target, weight = localise.training_target(batch["boxes"], batch["box_mask"])
        predicted = localise.box_of_class(outputs.astype(jnp.float32), batch["label"], regression)
        hits = localise.localised(predicted, batch["boxes"], batch["box_mask"]).astype(jnp.float32)
        return localise.euclidean_loss(predicted, target), weight, {"top1_correct": hits, "top5_correct": hits}

    return objective


def frozen_layers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Layers that keep their warm-start weights: none ('all'), or every conv layer ('fc6-fc7')."""
    return () if config.loc.finetune == "all" else tuple(models.conv_layer_names(config.model.variant))


def make_train_step(
    config: ml_collections.ConfigDict,
    model: models.VGG,
    tx: optax.GradientTransformation,
    steps_per_epoch: int | None = None,
) -> Callable[..., Any]:
    """`steps.make_train_step` with the box objective; frozen layers are put back after each update."""
    step = steps.make_train_step(config, model, tx, steps_per_epoch, objective=box_objective(model.box_head))
    frozen = frozen_layers(config)
    if not frozen:
        return step

    def train_step(state: steps.TrainState, batch: dict[str, jax.Array], root_key: jax.Array) -> Any:
        new_state, metrics = step(state, batch, root_key)
        # Dropping the update (rather than the gradient) also drops the coupled L2 term of those layers.
        params = {name: state.params[name] if name in frozen else value for name, value in new_state.params.items()}
        return new_state.replace(params=params), metrics

    return train_step


def make_eval_step(config: ml_collections.ConfigDict, model: models.VGG) -> Callable[..., dict[str, jax.Array]]:
    """Sums of loss and protocol-1 hits (IoU > 0.5 with a ground-truth box, ground-truth class's box)."""
    return steps.make_eval_step(config, model, box_objective(model.box_head))
