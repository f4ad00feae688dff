"""Paper §3.1 warm start, from where it comes: a run, a converted directory, or published weights by name.

``config.warm_start.checkpoint`` is a run directory (a training workdir or what `vgg_jax.weights.convert`
writes) or ``pretrained:NAME`` (``pretrained:vgg16``, ``pretrained:torchvision/vgg19``): published
weights through `vgg_jax.pretrained`'s cache, downloaded and hash-checked on first use. Layers are
copied by name (`vgg_jax.checkpointing.checkpoints.warm_start`); the classifier head ``fc8`` of a source trained on
other classes (1000 ImageNet ones, say) does not fit a data set with another class count, so it is
left at its random init and the log says so — fine-tuning on your own classes needs no layer list.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from vgg_jax.checkpointing import checkpoints
from vgg_jax.runtime import paths

HEAD = "fc8"  # the layer whose width is the number of classes


def restore(spec: str, step: int | str | None) -> tuple[Any, ml_collections.ConfigDict, int, str]:
    """(params, config, step, directory) of `spec`: a run directory, or 'pretrained:NAME' (fetched, cached)."""
    if spec.startswith(paths.PRETRAINED_PREFIX):
        from vgg_jax import pretrained  # stdlib imports only; conversion happens on the first fetch

        directory = str(pretrained.fetch(spec.removeprefix(paths.PRETRAINED_PREFIX)))
        step = "latest"  # converted weights hold one step (no validation error to rank 'best' by)
    else:
        directory = spec
    params, config, restored = checkpoints.restore_params(directory, step)
    return params, config, restored, directory


def layers_to_copy(fresh: Mapping[str, Any], source: Mapping[str, Any], layers: Sequence[str] | str) -> list[str]:
    """`layers` ('all': every layer of `fresh`), less a head whose class count differs from the source's."""
    names = list(fresh) if layers == "all" else list(layers)
    if HEAD in names and HEAD in source and HEAD in fresh:
        ours, theirs = np.shape(fresh[HEAD]["kernel"]), np.shape(source[HEAD]["kernel"])
        if ours[:-1] == theirs[:-1] and ours[-1] != theirs[-1]:
            logging.info(
                "warm start: %s has %d classes in the source, %d here: it starts from random init",
                HEAD,
                theirs[-1],
                ours[-1],
            )
            names.remove(HEAD)
    return names


def check_mean_rgb(config: ml_collections.ConfigDict, source_config: ml_collections.ConfigDict) -> None:
    """Warns when the source's input convention (mean RGB subtracted) is not this run's."""
    ours = tuple(config.mean_rgb)
    theirs = tuple(source_config.get("mean_rgb", ours))
    if not np.allclose(ours, theirs, atol=1e-3):
        logging.warning(
            "warm start: the source subtracted mean RGB %s, this run subtracts %s: the copied layers see shifted "
            "inputs (set --config.mean_rgb to the source's unless you mean it)",
            [round(v, 3) for v in theirs],
            [round(v, 3) for v in ours],
        )
