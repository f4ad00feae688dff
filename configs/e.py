"""VGG configuration E: the packaged `vgg_jax/configs/e.py` (the paper's recipe; arguments in common.py)."""

from vgg_jax.configs.e import get_config

__all__ = ["get_config"]
