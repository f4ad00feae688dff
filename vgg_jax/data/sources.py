"""Paper §3.1 training data, where it comes from: TFDS builders, metadata, example counts, records.

`get_dataset_builder(config)` opens ``config.dataset`` in ``config.data_dir`` and prepares it when
needed: the embedded sets (`vgg_jax.data.embedded`) and folders of images (``folder:PATH``,
`vgg_jax.data.folder`) offline under a file lock, manual-download sets
(ImageNet) from their manual directory or with instructions, others by download when
``config.download``. Unknown names, missing features and unprepared sets fail here, before any
expensive work.

The prepared builder is reused for the rest of the process, keyed on (dataset, data_dir): a training
run asks for it from several entry points (metadata, steps per epoch, each shard of the train
stream, every evaluation). Under `tfds.testing.mock_data` nothing is prepared and nothing is cached,
so a mocked builder never reaches a later unmocked call.

`read_records` gives a split's records in file order, images still encoded, with their name and
index in the split; `CorruptRecords` screens them before decoding (config.corrupt_images).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import threading
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vgg_jax.data import embedded, embedded_photos, folder
from vgg_jax.localisation import embedded_data as embedded_loc
from vgg_jax.localisation import ilsvrc_data  # noqa: F401 (registers the ilsvrc2012_loc builder)

DEMO_HINT = "--config=configs/e.py:demo"
EMBEDDED_DATASETS = (
    embedded.SklearnDigits.name,
    embedded_loc.SklearnDigitsLoc.name,
    embedded_photos.SamplePhotos.name,
)

_PREPARED: dict[tuple[str, str | None], tfds.core.DatasetBuilder] = {}


class CorruptImageError(RuntimeError):
    """A record's image cannot be decoded and ``config.corrupt_images == 'fail'``."""


# --------------------------------------------------------------------------- builders


def tfds_is_mocked() -> bool:
    """True inside `tfds.testing.mock_data` (nothing is prepared there, and nothing needs to be)."""
    fn = tfds.core.DatasetBuilder.download_and_prepare
    return "mock" in getattr(fn, "__name__", "")


def get_dataset_builder(config: Any) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `config.dataset` (in `config.data_dir`), prepared and ready to read.

    Raises ValueError (unknown name, no image/label features) or FileNotFoundError (not prepared and
    needs a manual download, or ``config.download`` is False) before any expensive work.
    """
    name = config.dataset
    data_dir = config.get("data_dir", "") or None
    required = _required_features(config)
    if tfds_is_mocked():
        return _open_builder(name, data_dir, required)
    key = (name, data_dir)
    if key not in _PREPARED and folder.is_folder(name):  # the user's own photos, prepared once
        _PREPARED[key] = folder.builder(name, data_dir)
    if key not in _PREPARED:
        builder = _open_builder(name, data_dir, required)
        if not builder.is_prepared():
            _ensure_prepared(builder, download=bool(config.get("download", True)))
            # Re-open: a builder made before its data existed does not see the prepared split sizes.
            builder = tfds.builder(name, data_dir=data_dir)
        _PREPARED[key] = builder
    return _PREPARED[key]


def _required_features(config: Any) -> tuple[str, ...]:
    """'image' and 'label', or the features an App. A localisation config maps (``config.loc.*_feature``)."""
    loc = config.get("loc")
    if not loc:
        return ("image", "label")
    return tuple(loc[field] for field in ("image_feature", "label_feature", "boxes_feature"))


def feature(features: Any, path: str) -> Any:
    """The feature at a '/'-separated path ('objects/label' is the label inside the 'objects' sequence)."""
    for part in path.split("/"):
        features = features[part]
    return features


def _open_builder(name: str, data_dir: str | None, required: tuple[str, ...]) -> tfds.core.DatasetBuilder:
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
    missing = [key for key in required if key.split("/")[0] not in features]
    if missing:
        raise ValueError(
            f"config.dataset={name!r} has no {' / '.join(missing)} feature (it has {sorted(features.keys())}); "
            "the pipeline needs an image-classification set with 'image' and 'label'."
        )
    return builder


def _ensure_prepared(builder: tfds.core.DatasetBuilder, *, download: bool) -> None:
    root = os.fspath(builder.data_dir_root)
    if builder.name in EMBEDDED_DATASETS:
        _prepare_embedded(builder, root)
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
    if not download:
        raise FileNotFoundError(
            f"config.dataset={builder.name!r} is not prepared in {root} and config.download is False. "
            f"Run `tfds build {builder.name} --data_dir={root}`, or try `{DEMO_HINT}`."
        )
    logging.warning("Downloading and preparing %s into %s.", builder.name, root)
    builder.download_and_prepare()


def _prepare_embedded(builder: tfds.core.DatasetBuilder, root: str) -> None:
    # Several processes on one machine (tests, local multi-host) may start together: one prepares.
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{builder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not tfds.builder(builder.name, data_dir=root).is_prepared():
                logging.info("Preparing the embedded data set %s in %s (offline, seconds).", builder.name, root)
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- splits & metadata


def num_examples(builder: tfds.core.DatasetBuilder, split: Any) -> int:
    """Number of examples of `split` (a name, a slice like 'train[:10%]' or an `even_splits` part)."""
    splits = builder.info.splits
    if len(splits):  # Known split metadata (always, for a prepared data set).
        return int(splits[split].num_examples)
    # Split metadata unknown (e.g. `tfds.testing.mock_data`): ask the data set itself.
    cardinality = int(builder.as_dataset(split=split).cardinality())
    if cardinality < 0:
        raise ValueError(f"cannot tell how many examples {builder.name!r} split {split!r} has")
    return cardinality


def check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> None:
    """Raises a ValueError naming ``config.<field>`` when `split` is not a split (or slice) of `builder`."""
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


def split_builder(config: Any, split: str, field: str) -> tfds.core.DatasetBuilder:
    """`get_dataset_builder(config)`, checked to have `split` (named ``config.<field>`` in errors)."""
    builder = get_dataset_builder(config)
    check_split(builder, split, field)
    return builder


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """What the model and the loop need to know about the data set."""

    name: str
    num_classes: int
    class_names: list[str] | None
    builder: Any = dataclasses.field(repr=False, compare=False)

    def num_examples(self, split: str) -> int:
        return num_examples(self.builder, split)


def dataset_metadata(config: Any) -> DatasetMetadata:
    """Name, classes and (through its builder) split sizes of `config.dataset`; raises like `get_dataset_builder`."""
    builder = get_dataset_builder(config)
    label = feature(builder.info.features, _required_features(config)[1])
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise ValueError(f"config.dataset={builder.name!r}: its 'label' feature is not a ClassLabel")
    names = list(label.names) if getattr(label, "names", None) else None
    return DatasetMetadata(name=builder.name, num_classes=int(num_classes), class_names=names, builder=builder)


# --------------------------------------------------------------------------- records


def graph_function(fn: Any) -> Any:
    """`fn` for a tf.data transformation, traced as written: the functions we give tf.data are graph code
    (tf.cond, no Python control flow on tensors), and AutoGraph's source conversion of them took ~1.8 s of
    each process's first training pipeline (2.5 s to build it, 0.7 s without)."""
    return tf.autograph.experimental.do_not_convert(fn)


def encoded_split(builder: tfds.core.DatasetBuilder, split: Any, image: str = "image") -> tf.data.Dataset:
    """`split` in file order with its records' ids ('tfds_id'), the `image` feature left encoded."""
    encoded = isinstance(builder.info.features[image], tfds.features.Image)
    decoders = {image: tfds.decode.SkipDecoding()} if encoded else None
    return builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=decoders,
        read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False),
    )


def read_records(builder: tfds.core.DatasetBuilder, split: Any, offset: int) -> tf.data.Dataset:
    """{'image': encoded bytes (or uint8), 'label': int32, 'id': record name, 'index': int64} in file order.

    'index' is the example's index in the whole split: its index in `split` (a shard) plus `offset`.
    """
    ds = encoded_split(builder, split)

    def record(index, ex):
        return {
            "image": ex["image"],
            "label": tf.cast(ex["label"], tf.int32),
            "id": ex["filename"] if "filename" in ex else ex["tfds_id"],  # a folder's images: their path
            "index": index + offset,
        }

    return ds.enumerate().map(graph_function(record), num_parallel_calls=tf.data.AUTOTUNE)


class CorruptRecords:
    """Screens records before decoding; counts (and names) those skipped, or raises in 'fail' mode."""

    def __init__(self, mode: str):
        self.mode = mode
        self.count = 0
        self.names: list[str] = []
        self._lock = threading.Lock()

    def probe(self, data: tf.Tensor, name: tf.Tensor) -> bool:
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

    def screen(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """`ds` without the records `filter_fn` rejects."""
        return ds.filter(graph_function(self.filter_fn))

    def restart(self) -> None:
        """Counts (and names) from zero: a new pass over the same records."""
        self.count, self.names = 0, []

    def filter_fn(self, example: dict[str, tf.Tensor]) -> tf.Tensor:
        """`tf.data` predicate: complete JPEG/PNG framing passes at once, anything else is probed."""
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

    def tolerate(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """In 'skip' mode, also drops examples whose decode fails later: damage the screen cannot see."""
        return ds.ignore_errors(log_warning=True) if self.mode == "skip" else ds
