"""Paper §3.2 testing on device: batches of dense canvases and multi-crop views, compiled once per shape.

`run_evaluation` turns a stream of rescaled images into per-example soft-max
posteriors for the methods of `vgg_jax.evaluate` (dense, multi-crop, centre
crop), averaged over the test scales; the protocol arithmetic (views,
canvases, flips, posteriors) is `vgg_jax.protocols`.

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
Crops are cut when their batch is built, so the queues hold one image per
example, not 50 crops.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import models, parallel, preprocess, protocols
from vgg_jax.progress import Progress, format_eta

Key = tuple[str, int, tuple[int, int]]  # (method, Q, shape): one compiled input shape, one queue


def default_mesh() -> Mesh:
    """The training mesh: every device of every process on one 'data' axis."""
    return parallel.create_mesh()


_JIT_CACHE: dict[Any, Callable[..., Any]] = {}


def _compiled(kind: str, model: models.VGG, mean_rgb: tuple[float, ...], mesh: Mesh) -> Callable[..., Any]:
    """One jitted function per (kind, net, mesh); jit's own cache then holds one executable per shape."""
    key = (kind, repr(model), mean_rgb, mesh)
    if key in _JIT_CACHE:
        return _JIT_CACHE[key]

    def dense(params, images, sizes, meta):
        # images: (B, H, W, 3) uint8 canvases; sizes: (B, 2) the (h, w) of the image in the top-left corner.
        inside = protocols.top_left_mask(sizes[:, 0], sizes[:, 1], images.shape[1:3])
        x = jnp.where(inside[..., None], preprocess.preprocess_for_model(images, mean_rgb=mean_rgb), 0.0)
        scores = model.apply({"params": params}, protocols.with_flips(x, sizes[:, 1]), dense=True)
        cells = protocols.top_left_mask(
            *protocols.dense_map_size(sizes[:, 0], sizes[:, 1], model.crop_size), scores.shape[1:3]
        )
        return protocols.dense_flip_posterior(scores, cells), meta

    def views(params, crops, meta):
        # crops: (B, V, c, c, 3) uint8: every view of each image (flips included), posteriors averaged over V.
        batch, count = crops.shape[:2]
        x = preprocess.preprocess_for_model(crops.reshape(batch * count, *crops.shape[2:]), mean_rgb=mean_rgb)
        logits = model.apply({"params": params}, x).astype(jnp.float32).reshape(batch, count, -1)
        return protocols.average_posteriors(logits, axis=1), meta

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


def _allgather_counts(counts: np.ndarray) -> np.ndarray:
    """(process_count, K) table of every process's `counts` (no collective on one process)."""
    if jax.process_count() == 1:
        return counts[None]
    return np.asarray(multihost_utils.process_allgather(counts)).reshape(jax.process_count(), -1)


@dataclasses.dataclass
class _Item:
    index: int
    label: int
    data: np.ndarray
    size: tuple[int, int] = (0, 0)


class _Scheduler:
    """Queues each example's images per compiled shape and runs global batches that every process agrees on.

    `add` queues one example (every method × scale); `flush` runs the batches
    that are due; `finish` collects the last results and returns the posteriors
    averaged over scales. One batch is in flight while the next is built.
    """

    def __init__(
        self,
        model: models.VGG,
        params: Any,
        *,
        methods: Sequence[str],
        scales: Sequence[int],
        mean_rgb: tuple[float, ...],
        batch_size: int,
        mesh: Mesh,
        grid: int,
        dense_buckets: str,
        canvases: Mapping[int, list[tuple[int, int]]],
        progress: _ProgressLog,
    ):
        self.model, self.mesh, self.grid, self.batch_size = model, mesh, grid, batch_size
        self.methods, self.scales = tuple(methods), list(scales)
        self.canvases, self.dense_buckets = canvases, dense_buckets
        self.crop, self.processes = model.crop_size, jax.process_count()
        self.params = _replicate(params, mesh)
        self.data_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        self.functions = {kind: _compiled(kind, model, mean_rgb, mesh) for kind in ("dense", "views")}
        self.static_keys = None if dense_buckets == "exact" else self._all_keys()
        self.progress = progress
        self.queues: dict[Key, list[_Item]] = {}
        self.pending: list[tuple[str, Any]] = []
        self.sums: dict[str, dict[int, np.ndarray]] = {m: {} for m in self.methods}
        self.counts: dict[str, dict[int, int]] = {m: {} for m in self.methods}
        self.labels: dict[int, int] = {}

    def _all_keys(self) -> list[Key]:
        keys = []
        for method in self.methods:
            for q in self.scales:
                shapes = self.canvases[q] if method == "dense" else [(self.crop, self.crop)]
                keys += [(method, q, tuple(shape)) for shape in shapes]
        return keys

    # ------------------------------------------------------------------ queueing

    def add(self, example: Mapping[str, Any]) -> None:
        """Queues `example` ({'index', 'label', 'scaled': {Q: image}}) for every method and scale."""
        index, label = int(example["index"]), int(example["label"])
        for method in self.methods:
            for q in self.scales:
                image = np.asarray(example["scaled"][q])
                if min(image.shape[:2]) < self.crop:
                    raise ValueError(
                        f"example {index}: rescaled to Q={q} it is {image.shape[:2]}, smaller than crop {self.crop}"
                    )
                key, item = (method, q, (self.crop, self.crop)), _Item(index, label, image)
                if method == "dense":
                    exact = self.dense_buckets == "exact"
                    canvas = image.shape[:2] if exact else protocols.choose_canvas(*image.shape[:2], self.canvases[q])
                    data, size = protocols.place_on_canvas(image, canvas)
                    key, item = (method, q, tuple(canvas)), _Item(index, label, data, size)
                self.queues.setdefault(key, []).append(item)

    def flush(self, exhausted: bool) -> bool:
        """Runs the batches due on every process (all of them once every process is `exhausted`); True when done."""
        keys = self.static_keys if self.static_keys is not None else sorted(self.queues)
        lengths = np.array([len(self.queues.get(key, ())) for key in keys] + [int(exhausted)], np.int64)
        table = _allgather_counts(lengths)
        done = bool(table[:, -1].all())
        for position, key in enumerate(keys):
            local = self._images_per_step(key) // self.processes
            column = table[:, position]
            if done:
                steps = -(-int(column.max()) // local)  # flush everything, padding the short processes
            elif column.max() >= 4 * local:
                steps = int(column.max()) // local  # bound memory: run full batches of the fullest process
            else:
                steps = int(column.min()) // local  # only batches full on every process; carry the rest
            queue = self.queues.get(key, [])
            for _ in range(steps):
                batch, queue[:] = queue[:local], queue[local:]
                self._run_batch(key, batch, local)
        return done

    def finish(self) -> dict[str, Any]:
        """Collects the batches in flight; {'indices', 'labels', 'posteriors': {method: (N, C)}} sorted by index."""
        for method, outputs in self.pending:
            self._collect(method, outputs)
        self.pending = []
        self.progress.log(final=True)
        indices = np.array(sorted(self.labels), np.int64)
        result: dict[str, Any] = {"indices": indices, "labels": np.array([self.labels[i] for i in indices], np.int64)}
        result["posteriors"] = {}
        for method in self.methods:
            missing = [i for i in indices.tolist() if self.counts[method].get(i) != len(self.scales)]
            if missing:
                raise RuntimeError(f"{method}: examples {missing[:5]} were not evaluated once per scale")
            mean = [self.sums[method][i] / len(self.scales) for i in indices.tolist()]
            result["posteriors"][method] = np.stack(mean).astype(np.float32)
        return result

    # ------------------------------------------------------------------ batches

    def _images_per_step(self, key: Key) -> int:
        """Dense: about `batch_size` crops' worth of pixels; multi-crop: batch_size / 50 images."""
        method, _, (height, width) = key
        if method == "dense":
            wanted = self.batch_size * self.crop * self.crop // (2 * height * width)
        elif method == "multicrop":
            wanted = self.batch_size // (2 * self.grid * self.grid)
        else:
            wanted = self.batch_size
        devices = self.mesh.devices.size
        return max(devices, wanted // devices * devices)

    def _item_shape(self, key: Key) -> tuple[int, ...]:
        method, _, shape = key
        if method == "dense":
            return (*shape, 3)
        return (2 * self.grid * self.grid if method == "multicrop" else 1, self.crop, self.crop, 3)

    def _views(self, method: str, item: _Item) -> np.ndarray:
        if method == "multicrop":
            return protocols.multicrop_views(item.data, self.crop, self.grid)
        if method == "center_crop":
            return protocols.center_crop(item.data, self.crop)[None]
        return item.data

    def _run_batch(self, key: Key, items: list[_Item], local: int) -> None:
        """Dispatches one global batch; its results are collected after the next one is dispatched."""
        method = key[0]
        meta = np.zeros((local, 3), np.int32)  # index, label, valid
        data = np.zeros((local, *self._item_shape(key)), np.uint8)
        for row, item in enumerate(items):
            meta[row] = (item.index, item.label, 1)
            data[row] = self._views(method, item)
        arrays = [data, meta]
        if method == "dense":
            sizes = np.tile(np.asarray(key[2], np.int32), (local, 1))
            sizes[: len(items)] = [item.size for item in items]
            arrays.insert(1, sizes)
        global_arrays = [jax.make_array_from_process_local_data(self.data_sharding, a) for a in arrays]
        function = self.functions["dense" if method == "dense" else "views"]
        self.pending.append((method, function(self.params, *global_arrays)))
        if len(self.pending) > 1:
            self._collect(*self.pending.pop(0))

    def _collect(self, method: str, outputs: Any) -> None:
        posteriors, meta_out = jax.device_get(outputs)
        valid = meta_out[:, 2] == 1
        indices, labels = meta_out[valid, 0].tolist(), meta_out[valid, 1].tolist()
        sums, counts = self.sums[method], self.counts[method]
        for index, label, posterior in zip(indices, labels, posteriors[valid], strict=True):
            sums[index] = sums[index] + posterior if index in sums else np.array(posterior, np.float32)
            counts[index] = counts.get(index, 0) + 1
            self.labels[index] = label
        self.progress.update(int(valid.sum()))


class _ProgressLog:
    """Batches done, images/s and ETA, logged by process 0 at most every `every_s` seconds (`progress.Progress`)."""

    def __init__(self, name: str, total: int | None, components: int, every_s: float):
        self.name, self.components, self.every_s = name, components, every_s
        self.progress = Progress(total)
        self.last = time.perf_counter()
        self.batches = self.units = 0

    def update(self, units: int) -> None:
        self.batches += 1
        self.units += units  # one unit: one example at one (method, scale)
        if time.perf_counter() - self.last >= self.every_s:
            self.log()

    def log(self, final: bool = False) -> None:
        self.last = time.perf_counter()
        images = self.units // self.components
        rate, eta = self.progress.measure(images)
        if final:  # the whole run's rate; nothing is left
            rate, eta = self.progress.overall_rate(images), None
        if jax.process_index() == 0:
            tail = f", ETA {format_eta(eta)}" if eta is not None else ""
            logging.info("%s: %d batches, %d images, %.1f images/s%s", self.name, self.batches, images, rate, tail)


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
    grid: int = protocols.GRID,
    dense_buckets: str = "aspect",
    max_aspect: float = 2.0,
    num_buckets: int = 5,
    chunk_examples: int | None = None,
    total_examples: int | None = None,
    name: str = "eval",
    log_every_s: float = 10.0,
) -> dict[str, Any]:
    """Per-example posteriors of this process's `examples` (every process gets everyone's); paper §3.2.

    `examples` yields {'index', 'label', 'scaled': {Q: uint8 (h, w, 3) rescaled to Q}}.
    `methods` ⊆ ('dense', 'multicrop', 'center_crop'); `batch_size` is the
    global batch in crops: a multi-crop step holds batch_size/50 images, a
    dense step about the same number of pixels (both rounded to a multiple of
    the device count). Returns {'indices', 'labels', 'posteriors': {method: (N, C)}},
    rows sorted by index, each posterior averaged over `scales`.
    """
    protocols.check_scales(scales, model.crop_size)
    if dense_buckets not in ("aspect", "exact"):
        raise ValueError(f"dense_buckets must be 'aspect' or 'exact', got {dense_buckets!r}")
    if dense_buckets == "exact" and jax.process_count() > 1:
        raise ValueError("dense_buckets='exact' compiles per image shape and needs one process; use 'aspect'")
    scheduler = _Scheduler(
        model,
        params,
        methods=methods,
        scales=scales,
        mean_rgb=tuple(float(v) for v in mean_rgb),
        batch_size=batch_size,
        mesh=mesh or default_mesh(),
        grid=grid,
        dense_buckets=dense_buckets,
        canvases={q: protocols.dense_canvases(q, max_aspect=max_aspect, num_buckets=num_buckets) for q in scales},
        progress=_ProgressLog(name, total_examples, len(methods) * len(scales), log_every_s),
    )
    local_chunk = chunk_examples or max(8, batch_size // jax.process_count())
    iterator = iter(examples)
    exhausted = False
    while True:
        taken = 0
        for example in itertools.islice(iterator, 0 if exhausted else local_chunk):
            scheduler.add(example)
            taken += 1
        exhausted = exhausted or taken < local_chunk
        if scheduler.flush(exhausted):
            return scheduler.finish()
