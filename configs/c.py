"""VGG configuration C: the packaged `vgg_jax/configs/c.py` (the paper's recipe; arguments in common.py)."""

from vgg_jax.configs.c import get_config

__all__ = ["get_config"]
