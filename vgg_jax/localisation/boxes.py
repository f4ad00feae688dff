"""Paper App. A localisation data: ground-truth boxes through the §3.1 augmentation, box-carrying streams.

Boxes are corners ``(ymin, xmin, ymax, xmax)`` normalised by the image, TFDS's BBox convention. Any
TFDS set whose examples carry boxes and labels works: ``config.loc`` names its features —
``image_feature``, ``label_feature`` (the image's class; a per-object feature such as
``objects/label`` gives the class of the largest box [choice]), ``boxes_feature`` (e.g.
``objects/bbox``) and ``box_labels_feature`` (the boxes' classes: only the image class's boxes are
kept; '' when every box is of the image's class, as in ILSVRC). At most ``loc.max_boxes`` boxes per
image are kept, padded, with a mask.

**Boxes follow the image exactly**: the isotropic rescale to S maps a normalised coordinate y to
y·H' pixels (H' the rescaled height, as `image_ops` computes it), the crop subtracts its offset and
divides by the crop side, the flip maps x to 1 − x. The result is relative to the crop and is not
clipped (a box may extend past it; `vgg_jax.localisation.arithmetic.training_target` clips). tests/test_localise_data
paints a box into an image, augments image and box together and checks the painted region's box.

Streams (same shards, order, determinism and resume as `vgg_jax.data.streams`, whose loop they plug
into): `BoxExamples` for training batches {'image', 'label', 'boxes' (B, 4) in crop coordinates,
'box_mask'}; `create_eval_iterator` the centre crops at Q with their boxes (protocol 1);
`load_eval_images` whole decoded images with their normalised boxes (protocol 2, dense).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax.data import image_ops, sources, streams

KEYS = ("image", "label", "boxes", "box_mask")


# --------------------------------------------------------------------------- geometry


def image_shape(image: tf.Tensor) -> tf.Tensor:
    """(H, W) of encoded bytes (JPEG: from the header, without decoding) or of decoded pixels."""
    if image.dtype != tf.string:
        return tf.shape(image)[:2]

    def other():
        return tf.shape(tf.io.decode_image(image, channels=3, expand_animations=False))[:2]

    return tf.cond(tf.io.is_jpeg(image), lambda: tf.io.extract_jpeg_shape(image)[:2], other)


def crop_boxes(
    boxes: tf.Tensor,
    image_hw: tf.Tensor,
    scale: tf.Tensor,
    offset: tuple[tf.Tensor, tf.Tensor],
    crop: int,
    flipped: tf.Tensor | bool = False,
) -> tf.Tensor:
    """Normalised image boxes (B, 4) → boxes relative to the crop of the image rescaled to `scale`.

    `offset` is the crop's (top, left) in the rescaled image, `flipped` whether the crop was mirrored.
    """
    new_h, new_w = image_ops._rescaled_size(image_hw[0], image_hw[1], scale)
    boxes = tf.cast(boxes, tf.float32)
    ys = (boxes[:, 0::2] * tf.cast(new_h, tf.float32) - tf.cast(offset[0], tf.float32)) / crop
    xs = (boxes[:, 1::2] * tf.cast(new_w, tf.float32) - tf.cast(offset[1], tf.float32)) / crop
    xs = tf.where(tf.convert_to_tensor(flipped), 1.0 - xs[:, ::-1], xs)
    return tf.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)


def random_crop_with_boxes(
    image: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor, **augmentation: Any
) -> tuple[tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """`image_ops.random_rescaled_crop` (same arguments) with `boxes` taken along: (crop, boxes, details)."""
    shape = image_shape(image)
    out, details = image_ops.random_rescaled_crop(image, seed, **augmentation)
    offset = (details["offset_y"], details["offset_x"])
    return out, crop_boxes(boxes, shape, details["scale"], offset, augmentation["crop"], details["flipped"]), details


def centre_crop_with_boxes(
    image: tf.Tensor, boxes: tf.Tensor, scale: int, crop: int, resize: str = "exact"
) -> tuple[tf.Tensor, tf.Tensor]:
    """The §3.2 centre crop of the image rescaled to Q = `scale`, and `boxes` relative to it."""
    shape = image_shape(image)
    new_h, new_w = image_ops._rescaled_size(shape[0], shape[1], tf.constant(scale, tf.int32))
    offset = ((new_h - crop) // 2, (new_w - crop) // 2)  # image_ops' default offsets
    out = image_ops.rescaled_crop(image, scale, crop, resize=resize)
    return out, crop_boxes(boxes, shape, scale, offset, crop)


# --------------------------------------------------------------------------- records


def _get(example: dict[str, Any], path: str) -> Any:
    for part in path.split("/"):
        example = example[part]
    return example


def _area(boxes: tf.Tensor) -> tf.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pad(boxes: tf.Tensor, max_boxes: int) -> tuple[tf.Tensor, tf.Tensor]:
    boxes = boxes[:max_boxes]
    count = tf.shape(boxes)[0]
    padded = tf.pad(boxes, [[0, max_boxes - count], [0, 0]])
    return tf.ensure_shape(padded, [max_boxes, 4]), tf.range(max_boxes) < count


class BoxExamples:
    """Records with boxes and the §3.1 augmentation that carries them: the `examples` hook of `streams`."""

    keys = KEYS

    def __init__(self, config: Any):
        loc = config.loc
        self.image_feature, self.label_feature = loc.image_feature, loc.label_feature
        self.boxes_feature, self.box_labels_feature = loc.boxes_feature, loc.box_labels_feature
        self.max_boxes = int(loc.max_boxes)
        self.augmentation = dict(
            scale_min=int(config.scale_min),
            scale_max=int(config.scale_max),
            crop=int(config.crop_size),
            flip=bool(config.get("random_flip", True)),
            resize=config.get("resize_method", "exact"),
        )

    def read(self, builder: tfds.core.DatasetBuilder, split: Any, offset: int) -> tf.data.Dataset:
        """{'image' (encoded), 'label', 'boxes' (max_boxes, 4), 'box_mask', 'id', 'index'} in file order."""
        ds = sources.encoded_split(builder, split, self.image_feature)

        def record(index, ex):
            boxes = tf.reshape(tf.cast(_get(ex, self.boxes_feature), tf.float32), [-1, 4])
            label = tf.cast(_get(ex, self.label_feature), tf.int32)
            if label.shape.rank == 1:  # a per-object class: the largest box's [choice]
                largest = tf.argmax(tf.concat([_area(boxes), [-1.0]], 0), output_type=tf.int32)
                label = tf.concat([label, [0]], 0)[largest]
            if self.box_labels_feature:
                boxes = tf.boolean_mask(boxes, tf.cast(_get(ex, self.box_labels_feature), tf.int32) == label)
            boxes, mask = _pad(boxes, self.max_boxes)
            return {
                "image": ex[self.image_feature],
                "label": label,
                "boxes": boxes,
                "box_mask": mask,
                "id": ex["tfds_id"],
                "index": index + offset,
            }

        return ds.enumerate().map(sources.graph_function(record), num_parallel_calls=tf.data.AUTOTUNE)

    def centre_crop(self, example: dict, q: int, crop: int, resize: str) -> dict:
        """Protocol 1's view: the centre crop at Q, with its boxes."""
        image, boxes = centre_crop_with_boxes(example["image"], example["boxes"], q, crop, resize)
        return {"image": image, "label": example["label"], "boxes": boxes, "box_mask": example["box_mask"]}

    def padding(self, crop: int) -> dict:
        return {
            "image": tf.zeros([crop, crop, 3], tf.uint8),
            "label": tf.constant(0, tf.int32),
            "boxes": tf.zeros([self.max_boxes, 4], tf.float32),
            "box_mask": tf.zeros([self.max_boxes], tf.bool),
        }

    def augment(self, example: dict[str, tf.Tensor], key: tf.Tensor) -> dict[str, tf.Tensor]:
        image, boxes, _ = random_crop_with_boxes(example["image"], example["boxes"], key, **self.augmentation)
        return {"image": image, "label": example["label"], "boxes": boxes, "box_mask": example["box_mask"]}


# --------------------------------------------------------------------------- streams


def create_train_iterator(config: Any, *, start_step: int = 0, **processes: Any) -> Iterator[dict[str, np.ndarray]]:
    """`streams.create_train_iterator` with boxes: batches of {'image', 'label', 'boxes', 'box_mask'}."""
    return streams.create_train_iterator(config, start_step=start_step, examples=BoxExamples(config), **processes)


def eval_batches(config: Any, split: str | None = None, **options: Any) -> streams.EvalBatches:
    """Protocol 1 batches: `streams.eval_batches` with boxes — centre crops at Q (default
    ``config.eval_scale``) of {'image', 'label', 'boxes', 'box_mask', 'mask'}; padding rows have mask False."""
    return streams.eval_batches(config, split, examples=BoxExamples(config), **options)


def create_eval_iterator(config: Any, split: str | None = None, **options: Any) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `eval_batches(config, split, **options)`."""
    return iter(eval_batches(config, split, **options))


def load_eval_images(
    config: Any, split: str | None = None, *, process_index: int | None = None, process_count: int | None = None
) -> tf.data.Dataset:
    """This process's shard of `split`, whole decoded images with their normalised boxes (protocol 2).

    Elements: {'image': uint8 (H, W, 3), 'label', 'boxes' (max_boxes, 4), 'box_mask', 'index'}.
    """
    examples = BoxExamples(config)
    records, corrupt, _, _ = streams.eval_records(config, split, process_index, process_count, examples.read)

    def decode(ex):
        return {key: ex[key] for key in ("label", "boxes", "box_mask", "index")} | {
            "image": image_ops.decode_rgb(ex["image"])
        }

    ds = corrupt.tolerate(records.map(sources.graph_function(decode), num_parallel_calls=tf.data.AUTOTUNE))
    return ds.with_options(streams.tf_data_options(config))


def dataset_has_boxes(config: Any) -> None:
    """Raises a ValueError naming the config field when the data set lacks a mapped box feature."""
    features = sources.get_dataset_builder(config).info.features
    for field in ("image_feature", "label_feature", "boxes_feature", "box_labels_feature"):
        path = config.loc[field]
        try:
            if path:
                sources.feature(features, path)
        except KeyError:
            raise ValueError(
                f"config.loc.{field}={path!r}: {config.dataset!r} has no such feature; it has {sorted(features.keys())}"
            ) from None
