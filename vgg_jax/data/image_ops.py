"""Per-image TensorFlow ops of paper §3.1 (training crops) and §3.2 (test-time rescale to Q).

Images are uint8 HWC RGB; grey is promoted to RGB and alpha dropped. Every op works eagerly and
inside `tf.data.Dataset.map`.

- `rescale_smaller_side`: isotropic rescale so the smaller side is S (training) or Q (test).
- `rescaled_crop`: a crop of that rescaled image, computed without the rescale.
- `random_rescaled_crop`: the §3.1 augmentation: S ~ U{Smin..Smax} per image (scale jittering; a
  fixed S when Smin = Smax), a crop at a uniform position, a horizontal flip with probability 1/2.
- `random_window_on_canvas`: the same draws, but only the crop's decoded source window goes to the device
  (on a fixed canvas), which resamples and flips it in the train step (`vgg_jax.resample`).

**Rescale + crop in one step** [implementation]: the crop is computed from the window of the source
image it covers (JPEGs decode only that window with `tf.io.decode_and_crop_jpeg`) with
`ScaleAndTranslate`, the op behind ``tf.image.resize(antialias=True)``. Up to float rounding this
equals "resize the whole image (bilinear, antialiased) then crop"; a test checks it. Optional
``config.resize_method='fast'`` (default 'exact'): plain bilinear of the window at the nearest pixel
alignment, about 2× faster per core (bench/RESULTS.md), slightly aliased when shrinking.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

Offsets = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def _round_to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _rescaled_size(height: tf.Tensor, width: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(H', W') with min(H', W') == size and the aspect ratio kept (larger side rounded)."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    s = tf.cast(size, tf.float64)
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, s, tf.round(h * s / short))
    new_w = tf.where(w < h, s, tf.round(w * s / short))
    return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """Grey (1 channel) → RGB; drops alpha."""
    channels = tf.shape(image)[-1]
    image = tf.cond(channels == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[:, :, :3])
    return tf.ensure_shape(image, [None, None, 3])


def _decode_full(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (JPEG, PNG, GIF, BMP, WebP) → uint8 RGB HWC."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_rgb(image: tf.Tensor) -> tf.Tensor:
    """The whole image as uint8 RGB HWC, from encoded bytes (tf.string) or already-decoded pixels."""
    return _decode_full(image) if image.dtype == tf.string else _to_rgb(image)


def rescale_smaller_side(image: tf.Tensor, size: int | tf.Tensor) -> tf.Tensor:
    """Isotropically rescales a uint8 HWC image so its smaller side is `size` (bilinear, antialiased).

    Works eagerly and inside `tf.data.Dataset.map`; returns uint8 RGB.
    """
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise TypeError(f"rescale_smaller_side expects uint8 pixels, got {image.dtype}")
    image = _to_rgb(image)
    new_h, new_w = _rescaled_size(tf.shape(image)[0], tf.shape(image)[1], size)
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    return _round_to_uint8(resized)


def rescaled_crop(
    image: tf.Tensor,
    size: int | tf.Tensor,
    crop: int,
    offsets: Offsets | None = None,
    resize: str = "exact",
) -> tf.Tensor:
    """A `crop`×`crop` window of the image rescaled so its smaller side is `size`, computed without the rescale.

    `image` is encoded bytes (tf.string; JPEGs are decoded only inside the window) or a uint8 HWC tensor.
    `offsets(H', W')` gives the window's top-left corner in the rescaled image (default: the centre).
    resize='exact': equals ``rescale_smaller_side(image, size)[oy:oy+crop, ox:ox+crop]`` up to float rounding.
    resize='fast': plain bilinear (no antialiasing) of the window, aligned to the nearest pixel: about 2× faster
    on one core, slightly aliased when shrinking.
    """
    return _rescaled_crop(image, size, crop, offsets, resize)[0]


def _rescaled_crop(
    image: tf.Tensor, size: int | tf.Tensor, crop: int, offsets: Offsets | None, resize: str = "exact"
) -> tuple[tf.Tensor, tf.Tensor]:
    """`rescaled_crop` that also returns the offsets (oy, ox) it used."""
    region, scale, translation, offset = _crop_region(image, size, crop, offsets)
    return _resample(region, scale, translation, crop, resize), offset


def _crop_region(
    image: tf.Tensor, size: int | tf.Tensor, crop: int, offsets: Offsets | None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The decoded source window a crop reads, its scale (sy, sx), translation, and the crop's offsets (oy, ox)."""
    image = tf.convert_to_tensor(image)
    size = tf.convert_to_tensor(size, tf.int32)
    if offsets is None:
        offsets = lambda h, w: ((h - crop) // 2, (w - crop) // 2)

    def window(height, width):
        return _crop_window(height, width, size, crop, offsets)

    if image.dtype == tf.string:

        def jpeg():
            shape = tf.io.extract_jpeg_shape(image)
            win, scale, translation, offset = window(shape[0], shape[1])
            return tf.io.decode_and_crop_jpeg(image, win, channels=3), scale, translation, offset

        def other():
            return _cut_window(_decode_full(image), window)

        region, scale, translation, offset = tf.cond(tf.io.is_jpeg(image), jpeg, other)
    else:
        region, scale, translation, offset = _cut_window(_to_rgb(image), window)
    return tf.ensure_shape(region, [None, None, 3]), scale, translation, offset


def _crop_window(
    height: tf.Tensor, width: tf.Tensor, size: tf.Tensor, crop: int, offsets: Offsets
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The source window [y0, x0, h, w] a crop reads, the scale (sy, sx), the translation, and (oy, ox)."""
    new_h, new_w = _rescaled_size(height, width, size)
    oy, ox = offsets(new_h, new_w)
    # Per-axis scales exactly as tf.image.resize computes them.
    sy = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
    sx = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
    # Source rows/cols the crop reads: its extent / scale plus the filter's support.
    margin_y = tf.math.ceil(1.0 / tf.minimum(sy, 1.0)) + 1.0
    margin_x = tf.math.ceil(1.0 / tf.minimum(sx, 1.0)) + 1.0
    oyf, oxf = tf.cast(oy, tf.float32), tf.cast(ox, tf.float32)
    y0 = tf.clip_by_value(tf.cast(tf.floor(oyf / sy - margin_y), tf.int32), 0, height - 1)
    x0 = tf.clip_by_value(tf.cast(tf.floor(oxf / sx - margin_x), tf.int32), 0, width - 1)
    y1 = tf.clip_by_value(tf.cast(tf.math.ceil((oyf + crop) / sy + margin_y), tf.int32), y0 + 1, height)
    x1 = tf.clip_by_value(tf.cast(tf.math.ceil((oxf + crop) / sx + margin_x), tf.int32), x0 + 1, width)
    # Output pixel i of the crop is rescaled pixel oy + i: translation maps it into the window.
    translation = tf.stack([tf.cast(y0, tf.float32) * sy - oyf, tf.cast(x0, tf.float32) * sx - oxf])
    return tf.stack([y0, x0, y1 - y0, x1 - x0]), tf.stack([sy, sx]), translation, tf.stack([oy, ox])


def _cut_window(full: tf.Tensor, window: Callable) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """`_crop_window`'s region of an already-decoded image, with its scale, translation and offsets."""
    shape = tf.shape(full)
    win, scale, translation, offset = window(shape[0], shape[1])
    return full[win[0] : win[0] + win[2], win[1] : win[1] + win[3]], scale, translation, offset


def _resample(region: tf.Tensor, scale: tf.Tensor, translation: tf.Tensor, crop: int, resize: str) -> tf.Tensor:
    """The uint8 `crop`×`crop` output from the source window, by `resize` ('exact' or 'fast')."""
    if resize == "fast":
        region_size = tf.cast(tf.shape(region)[:2], tf.float32)
        new_size = tf.maximum(tf.cast(tf.round(region_size * scale), tf.int32), crop)
        resized = tf.image.resize(region, new_size, method="bilinear", antialias=False)
        start = tf.clip_by_value(tf.cast(tf.round(-translation), tf.int32), 0, new_size - crop)
        out = resized[start[0] : start[0] + crop, start[1] : start[1] + crop]
        return tf.ensure_shape(_round_to_uint8(out), [crop, crop, 3])
    if resize != "exact":
        raise ValueError(f"resize={resize!r}: expected 'exact' or 'fast' (config.resize_method)")
    out = tf.raw_ops.ScaleAndTranslate(
        images=region[None],
        size=tf.constant([crop, crop], tf.int32),
        scale=scale,
        translation=translation,
        kernel_type="triangle",  # = bilinear; antialiased like tf.image.resize(antialias=True)
        antialias=True,
    )[0]
    return tf.ensure_shape(_round_to_uint8(out), [crop, crop, 3])


def _random_draws(seed: tf.Tensor, scale_min: int, scale_max: int, crop: int, flip: bool):
    """Paper §3.1's random choices for one image: S ~ U{scale_min..scale_max}, the crop's offsets, the flip."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    s = tf.random.stateless_uniform([], seed=seeds[0], minval=scale_min, maxval=scale_max + 1, dtype=tf.int32)
    u = tf.random.stateless_uniform([2], seed=seeds[1], dtype=tf.float32)
    flipped = tf.logical_and(tf.constant(bool(flip)), tf.random.stateless_uniform([], seed=seeds[2]) < 0.5)

    def offsets(h, w):
        oy = tf.minimum(tf.cast(tf.floor(u[0] * tf.cast(h - crop + 1, tf.float32)), tf.int32), h - crop)
        ox = tf.minimum(tf.cast(tf.floor(u[1] * tf.cast(w - crop + 1, tf.float32)), tf.int32), w - crop)
        return oy, ox

    return s, offsets, flipped


def random_rescaled_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale_min: int,
    scale_max: int,
    crop: int,
    flip: bool,
    resize: str = "exact",
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """Paper §3.1 augmentation of one image with a stateless `seed` (shape [2]).

    S ~ U{scale_min..scale_max}; crop position uniform over the rescaled image; horizontal flip with
    probability 1/2 when `flip`. Returns (uint8 crop, {'scale', 'offset_y', 'offset_x', 'flipped'}).
    """
    s, offsets, flipped = _random_draws(seed, scale_min, scale_max, crop, flip)
    out, offset = _rescaled_crop(image, s, crop, offsets, resize)
    out = tf.cond(flipped, lambda: tf.reverse(out, axis=[1]), lambda: out)
    return out, {"scale": s, "offset_y": offset[0], "offset_x": offset[1], "flipped": flipped}


def random_window_on_canvas(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale_min: int,
    scale_max: int,
    crop: int,
    flip: bool,
    canvas: int,
) -> tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """`random_rescaled_crop`'s crop (the same draws) left for the accelerator to resample (`vgg_jax.resample`).

    Returns the decoded source window on a ``canvas``×``canvas`` uint8 canvas (top-left, zeros elsewhere), the
    float32 vector ``[sy, sx, ty, tx, height, width, flipped]`` that `vgg_jax.resample.crops_from_canvas` turns
    into the crop, and the draws. A window larger than the canvas is first shrunk on the host by the smallest
    integer factor r that fits (each output pixel the mean of an r×r block; the scale grows by r): close to,
    not equal to, the host path's crop (tests/test_resample.py bounds the difference).
    """
    s, offsets, flipped = _random_draws(seed, scale_min, scale_max, crop, flip)
    region, scale, translation, offset = _crop_region(image, s, crop, offsets)
    size = tf.shape(region)[:2]
    factor = (tf.reduce_max(size) + canvas - 1) // canvas
    region, scale = tf.cond(
        factor > 1,
        lambda: (_shrink(region, factor), scale * tf.cast(factor, tf.float32)),
        lambda: (region, scale),
    )
    size = tf.shape(region)[:2]
    placed = tf.pad(region, [[0, canvas - size[0]], [0, canvas - size[1]], [0, 0]])
    placed = tf.ensure_shape(placed, [canvas, canvas, 3])
    geometry = tf.concat([scale, translation, tf.cast(size, tf.float32), tf.cast(flipped, tf.float32)[None]], axis=0)
    return placed, geometry, {"scale": s, "offset_y": offset[0], "offset_x": offset[1], "flipped": flipped}


def _shrink(region: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Mean of each factor×factor block, rounded to uint8; a partial last block is completed by mirroring."""
    size = tf.shape(region)[:2]
    blocks = (size + factor - 1) // factor
    pad = blocks * factor - size
    region = tf.pad(region, [[0, pad[0]], [0, pad[1]], [0, 0]], mode="SYMMETRIC")
    region = tf.reshape(region, [blocks[0], factor, blocks[1], factor, 3])
    return _round_to_uint8(tf.reduce_mean(tf.cast(region, tf.float32), axis=[1, 3]))
