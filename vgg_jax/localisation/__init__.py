"""vgg_jax.localisation."""
