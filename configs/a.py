"""VGG configuration A: the packaged `vgg_jax/configs/a.py` (the paper's recipe; arguments in common.py)."""

from vgg_jax.configs.a import get_config

__all__ = ["get_config"]
