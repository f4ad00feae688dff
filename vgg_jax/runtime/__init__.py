"""vgg_jax.runtime."""
