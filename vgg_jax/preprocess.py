"""Paper §2 and §3.1 preprocessing on device: mean-RGB subtraction and the PCA colour shift.

Pure jnp, TensorFlow-free: the jitted train step, evaluation and the notebook
API (`vgg_jax.load`) all call these, and only uint8 crosses the host-device
link. Images are NHWC, RGB, on the 0–255 scale.

- **Mean RGB**: the paper's only normalisation is subtracting the training
  set's mean RGB (no division by a std). `CAFFE_MEAN_RGB` is the value the
  released models use; it is the one definition every config and converter
  imports.
- **Colour shift**: ``Σ_i α_i λ_i v_i`` per image, α_i ~ N(0, std²), with the
  standard ImageNet eigen-decomposition (PAPER.md §2) and λ on the 0–255 scale
  (×255); not clipped to 0..255 (as in AlexNet / fb.resnet.torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
# Standard ImageNet PCA of RGB pixels on the 0–1 scale (PAPER.md §2); columns are eigenvectors.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def color_shift_offsets(key: jax.Array, count: int, std: float = 0.1) -> jax.Array:
    """(count, 3) PCA colour offsets Σ_i α_i λ_i v_i, α_i ~ N(0, std²), on the 0–255 scale (paper §3.1)."""
    eigval = jnp.asarray(PCA_EIGVAL, jnp.float32) * 255.0
    eigvec = jnp.asarray(PCA_EIGVEC, jnp.float32)
    alpha = jax.random.normal(key, (count, 3), jnp.float32) * std
    return (alpha * eigval) @ eigvec.T  # row n is Σ_i α_ni λ_i v_i


def color_shift(images: jax.Array, key: jax.Array, std: float = 0.1) -> jax.Array:
    """PCA colour shift (paper §3.1): adds Σ_i α_i λ_i v_i, α_i ~ N(0, std²), to every pixel of each image.

    `images`: float (N, H, W, 3) on the 0–255 scale; λ are PAPER.md's eigenvalues × 255.
    """
    shift = color_shift_offsets(key, images.shape[0], std)
    return images + shift[:, None, None, :].astype(images.dtype)


def subtract_mean(images: jax.Array, mean_rgb: Sequence[float]) -> jax.Array:
    """Paper §2: the only normalisation is the training set's mean RGB, subtracted from every pixel."""
    return images - jnp.asarray(mean_rgb, images.dtype)


def preprocess_for_model(
    images: jax.Array,
    *,
    mean_rgb: Sequence[float],
    key: jax.Array | None = None,
    color_shift_std: float = 0.0,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """uint8 NHWC → float: colour shift (when `key` is given and std > 0), minus the mean RGB, cast to `dtype`.

    One pass over the pixels: the per-image colour offset and the mean fold into one (N, 3) offset first.
    """
    x = jnp.asarray(images)
    offset = -jnp.asarray(mean_rgb, jnp.float32)[None, :]
    if key is not None and color_shift_std > 0:
        offset = offset + color_shift_offsets(key, x.shape[0], color_shift_std)
    return (x.astype(jnp.float32) + offset[:, None, None, :]).astype(dtype)
