"""Layer operations of paper §2.1–§3.2 that flax does not provide in the form VGG needs.

LRN (A-LRN), the 2×2/2 max-pool written for XLA:CPU's speed, Caffe's ceil-mode padding for dense
evaluation, and the k×k patches that let fc6 run as a matrix product over a map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def local_response_norm(
    x: jax.Array,
    *,
    size: int = 5,
    k: float = 2.0,
    alpha: float = 1e-4,
    beta: float = 0.75,
    alpha_over_size: bool = False,
) -> jax.Array:
    """Cross-channel LRN of Krizhevsky et al. (2012), used by A-LRN (paper §2.2).

    b_c = a_c / (k + α' Σ_{c'} a_{c'}²)^β, the sum over the `size` channels
    centred on c (clipped at the edges). The AlexNet paper uses α' = α (the
    default here); Caffe's LRN layer uses α' = α / size — pass
    ``alpha_over_size=True`` to match weights trained with Caffe.
    """
    half = size // 2
    channels = x.shape[-1]
    padded = jnp.pad(jnp.square(x), [(0, 0)] * (x.ndim - 1) + [(half, size - 1 - half)])
    # A sum of `size` shifted slices: plain ops that differentiate (and rematerialise) everywhere.
    squared_sum = sum(padded[..., offset : offset + channels] for offset in range(size))
    scale = alpha / size if alpha_over_size else alpha
    return x / jnp.power(k + scale * squared_sum, beta)


def _quarters(x: jax.Array) -> tuple[jax.Array, ...]:
    """The four pixels of every 2×2/2 window (of the even-sized top-left part), in row-major order."""
    x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Paper §2.1's max-pooling over 2×2 windows with stride 2 (NHWC; an odd last row/column is dropped).

    Equal to ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))``, gradient included (ties: the first pixel
    of the window in row-major order takes it), but written as elementwise maxima of the four strided
    quarters, and its gradient as a mask of the same: XLA:CPU runs the reduce-window form's gradient through
    index-tracking iotas and a select-and-scatter, 8× slower (bench/RESULTS.md, "The step's own work").
    """
    a, b, c, d = _quarters(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_backward(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array]:
    x, y = residuals
    n, height, width, channels = x.shape
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for quarter in _quarters(x):
        hit = (quarter == y) & ~taken
        taken = taken | hit
        parts.append(jnp.where(hit, grad, jnp.zeros((), grad.dtype)))
    rows = [jnp.stack(parts[:2], axis=3), jnp.stack(parts[2:], axis=3)]  # (N, H/2, W/2, 2, C) each
    dx = jnp.stack(rows, axis=2).reshape(n, height // 2 * 2, width // 2 * 2, channels)
    return (jnp.pad(dx, ((0, 0), (0, height - dx.shape[1]), (0, width - dx.shape[2]), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


def sliding_patches(x: jax.Array, window: int) -> jax.Array:
    """(N, H, W, C) → (N, H−k+1, W−k+1, k·k·C): every k×k patch, flattened in NHWC (row, column, channel) order.

    The fc kernels' row order, so ``sliding_patches(x, k) @ kernel`` is the 'VALID' k×k convolution.
    """
    if window == 1:
        return x
    out_h, out_w = x.shape[1] - window + 1, x.shape[2] - window + 1
    taps = [x[:, i : i + out_h, j : j + out_w, :] for i in range(window) for j in range(window)]
    return jnp.concatenate(taps, axis=-1)


def ceil_mode_pad(x: jax.Array) -> jax.Array:
    """Pads an odd height/width at the bottom/right with −inf, so a 2×2/2 max-pool rounds up (Caffe's ceil mode).

    Dense evaluation only (paper §3.2): the released nets ran fully convolutionally in Caffe, whose
    pooling covers the last odd row/column, so the score map covers the whole input. Which part of an
    image is that input is the test protocol's pooling rule (`vgg_jax.evaluation.arithmetic.DENSE_POOLING`).
    Crops (multiples of 32) never need it.
    """
    pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
    if not (pad_h or pad_w):
        return x
    return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
