"""Paper §3.1 preprocessing: the training set's mean RGB, the one value subtracted from every pixel.

``python -m vgg_jax.data.mean_rgb --dataset=NAME [--data_dir=DIR] [--split=train] [--max_examples=N]``
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

from vgg_jax import cli
from vgg_jax.data import image_ops, sources, streams


def compute_mean_rgb(
    config: Any, max_examples: int | None = None, split: str | None = None
) -> tuple[float, float, float]:
    """Mean RGB of the training split (see the module docstring for the definition), on 0–255 pixels."""
    split = split or config.train_split
    builder = sources.split_builder(config, split, "train_split")
    corrupt = sources.CorruptRecords("skip")
    ds = sources.read_records(builder, split, 0).filter(corrupt.filter_fn)
    if max_examples:
        ds = ds.take(int(max_examples))

    def image_mean(ex):
        image = image_ops.decode_rgb(ex["image"])
        return tf.reduce_mean(tf.cast(tf.reshape(image, [-1, 3]), tf.float64), axis=0)

    ds = corrupt.tolerate(ds.map(image_mean, num_parallel_calls=tf.data.AUTOTUNE)).batch(1024)
    total, count = np.zeros(3, np.float64), 0
    for means in ds.with_options(streams.tf_data_options(config)).as_numpy_iterator():
        total += means.sum(axis=0)
        count += len(means)
        logging.info("mean RGB: %d images", count)
    if count == 0:
        raise ValueError(f"{config.dataset!r} split {split!r} has no decodable images")
    return tuple(float(v) for v in total / count)


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with a one-line error for a bad argument, a missing or unknown data set)."""
    return cli.run(lambda: _main(argv), argv=argv)


def _main(argv: list[str] | None) -> int:
    import ml_collections

    parser = cli.ArgumentParser(prog="python -m vgg_jax.data.mean_rgb", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="TFDS name, e.g. imagenet2012, stl10, sklearn_digits")
    parser.add_argument("--data_dir", default="", help="TFDS data_dir ('' = TFDS default)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_examples", type=int, default=0, help="0 = all")
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
