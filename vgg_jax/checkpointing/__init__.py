"""vgg_jax.checkpointing."""
