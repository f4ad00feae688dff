"""VGG configuration D: the packaged `vgg_jax/configs/d.py` (the paper's recipe; arguments in common.py)."""

from vgg_jax.configs.d import get_config

__all__ = ["get_config"]
