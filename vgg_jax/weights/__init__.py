"""vgg_jax.weights."""
