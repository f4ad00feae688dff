"""vgg_jax: the VGG networks of Simonyan & Zisserman (ICLR 2015) in JAX/Flax."""

from typing import Any

from vgg_jax import cpu_defaults

# Before any JAX backend starts: the measured fast XLA:CPU flags (no-op on GPU/TPU; user XLA_FLAGS win).
cpu_defaults.apply()

from vgg_jax import pretrained  # noqa: E402  (a callable module: vgg_jax.pretrained("vgg16"); stdlib imports only)
from vgg_jax.models import VARIANTS, VGG, feature_names, layer_names, parameter_count  # noqa: E402

__all__ = ["VARIANTS", "VGG", "feature_names", "layer_names", "load", "parameter_count", "pretrained"]


def load(path: str, step: int | str | None = None) -> Any:
    """Loads a training workdir or a converted-weights directory for inference.

    `step` is None (latest), 'best' (best validation error) or a step number.
    See `vgg_jax.inference.Classifier`.
    """
    from vgg_jax.inference import load as _load

    return _load(path, step=step)
