"""VGG configuration B: the packaged `vgg_jax/configs/b.py` (the paper's recipe; arguments in common.py)."""

from vgg_jax.configs.b import get_config

__all__ = ["get_config"]
