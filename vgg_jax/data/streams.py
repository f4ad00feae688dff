"""Training and evaluation batches: paper §3.1 training data and §3.2 single-crop testing, per process.

Training (`create_train_iterator`): TFDS records of this process's shard
(`tfds.even_splits(split, n=process_count)[process_index]`) → per-epoch seeded shuffle → screen
corrupt records → decode, rescale to S and crop in one step, random flip (`image_ops`) → uint8 NHWC
batches of `global_batch_size / process_count` with int32 labels → prefetch. With
``config.resample_on_device`` the host decodes only each crop's window and the train step resamples
and flips it (`vgg_jax.training.resample`): the same draws, the same crops within ±1. Cast, colour shift and
mean subtraction happen on device (`vgg_jax.preprocess`), so only uint8 crosses the host-device link.

Evaluation (`eval_batches`; one pass: `create_eval_iterator`): rescale so the smaller side is Q, centre
crop; the last batch is padded (``mask`` False) so each example counts once and every process runs
`num_eval_batches` batches. `load_eval_images` gives the full decoded images for dense / multi-crop evaluation.

**Determinism and resume**: epoch ``e`` of process ``p`` shuffles its shard with a seed derived from
(seed, p, e), keeps exactly ``steps_per_epoch × local_batch`` examples (the remainder differs each
epoch), and draws every random number of an example from a stateless key (seed, p, e, example
index). Resuming at step ``s`` reads — without decoding — at most one epoch of records to skip.
Exact as long as no record is skipped as corrupt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax.data import image_ops, sources
from vgg_jax.data.sources import CorruptImageError, CorruptRecords, graph_function
from vgg_jax.evaluation import arithmetic as protocols

_AUTOTUNE = tf.data.AUTOTUNE

# --------------------------------------------------------------------------- config checks


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, process_count={count})")
    return index, count


def _local_batch(config: Any, field: str, process_count: int) -> int:
    """``config.<field>`` (a global batch size) divided among `process_count` processes."""
    global_batch = int(config[field])
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(
            f"config.{field}={global_batch} must be a positive multiple of the number of processes "
            f"({process_count}): each process loads {field} / process_count examples per batch."
        )
    return global_batch // process_count


def resample_canvas(config: Any) -> int:
    """The canvas side with ``config.resample_on_device`` (0 when resampling on the host).

    ``config.resample_canvas``: 0 (default) is 2 × crop_size, which holds the source window of a crop at
    S = 256 from images whose smaller side is up to about 2 × 256; larger windows are shrunk on the host
    first (`image_ops.random_window_on_canvas`).
    """
    if not config.get("resample_on_device", False):
        return 0
    return int(config.get("resample_canvas", 0)) or 2 * int(config.crop_size)


def check_eval_scale(config: Any, scale: int) -> None:
    """A clear error when the centre crop does not fit the test scale Q (a caller's Q, not only config's)."""
    try:
        protocols.check_scales([scale], int(config.crop_size))  # the one statement of the rule
    except ValueError as error:
        raise ValueError(
            f"config.crop_size={config.crop_size} is larger than the test scale Q={scale} (config.eval_scale): "
            f"the centre crop must fit in the rescaled image ({error})"
        ) from None


def _resize_method(config: Any) -> str:
    return config.get("resize_method", "exact")


def _corrupt_mode(config: Any) -> str:
    return config.get("corrupt_images", "skip")


def input_shards(config: Any, process_count: int) -> int:
    """How many shards the training stream is cut into (config.input_shards; 0 = one per process).

    The stream is a function of the shard count alone: each process reads
    input_shards / process_count consecutive shards and stacks their batches, so
    one process can reproduce exactly what several hosts see together.
    """
    shards = int(config.get("input_shards", 0)) or process_count
    if shards % process_count:
        raise ValueError(
            f"config.input_shards={shards} must be a multiple of the number of processes ({process_count})"
        )
    return shards


def steps_per_epoch(config: Any, *, process_count: int | None = None) -> int:
    """Training steps per epoch, the same on every process: (N // input_shards) // shard_batch."""
    _, count = _processes(0, process_count)
    count = input_shards(config, count)
    local = _local_batch(config, "global_batch_size", count)
    builder = sources.split_builder(config, config.train_split, "train_split")
    steps = (sources.num_examples(builder, config.train_split) // count) // local
    if steps < 1:
        raise ValueError(
            f"config.train_split={config.train_split!r} of {config.dataset!r} has too few examples for one batch of "
            f"{local} per process on {count} process(es); lower config.global_batch_size"
        )
    return steps


# --------------------------------------------------------------------------- shared pieces


def _shard_sizes(builder: tfds.core.DatasetBuilder, split: str, process_count: int) -> tuple[list[Any], list[int]]:
    """`split` cut into `process_count` even parts, and the parts' sizes."""
    parts = tfds.even_splits(split, n=process_count)
    return parts, [sources.num_examples(builder, part) for part in parts]


def _eval_batches(sizes: list[int], local_batch: int) -> int:
    """Batches every process runs: enough for the largest shard, so all processes step together."""
    return max(1, math.ceil(max(sizes) / local_batch))


def tf_data_options(config: Any) -> tf.data.Options:
    """Deterministic order (the resume guarantee needs it); ``config.tf_data_threads`` caps the threads."""
    options = tf.data.Options()
    options.deterministic = True
    threads = int(config.get("tf_data_threads", 0))  # 0: TF's default (all cores)
    if threads > 0:
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
    return options


def _stateless_key(*parts) -> tf.Tensor:
    key = tf.constant([0, 0], tf.int64)
    for part in parts:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(part, tf.int64))
    return key


class _Iterator:
    """Numpy iterator over a tf.data pipeline; corrupt-record errors become `CorruptImageError`."""

    def __init__(self, ds: tf.data.Dataset, corrupt: CorruptRecords | list[CorruptRecords], keys: tuple[str, ...]):
        self._it = iter(ds)
        self._corrupt = corrupt if isinstance(corrupt, list) else [corrupt]
        self._keys = keys

    @property
    def num_skipped_corrupt(self) -> int:
        return sum(counter.count for counter in self._corrupt)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._it)
        except tf.errors.OpError as error:
            message = str(error)
            if "CorruptImageError" in message or "corrupt image" in message.lower():
                start = message.find("corrupt image record")
                raise CorruptImageError(message[start:].splitlines()[0] if start >= 0 else message) from None
            if any(word in message.lower() for word in ("jpeg", "png", "decode", "image")):
                raise CorruptImageError(
                    f"decoding an image failed ({message.splitlines()[0][:300]}); "
                    "set config.corrupt_images='skip' to skip undecodable records"
                ) from error
            raise
        return {key: batch[key].numpy() for key in self._keys}


class EvalBatches:
    """The evaluation batches of a split, from a pipeline built once: every `iter()` is a whole new pass.

    A training run evaluates many times, and building the pipeline (~0.5 s) costs more than a pass over a
    small split; the skipped-record counts start again with each pass."""

    def __init__(self, ds: tf.data.Dataset, corrupt: CorruptRecords, keys: tuple[str, ...]):
        self._ds, self._corrupt, self._keys = ds, corrupt, keys

    def __iter__(self) -> _Iterator:
        self._corrupt.restart()
        return _Iterator(self._ds, self._corrupt, self._keys)


# --------------------------------------------------------------------------- training


def _train_dataset(
    config: Any,
    *,
    start_step: int,
    process_index: int,
    process_count: int,
    with_details: bool = False,
    examples: Any = None,
) -> tuple[tf.data.Dataset, CorruptRecords]:
    local = _local_batch(config, "global_batch_size", process_count)
    builder = sources.split_builder(config, config.train_split, "train_split")
    spe = steps_per_epoch(config, process_count=process_count)
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    parts, sizes = _shard_sizes(builder, config.train_split, process_count)
    read = examples.read if examples is not None else sources.read_records
    records = read(builder, parts[process_index], sum(sizes[:process_index]))
    seed, per_epoch = int(config.seed), spe * local
    buffer = max(1, int(config.get("shuffle_buffer", 10_000)))

    def epoch_ds(epoch):
        key = _stateless_key(seed, process_index, epoch, -1)
        shuffle_seed = tf.random.stateless_uniform([], seed=key, minval=None, maxval=None, dtype=tf.int64)
        ds = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False).take(per_epoch)
        return ds.map(graph_function(lambda ex: {**ex, "epoch": epoch}))

    first_epoch, skip = divmod(int(start_step), spe)
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(graph_function(epoch_ds)).skip(skip * local)
    corrupt = CorruptRecords(_corrupt_mode(config))
    ds = corrupt.screen(ds)
    smin, smax, crop = int(config.scale_min), int(config.scale_max), int(config.crop_size)
    flip = bool(config.get("random_flip", True))
    resize = _resize_method(config)
    canvas = resample_canvas(config)

    def augment(ex):
        key = _stateless_key(seed, process_index, ex["epoch"], ex["index"])
        if examples is not None:  # e.g. App. A: boxes follow the crop (vgg_jax.localisation.boxes)
            return examples.augment(ex, key)
        draws = dict(scale_min=smin, scale_max=smax, crop=crop, flip=flip)
        if canvas:  # the train step resamples (vgg_jax.training.resample)
            image, geometry, details = image_ops.random_window_on_canvas(ex["image"], key, canvas=canvas, **draws)
            out = {"image": image, "geometry": geometry, "label": ex["label"]}
        else:
            image, details = image_ops.random_rescaled_crop(ex["image"], key, resize=resize, **draws)
            out = {"image": image, "label": ex["label"]}
        if with_details:
            out.update(details, index=ex["index"], epoch=ex["epoch"])
        return out

    ds = corrupt.tolerate(ds.map(graph_function(augment), num_parallel_calls=_AUTOTUNE))
    ds = ds.batch(local, drop_remainder=True).prefetch(_AUTOTUNE)
    return ds.with_options(tf_data_options(config)), corrupt


def create_train_iterator(
    config: Any,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    examples: Any = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's training batches from step `start_step` on.

    Yields {'image': uint8 (local_batch, crop, crop, 3), 'label': int32 (local_batch,)} with
    local_batch = global_batch_size // process_count; with ``config.resample_on_device``, 'image' holds
    the crops' decoded source windows on (local_batch, canvas, canvas, 3) canvases and 'geometry'
    float32 (local_batch, 7) how the train step resamples them (`vgg_jax.training.resample`). Batch k of a stream
    started at step s equals batch s + k of a stream started at 0. The iterator's `num_skipped_corrupt`
    counts skipped records.
    `examples` (`.read`, `.augment(example, key)`, `.keys`) replaces the records and the augmentation,
    keeping the shards, order and keys: `vgg_jax.localisation.boxes.BoxExamples` carries boxes (App. A).
    """
    index, count = _processes(process_index, process_count)
    shards = input_shards(config, count)
    _local_batch(config, "global_batch_size", count)
    per_process = shards // count
    streams = [
        _train_dataset(config, start_step=start_step, process_index=shard, process_count=shards, examples=examples)
        for shard in range(index * per_process, (index + 1) * per_process)
    ]
    if per_process == 1:
        ds, corrupt = streams[0]
    else:
        # Rows in shard order, as the processes' rows are ordered in the global batch.
        ds = tf.data.Dataset.zip(tuple(stream for stream, _ in streams)).map(
            graph_function(
                lambda *batches: {key: tf.concat([batch[key] for batch in batches], 0) for key in batches[0]}
            )
        )
        corrupt = [c for _, c in streams]
    keys = ("image", "geometry", "label") if resample_canvas(config) else ("image", "label")
    return _Iterator(ds, corrupt, examples.keys if examples is not None else keys)


# --------------------------------------------------------------------------- evaluation


def eval_records(
    config: Any, split: str | None, process_index: int | None, process_count: int | None, read: Any = None
) -> tuple[tf.data.Dataset, CorruptRecords, list[int], int]:
    """This process's screened records of `split`, the screen, all shards' sizes, and the process count."""
    index, count = _processes(process_index, process_count)
    split = split or config.eval_split
    builder = sources.split_builder(config, split, "eval_split")
    parts, sizes = _shard_sizes(builder, split, count)
    corrupt = CorruptRecords(_corrupt_mode(config))
    records = corrupt.screen((read or sources.read_records)(builder, parts[index], sum(sizes[:index])))
    return records, corrupt, sizes, count


def load_eval_images(
    config: Any, split: str | None = None, *, process_index: int | None = None, process_count: int | None = None
) -> tf.data.Dataset:
    """This process's shard of `split` (default `config.eval_split`), unbatched, in a fixed order.

    Elements: {'image': uint8 full-size RGB (H, W, 3), 'label': int32, 'index': int64 (index in the split)}.
    """
    records, corrupt, _, _ = eval_records(config, split, process_index, process_count)

    def decode(ex):
        return {"image": image_ops.decode_rgb(ex["image"]), "label": ex["label"], "index": ex["index"]}

    ds = corrupt.tolerate(records.map(graph_function(decode), num_parallel_calls=_AUTOTUNE))
    return ds.with_options(tf_data_options(config))


def num_eval_batches(config: Any, split: str | None = None, *, process_count: int | None = None) -> int:
    """Batches every process runs over `split` (the same at every scale): ceil(largest shard / local eval batch)."""
    _, count = _processes(0, process_count)
    local = _local_batch(config, "eval_batch_size", count)
    split = split or config.eval_split
    builder = sources.split_builder(config, split, "eval_split")
    return _eval_batches(_shard_sizes(builder, split, count)[1], local)


def eval_batches(
    config: Any,
    split: str | None = None,
    *,
    scale: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    examples: Any = None,
) -> EvalBatches:
    """Centre crops of the images rescaled to Q = `scale` (default `config.eval_scale`), padded batches.

    Each pass yields `num_eval_batches(config, split)` batches of {'image': uint8 (local_eval_batch, crop, crop, 3),
    'label': int32, 'mask': bool}; padding examples (zeros, label 0) have mask False. `examples`
    (`.read`, `.centre_crop(example, q, crop, resize)`, `.padding(crop)`, `.keys`) replaces the records and
    the crop, e.g. App. A's boxes that follow it (`vgg_jax.localisation.boxes`).
    """
    q = int(scale if scale is not None else config.eval_scale)
    check_eval_scale(config, q)
    read = examples.read if examples is not None else None
    records, corrupt, sizes, count = eval_records(config, split, process_index, process_count, read)
    local = _local_batch(config, "eval_batch_size", count)
    crop, resize = int(config.crop_size), _resize_method(config)

    def preprocess(ex):
        if examples is not None:
            return examples.centre_crop(ex, q, crop, resize) | {"mask": tf.constant(True)}
        image = image_ops.rescaled_crop(ex["image"], q, crop, resize=resize)
        return {"image": image, "label": ex["label"], "mask": tf.constant(True)}

    ds = corrupt.tolerate(records.map(graph_function(preprocess), num_parallel_calls=_AUTOTUNE))
    padding = {"image": tf.zeros([crop, crop, 3], tf.uint8), "label": tf.constant(0, tf.int32)}
    padding = (examples.padding(crop) if examples is not None else padding) | {"mask": tf.constant(False)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.batch(local, drop_remainder=True).take(_eval_batches(sizes, local)).prefetch(_AUTOTUNE)
    keys = (*(examples.keys if examples is not None else ("image", "label")), "mask")
    return EvalBatches(ds.with_options(tf_data_options(config)), corrupt, keys)


def create_eval_iterator(config: Any, split: str | None = None, **options: Any) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `eval_batches(config, split, **options)`."""
    return iter(eval_batches(config, split, **options))
