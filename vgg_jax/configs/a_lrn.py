"""VGG configuration A-LRN (paper Table 1) with the paper's recipe; see common.py for `arg`."""

import ml_collections

from vgg_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return common.get_config("A-LRN", arg)
