"""vgg_jax.resample + image_ops.random_window_on_canvas: paper §3.1's crops resampled on the device."""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vgg_jax import models, optim, resample, steps
from vgg_jax.data import image_ops, streams

DRAWS = dict(scale_min=40, scale_max=120, crop=32, flip=True)


def smooth_image(rng, height, width):
    """A photo-like image: coarse random colours upsampled (JPEG-friendly, no pixel noise)."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((int(width), int(height)), Image.BICUBIC))


def encode(array, kind):
    if kind == "pixels":
        return tf.constant(array)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG" if kind == "jpeg" else "PNG", quality=90)
    return tf.constant(buffer.getvalue())


def both_paths(image, seed, canvas):
    host, host_draws = image_ops.random_rescaled_crop(image, seed, **DRAWS)
    placed, geometry, draws = image_ops.random_window_on_canvas(image, seed, canvas=canvas, **DRAWS)
    device = resample.crops_from_canvas(jnp.asarray(placed.numpy())[None], jnp.asarray(geometry.numpy())[None], 32)
    draws = {k: v.numpy() for k, v in draws.items()}
    return host.numpy().astype(np.float32), np.asarray(device[0]), {k: v.numpy() for k, v in host_draws.items()}, draws


@pytest.mark.parametrize("kind", ["jpeg", "png", "pixels"])
def test_same_crops_as_the_host_path_within_one(kind):
    """Shrinking (S < side) and enlarging (S > side), flipped or not, crops at the image's borders: ±1."""
    rng = np.random.default_rng(0)
    flipped = set()
    for i in range(12):
        height, width = rng.integers(60, 150, 2)
        image = encode(
            smooth_image(rng, height, width) if i % 2 else rng.integers(0, 256, (height, width, 3), np.uint8), kind
        )
        host, device, host_draws, draws = both_paths(image, tf.constant([3, i], tf.int64), canvas=160)
        assert draws == host_draws  # the same S, position and flip: the paper's augmentation is unchanged
        assert np.abs(device - host).max() <= 1.0, (kind, i, host_draws)
        assert np.mean(device != host) < 0.05  # float rounding: a few pixels at most land on the other integer
        flipped.add(bool(draws["flipped"]))
    assert flipped == {True, False}


def test_windows_larger_than_the_canvas_are_shrunk_first():
    """A window beyond the canvas is block-averaged on the host by an integer factor: close, not equal."""
    rng = np.random.default_rng(1)
    worst, means = 0.0, []
    for i in range(8):
        image = encode(smooth_image(rng, *rng.integers(150, 200, 2)), "jpeg")
        placed, geometry, _ = image_ops.random_window_on_canvas(
            image, tf.constant([5, i], tf.int64), canvas=48, **DRAWS
        )
        assert placed.shape == (48, 48, 3) and placed.dtype == tf.uint8
        assert 0 < geometry[4] <= 48 and 0 < geometry[5] <= 48  # the shrunk window fits
        host, device, _, _ = both_paths(image, tf.constant([5, i], tf.int64), canvas=48)
        worst, means = max(worst, float(np.abs(device - host).max())), means + [float(np.abs(device - host).mean())]
    assert np.mean(means) < 0.5 and worst <= 4.0


def test_the_canvas_and_what_crosses_the_link():
    """uint8 canvas + 7 float32 numbers per image: 3·C² + 28 bytes (150,556 for a crop of 224 → 602,140 at C=448)."""
    image = encode(np.zeros((50, 70, 3), np.uint8), "pixels")
    placed, geometry, _ = image_ops.random_window_on_canvas(image, tf.constant([0, 0], tf.int64), canvas=64, **DRAWS)
    assert placed.dtype == tf.uint8 and placed.shape == (64, 64, 3)
    assert geometry.dtype == tf.float32 and geometry.shape == (len(resample.GEOMETRY_FIELDS),)
    assert placed.numpy().nbytes + geometry.numpy().nbytes == 3 * 64 * 64 + 28
    with pytest.raises(ValueError, match=r"geometry \(N, 7\)"):
        resample.crops_from_canvas(jnp.zeros((2, 64, 64, 3), jnp.uint8), jnp.zeros((2, 6)), 32)


def test_outside_the_window_is_never_read():
    """Whatever lies on the canvas beyond the window's size does not change the crop."""
    rng = np.random.default_rng(2)
    canvas = rng.integers(0, 256, (1, 40, 40, 3), np.uint8)
    geometry = jnp.asarray([[0.8, 1.3, -2.0, -1.5, 30, 25, 1.0]], jnp.float32)
    other = canvas.copy()
    other[:, 30:], other[:, :, 25:] = 255, 0
    out = resample.crops_from_canvas(jnp.asarray(canvas), geometry, 24)
    np.testing.assert_array_equal(out, resample.crops_from_canvas(jnp.asarray(other), geometry, 24))
    assert float(out.min()) >= 0 and float(out.max()) <= 255 and np.all(np.asarray(out) == np.round(out))


def tiny_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            model=dict(variant="A", num_classes=10, width_multiplier=1 / 16, fc_width=16),
            crop_size=32,
            compute_dtype="float32",
            mean_rgb=(120.0, 110.0, 100.0),
            color_shift_std=0.1,
            lr_schedule="plateau",
            learning_rate=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            decay_biases=False,
            plateau=dict(factor=0.1, patience=3, threshold=1e-3, cooldown=0, max_reductions=3),
        )
    )
    config.update(overrides)
    return config


def test_train_step_resamples_canvases_like_the_crops_it_is_given():
    """The step fed canvases + geometry equals the step fed the crops `crops_from_canvas` makes of them."""
    config = tiny_config()
    model = models.from_config(config)
    tx = optim.create_optimizer(config, steps_per_epoch=10)
    state = steps.create_train_state(config, model, tx, optim.PlateauControl(config))
    rng = np.random.default_rng(3)
    canvas = jnp.asarray(rng.integers(0, 256, (2, 48, 48, 3), np.uint8))
    geometry = jnp.asarray([[0.9, 0.9, -1.0, -1.0, 40, 44, 0.0], [1.2, 1.2, -3.0, -2.0, 30, 30, 1.0]], jnp.float32)
    labels = jnp.asarray([1, 7], jnp.int32)
    crops = resample.crops_from_canvas(canvas, geometry, 32).astype(jnp.uint8)
    step = jax.jit(steps.make_train_step(config, model, tx))
    key = jax.random.key(0)
    _, on_device = step(state, {"image": canvas, "geometry": geometry, "label": labels}, key)
    _, given = step(state, {"image": crops, "label": labels}, key)
    assert np.isfinite(float(on_device["loss"]))
    np.testing.assert_allclose(on_device["loss"], given["loss"], rtol=1e-6)
    np.testing.assert_allclose(on_device["grad_norm"], given["grad_norm"], rtol=1e-5)


def test_canvas_config_checks():
    base = dict(crop_size=32, scale_min=32, scale_max=40, corrupt_images="skip")
    assert streams.resample_canvas(ml_collections.ConfigDict(base)) == 0  # host resampling: no canvas
    assert streams.resample_canvas(ml_collections.ConfigDict(base | {"resample_on_device": True})) == 64
    config = ml_collections.ConfigDict(base | {"resample_on_device": True, "resample_canvas": 16})
    with pytest.raises(ValueError, match="resample_canvas=16 is smaller than config.crop_size=32"):
        streams.check_train_config(config)


def test_training_stream_sends_windows_that_resample_to_the_host_streams_crops(tmp_path):
    """config.resample_on_device: the same examples, draws and order; the resampled canvases are the host
    stream's crops within ±1; canvases and geometry are all that the batch holds besides the labels."""
    from vgg_jax.data import sources
    from vgg_jax.preprocess import CAFFE_MEAN_RGB

    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            dataset="sklearn_digits",
            data_dir=str(tmp_path),
            train_split="train",
            eval_split="test",
            crop_size=16,
            scale_min=16,
            scale_max=24,
            eval_scale=18,
            random_flip=True,
            color_shift_std=0.1,
            mean_rgb=CAFFE_MEAN_RGB,
            shuffle_buffer=64,
            corrupt_images="skip",
            global_batch_size=32,
            eval_batch_size=32,
        )
    )
    assert sources.get_dataset_builder(config).is_prepared()
    host = next(streams.create_train_iterator(config, start_step=2, process_index=0, process_count=1))
    config.resample_on_device = True
    device = next(streams.create_train_iterator(config, start_step=2, process_index=0, process_count=1))
    assert set(device) == {"image", "geometry", "label"}
    assert device["image"].shape == (32, 32, 32, 3) and device["geometry"].shape == (32, 7)
    np.testing.assert_array_equal(device["label"], host["label"])
    crops = np.asarray(resample.crops_from_canvas(jnp.asarray(device["image"]), jnp.asarray(device["geometry"]), 16))
    assert np.abs(crops - host["image"].astype(np.float32)).max() <= 1.0
    assert 0 < device["geometry"][:, 6].sum() < 32  # some crops flipped, some not
