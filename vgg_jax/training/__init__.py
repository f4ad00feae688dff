"""vgg_jax.training."""
