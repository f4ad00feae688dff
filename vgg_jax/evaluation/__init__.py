"""vgg_jax.evaluation."""
