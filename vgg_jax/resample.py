"""Paper §3.1's rescale + crop + flip, on the accelerator: the training crops from windows the host only decoded.

With ``config.resample_on_device`` the host decodes just the source window a crop reads and places it on a
fixed square canvas (`vgg_jax.data.image_ops.random_window_on_canvas`), with the vector
``[sy, sx, ty, tx, height, width, flipped]``; the jitted train step turns that into the crop here. The
resampling is the host path's: TensorFlow's antialiased ``ScaleAndTranslate`` with the triangle (bilinear)
kernel — output pixel x samples the source at (x + ½ − t)/s − ½, weights tri(|d| / max(1/s, 1)) over
the window's pixels, normalised to sum 1 (so the image border renormalises, as there) — then rounding to
0..255, as the host path's uint8 crop. As in ``jax.image.scale_and_translate`` but with the window's
size traced per image: the canvas beyond it has no weight. Separable: two batched matmuls per image,
about 0.4 GFLOP at a 448² canvas and crop 224 (a train step is 93 GFLOP per image).

Pure jnp, TensorFlow-free (the GPU benchmark's import path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GEOMETRY_FIELDS = ("sy", "sx", "ty", "tx", "height", "width", "flipped")


def _weights(scale: jax.Array, translation: jax.Array, valid: jax.Array, canvas: int, out: int) -> jax.Array:
    """(N, out, canvas) resampling weights along one axis, for per-image scale, translation and valid size."""
    scale, translation, valid = scale[:, None, None], translation[:, None, None], valid[:, None, None]
    inv_scale = 1.0 / scale
    kernel_scale = jnp.maximum(inv_scale, 1.0)  # antialiasing: the kernel widens when shrinking
    sample = (jnp.arange(out, dtype=jnp.float32)[None, :, None] + 0.5 - translation) * inv_scale - 0.5
    source = jnp.arange(canvas, dtype=jnp.float32)[None, None, :]
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample - source) / kernel_scale)  # the triangle kernel
    weights = jnp.where(source < valid, weights, 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = jnp.where(total > 1000.0 * jnp.finfo(jnp.float32).tiny, weights / jnp.where(total > 0, total, 1.0), 0.0)
    # No sample outside the window (TensorFlow's rule): those output pixels are 0.
    inside = (sample >= -0.5) & (sample <= valid - 0.5)
    return jnp.where(inside, weights, 0.0)


def crops_from_canvas(canvas: jax.Array, geometry: jax.Array, crop: int) -> jax.Array:
    """float32 (N, crop, crop, 3) crops, values rounded to 0..255, from uint8 canvases (N, C, C, 3) and (N, 7)
    `geometry` rows [sy, sx, ty, tx, height, width, flipped] (a flipped crop is mirrored left-right)."""
    if canvas.ndim != 4 or canvas.shape[-1] != 3 or geometry.shape != (canvas.shape[0], len(GEOMETRY_FIELDS)):
        raise ValueError(
            f"crops_from_canvas expects canvases (N, C, C, 3) and geometry (N, {len(GEOMETRY_FIELDS)}) "
            f"{GEOMETRY_FIELDS}, got {canvas.shape} and {geometry.shape}"
        )
    geometry = geometry.astype(jnp.float32)
    sy, sx, ty, tx, height, width, flipped = (geometry[:, i] for i in range(len(GEOMETRY_FIELDS)))
    rows = _weights(sy, ty, height, canvas.shape[1], crop)
    cols = _weights(sx, tx, width, canvas.shape[2], crop)
    # A flip mirrors the output columns: reverse each flipped image's column weights.
    cols = jnp.where(flipped[:, None, None] > 0.5, cols[:, ::-1, :], cols)
    pixels = canvas.astype(jnp.float32)
    exact = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on GPUs: the crops must match the host path's
    tall = jnp.einsum("noh,nhwc->nowc", rows, pixels, precision=exact)
    out = jnp.einsum("npw,nowc->nopc", cols, tall, precision=exact)
    return jnp.clip(jnp.round(out), 0.0, 255.0)
