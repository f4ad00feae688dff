"""Input pipeline: paper §3.1 training data and §3.2 test-time preprocessing.

Training (host, tf.data): TFDS records of this process's shard
(`tfds.even_splits(split, n=process_count)[process_index]`) → per-epoch seeded
shuffle → check/skip corrupt records → decode (JPEG/PNG/…, grey promoted to
RGB) → isotropic rescale so the smaller side is S (fixed, or S ~ U{Smin..Smax}
per image: scale jittering) → random crop of `crop_size` → random horizontal
flip → uint8 NHWC batches of `global_batch_size / process_count` with int32
labels → prefetch.

On device (pure jnp, inside the jitted step): cast, PCA colour shift
(Krizhevsky et al. 2012; paper §3.1) and mean-RGB subtraction, so only uint8
crosses the host-device link.

Evaluation: rescale so the smaller side is Q, centre crop; the last batch is
padded (``mask`` False) so each example counts once and every process runs
`num_eval_batches` batches. `load_eval_images` gives the full decoded images
for dense / multi-crop evaluation (evaluate.py).

Choices:

- **Rescale + crop in one step** [implementation]: the crop is computed from
  the window of the source image it covers (JPEGs decode only that window with
  `tf.io.decode_and_crop_jpeg`) with `ScaleAndTranslate`, the op behind
  ``tf.image.resize(antialias=True)``. Up to float rounding this equals
  "resize the whole image (bilinear, antialiased) then crop"; a test checks it.
  Optional ``config.resize_method='fast'`` (default 'exact'): plain bilinear
  of the window at the nearest pixel alignment, about 2× faster per core
  (bench/RESULTS.md), slightly aliased when shrinking.
- **Determinism and resume**: epoch ``e`` of process ``p`` shuffles its shard
  with a seed derived from (seed, p, e), keeps exactly ``steps_per_epoch ×
  local_batch`` examples (the remainder differs each epoch), and draws every
  random number of an example from a stateless key (seed, p, e, example index).
  Resuming at step ``s`` reads — without decoding — at most one epoch of
  records to skip. Exact as long as no record is skipped as corrupt.
- **Mean RGB** (`compute_mean_rgb`): the mean over training images of each
  image's mean pixel (every image weighs the same, whatever its size) on the
  decoded, unresized image. This is what Caffe's mean image over 256×256
  resized images, averaged over pixels, gives (up to resampling): the value the
  released VGG models use.
- **Colour shift**: ``Σ_i α_i λ_i v_i`` per image, α_i ~ N(0, std²), λ on the
  0–255 scale (×255); not clipped to 0..255 (as in AlexNet / fb.resnet.torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

try:  # The input pipeline runs on the host CPU: TensorFlow must not grab an accelerator.
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Already initialised by someone else.
    pass

DEMO_HINT = "--config=configs/e.py:demo"
EMBEDDED_DATASETS = ("sklearn_digits",)
_AUTOTUNE = tf.data.AUTOTUNE


class CorruptImageError(RuntimeError):
    """A record's image cannot be decoded and ``config.corrupt_images == 'fail'``."""


# --------------------------------------------------------------------------- data set & metadata


def _tfds_is_mocked() -> bool:
    """True inside `tfds.testing.mock_data` (nothing is prepared there, and nothing needs to be)."""
    fn = tfds.core.DatasetBuilder.download_and_prepare
    return "mock" in getattr(fn, "__name__", "")


def get_dataset_builder(config) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `config.dataset` (in `config.data_dir`), prepared and ready to read.

    The embedded sets (`vgg_jax.datasets`) are prepared offline on first use.
    Raises ValueError (unknown name, no image/label features) or
    FileNotFoundError (not prepared and needs a manual download, or
    ``config.download`` is False) before any expensive work.
    """
    import vgg_jax.datasets  # noqa: F401  (registers the embedded builders)

    name = config.dataset
    data_dir = config.get("data_dir", "") or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise ValueError(
            f"config.dataset={name!r}: TFDS knows no data set of that name, and found no prepared copy of it in "
            f"{where}. Check the spelling (`tfds.list_builders()`), or set config.data_dir to the directory that "
            f"holds `{name}/<version>/`. The embedded demo needs no download: `{DEMO_HINT}`."
        ) from None
    features = builder.info.features
    missing = [key for key in ("image", "label") if key not in features]
    if missing:
        raise ValueError(
            f"config.dataset={name!r} has no {' / '.join(missing)} feature (it has {sorted(features.keys())}); "
            "the pipeline needs an image-classification set with 'image' and 'label'."
        )
    if builder.is_prepared():
        return builder
    _ensure_prepared(builder, config)
    # Re-open: a builder made before its data existed does not see the prepared split sizes.
    return builder if _tfds_is_mocked() else tfds.builder(name, data_dir=data_dir)


def _ensure_prepared(builder: tfds.core.DatasetBuilder, config) -> None:
    if _tfds_is_mocked() or builder.is_prepared():
        return
    root = os.fspath(builder.data_dir_root)
    if builder.name in EMBEDDED_DATASETS:
        # Several processes on one machine (tests, local multi-host) may start together: one prepares.
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, f".{builder.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                prepared = tfds.builder(builder.name, data_dir=root).is_prepared()
                if not prepared:
                    logging.info("Preparing the embedded data set %s in %s (offline, seconds).", builder.name, root)
                    builder.download_and_prepare(
                        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
                    )
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual_dir = os.path.join(root, "downloads", "manual")
        if not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
            instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
            raise FileNotFoundError(
                f"config.dataset={builder.name!r} is not prepared in {root} and cannot be downloaded automatically. "
                f"Put its files into {manual_dir}/ (TFDS says: {instructions}) and run "
                f"`tfds build {builder.name} --data_dir={root} --manual_dir={manual_dir}` (or start again: it "
                f"is then prepared on first use), or set config.data_dir to where it is prepared. "
                f"Without it, `{DEMO_HINT}` trains on the embedded digits with no download."
            )
        logging.warning("Preparing %s from %s into %s: this can take hours.", builder.name, manual_dir, root)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        return
    if not config.get("download", True):
        raise FileNotFoundError(
            f"config.dataset={builder.name!r} is not prepared in {root} and config.download is False. "
            f"Run `tfds build {builder.name} --data_dir={root}`, or try `{DEMO_HINT}`."
        )
    logging.warning("Downloading and preparing %s into %s.", builder.name, root)
    builder.download_and_prepare()


def _num_examples(builder: tfds.core.DatasetBuilder, split: Any) -> int:
    """Number of examples of `split` (a name, a slice like 'train[:10%]' or an `even_splits` part)."""
    splits = builder.info.splits
    if len(splits):  # Known split metadata (always, for a prepared data set).
        return int(splits[split].num_examples)
    # Split metadata unknown (e.g. `tfds.testing.mock_data`): ask the data set itself.
    cardinality = int(builder.as_dataset(split=split).cardinality())
    if cardinality < 0:
        raise ValueError(f"cannot tell how many examples {builder.name!r} split {split!r} has")
    return cardinality


def _check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> None:
    names = list(builder.info.splits.keys())
    if not names:  # Unknown (mocked): anything goes.
        return
    try:
        builder.info.splits[split]
    except (KeyError, ValueError, AssertionError):
        raise ValueError(
            f"config.{field}={split!r} is not a split of {builder.name!r}; it has {sorted(names)} "
            "(slices such as 'train[:90%]' work too)."
        ) from None


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """What the model and the loop need to know about the data set."""

    name: str
    num_classes: int
    class_names: list[str] | None
    builder: Any = dataclasses.field(repr=False, compare=False)

    def num_examples(self, split: str) -> int:
        return _num_examples(self.builder, split)


def dataset_metadata(config) -> DatasetMetadata:
    builder = get_dataset_builder(config)
    label = builder.info.features["label"]
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise ValueError(f"config.dataset={builder.name!r}: its 'label' feature is not a ClassLabel")
    names = list(label.names) if getattr(label, "names", None) else None
    return DatasetMetadata(name=builder.name, num_classes=int(num_classes), class_names=names, builder=builder)


# --------------------------------------------------------------------------- config checks


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, process_count={count})")
    return index, count


def _local_batch(global_batch: int, process_count: int, field: str) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(
            f"config.{field}={global_batch} must be a positive multiple of the number of processes "
            f"({process_count}): each process loads {field} / process_count examples per batch."
        )
    return global_batch // process_count


def check_train_config(config) -> None:
    smin, smax, crop = int(config.scale_min), int(config.scale_max), int(config.crop_size)
    if smin > smax:
        raise ValueError(f"config.scale_min={smin} > config.scale_max={smax}: S is drawn from [scale_min, scale_max]")
    if crop > smin:
        raise ValueError(
            f"config.crop_size={crop} is larger than the smallest training scale S=config.scale_min={smin}: "
            "a crop must fit in the rescaled image"
        )
    _check_corrupt_mode(config)
    _resize_method(config)


def check_eval_scale(config, scale: int) -> None:
    if int(config.crop_size) > scale:
        raise ValueError(
            f"config.crop_size={config.crop_size} is larger than the test scale Q={scale} (config.eval_scale): "
            "the centre crop must fit in the rescaled image"
        )
    _check_corrupt_mode(config)


def _resize_method(config) -> str:
    method = config.get("resize_method", "exact")
    if method not in ("exact", "fast"):
        raise ValueError(f"config.resize_method={method!r}: expected 'exact' (antialiased) or 'fast' (bilinear)")
    return method


def _check_corrupt_mode(config) -> str:
    mode = config.get("corrupt_images", "skip")
    if mode not in ("skip", "fail"):
        raise ValueError(f"config.corrupt_images={mode!r}: expected 'skip' or 'fail'")
    return mode


def input_shards(config, process_count: int) -> int:
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


def steps_per_epoch(config, *, process_count: int | None = None) -> int:
    """Training steps per epoch, the same on every process: (N // input_shards) // shard_batch."""
    _, count = _processes(0, process_count)
    count = input_shards(config, count)
    local = _local_batch(int(config.global_batch_size), count, "global_batch_size")
    builder = get_dataset_builder(config)
    _check_split(builder, config.train_split, "train_split")
    steps = (_num_examples(builder, config.train_split) // count) // local
    if steps < 1:
        raise ValueError(
            f"config.train_split={config.train_split!r} of {config.dataset!r} has too few examples for one batch of "
            f"{local} per process on {count} process(es); lower config.global_batch_size"
        )
    return steps


# --------------------------------------------------------------------------- per-example ops (tf)


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


def _decode_full(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (JPEG, PNG, GIF, BMP, WebP) → uint8 RGB HWC."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def rescaled_crop(
    image: tf.Tensor,
    size: int | tf.Tensor,
    crop: int,
    offsets: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None,
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


def _rescaled_crop(image, size, crop, offsets, resize="exact"):
    """`rescaled_crop` that also returns the offsets (oy, ox) it used."""
    image = tf.convert_to_tensor(image)
    size = tf.convert_to_tensor(size, tf.int32)
    if offsets is None:
        offsets = lambda h, w: ((h - crop) // 2, (w - crop) // 2)

    def window(height, width):
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

    if image.dtype == tf.string:

        def jpeg():
            shape = tf.io.extract_jpeg_shape(image)
            win, scale, translation, offset = window(shape[0], shape[1])
            return tf.io.decode_and_crop_jpeg(image, win, channels=3), scale, translation, offset

        def other():
            full = _decode_full(image)
            shape = tf.shape(full)
            win, scale, translation, offset = window(shape[0], shape[1])
            return full[win[0] : win[0] + win[2], win[1] : win[1] + win[3]], scale, translation, offset

        region, scale, translation, offset = tf.cond(tf.io.is_jpeg(image), jpeg, other)
    else:
        full = _to_rgb(image)
        shape = tf.shape(full)
        win, scale, translation, offset = window(shape[0], shape[1])
        region = full[win[0] : win[0] + win[2], win[1] : win[1] + win[3]]
    region = tf.ensure_shape(region, [None, None, 3])
    if resize == "fast":
        region_size = tf.cast(tf.shape(region)[:2], tf.float32)
        new_size = tf.maximum(tf.cast(tf.round(region_size * scale), tf.int32), crop)
        resized = tf.image.resize(region, new_size, method="bilinear", antialias=False)
        start = tf.clip_by_value(tf.cast(tf.round(-translation), tf.int32), 0, new_size - crop)
        out = resized[start[0] : start[0] + crop, start[1] : start[1] + crop]
        return tf.ensure_shape(_round_to_uint8(out), [crop, crop, 3]), offset
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
    return tf.ensure_shape(_round_to_uint8(out), [crop, crop, 3]), offset


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
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    s = tf.random.stateless_uniform([], seed=seeds[0], minval=scale_min, maxval=scale_max + 1, dtype=tf.int32)
    u = tf.random.stateless_uniform([2], seed=seeds[1], dtype=tf.float32)
    flipped = tf.logical_and(tf.constant(bool(flip)), tf.random.stateless_uniform([], seed=seeds[2]) < 0.5)

    def offsets(h, w):
        oy = tf.minimum(tf.cast(tf.floor(u[0] * tf.cast(h - crop + 1, tf.float32)), tf.int32), h - crop)
        ox = tf.minimum(tf.cast(tf.floor(u[1] * tf.cast(w - crop + 1, tf.float32)), tf.int32), w - crop)
        return oy, ox

    out, offset = _rescaled_crop(image, s, crop, offsets, resize)
    out = tf.cond(flipped, lambda: tf.reverse(out, axis=[1]), lambda: out)
    return out, {"scale": s, "offset_y": offset[0], "offset_x": offset[1], "flipped": flipped}


# --------------------------------------------------------------------------- corrupt records


class _CorruptRecords:
    """Counts (and names) records skipped as corrupt; raises instead in 'fail' mode."""

    def __init__(self, mode: str):
        self.mode = mode
        self.count = 0
        self.names: list[str] = []
        self._lock = threading.Lock()

    def probe(self, data, name) -> bool:
        """Full decode attempt, for records the quick check could not vouch for. Runs in `tf.py_function`."""
        name = name.numpy().decode("utf-8", "replace")
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
            return True
        except (tf.errors.OpError, ValueError) as error:
            message = f"corrupt image record {name}: {str(error).splitlines()[0][:200]}"
        if self.mode == "fail":
            raise CorruptImageError(message + " (set config.corrupt_images='skip' to skip such records)")
        with self._lock:
            self.count += 1
            self.names.append(name)
        logging.warning("Skipping %s (%d skipped so far).", message, self.count)
        return False

    def filter_fn(self, example: dict[str, tf.Tensor]) -> tf.Tensor:
        data = example["image"]
        if data.dtype != tf.string:  # Already decoded by TFDS.
            return tf.constant(True)
        n = tf.strings.length(data)
        tail2 = tf.strings.substr(data, tf.maximum(n - 2, 0), 2)
        iend = tf.strings.substr(data, tf.maximum(n - 8, 0), 4)
        jpeg_ok = tf.logical_and(tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff", tail2 == b"\xff\xd9")
        png_ok = tf.logical_and(tf.strings.substr(data, 0, 8) == b"\x89PNG\r\n\x1a\n", iend == b"IEND")
        quick_ok = tf.logical_or(jpeg_ok, png_ok)
        return tf.cond(
            quick_ok,
            lambda: tf.constant(True),
            lambda: tf.reshape(tf.py_function(self.probe, [data, example["id"]], tf.bool), []),
        )


# --------------------------------------------------------------------------- reading records


def _read_records(builder: tfds.core.DatasetBuilder, split: Any, offset: int) -> tf.data.Dataset:
    """{'image': encoded bytes (or uint8), 'label': int32, 'id': record name, 'index': int64} in file order."""
    image_feature = builder.info.features["image"]
    decoders = {"image": tfds.decode.SkipDecoding()} if isinstance(image_feature, tfds.features.Image) else None
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=decoders,
        read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False),
    )

    def record(index, ex):
        return {
            "image": ex["image"],
            "label": tf.cast(ex["label"], tf.int32),
            "id": ex["tfds_id"],
            "index": index + offset,
        }

    return ds.enumerate().map(record, num_parallel_calls=_AUTOTUNE)


def _shard(builder, split: str, process_index: int, process_count: int) -> tuple[Any, int, list[int]]:
    """This process's part of `split`, its first example's index in the split, and all parts' sizes."""
    parts = tfds.even_splits(split, n=process_count)
    sizes = [_num_examples(builder, part) for part in parts]
    return parts[process_index], sum(sizes[:process_index]), sizes


def _options(config) -> tf.data.Options:
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


# --------------------------------------------------------------------------- training


class _Iterator:
    """Numpy iterator over a tf.data pipeline; corrupt-record errors become `CorruptImageError`."""

    def __init__(self, ds: tf.data.Dataset, corrupt: _CorruptRecords | list[_CorruptRecords], keys: tuple[str, ...]):
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


def _train_dataset(
    config, *, start_step: int, process_index: int, process_count: int, with_details: bool = False
) -> tuple[tf.data.Dataset, _CorruptRecords]:
    check_train_config(config)
    local = _local_batch(int(config.global_batch_size), process_count, "global_batch_size")
    builder = get_dataset_builder(config)
    _check_split(builder, config.train_split, "train_split")
    spe = steps_per_epoch(config, process_count=process_count)
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    shard, offset, _ = _shard(builder, config.train_split, process_index, process_count)
    records = _read_records(builder, shard, offset)
    seed, per_epoch = int(config.seed), spe * local
    buffer = max(1, int(config.get("shuffle_buffer", 10_000)))

    def epoch_ds(epoch):
        key = _stateless_key(seed, process_index, epoch, -1)
        shuffle_seed = tf.random.stateless_uniform([], seed=key, minval=None, maxval=None, dtype=tf.int64)
        ds = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False).take(per_epoch)
        return ds.map(lambda ex: {**ex, "epoch": epoch})

    first_epoch, skip = divmod(int(start_step), spe)
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_ds).skip(skip * local)
    corrupt = _CorruptRecords(_check_corrupt_mode(config))
    ds = ds.filter(corrupt.filter_fn)
    smin, smax, crop = int(config.scale_min), int(config.scale_max), int(config.crop_size)
    flip = bool(config.get("random_flip", True))
    resize = _resize_method(config)

    def augment(ex):
        key = _stateless_key(seed, process_index, ex["epoch"], ex["index"])
        image, details = random_rescaled_crop(
            ex["image"], key, scale_min=smin, scale_max=smax, crop=crop, flip=flip, resize=resize
        )
        out = {"image": image, "label": ex["label"]}
        if with_details:
            out.update(details, index=ex["index"], epoch=ex["epoch"])
        return out

    ds = ds.map(augment, num_parallel_calls=_AUTOTUNE)
    if corrupt.mode == "skip":
        ds = ds.ignore_errors(log_warning=True)  # Safety net for damage the pre-decode check cannot see.
    ds = ds.batch(local, drop_remainder=True).prefetch(_AUTOTUNE)
    return ds.with_options(_options(config)), corrupt


def create_train_iterator(
    config, *, start_step: int = 0, process_index: int | None = None, process_count: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's training batches from step `start_step` on.

    Yields {'image': uint8 (local_batch, crop, crop, 3), 'label': int32 (local_batch,)} with
    local_batch = global_batch_size // process_count. Batch k of a stream started at step s equals
    batch s + k of a stream started at 0. The iterator's `num_skipped_corrupt` counts skipped records.
    """
    index, count = _processes(process_index, process_count)
    shards = input_shards(config, count)
    _local_batch(int(config.global_batch_size), count, "global_batch_size")
    per_process = shards // count
    streams = [
        _train_dataset(config, start_step=start_step, process_index=shard, process_count=shards)
        for shard in range(index * per_process, (index + 1) * per_process)
    ]
    if per_process == 1:
        ds, corrupt = streams[0]
    else:
        # Rows in shard order, as the processes' rows are ordered in the global batch.
        ds = tf.data.Dataset.zip(tuple(stream for stream, _ in streams)).map(
            lambda *batches: {key: tf.concat([batch[key] for batch in batches], 0) for key in batches[0]}
        )
        corrupt = [c for _, c in streams]
    return _Iterator(ds, corrupt, ("image", "label"))


# --------------------------------------------------------------------------- evaluation


def _eval_setup(config, split: str | None, process_index, process_count):
    index, count = _processes(process_index, process_count)
    split = split or config.eval_split
    builder = get_dataset_builder(config)
    _check_split(builder, split, "eval_split")
    shard, offset, sizes = _shard(builder, split, index, count)
    corrupt = _CorruptRecords(_check_corrupt_mode(config))
    records = _read_records(builder, shard, offset).filter(corrupt.filter_fn)
    return records, corrupt, sizes, count


def load_eval_images(
    config, split: str | None = None, *, process_index: int | None = None, process_count: int | None = None
) -> tf.data.Dataset:
    """This process's shard of `split` (default `config.eval_split`), unbatched, in a fixed order.

    Elements: {'image': uint8 full-size RGB (H, W, 3), 'label': int32, 'index': int64 (index in the split)}.
    """
    records, corrupt, _, _ = _eval_setup(config, split, process_index, process_count)

    def decode(ex):
        image = ex["image"]
        image = _decode_full(image) if image.dtype == tf.string else _to_rgb(image)
        return {"image": image, "label": ex["label"], "index": ex["index"]}

    ds = records.map(decode, num_parallel_calls=_AUTOTUNE)
    if corrupt.mode == "skip":
        ds = ds.ignore_errors(log_warning=True)
    return ds.with_options(_options(config))


def num_eval_batches(
    config, split: str | None = None, *, scale: int | None = None, process_count: int | None = None
) -> int:
    """Batches every process runs over `split`: ceil(largest shard / local eval batch)."""
    del scale  # Same for every scale; accepted for symmetry with create_eval_iterator.
    _, count = _processes(0, process_count)
    local = _local_batch(int(config.eval_batch_size), count, "eval_batch_size")
    split = split or config.eval_split
    builder = get_dataset_builder(config)
    _check_split(builder, split, "eval_split")
    sizes = [_num_examples(builder, part) for part in tfds.even_splits(split, n=count)]
    return max(1, math.ceil(max(sizes) / local))


def create_eval_iterator(
    config,
    split: str | None = None,
    *,
    scale: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Centre crops of the images rescaled to Q = `scale` (default `config.eval_scale`), padded batches.

    Yields `num_eval_batches(config, split)` batches of {'image': uint8 (local_eval_batch, crop, crop, 3),
    'label': int32, 'mask': bool}; padding examples (zeros, label 0) have mask False.
    """
    q = int(scale if scale is not None else config.eval_scale)
    check_eval_scale(config, q)
    records, corrupt, sizes, count = _eval_setup(config, split, process_index, process_count)
    local = _local_batch(int(config.eval_batch_size), count, "eval_batch_size")
    batches = max(1, math.ceil(max(sizes) / local))
    crop, resize = int(config.crop_size), _resize_method(config)

    def preprocess(ex):
        image = rescaled_crop(ex["image"], q, crop, resize=resize)
        return {"image": image, "label": ex["label"], "mask": tf.constant(True)}

    ds = records.map(preprocess, num_parallel_calls=_AUTOTUNE)
    if corrupt.mode == "skip":
        ds = ds.ignore_errors(log_warning=True)
    padding = {
        "image": tf.zeros([crop, crop, 3], tf.uint8),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.batch(local, drop_remainder=True).take(batches).prefetch(_AUTOTUNE)
    return _Iterator(ds.with_options(_options(config)), corrupt, ("image", "label", "mask"))


# --------------------------------------------------------------------------- mean RGB


def compute_mean_rgb(config, max_examples: int | None = None, split: str | None = None) -> tuple[float, float, float]:
    """Mean RGB of the training split (see the module docstring for the definition), on 0–255 pixels."""
    split = split or config.train_split
    builder = get_dataset_builder(config)
    _check_split(builder, split, "train_split")
    corrupt = _CorruptRecords("skip")
    ds = _read_records(builder, split, 0).filter(corrupt.filter_fn)
    if max_examples:
        ds = ds.take(int(max_examples))

    def image_mean(ex):
        image = ex["image"]
        image = _decode_full(image) if image.dtype == tf.string else _to_rgb(image)
        return tf.reduce_mean(tf.cast(tf.reshape(image, [-1, 3]), tf.float64), axis=0)

    ds = ds.map(image_mean, num_parallel_calls=_AUTOTUNE).ignore_errors(log_warning=True).batch(1024)
    total, count = np.zeros(3, np.float64), 0
    for means in ds.with_options(_options(config)).as_numpy_iterator():
        total += means.sum(axis=0)
        count += len(means)
        logging.info("mean RGB: %d images", count)
    if count == 0:
        raise ValueError(f"{config.dataset!r} split {split!r} has no decodable images")
    return tuple(float(v) for v in total / count)


def main(argv: list[str] | None = None) -> int:
    import ml_collections

    parser = argparse.ArgumentParser(prog="python -m vgg_jax.input_pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mean = commands.add_parser("mean_rgb", help="print the training split's mean RGB (0–255)")
    mean.add_argument("--dataset", required=True, help="TFDS name, e.g. imagenet2012, stl10, sklearn_digits")
    mean.add_argument("--data_dir", default="", help="TFDS data_dir ('' = TFDS default)")
    mean.add_argument("--split", default="train")
    mean.add_argument("--max_examples", type=int, default=0, help="0 = all")
    args = parser.parse_args(argv)
    config = ml_collections.ConfigDict(
        {"dataset": args.dataset, "data_dir": args.data_dir, "train_split": args.split, "corrupt_images": "skip"}
    )
    try:
        rgb = compute_mean_rgb(config, max_examples=args.max_examples or None)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"mean_rgb = ({rgb[0]:.3f}, {rgb[1]:.3f}, {rgb[2]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
