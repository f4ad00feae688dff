"""VGG configuration A-LRN: the packaged `vgg_jax/configs/a_lrn.py` (the paper's recipe; arguments in common.py)."""

from vgg_jax.configs.a_lrn import get_config

__all__ = ["get_config"]
