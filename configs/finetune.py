"""Fine-tuning published VGG on a folder of photos: the packaged `vgg_jax/configs/finetune.py` (choices there)."""

from vgg_jax.configs.finetune import get_config

__all__ = ["get_config"]
