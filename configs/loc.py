"""App. A localisation: the packaged `vgg_jax/configs/loc.py` (arguments in its docstring)."""

from vgg_jax.configs.loc import get_config

__all__ = ["get_config"]
