"""App. A data: boxes through every augmentation, box-carrying streams, the embedded set, the ILSVRC reader."""

import io
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from vgg_jax.configs import loc as loc_config
from vgg_jax.data import sources
from vgg_jax.localisation import boxes
from vgg_jax.localisation import embedded_data as embedded_loc
from vgg_jax.localisation import ilsvrc_data as ilsvrc_loc


def painted(height, width, box):
    """A black image with the pixel box (top, left, bottom, right) painted white, and the box normalised."""
    image = np.zeros((height, width, 3), np.uint8)
    top, left, bottom, right = box
    image[top:bottom, left:right] = 255
    return image, np.asarray([[top / height, left / width, bottom / height, right / width]], np.float32)


def painted_box(image, crop):
    """The normalised bounding box of the (mostly) painted pixels of a crop."""
    rows, cols = np.nonzero(np.asarray(image)[..., 0] > 127)
    return np.asarray([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]) / crop


@pytest.mark.parametrize(
    "height, width, box, scale_min, scale_max",
    [
        (90, 120, (20, 30, 70, 100), 40, 48),  # landscape, jittered S
        (130, 70, (5, 10, 100, 60), 40, 64),  # portrait, box near the edge
        (64, 80, (30, 40, 60, 78), 32, 32),  # fixed S = crop: only the flip and the rescale act
    ],
)
@pytest.mark.parametrize("encode", [False, True])
def test_boxes_follow_rescale_crop_and_flip_exactly(height, width, box, scale_min, scale_max, encode):
    """Paint the box, augment image and box together: the painted region's box is the transformed box."""
    image, normalised = painted(height, width, box)
    source = tf.io.encode_png(image) if encode else tf.constant(image)
    flips_seen = set()
    for seed in range(12):
        crop, moved, details = boxes.random_crop_with_boxes(
            source, normalised, tf.constant([seed, 3]), scale_min=scale_min, scale_max=scale_max, crop=32, flip=True
        )
        flips_seen.add(bool(details["flipped"]))
        expected = np.clip(moved.numpy()[0], 0.0, 1.0)
        if np.any(expected[2:] - expected[:2] < 2 / 32):
            continue  # the box is (almost) outside this crop
        # One pixel of tolerance: the antialiased rescale blurs the painted edge by up to a pixel.
        np.testing.assert_allclose(painted_box(crop, 32), expected, atol=1.01 / 32)
    assert flips_seen == {True, False}


def test_centre_crop_boxes_match_the_painted_region():
    image, normalised = painted(100, 150, (30, 40, 80, 120))
    crop, moved = boxes.centre_crop_with_boxes(tf.constant(image), normalised, 64, 32)
    np.testing.assert_allclose(painted_box(crop, 32), np.clip(moved.numpy()[0], 0, 1), atol=1.01 / 32)
    # Not clipped: the box's true extent beyond the crop is kept (the loss and the IoU need it).
    assert moved.numpy()[0, 3] > 1.0


def test_embedded_canvas_box_is_the_painted_digit_exactly():
    digit = np.zeros((8, 8), np.int64)
    digit[2:6, 3:5] = 16
    image, (top, left, bottom, right) = embedded_loc.place_digit(digit, np.random.default_rng(0))
    assert image.shape == (96, 96, 3)
    ink = image[..., 0] > 31  # brighter than any background pixel
    rows, cols = np.nonzero(ink)
    assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (top, left, bottom, right)
    assert image[top:bottom, left:right, 0].max() == 255
    assert 4 * min(embedded_loc.FACTORS) <= bottom - top <= 4 * max(embedded_loc.FACTORS) + 8  # 4 rows, enlarged
    again, _ = embedded_loc.place_digit(digit, np.random.default_rng(0))
    np.testing.assert_array_equal(image, again)  # deterministic


def demo_config(**overrides):
    config = loc_config.get_config("demo")
    config.global_batch_size, config.eval_batch_size, config.shuffle_buffer = 8, 16, 64
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_box_streams_carry_boxes_of_the_image_class():
    config = demo_config()
    assert sources.dataset_metadata(config).num_classes == 10
    batch = next(boxes.create_train_iterator(config))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["boxes"].shape == (8, 1, 4)
    assert batch["box_mask"].all()
    evaluation = next(boxes.create_eval_iterator(config))
    assert set(evaluation) == {"image", "label", "boxes", "box_mask", "mask"}
    whole = next(iter(boxes.load_eval_images(config)))
    assert whole["image"].shape == (96, 96, 3)
    box = whole["boxes"].numpy()[0]
    assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_box_stream_shards_like_the_classification_stream():
    """input_shards=2 on one process = the rows of two processes, stacked (multi-host as for classification)."""
    config = demo_config(input_shards=2)
    together = next(boxes.create_train_iterator(config, process_index=0, process_count=1))
    config = demo_config()
    parts = [next(boxes.create_train_iterator(config, process_index=p, process_count=2)) for p in range(2)]
    for key in ("image", "label", "boxes"):
        np.testing.assert_array_equal(together[key], np.concatenate([part[key] for part in parts]))


def xml(width, height, objects):
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax) in objects:
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return ("".join(parts) + "</annotation>").encode()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg(height, width):
    return tf.io.encode_jpeg(tf.zeros([height, width, 3], tf.uint8)).numpy()


def test_parse_annotation_normalises_like_tfds_voc():
    height, width, objects = ilsvrc_loc.parse_annotation(xml(200, 100, [("n01440764", (20, 10, 220, 50))]))
    assert (height, width) == (100, 200)
    assert objects == [("n01440764", 0.1, 0.1, 0.5, 1.0)]  # xmax 220 > width: clipped


def test_ilsvrc_archives_build_a_box_set(tmp_path):
    """Archives in the official layout → ilsvrc2012_loc; only images with boxes; read through config.loc."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    synsets = ("n01440764", "n01443537")
    with tarfile.open(manual / ilsvrc_loc.TRAIN_IMAGES, "w") as outer:
        for synset in synsets:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(3):
                    add(tar, f"{synset}_{i}.JPEG", jpeg(40, 60))
            add(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / ilsvrc_loc.TRAIN_BOXES, "w:gz") as tar:
        for synset in synsets:
            for i in range(2):  # image 2 of each class has no box: not in the localisation set
                add(tar, f"{synset}/{synset}_{i}.xml", xml(60, 40, [(synset, (6, 4, 30, 20))]))
    with tarfile.open(manual / ilsvrc_loc.VAL_IMAGES, "w") as tar:
        add(tar, "ILSVRC2012_val_00000001.JPEG", jpeg(50, 50))
    with tarfile.open(manual / ilsvrc_loc.VAL_BOXES, "w:gz") as tar:
        objects = [(synsets[1], (0, 0, 25, 25)), (synsets[1], (25, 25, 50, 50))]
        add(tar, "val/ILSVRC2012_val_00000001.xml", xml(50, 50, objects))

    config = loc_config.get_config("")
    config.dataset, config.data_dir = "ilsvrc2012_loc", str(tmp_path)
    config.crop_size, config.scale_min, config.scale_max, config.eval_scale = 32, 40, 40, 40
    config.global_batch_size, config.eval_batch_size = 2, 1
    metadata = sources.dataset_metadata(config)
    assert metadata.num_classes == 1000 and metadata.num_examples("train") == 4
    assert metadata.num_examples("validation") == 1
    whole = next(iter(boxes.load_eval_images(config)))
    assert int(whole["label"]) == 1  # n01443537 is ImageNet's class 1
    np.testing.assert_allclose(whole["boxes"].numpy()[:2], [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    assert whole["box_mask"].numpy().sum() == 2
    batch = next(boxes.create_train_iterator(config))
    assert set(batch["label"]) <= {0, 1} and batch["box_mask"][:, 0].all()
