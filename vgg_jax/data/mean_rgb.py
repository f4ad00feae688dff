"""Paper §3.1 preprocessing: the training set's mean RGB, the one value subtracted from every pixel.

``python -m vgg_jax mean-rgb --dataset=NAME [--data_dir=DIR] [--split=train] [--max_examples=N]``
prints it on the 0–255 scale; put it into ``config.mean_rgb``.

Definition: the mean over training images of each image's mean pixel (every image weighs the same,
whatever its size) on the decoded, unresized image. This is what Caffe's mean image over 256×256
resized images, averaged over pixels, gives (up to resampling): the value the released VGG models use.
The subtraction itself runs on device (`vgg_jax.preprocess`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from vgg_jax.data import image_ops, sources, streams
from vgg_jax.runtime import cli


def compute_mean_rgb(
    config: Any, max_examples: int | None = None, split: str | None = None
) -> tuple[float, float, float]:
    """Mean RGB of the training split (see the module docstring for the definition), on 0–255 pixels."""
    split = split or config.train_split
    builder = sources.split_builder(config, split, "train_split")
    corrupt = sources.CorruptRecords("skip")
    ds = corrupt.screen(sources.read_records(builder, split, 0))
    if max_examples:
        ds = ds.take(int(max_examples))

    def image_mean(ex):
        image = image_ops.decode_rgb(ex["image"])
        return tf.reduce_mean(tf.cast(tf.reshape(image, [-1, 3]), tf.float64), axis=0)

    ds = corrupt.tolerate(ds.map(sources.graph_function(image_mean), num_parallel_calls=tf.data.AUTOTUNE))
    ds = ds.batch(1024)
    total, count = np.zeros(3, np.float64), 0
    for means in ds.with_options(streams.tf_data_options(config)).as_numpy_iterator():
        total += means.sum(axis=0)
        count += len(means)
        logging.info("mean RGB: %d images", count)
    if count == 0:
        raise ValueError(f"{config.dataset!r} split {split!r} has no decodable images")
    return tuple(float(v) for v in total / count)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("dataset", None, "TFDS name, e.g. imagenet2012, stl10, sklearn_digits, or folder:PATH.")
    flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = TFDS's default).")
    flags.DEFINE_string("split", "train", "The split whose mean is taken (TFDS slicing allowed).")
    flags.DEFINE_integer("max_examples", 0, "Use only the first N images (0 = all).", lower_bound=0)


def _main(argv: list[str]) -> None:
    import ml_collections
    from absl import flags

    from vgg_jax.runtime import process

    process.start_command()
    values = flags.FLAGS
    config = ml_collections.ConfigDict(
        {"dataset": values.dataset, "data_dir": values.data_dir, "train_split": values.split, "corrupt_images": "skip"}
    )
    rgb = compute_mean_rgb(config, max_examples=values.max_examples or None)
    print(f"mean_rgb = ({rgb[0]:.3f}, {rgb[1]:.3f}, {rgb[2]:.3f})")


def run(argv: list[str] | None = None) -> None:
    """`python -m vgg_jax mean-rgb` / `vgg-jax mean-rgb`: prints the mean; a bad flag is one `error:` line."""
    cli.run_absl(
        _main,
        define=_define_flags,
        usage="vgg-jax mean-rgb --dataset=NAME [--data_dir=DIR] [--split=train] [--max_examples=N]",
        required=("dataset",),
        argv=[sys.argv[0], *argv] if argv is not None else None,
        expected=(ValueError, OSError),
    )


if __name__ == "__main__":
    run()
