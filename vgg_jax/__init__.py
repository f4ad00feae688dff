"""vgg_jax: the VGG networks of Simonyan & Zisserman (ICLR 2015) in JAX/Flax."""

from typing import Any

from vgg_jax import pretrained  # a callable module: vgg_jax.pretrained("vgg16"); stdlib imports only
from vgg_jax.models import VARIANTS, VGG, feature_names, layer_names, parameter_count
from vgg_jax.runtime.process import prepare as prepare_process

__all__ = [
    "VARIANTS",
    "VGG",
    "feature_names",
    "layer_names",
    "load",
    "parameter_count",
    "prepare_process",
    "pretrained",
]


def load(path: str, step: int | str | None = None) -> Any:
    """Loads a training workdir or a converted-weights directory for inference.

    `step` is None (latest), 'best' (best validation error) or a step number.
    See `vgg_jax.inference.Classifier`.
    """
    from vgg_jax.inference import load as _load

    return _load(path, step=step)
