"""Paper §3.2 testing and §4 (Tables 3–6) as pure arithmetic: views, canvases, posteriors, top-k, test scales.

Pure NumPy / jnp, no TensorFlow or I/O: the test protocol, the runner, the training loop's top-k and
every consumer of the runner take their rules from here, so each rule has one definition. A test scale
Q is the smaller side after an isotropic rescale (`paper_scales`, `check_scales`); multi-crop is 5×5
crops × 2 flips per scale (`multicrop_views`); dense averages the class score map of the image and of
its flip, each soft-maxed (`dense_flip_posterior`), over the part of the image the pooling rule says
(`DENSE_POOLING`), placed top-left on a few canvases with only the image's own cells averaged
(`dense_canvases`, `top_left_mask`); an App. B descriptor is the same without soft-max
(`combine_scales`). Flips, crops, scales and nets are averaged as posteriors, never logits
(`fuse_posteriors`); top-k errors count ties pessimistically (`topk_errors`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # the bench's bare-GPU import path has no ml_collections
    import ml_collections

GRID = 5  # paper §3.2: 5×5 crops per scale (× 2 flips = 50)

# ----------------------------------------------------------------------------- test scales


def paper_scales(config: ml_collections.ConfigDict, multi: bool = False) -> list[int]:
    """Paper §4: Q = S (fixed S) or (Smin+Smax)/2 (jittered); multi: {S−32, S, S+32} or {Smin, mid, Smax}."""
    low, high = int(config.scale_min), int(config.scale_max)
    if low == high:
        return [low - 32, low, low + 32] if multi else [low]
    middle = (low + high) // 2
    return [low, middle, high] if multi else [middle]


def resolve_scales(spec: str | Sequence[int] | None, config: ml_collections.ConfigDict) -> list[int]:
    """'single' (default) / 'multi' → the paper's scales for this run; '256,384' or a list → those (checked)."""
    if spec is None or spec == "single":
        scales = paper_scales(config)
    elif spec == "multi":
        scales = paper_scales(config, multi=True)
    elif isinstance(spec, str):
        try:
            scales = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--scales must be 'single', 'multi' or integers like 256,384,512; got {spec!r}") from None
    else:
        scales = [int(q) for q in spec]
    check_scales(scales, int(config.crop_size))
    return scales


def resolve_flips(flips: str | bool | None, config: ml_collections.ConfigDict) -> bool:
    """Test-time flips (paper §3.2 averages image and flip): 'auto'/None follow the training's
    `config.random_flip` (a net never shown mirrored digits should not be asked about them); 'yes'/'no' force."""
    if flips is None or flips == "auto":
        return bool(config.get("random_flip", True))
    if isinstance(flips, bool):
        return flips
    if flips in ("yes", "no"):
        return flips == "yes"
    raise ValueError(f"flips must be 'auto', 'yes' or 'no', got {flips!r}")


def check_scales(scales: Sequence[int], crop_size: int) -> None:
    """Paper §3.2: every test scale Q (the rescaled smaller side) must hold the crop; at least one Q."""
    if not scales:
        raise ValueError("at least one test scale Q is needed")
    small = [q for q in scales if q < crop_size]
    if small:
        raise ValueError(
            f"test scale(s) Q={small} are smaller than crop_size={crop_size}: testing needs Q >= crop_size={crop_size}"
        )


def rescaled_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Paper §3.2 isotropic rescale: (H', W') with min(H', W') = `size`, the other side rounded."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


@functools.partial(jax.jit, static_argnames=("size",))
def _resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    resized = jax.image.resize(
        images.astype(jnp.float32), (images.shape[0], *size, images.shape[3]), "linear", antialias=True
    )
    return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def resize_smaller_side(images: np.ndarray | jax.Array, size: int) -> jax.Array:
    """Isotropic rescale of uint8 NHWC images so that min(H, W) = `size` (bilinear, antialiased), on device."""
    height, width = images.shape[1:3]
    if min(height, width) == size:
        return jnp.asarray(images)
    return _resize(jnp.asarray(images), rescaled_size(height, width, size))


def scaled_examples(images: Any, scales: Sequence[int]) -> list[dict[str, Any]]:
    """The runner's examples {'index', 'label': 0, 'scaled': {Q: image}} of uint8 images (a batch or a list of
    any sizes), each rescaled to every Q with `resize_smaller_side` (the notebook API's rescale)."""
    examples = []
    for index, image in enumerate(images):
        batch = np.asarray(image)[None]
        scaled = {int(q): np.asarray(resize_smaller_side(batch, int(q)))[0] for q in scales}
        examples.append({"index": index, "label": 0, "scaled": scaled})
    return examples


# ----------------------------------------------------------------------------- crops and multi-crop views


def center_crop(images: Any, size: int | tuple[int, int]) -> Any:
    """The central `size` (side, or (height, width)) window of an HWC image or NHWC batch, NumPy or JAX."""
    crop_h, crop_w = (size, size) if isinstance(size, int | np.integer) else size
    height, width = images.shape[-3:-1]
    if height < crop_h or width < crop_w:
        raise ValueError(f"a {height}x{width} image is smaller than the crop size {size}")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w, :]


def multicrop_offsets(height: int, width: int, crop: int, grid: int = GRID) -> np.ndarray:
    """(grid², 2) (top, left) of `crop`×`crop` windows on a regular grid over a height×width image.

    Rows and columns are evenly spaced from 0 to height−crop (width−crop), so
    the four corners are included; row-major order.
    """
    if height < crop or width < crop:
        raise ValueError(f"a {height}x{width} image is smaller than the crop size {crop}")
    tops = np.round(np.linspace(0, height - crop, grid)).astype(int)
    lefts = np.round(np.linspace(0, width - crop, grid)).astype(int)
    return np.stack(np.meshgrid(tops, lefts, indexing="ij"), axis=-1).reshape(-1, 2)


def multicrop_views(image: np.ndarray, crop: int, grid: int = GRID, flips: bool = True) -> np.ndarray:
    """(grid²·(1+flips), crop, crop, C): the grid crops, then the same crops flipped horizontally."""
    crops = np.stack([image[t : t + crop, s : s + crop] for t, s in multicrop_offsets(*image.shape[:2], crop, grid)])
    return np.concatenate([crops, crops[:, :, ::-1]]) if flips else crops


def multiscale_views(
    image: np.ndarray,
    scales: Sequence[int],
    crop: int,
    rescale: Callable[[np.ndarray, int], np.ndarray],
    grid: int = GRID,
) -> np.ndarray:
    """All multi-crop views of `image` over `scales` (150 for 3 scales), scale-major."""
    return np.concatenate([multicrop_views(np.asarray(rescale(image, q)), crop, grid) for q in scales])


# ----------------------------------------------------------------------------- dense canvases


def dense_canvases(scale: int, *, max_aspect: float = 2.0, num_buckets: int = 5) -> list[tuple[int, int]]:
    """The fixed (H, W) shapes that rescaled images are padded to for dense evaluation at `scale`."""
    if max_aspect < 1 or num_buckets < 1:
        raise ValueError(f"need max_aspect >= 1 and num_buckets >= 1, got {max_aspect}, {num_buckets}")
    longs = sorted({max(scale, round(scale * r)) for r in np.linspace(1.0, max_aspect, num_buckets)})
    return [(scale, long) for long in longs] + [(long, scale) for long in longs if long != scale]


def choose_canvas(height: int, width: int, canvases: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The smallest canvas holding a height×width image; else the largest of its orientation (it gets cropped)."""
    fitting = [c for c in canvases if c[0] >= height and c[1] >= width]
    if fitting:
        return min(fitting, key=lambda c: (c[0] * c[1], c))
    same_orientation = [c for c in canvases if (c[1] >= c[0]) == (width >= height)] or list(canvases)
    return max(same_orientation, key=lambda c: (c[0] * c[1], c))


def place_on_canvas(image: np.ndarray, canvas: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """`image` centre-cropped to fit `canvas`, placed top-left on a zero canvas; returns (canvas, (h, w) used)."""
    fitted = center_crop(image, (min(image.shape[0], canvas[0]), min(image.shape[1], canvas[1])))
    height, width = fitted.shape[:2]
    out = np.zeros((*canvas, image.shape[2]), image.dtype)
    out[:height, :width] = fitted
    return out, (height, width)


def pooled_size(size: Any, pools: int) -> Any:
    """A side after `pools` 2×2/2 max-pools in ceil mode (dense evaluation, `layers.ceil_mode_pad`): ⌈size/2^pools⌉."""
    return -(-size // 2**pools)


def dense_map_size(height: Any, width: Any, crop: int) -> tuple[Any, Any]:
    """Score-map size of the fully-convolutional net on a height×width input (5 ceil-mode pools, a k×k fc6).

    ⌈h/32⌉ − k + 1 cells, k = crop/32: the last cell reaches past a side that is not a multiple of 32, so
    every pixel of the input is seen (Caffe's rounding). Integers or arrays of them.
    """
    window = crop // NET_STRIDE
    return pooled_size(height, 5) - window + 1, pooled_size(width, 5) - window + 1


# The dense pooling rule: how the fully-convolutional net meets a side that is not a multiple of its total
# stride (32). "ceil" runs it on the whole image: ceil-mode pools pad the right/bottom, so the map covers every
# pixel and its last cells are partly padding (Caffe's pooling; the paper applies the net to "the whole
# (uncropped) image"); "centre" runs it on the image trimmed evenly at both ends of each side to a multiple
# of 32 (≤ 15 px a side), so the windows sit where a centre crop's does; "floor" on the top-left multiple of
# 32 (what floor-mode pools keep, without the context of the dropped rows). bench/RESULTS.md, "Dense pooling",
# measures the three where the geometry resembles the paper's; the paper's configs use PAPER_POOLING, the
# digit demos (32-px crops on 32–40-px images, one window) "centre".
DENSE_POOLING = ("ceil", "centre", "floor")
PAPER_POOLING = "ceil"
NET_STRIDE = 32


def check_dense_pooling(value: str) -> str:
    if value not in DENSE_POOLING:
        raise ValueError(f"dense_pooling must be one of {DENSE_POOLING}, got {value!r}")
    return value


def centre_trim(image: np.ndarray, stride: int = NET_STRIDE) -> np.ndarray:
    """`image` (h, w, C) or a batch of them, centre-cropped to the largest multiple of `stride` on each side."""
    height, width = image.shape[-3:-1]
    return center_crop(image, (max(stride, height // stride * stride), max(stride, width // stride * stride)))


def dense_region(height: int, width: int, pooling: str) -> tuple[int, int, int, int]:
    """(top, left, h, w): the part of a height×width image the dense net runs on under `pooling` (see above)."""
    if check_dense_pooling(pooling) == "ceil":
        return 0, 0, height, width
    rows, cols = max(NET_STRIDE, height // NET_STRIDE * NET_STRIDE), max(NET_STRIDE, width // NET_STRIDE * NET_STRIDE)
    if pooling == "floor":
        return 0, 0, rows, cols
    return (height - rows) // 2, (width - cols) // 2, rows, cols


def dense_input(image: np.ndarray, pooling: str) -> np.ndarray:
    """The (h, w, C) image (or NHWC batch) cut to `dense_region`: what the dense net sees under `pooling`."""
    top, left, rows, cols = dense_region(*image.shape[-3:-1], pooling)
    return image[..., top : top + rows, left : left + cols, :]


def top_left_mask(heights: jax.Array, widths: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """(N, *shape) bool: True inside each image's heights[n]×widths[n] top-left region (pixels or map cells)."""
    rows, cols = jnp.arange(shape[0])[None, :, None], jnp.arange(shape[1])[None, None, :]
    return (rows < jnp.asarray(heights)[:, None, None]) & (cols < jnp.asarray(widths)[:, None, None])


# ----------------------------------------------------------------------------- dense posteriors (jnp)


def with_flips(images: jax.Array, widths: jax.Array | None = None) -> jax.Array:
    """(2N, H, W, C): the N images, then each mirrored horizontally.

    With `widths` (N,) each image is mirrored inside its own top-left width, so a
    padded canvas keeps its image top-left aligned and its padding in place.
    """
    if widths is None:
        return jnp.concatenate([images, images[:, :, ::-1]])
    columns = jnp.arange(images.shape[2])[None, :]
    widths = jnp.asarray(widths)[:, None]
    mirror = jnp.where(columns < widths, widths - 1 - columns, columns)
    flipped = jax.vmap(lambda image, index: image[:, index])(images, mirror)
    return jnp.concatenate([images, flipped])


def spatial_average(maps: jax.Array, cells: jax.Array | None = None) -> jax.Array:
    """(N, h, w, C) maps → (N, C) in float32: the mean over positions, or over the True `cells` (N, h, w)."""
    maps = maps.astype(jnp.float32)
    if cells is None:
        return maps.mean(axis=(1, 2))
    weights = cells.astype(jnp.float32)[..., None]
    return (maps * weights).sum((1, 2)) / weights.sum((1, 2))


def average_flips(values: jax.Array) -> jax.Array:
    """(2N, ...) values of N images then of their flips → (N, ...) their mean."""
    count = values.shape[0] // 2
    return 0.5 * (values[:count] + values[count:])


def dense_flip_posterior(score_maps: jax.Array, cells: jax.Array | None = None, flips: bool = True) -> jax.Array:
    """Paper §3.2 dense evaluation: (2N, h, w, classes) score maps of N images then their flips → (N, classes).

    Each map is averaged spatially (over the True `cells` (N, h, w) of the image,
    the same for its flip, where given) into class scores, soft-maxed, and the
    posteriors of the image and its flip averaged. ``flips=False``: N maps, no flips.
    """
    if cells is not None and flips:
        cells = jnp.concatenate([cells, cells])
    posteriors = jax.nn.softmax(spatial_average(score_maps, cells), axis=-1)
    return average_flips(posteriors) if flips else posteriors


def dense_flip_descriptor(maps: jax.Array, cells: jax.Array | None = None, flips: bool = True) -> jax.Array:
    """Paper App. B descriptor at one scale: (2N, h, w, F) activation maps of N images then their flips → (N, F).

    Each map is global-average-pooled (over its True `cells`, as `dense_flip_posterior`) and the image's
    and its flip's vectors are averaged; no soft-max, no normalisation (`combine_scales` does that).
    """
    if cells is not None and flips:
        cells = jnp.concatenate([cells, cells])
    pooled = spatial_average(maps, cells)
    return average_flips(pooled) if flips else pooled


def l2_normalize(x: Any, axis: int = -1) -> Any:
    """x / ‖x‖₂ along `axis` (a zero vector stays zero); NumPy or jnp."""
    xp = jnp if isinstance(x, jax.Array) else np
    norm = xp.sqrt(xp.sum(xp.square(x), axis=axis, keepdims=True))
    return x / xp.maximum(norm, 1e-12)


def combine_scales(per_scale: Any, how: str = "average", normalize_each: bool = False) -> Any:
    """Paper App. B: (N, S, F) descriptors over S scales → (N, F) averaged or (N, S·F) stacked, L2-normalised.

    The paper normalises the final descriptor; ``normalize_each`` also normalises every scale's
    vector first (not the paper's; off by default, `transfer`'s ``--normalize_scales``).
    """
    if how not in ("average", "stack"):
        raise ValueError(f"scales combine by 'average' or 'stack', got {how!r}")
    per_scale = l2_normalize(per_scale) if normalize_each else per_scale
    if how == "average":
        combined = per_scale.mean(axis=1)
    else:
        combined = per_scale.reshape(per_scale.shape[0], -1)
    return l2_normalize(combined)


# ----------------------------------------------------------------------------- posteriors and fusion


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Soft-max in float64 NumPy."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def average_posteriors(logits: Any, axis: int = 0) -> Any:
    """Mean over `axis` of the soft-max posteriors (never of the logits) — flips, crops, scales, nets."""
    if isinstance(logits, jax.Array):
        return jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=axis)
    return softmax(logits).mean(axis=axis)


def fuse_posteriors(posteriors: Sequence[np.ndarray]) -> np.ndarray:
    """Fusion (paper Table 6): the mean of several nets' (N, C) posteriors over the same examples."""
    shapes = {np.shape(p) for p in posteriors}
    if len(shapes) != 1:
        raise ValueError(f"cannot fuse posteriors of different shapes {sorted(shapes)}")
    return np.mean(np.stack(posteriors), axis=0)


# ----------------------------------------------------------------------------- top-k error


def topk_correct(logits: Any, labels: Any, k: int) -> Any:
    """1.0 where the label is within the top k of (N, C) `logits`, else 0.0 (paper §4 top-k error).

    Tie rule (pessimistic): the true class counts as within the top k only if
    fewer than k *other* classes score greater than *or equal to* it. A tie at
    the k-th place is therefore an error, and a net with constant scores gets
    100% error, never 0%. Rows with a non-finite score are wrong.

    jnp inside jitted steps (training, periodic validation); NumPy arrays stay
    NumPy, in their own precision (float64 posteriors are not rounded to float32).
    Comparisons between values of one dtype are exact, so no cast is needed.
    """
    xp = jnp if isinstance(logits, jax.Array) else np
    true_scores = xp.take_along_axis(logits, labels[:, None], axis=-1)
    others_at_least = xp.sum(logits >= true_scores, axis=-1) - 1
    finite = xp.all(xp.isfinite(logits), axis=-1)
    return ((others_at_least < k) & finite).astype(xp.float32)


def topk_errors(
    scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k error rates (fractions) of (N, C) `scores` over the rows where `mask` is true (`topk_correct`'s ties)."""
    scores, labels = np.asarray(scores), np.asarray(labels).astype(np.int64)
    mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
    count = int(mask.sum())
    result = {}
    for k in ks:
        wrong = topk_correct(scores, labels, k) == 0
        result[f"top{k}_error"] = float((wrong & mask).sum() / count) if count else float("nan")
    return result
