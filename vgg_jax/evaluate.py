"""Paper §3.2 testing and the protocols of §4 (Tables 3–6): dense, multi-crop, scales, flips, fusion.

Every image is rescaled isotropically so that its smaller side is the test
scale Q, then classified one of these ways (``method``):

* ``dense``: the fully-convolutional net (fc6 as a k×k conv, fc7/fc8 as 1×1)
  runs on the whole rescaled image; the class score map is averaged spatially
  into one score vector, as in the paper; the soft-max posteriors of the image
  and of its horizontal flip are averaged.
* ``multicrop``: crops of ``crop_size`` on a 5×5 regular grid (corners
  included) × 2 flips = 50 views per scale; their posteriors are averaged.
* ``both``: the dense and multi-crop posteriors averaged (paper Table 5).
* ``center_crop``: one centre crop, no flip (the cheap periodic validation).

Over several scales the per-scale posteriors are averaged; over several nets
(fusion, Table 6) the per-net posteriors are averaged. Everything that is
averaged is a soft-max posterior, never a logit — except the spatial average
of one dense score map, which the paper takes over class scores.

Bounded compilation in dense evaluation (approximation, **[choice]**): the
rescaled image (smaller side Q, other side L) is placed in the top-left corner
of the smallest of a few fixed canvases ("buckets") that holds it: (Q, L_b)
for landscape, (L_b, Q) for portrait, with L_b = round(Q·r) for ``num_buckets``
aspect ratios r evenly spaced in [1, ``max_aspect``] — at most
2·num_buckets − 1 compiled shapes per scale. The padding is zero after mean
subtraction; the flip mirrors the image inside its own width, so it stays
top-left aligned. The score map is averaged only over the cells the exact
computation on the unpadded image would produce (⌊h/32⌋−k+1 by ⌊w/32⌋−k+1,
k = crop_size/32), so every cell covers the same pixels as in the exact map.
The remaining difference is context: convolutions near the right/bottom edge
of the image see ReLU(bias)-valued activations in the padding where the exact
computation sees zero padding. An image whose rescaled shape equals a canvas is
computed exactly (tested). Images more elongated than ``max_aspect`` are
centre-cropped along their long side to the largest canvas. ``dense_buckets=
'exact'`` compiles one shape per distinct image shape instead (single process).

Batches: every process runs the same sequence of batches (a few integers are
all-gathered per chunk of input to agree on it), padded with masked rows; the
outputs come back replicated with their example index, label and mask, so each
example is counted exactly once and every process gets the full posteriors.

Command line (several ``--checkpoint`` fuse the nets)::

    python -m vgg_jax.evaluate --checkpoint=runs/d --checkpoint=runs/e \\
        --method=both --scales=multi --split=validation --out=results.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import checkpoints, models

METHODS = ("dense", "multicrop", "both", "center_crop")
METHOD_LABELS = {
    "dense": "dense",
    "multicrop": "multi-crop",
    "both": "dense + multi-crop",
    "center_crop": "centre crop",
}
GRID = 5  # paper §3.2: 5×5 crops per scale (× 2 flips = 50)


# ----------------------------------------------------------------------------- views (pure NumPy)


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


def center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    height, width = image.shape[:2]
    if height < crop or width < crop:
        raise ValueError(f"a {height}x{width} image is smaller than the crop size {crop}")
    top, left = (height - crop) // 2, (width - crop) // 2
    return image[top : top + crop, left : left + crop]


# ----------------------------------------------------------------------------- dense buckets


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
    height, width = min(image.shape[0], canvas[0]), min(image.shape[1], canvas[1])
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    out = np.zeros((*canvas, image.shape[2]), image.dtype)
    out[:height, :width] = image[top : top + height, left : left + width]
    return out, (height, width)


def dense_map_size(height: int, width: int, crop: int) -> tuple[int, int]:
    """Score-map size of the fully-convolutional net on a height×width image (5 pools, then a k×k fc6)."""
    window = crop // 32
    return height // 32 - window + 1, width // 32 - window + 1


# ----------------------------------------------------------------------------- posteriors and metrics


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def average_posteriors(logits: Any, axis: int = 0) -> Any:
    """Mean over `axis` of the soft-max posteriors (never of the logits) — flips, crops, scales, nets."""
    if isinstance(logits, jax.Array):
        return jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=axis)
    return softmax(logits).mean(axis=axis)


def topk_errors(
    scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k error rates (fractions) of (N, C) `scores` over the rows where `mask` is true.

    Tie rule (pessimistic): the true class counts as within the top k only if
    fewer than k *other* classes score greater than *or equal to* it. A tie at
    the k-th place is therefore an error, and a net with constant scores gets
    100% error, never 0%. Rows with a non-finite score are errors.
    """
    scores, labels = np.asarray(scores), np.asarray(labels).astype(np.int64)
    mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
    true_scores = scores[np.arange(len(labels)), labels]
    rank = (scores >= true_scores[:, None]).sum(axis=1) - 1  # others scoring >= the true class
    finite = np.isfinite(scores).all(axis=1)
    count = int(mask.sum())
    result = {}
    for k in ks:
        wrong = (rank >= k) | ~finite
        result[f"top{k}_error"] = float((wrong & mask).sum() / count) if count else float("nan")
    return result


def fuse_posteriors(posteriors: Sequence[np.ndarray]) -> np.ndarray:
    """Fusion (paper Table 6): the mean of several nets' (N, C) posteriors over the same examples."""
    shapes = {np.shape(p) for p in posteriors}
    if len(shapes) != 1:
        raise ValueError(f"cannot fuse posteriors of different shapes {sorted(shapes)}")
    return np.mean(np.stack(posteriors), axis=0)


# ----------------------------------------------------------------------------- scales


def paper_scales(config: ml_collections.ConfigDict, multi: bool = False) -> list[int]:
    """Paper §4: Q = S (fixed S) or (Smin+Smax)/2 (jittered); multi: {S−32, S, S+32} or {Smin, mid, Smax}."""
    low, high = int(config.scale_min), int(config.scale_max)
    if low == high:
        return [low - 32, low, low + 32] if multi else [low]
    middle = (low + high) // 2
    return [low, middle, high] if multi else [middle]


def resolve_scales(spec: str | Sequence[int] | None, config: ml_collections.ConfigDict) -> list[int]:
    """'single' (default) / 'multi' → the paper's scales for this run; '256,384' or a list → those."""
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


def check_scales(scales: Sequence[int], crop_size: int) -> None:
    if not scales:
        raise ValueError("at least one test scale Q is needed")
    small = [q for q in scales if q < crop_size]
    if small:
        raise ValueError(f"test scale(s) Q={small} are smaller than crop_size={crop_size}: Q must be >= crop_size")


# ----------------------------------------------------------------------------- device side


def default_mesh() -> Mesh:
    """The training mesh: every device of every process on one 'data' axis."""
    from vgg_jax import parallel

    return parallel.create_mesh()


_JIT_CACHE: dict[Any, Callable[..., Any]] = {}


def _compiled(kind: str, model: models.VGG, mean_rgb: tuple[float, ...], mesh: Mesh) -> Callable[..., Any]:
    """One jitted function per (kind, net, mesh); jit's own cache then holds one executable per shape."""
    key = (kind, repr(model), mean_rgb, mesh)
    if key in _JIT_CACHE:
        return _JIT_CACHE[key]
    mean = jnp.asarray(mean_rgb, jnp.float32)

    def dense(params, images, sizes, meta):
        # images: (B, H, W, 3) uint8 canvases; sizes: (B, 2) the (h, w) of the image in the top-left corner.
        _, height, width, _ = images.shape
        h, w = sizes[:, 0, None, None], sizes[:, 1, None, None]
        inside = (jnp.arange(height)[None, :, None] < h) & (jnp.arange(width)[None, None, :] < w)
        x = jnp.where(inside[..., None], images.astype(jnp.float32) - mean, 0.0)
        columns = jnp.arange(width)[None, :]
        mirror = jnp.where(columns < sizes[:, 1:2], sizes[:, 1:2] - 1 - columns, columns)  # flip inside width w
        flipped = jax.vmap(lambda image, index: image[:, index])(x, mirror)
        scores = model.apply({"params": params}, jnp.concatenate([x, flipped]), dense=True).astype(jnp.float32)
        window = model.fc6_window
        cells_h, cells_w = sizes[:, 0] // 32 - window + 1, sizes[:, 1] // 32 - window + 1
        rows, cols = scores.shape[1:3]
        cells = (jnp.arange(rows)[None, :, None] < cells_h[:, None, None]) & (
            jnp.arange(cols)[None, None, :] < cells_w[:, None, None]
        )
        cells = jnp.concatenate([cells, cells]).astype(jnp.float32)[..., None]
        class_scores = (scores * cells).sum((1, 2)) / cells.sum((1, 2))  # spatial average of the score map
        batch = images.shape[0]
        both = jnp.stack([class_scores[:batch], class_scores[batch:]])  # (2, B, C): image, flip
        return average_posteriors(both, axis=0), meta

    def views(params, crops, meta):
        # crops: (B, V, c, c, 3) uint8: every view of each image (flips included), posteriors averaged over V.
        batch, count = crops.shape[:2]
        x = crops.reshape(batch * count, *crops.shape[2:]).astype(jnp.float32) - mean
        logits = model.apply({"params": params}, x).astype(jnp.float32).reshape(batch, count, -1)
        return average_posteriors(logits, axis=1), meta

    replicated = NamedSharding(mesh, P())
    function = jax.jit(dense if kind == "dense" else views, out_shardings=(replicated, replicated))
    _JIT_CACHE[key] = function
    return function


def _replicate(params: Any, mesh: Mesh) -> Any:
    """Parameters on every device of `mesh`; arrays already replicated there (training) are used as they are."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if not x.is_fully_addressable:
                return jax.device_put(x, sharding)
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(put, params)


@dataclasses.dataclass
class _Item:
    index: int
    label: int
    data: np.ndarray
    size: tuple[int, int] = (0, 0)


def _allgather_counts(counts: np.ndarray) -> np.ndarray:
    """(process_count, K) table of every process's `counts` (no collective on one process)."""
    if jax.process_count() == 1:
        return counts[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(counts)).reshape(jax.process_count(), -1)


class _Progress:
    """Batches done, images/s and ETA, logged by process 0 at most every `every_s` seconds."""

    def __init__(self, name: str, total: int | None, components: int, every_s: float):
        self.name, self.total, self.components, self.every_s = name, total, components, every_s
        self.start = self.last = time.perf_counter()
        self.batches = self.units = 0

    def update(self, units: int) -> None:
        self.batches += 1
        self.units += units
        if time.perf_counter() - self.last >= self.every_s:
            self.log()

    def log(self) -> None:
        now = self.last = time.perf_counter()
        if jax.process_index() != 0:
            return
        images = self.units / self.components
        rate = images / max(now - self.start, 1e-9)
        eta = f", ETA {max(self.total - images, 0) / max(rate, 1e-9):.0f}s" if self.total else ""
        logging.info("%s: %d batches, %.0f images, %.1f images/s%s", self.name, self.batches, images, rate, eta)


def run_evaluation(
    model: models.VGG,
    params: Any,
    examples: Iterable[Mapping[str, Any]],
    *,
    methods: Sequence[str],
    scales: Sequence[int],
    mean_rgb: Sequence[float],
    batch_size: int,
    mesh: Mesh | None = None,
    grid: int = GRID,
    dense_buckets: str = "aspect",
    max_aspect: float = 2.0,
    num_buckets: int = 5,
    chunk_examples: int | None = None,
    total_examples: int | None = None,
    name: str = "eval",
    log_every_s: float = 10.0,
) -> dict[str, Any]:
    """Per-example posteriors of this process's `examples` (every process gets everyone's).

    `examples` yields {'index', 'label', 'scaled': {Q: uint8 (h, w, 3) rescaled to Q}}.
    `methods` ⊆ ('dense', 'multicrop', 'center_crop'); `batch_size` is the
    global batch in crops: a multi-crop step holds batch_size/50 images, a
    dense step about the same number of pixels (both rounded to a multiple of
    the device count). Returns {'indices', 'labels', 'posteriors': {method: (N, C)}},
    rows sorted by index, each posterior averaged over `scales`.
    """
    mesh = mesh or default_mesh()
    crop, num_devices, processes = model.crop_size, mesh.devices.size, jax.process_count()
    check_scales(scales, crop)
    if dense_buckets not in ("aspect", "exact"):
        raise ValueError(f"dense_buckets must be 'aspect' or 'exact', got {dense_buckets!r}")
    if dense_buckets == "exact" and processes > 1:
        raise ValueError("dense_buckets='exact' compiles per image shape and needs one process; use 'aspect'")
    mean = tuple(float(v) for v in mean_rgb)
    canvases = {q: dense_canvases(q, max_aspect=max_aspect, num_buckets=num_buckets) for q in scales}
    static_keys = None if dense_buckets == "exact" else _all_keys(methods, scales, canvases, crop)
    data_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    params = _replicate(params, mesh)

    def images_per_step(key: tuple[str, int, tuple[int, int]]) -> int:
        method, _, (height, width) = key
        if method == "dense":
            wanted = batch_size * crop * crop // (2 * height * width)
        elif method == "multicrop":
            wanted = batch_size // (2 * grid * grid)
        else:
            wanted = batch_size
        return max(num_devices, wanted // num_devices * num_devices)

    def item_shape(key: tuple[str, int, tuple[int, int]]) -> tuple[int, ...]:
        method, _, shape = key
        if method == "dense":
            return (*shape, 3)
        return (2 * grid * grid if method == "multicrop" else 1, crop, crop, 3)

    def item_views(method: str, item: _Item) -> np.ndarray:
        """Crops are cut when their batch is built, so queues hold one image per example, not 50 crops."""
        if method == "multicrop":
            return multicrop_views(item.data, crop, grid)
        if method == "center_crop":
            return center_crop(item.data, crop)[None]
        return item.data

    def prepare(method: str, q: int, image: np.ndarray, index: int, label: int) -> tuple[Any, _Item]:
        if min(image.shape[:2]) < crop:
            raise ValueError(f"example {index}: rescaled to Q={q} it is {image.shape[:2]}, smaller than crop {crop}")
        if method == "dense":
            canvas = image.shape[:2] if dense_buckets == "exact" else choose_canvas(*image.shape[:2], canvases[q])
            data, size = place_on_canvas(image, canvas)
            return (method, q, tuple(canvas)), _Item(index, label, data, size)
        return (method, q, (crop, crop)), _Item(index, label, image)

    def run_batch(key, items: list[_Item], local: int) -> None:
        """Dispatches one global batch; its results are collected after the next one is dispatched."""
        method = key[0]
        meta = np.zeros((local, 3), np.int32)  # index, label, valid
        for row, item in enumerate(items):
            meta[row] = (item.index, item.label, 1)
        data = np.zeros((local, *item_shape(key)), np.uint8)
        for row, item in enumerate(items):
            data[row] = item_views(method, item)
        arrays = [data, meta]
        if method == "dense":
            sizes = np.tile(np.asarray(key[2], np.int32), (local, 1))
            sizes[: len(items)] = [item.size for item in items]
            arrays.insert(1, sizes)
        global_arrays = [jax.make_array_from_process_local_data(data_sharding, a) for a in arrays]
        function = _compiled("dense" if method == "dense" else "views", model, mean, mesh)
        pending.append((method, function(params, *global_arrays)))
        if len(pending) > 1:
            collect(*pending.pop(0))

    def collect(method: str, outputs: Any) -> None:
        posteriors, meta_out = jax.device_get(outputs)
        valid = meta_out[:, 2] == 1
        accumulate(method, meta_out[valid, 0], meta_out[valid, 1], posteriors[valid])
        progress.update(int(valid.sum()))

    pending: list[tuple[str, Any]] = []
    sums: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}
    counts: dict[str, dict[int, int]] = {m: {} for m in methods}
    labels: dict[int, int] = {}

    def accumulate(method, indices, example_labels, posteriors) -> None:
        for index, label, posterior in zip(indices.tolist(), example_labels.tolist(), posteriors, strict=True):
            if index in sums[method]:
                sums[method][index] = sums[method][index] + posterior
            else:
                sums[method][index] = np.array(posterior, np.float32)
            counts[method][index] = counts[method].get(index, 0) + 1
            labels[index] = label

    progress = _Progress(name, total_examples, len(methods) * len(scales), log_every_s)
    local_chunk = chunk_examples or max(8, batch_size // processes)
    queues: dict[Any, list[_Item]] = {}
    iterator: Iterator[Mapping[str, Any]] = iter(examples)
    exhausted = False
    while True:
        for _ in range(local_chunk if not exhausted else 0):
            example = next(iterator, None)
            if example is None:
                exhausted = True
                break
            index, label = int(example["index"]), int(example["label"])
            for method in methods:
                for q in scales:
                    key, item = prepare(method, q, np.asarray(example["scaled"][q]), index, label)
                    queues.setdefault(key, []).append(item)
        keys = static_keys if static_keys is not None else sorted(queues)
        lengths = np.array([len(queues.get(key, ())) for key in keys] + [int(exhausted)], np.int64)
        table = _allgather_counts(lengths)
        done = bool(table[:, -1].all())
        for position, key in enumerate(keys):
            local = images_per_step(key) // processes
            column = table[:, position]
            if done:
                steps = -(-int(column.max()) // local)  # flush everything, padding the short processes
            elif column.max() >= 4 * local:
                steps = int(column.max()) // local  # bound memory: run full batches of the fullest process
            else:
                steps = int(column.min()) // local  # only batches full on every process; carry the rest
            queue = queues.get(key, [])
            for _ in range(steps):
                batch, queue[:] = queue[:local], queue[local:]
                run_batch(key, batch, local)
        if done:
            break
    for method, outputs in pending:
        collect(method, outputs)
    progress.log()

    indices = np.array(sorted(labels), np.int64)
    result: dict[str, Any] = {"indices": indices, "labels": np.array([labels[i] for i in indices], np.int64)}
    result["posteriors"] = {}
    for method in methods:
        missing = [i for i in indices.tolist() if counts[method].get(i) != len(scales)]
        if missing:
            raise RuntimeError(f"{method}: examples {missing[:5]} were not evaluated once per scale")
        result["posteriors"][method] = np.stack([sums[method][i] / len(scales) for i in indices.tolist()]).astype(
            np.float32
        )
    return result


def _all_keys(methods, scales, canvases, crop) -> list[tuple[str, int, tuple[int, int]]]:
    keys = []
    for method in methods:
        for q in scales:
            shapes = canvases[q] if method == "dense" else [(crop, crop)]
            keys += [(method, q, tuple(shape)) for shape in shapes]
    return keys


# ----------------------------------------------------------------------------- data set + metrics


def _split_with_limit(split: str, max_examples: int | None) -> str:
    if not max_examples:
        return split
    if "[" in split:
        raise ValueError(f"give either a sliced split ({split!r}) or max_examples, not both")
    return f"{split}[:{int(max_examples)}]"


def _num_examples(config: ml_collections.ConfigDict, split: str, max_examples: int | None) -> int | None:
    try:
        from vgg_jax.data import sources

        total = int(sources.dataset_metadata(config).num_examples(split))
    except Exception:  # progress only: an unknown total just means no ETA
        return max_examples
    return min(total, max_examples) if max_examples else total


def _scaled_examples(config: ml_collections.ConfigDict, split: str, scales: Sequence[int]) -> Iterator[dict]:
    """This process's shard of `split`, each image rescaled (smaller side) to every Q, as NumPy."""
    import tensorflow as tf

    from vgg_jax.data import image_ops, streams

    dataset = streams.load_eval_images(
        config, split=split, process_index=jax.process_index(), process_count=jax.process_count()
    )

    def rescale(example):
        scaled = {}
        for q in scales:
            image = image_ops.rescale_smaller_side(example["image"], q)
            if image.dtype != tf.uint8:
                image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
            scaled[str(q)] = image
        return {"index": example["index"], "label": example["label"], "scaled": scaled}

    dataset = dataset.map(rescale, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
    for example in dataset.as_numpy_iterator():
        yield {
            "index": example["index"],
            "label": example["label"],
            "scaled": {q: example["scaled"][str(q)] for q in scales},
        }


def summarize(posteriors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top-1/top-5 error and the mean negative log posterior of the true class."""
    metrics = topk_errors(posteriors, labels)
    true = posteriors[np.arange(len(labels)), labels]
    metrics["loss"] = float(-np.log(np.maximum(true, 1e-12)).mean()) if len(labels) else float("nan")
    return metrics


def evaluate_params(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    method: str = "dense",
    scales: Sequence[int] | None = None,
    split: str | None = None,
    mesh: Mesh | None = None,
    max_examples: int | None = None,
    dense_buckets: str = "aspect",
    examples: Iterable[Mapping[str, Any]] | None = None,
    name: str = "eval",
) -> dict[str, Any]:
    """Evaluates `params` of the net `config` describes on `split` (default config.eval_split).

    Returns top1_error, top5_error (fractions), loss (mean −log posterior of
    the true class), num_examples, method, scales, and 'posteriors' (N, C),
    'labels', 'indices' for fusion; 'by_method' holds the same per component
    ('dense', 'multicrop' for method='both'). Pass `examples` (see
    `run_evaluation`) to bypass the data pipeline.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    scales = [int(q) for q in (scales or [config.eval_scale])]
    check_scales(scales, int(config.crop_size))
    split = split or config.eval_split
    methods = ("dense", "multicrop") if method == "both" else (method,)
    if examples is None:
        full_split = _split_with_limit(split, max_examples)
        total = _num_examples(config, split, max_examples)
        examples = _scaled_examples(config, full_split, scales)
    else:
        total = max_examples
    raw = run_evaluation(
        models.from_config(config),
        params,
        examples,
        methods=methods,
        scales=scales,
        mean_rgb=config.mean_rgb,
        batch_size=int(config.eval_batch_size),
        mesh=mesh,
        dense_buckets=dense_buckets,
        total_examples=total,
        name=name,
    )
    by_method = {
        m: dict(summarize(raw["posteriors"][m], raw["labels"]), posteriors=raw["posteriors"][m]) for m in methods
    }
    posteriors = fuse_posteriors([raw["posteriors"][m] for m in methods])
    return dict(
        summarize(posteriors, raw["labels"]),
        num_examples=len(raw["labels"]),
        method=method,
        scales=scales,
        split=split,
        posteriors=posteriors,
        labels=raw["labels"],
        indices=raw["indices"],
        by_method=by_method,
    )


# ----------------------------------------------------------------------------- checkpoints, fusion, table


def _train_scale(config: ml_collections.ConfigDict) -> str:
    low, high = int(config.scale_min), int(config.scale_max)
    return str(low) if low == high else f"[{low};{high}]"


def _net_name(directory: str, config: ml_collections.ConfigDict) -> str:
    return f"{config.model.variant} ({os.path.basename(os.path.normpath(str(directory)))})"


def _row(net: str, train_scale: str, method: str, scales: Sequence[int], metrics: Mapping[str, Any]) -> dict:
    return dict(
        net=net,
        train_scale=train_scale,
        method=method,
        scales=list(scales),
        top1_error=float(metrics["top1_error"]),
        top5_error=float(metrics["top5_error"]),
        num_examples=int(metrics["num_examples"]),
    )


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paper's layout: net, train S, method, test Q, top-1 and top-5 error (%)."""
    lines = ["| net | train S | method | test Q | top-1 error (%) | top-5 error (%) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['net']} | {row['train_scale']} | {METHOD_LABELS.get(row['method'], row['method'])} | "
            f"{','.join(str(q) for q in row['scales'])} | {100 * row['top1_error']:.1f} | "
            f"{100 * row['top5_error']:.1f} |"
        )
    return "\n".join(lines)


def evaluate_checkpoints(
    directories: Sequence[str],
    *,
    method: str = "dense",
    scales: str | Sequence[int] | None = None,
    split: str | None = None,
    step: int | str | None = "best",
    out: str | None = None,
    max_examples: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    dense_buckets: str = "aspect",
) -> dict[str, Any]:
    """Evaluates each run directory the paper's way and fuses them (posteriors averaged per example).

    `scales`: 'single' (default) / 'multi' (the paper's for each run's
    training scale) or explicit Qs. `overrides` replace config fields (e.g.
    data_dir, eval_batch_size). Prints the table on process 0, writes JSON to
    `out`, returns {'rows', 'table', 'split', 'checkpoints'}. Every check
    (run directories, scales, class counts) happens before any evaluation.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if not directories:
        raise ValueError("give at least one --checkpoint=DIR")
    runs = []
    for directory in directories:
        config = checkpoints.load_config(directory)  # FileNotFoundError names the missing config.json
        for field, value in (overrides or {}).items():
            config[field] = value
        resolved = checkpoints.resolve_step(directory, step)  # FileNotFoundError: no checkpoint
        try:
            run_scales = resolve_scales(scales, config)
        except ValueError as error:
            raise ValueError(f"{directory}: {error}") from None
        runs.append((directory, config, resolved, run_scales))
    first_dir, first_config = runs[0][0], runs[0][1]
    for directory, config, _, _ in runs[1:]:
        if int(config.model.num_classes) != int(first_config.model.num_classes):
            raise ValueError(
                f"cannot fuse {first_dir} ({first_config.model.num_classes} classes) with {directory} "
                f"({config.model.num_classes} classes): fused nets must share the class set"
            )
        if config.dataset != first_config.dataset:
            raise ValueError(f"cannot fuse {first_dir} ({first_config.dataset}) with {directory} ({config.dataset})")
    split = split or first_config.eval_split

    rows, results = [], []
    components = ("dense", "multicrop", "both") if method == "both" else (method,)
    for directory, config, resolved, run_scales in runs:
        params, _, _ = checkpoints.restore_params(directory, resolved)
        result = evaluate_params(
            config,
            params,
            method=method,
            scales=run_scales,
            split=split,
            mesh=mesh,
            max_examples=max_examples,
            dense_buckets=dense_buckets,
            name=f"eval {directory}",
        )
        results.append(result)
        net = _net_name(directory, config)
        for component in components:
            metrics = (
                result
                if component == method
                else dict(result["by_method"][component], num_examples=len(result["labels"]))
            )
            rows.append(
                dict(
                    _row(net, _train_scale(config), component, run_scales, metrics),
                    checkpoint=str(directory),
                    step=resolved,
                )
            )
    if len(results) > 1:
        base = results[0]
        for directory, result in zip(directories[1:], results[1:], strict=True):
            if not np.array_equal(result["indices"], base["indices"]):
                raise ValueError(f"{directory} was evaluated on other examples than {directories[0]}; cannot fuse")
        net = "+".join(_net_name(d, c) for d, c, _, _ in runs)
        all_scales = sorted({q for _, _, _, s in runs for q in s})
        for component in components:

            def pick(result, component=component):
                return result["posteriors"] if component == method else result["by_method"][component]["posteriors"]

            fused = fuse_posteriors([pick(r) for r in results])
            metrics = dict(summarize(fused, base["labels"]), num_examples=len(base["labels"]))
            rows.append(
                dict(_row(net, "fusion", component, all_scales, metrics), checkpoint="+".join(map(str, directories)))
            )
    table = format_table(rows)
    report = {"split": split, "method": method, "step": step, "rows": rows, "table": table}
    if jax.process_index() == 0:
        print(table, flush=True)
        if out:
            directory = os.path.dirname(os.path.abspath(out))
            os.makedirs(directory, exist_ok=True)
            with open(out, "w") as stream:
                json.dump(report, stream, indent=2)
    return report


# ----------------------------------------------------------------------------- command line


def _main(argv: Sequence[str]) -> None:
    import sys

    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    overrides = {}
    if values.data_dir:
        overrides["data_dir"] = values.data_dir
    if values.eval_batch_size:
        overrides["eval_batch_size"] = values.eval_batch_size
    step: int | str = int(values.step) if values.step.isdigit() else values.step
    try:
        first = checkpoints.load_config(values.checkpoint[0]) if values.checkpoint else None
        from vgg_jax import parallel

        parallel.initialize(first.get("distributed") if first is not None else None)
        evaluate_checkpoints(
            values.checkpoint,
            method=values.method,
            scales=values.scales,
            split=values.split,
            step=step,
            out=values.out,
            max_examples=values.max_examples,
            overrides=overrides,
            dense_buckets=values.dense_buckets,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def run() -> None:
    from absl import app, flags

    flags.DEFINE_multi_string("checkpoint", [], "Run directory (config.json + checkpoints/); repeat to fuse nets.")
    flags.DEFINE_enum("method", "dense", list(METHODS), "dense, multicrop, both (dense + multi-crop) or center_crop.")
    flags.DEFINE_string("scales", "single", "'single' / 'multi' (the paper's Q for each run) or e.g. 256,384,512.")
    flags.DEFINE_string("split", None, "Data set split (default: the run's eval_split); TFDS slicing allowed.")
    flags.DEFINE_string("step", "best", "'best' (lowest validation top-1), 'latest' or a step number.")
    flags.DEFINE_string("out", None, "Write the results as JSON here.")
    flags.DEFINE_integer("max_examples", None, "Evaluate only the first N examples of the split.")
    flags.DEFINE_string("data_dir", None, "Override the run's TFDS data_dir.")
    flags.DEFINE_integer("eval_batch_size", None, "Override the global batch (in crops).")
    flags.DEFINE_enum("dense_buckets", "aspect", ["aspect", "exact"], "Dense shape buckets, or exact shapes.")
    flags.mark_flag_as_required("checkpoint")
    app.run(_main)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run()
