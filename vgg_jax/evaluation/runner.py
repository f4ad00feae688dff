"""Paper §3.2 testing on device: batches of dense canvases and multi-crop views, compiled once per shape.

`run_evaluation` runs one net under one resolved `TestProtocol` on a stream of rescaled images and
returns per-example posteriors averaged over the test scales (or App. B descriptors, App. A dense maps).
Bounded compilation, exactly: a dense image goes top-left on the smallest of a few canvases per scale
(``num_buckets`` aspect ratios up to ``max_aspect``), every conv output is masked to the image and only
the cells the image alone gives are averaged, so results equal the per-image computation up to float
summation order. The one approximation: with several processes, an image more elongated than
``max_aspect`` is centre-cropped to the largest canvas (``buckets='exact'``: one shape per image
shape, single process). Every process runs the same batches, padded with masked rows, and gets each
example's output exactly once; crops are cut when their batch is built, so queues hold one image each.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import models
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation import executor
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.runtime import parallel
from vgg_jax.runtime.progress import Progress, format_eta

Key = tuple[str, int, tuple[int, int]]  # (method, Q, shape): one compiled input shape, one queue
CANVAS_METHODS = ("dense", "descriptor", "maps")  # whole images on canvases; the others are crops
PER_SCALE_METHODS = ("descriptor", "maps")  # kept per scale; the others' posteriors are averaged over scales


def replicate(params: Any, mesh: Mesh) -> Any:
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
        protocol: TestProtocol,
        mean_rgb: Sequence[float],
        mesh: Mesh,
        progress: _ProgressLog,
    ):
        self.model, self.mesh, self.protocol, self.progress = model, mesh, protocol, progress
        self.methods, self.scales = protocol.components, list(protocol.test_scales)
        self.grid, self.batch_size, self.flips = protocol.grid, int(protocol.batch_size), bool(protocol.flips)
        self.canvases = {
            q: protocols.dense_canvases(q, max_aspect=protocol.max_aspect, num_buckets=protocol.num_buckets)
            for q in self.scales
        }
        self.crop, self.processes = model.crop_size, jax.process_count()
        self.params = replicate(params, mesh)
        self.data_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        self.views_per_scale = self.grid * self.grid * (1 + int(self.flips))
        self.functions = {
            method: executor.forward(
                method if method in CANVAS_METHODS else "views", model, mean_rgb, mesh, self.flips, protocol.layers
            )
            for method in self.methods
        }
        # Several processes must agree on the batches, so they share a fixed key list; one process queues any shape.
        self.static_keys = None if protocol.buckets == "exact" or self.processes == 1 else self._all_keys()
        self.queues: dict[Key, list[_Item]] = {}
        self.pending: list[tuple[str, int, Any]] = []
        self.sums: dict[str, dict[int, Any]] = {m: {} for m in self.methods}
        self.counts: dict[str, dict[int, int]] = {m: {} for m in self.methods}
        self.labels: dict[int, int] = {}

    def _all_keys(self) -> list[Key]:
        keys = []
        for method in self.methods:
            for q in self.scales:
                shapes = self.canvases[q] if method in CANVAS_METHODS else [(self.crop, self.crop)]
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
                if method in CANVAS_METHODS:
                    image = protocols.dense_input(image, self.protocol.pooling)
                    canvas = protocols.choose_canvas(*image.shape[:2], self.canvases[q])
                    fits = canvas[0] >= image.shape[0] and canvas[1] >= image.shape[1]
                    if self.protocol.buckets == "exact" or (not fits and self.processes == 1):
                        canvas = image.shape[:2]  # its own shape: exact, one more compilation
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
        """Collects the batches in flight; the results sorted by example index (see `run_evaluation`)."""
        for pending in self.pending:
            self._collect(*pending)
        self.pending = []
        self.progress.log(final=True)
        indices = np.array(sorted(self.labels), np.int64)
        result: dict[str, Any] = {"indices": indices, "labels": np.array([self.labels[i] for i in indices], np.int64)}
        result["posteriors"] = {}
        for method in self.methods:
            missing = [i for i in indices.tolist() if self.counts[method].get(i) != len(self.scales)]
            if missing:
                raise RuntimeError(f"{method}: examples {missing[:5]} were not evaluated once per scale")
            if method == "descriptor":
                per_scale = [[self.sums[method][i][q] for q in self.scales] for i in indices.tolist()]
                width = sum(executor.layer_widths(self.model, self.protocol.layers))  # for no examples: (0, S, ΣF)
                result["descriptors"] = np.asarray(per_scale, np.float32).reshape(-1, len(self.scales), width)
            elif method == "maps":
                result["maps"] = [[self.sums[method][i][q] for q in self.scales] for i in indices.tolist()]
            else:
                mean = [self.sums[method][i] / len(self.scales) for i in indices.tolist()]
                stacked = np.stack(mean) if mean else np.zeros((0, self.model.num_classes))
                result["posteriors"][method] = stacked.astype(np.float32)
        return result

    # ------------------------------------------------------------------ batches

    def _images_per_step(self, key: Key) -> int:
        """Dense: about `batch_size` crops' worth of pixels; multi-crop: batch_size / 50 images."""
        method, _, (height, width) = key
        if method in CANVAS_METHODS:
            wanted = self.batch_size * self.crop * self.crop // ((1 + int(self.flips)) * height * width)
        elif method == "multicrop":
            wanted = self.batch_size // self.views_per_scale
        else:
            wanted = self.batch_size
        devices = self.mesh.devices.size
        return max(devices, wanted // devices * devices)

    def _item_shape(self, key: Key) -> tuple[int, ...]:
        method, _, shape = key
        if method in CANVAS_METHODS:
            return (*shape, 3)
        return (self.views_per_scale if method == "multicrop" else 1, self.crop, self.crop, 3)

    def _views(self, method: str, item: _Item) -> np.ndarray:
        if method == "multicrop":
            return protocols.multicrop_views(item.data, self.crop, self.grid, flips=self.flips)
        if method == "center_crop":
            return protocols.center_crop(item.data, self.crop)[None]
        return item.data

    def _run_batch(self, key: Key, items: list[_Item], local: int) -> None:
        """Dispatches one global batch; its results are collected after the next one is dispatched."""
        method = key[0]
        meta = np.zeros((local, 5), np.int32)  # index, label, valid, image height, width (canvases)
        data = np.zeros((local, *self._item_shape(key)), np.uint8)
        for row, item in enumerate(items):
            meta[row] = (item.index, item.label, 1, *item.size)
            data[row] = self._views(method, item)
        arrays = [data, meta]
        if method in CANVAS_METHODS:
            sizes = np.tile(np.asarray(key[2], np.int32), (local, 1))
            sizes[: len(items)] = [item.size for item in items]
            arrays.insert(1, sizes)
        global_arrays = [jax.make_array_from_process_local_data(self.data_sharding, a) for a in arrays]
        self.pending.append((method, key[1], self.functions[method](self.params, *global_arrays)))
        if len(self.pending) > 1:
            self._collect(*self.pending.pop(0))

    def _collect(self, method: str, scale: int, outputs: Any) -> None:
        values, meta_out = jax.device_get(outputs)
        valid = meta_out[:, 2] == 1
        sums, counts = self.sums[method], self.counts[method]
        for value, (index, label, _, height, width) in zip(values[valid], meta_out[valid].tolist(), strict=True):
            if method == "maps":  # the image's own cells of the canvas-wide maps
                rows, cols = protocols.dense_map_size(height, width, self.crop)
                sums.setdefault(index, {})[scale] = np.array(value[:, :rows, :cols], np.float32)
            elif method == "descriptor":  # kept per scale: App. B averages or stacks them
                sums.setdefault(index, {})[scale] = np.array(value, np.float32)
            else:
                sums[index] = sums[index] + value if index in sums else np.array(value, np.float32)
            counts[index] = counts.get(index, 0) + 1
            self.labels[index] = label
        self.progress.update(int(valid.sum()))


class _ProgressLog:
    """Batches done, images/s and ETA, logged by process 0 at most every `every_s` seconds (`progress.Progress`)."""

    def __init__(self, name: str, total: int | None, components: int, every_s: float | None):
        self.name, self.components, self.every_s = name, components, every_s
        self.progress = Progress(total)
        self.last = time.perf_counter()
        self.batches = self.units = 0

    def update(self, units: int) -> None:
        self.batches += 1
        self.units += units  # one unit: one example at one (method, scale)
        if self.every_s is not None and time.perf_counter() - self.last >= self.every_s:
            self.log()

    def log(self, final: bool = False) -> None:
        if self.every_s is None:  # the caller reports progress itself
            return
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
    protocol: TestProtocol,
    *,
    mean_rgb: Sequence[float],
    mesh: Mesh | None = None,
    chunk_examples: int | None = None,
    total_examples: int | None = None,
    name: str = "eval",
    log_every_s: float | None = 10.0,
) -> dict[str, Any]:
    """One net under a resolved `protocol`, on this process's `examples` (every process gets everyone's results).

    `examples` yields {'index', 'label', 'scaled': {Q: uint8 (h, w, 3) rescaled to Q}} for every Q of the
    protocol. Its batch is the global batch in crops: a multi-crop step holds batch/50 images, a dense step
    about the same number of pixels (both rounded to a multiple of the device count). `log_every_s`: a
    progress line at most that often (None: none).
    Returns {'indices', 'labels', 'posteriors': {method: (N, C)}} (rows sorted by index, each posterior
    averaged over the scales); for 'descriptor' also 'descriptors' (N, scales, ΣF): App. B's pooled layers
    per scale, not normalised; for 'maps' also 'maps': per example, per scale, the (1 + flips, h, w, D) map
    of the last layer over the image's own cells (the mirror's cells in the mirror's frame).
    """
    if not protocol.resolved:
        raise ValueError("run_evaluation needs a resolved TestProtocol: protocol.resolve(config)")
    protocols.check_scales(protocol.test_scales, model.crop_size)
    if protocol.buckets == "exact" and jax.process_count() > 1:
        raise ValueError("dense_buckets='exact' compiles per image shape and needs one process; use 'aspect'")
    progress = _ProgressLog(name, total_examples, len(protocol.components) * len(protocol.test_scales), log_every_s)
    scheduler = _Scheduler(model, params, protocol, mean_rgb, mesh or parallel.create_mesh(), progress)
    local_chunk = chunk_examples or max(8, int(protocol.batch_size) // jax.process_count())
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
