"""inference.py: load a run, logits/predict (crop and dense multi-scale), features (App. B descriptor)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_jax
from vgg_jax import checkpoints, inference, models, protocols
from vgg_jax.configs import common


def _random_params(config, seed):
    """He-scaled random parameters of the run's network (NumPy: eager Flax init is slow), non-zero biases."""
    crop = config.crop_size
    shapes = jax.eval_shape(
        models.from_config(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32)
    )["params"]
    rng = np.random.default_rng(seed)
    return {
        layer: {
            "kernel": (
                rng.standard_normal(leaves["kernel"].shape) * np.sqrt(2 / np.prod(leaves["kernel"].shape[:-1]))
            ).astype(np.float32),
            "bias": rng.normal(0, 0.05, leaves["bias"].shape).astype(np.float32),
        }
        for layer, leaves in shapes.items()
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A narrow E training run (the demo config) with checkpoints at steps 10 (best) and 20 (latest)."""
    directory = str(tmp_path_factory.mktemp("run"))
    config = common.get_config("E", "demo")
    checkpoints.save_config(directory, config)
    manager = checkpoints.create_manager(directory, async_save=False)
    saved = {}
    for step, error in ((10, 0.2), (20, 0.3)):
        saved[step] = _random_params(config, step)
        checkpoints.save(
            manager,
            step,
            params=saved[step],
            train_state={"step": np.int32(step)},
            meta={"step": step, "top1_error": error},
            metrics={"top1_error": error},
        )
    manager.wait_until_finished()
    manager.close()
    return directory, saved


@pytest.fixture(scope="module")
def classifier(run_dir):
    return vgg_jax.load(run_dir[0])


_apply = jax.jit(
    lambda model, params, x, **kw: model.apply({"params": params}, x, **kw),
    static_argnums=0,
    static_argnames=("dense", "outputs"),
)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("step,expected", [(None, 20), ("latest", 20), ("best", 10), (10, 10), (20, 20)])
def test_load_restores_exactly_the_saved_params(run_dir, step, expected):
    directory, saved = run_dir
    classifier = inference.load(directory, step=step)
    assert classifier.step == expected
    assert classifier.config.model.variant == "E" and classifier.crop_size == 32
    jax.tree_util.tree_map(np.testing.assert_array_equal, classifier.params, saved[expected])
    assert set(classifier.params) == set(models.layer_names("E"))


def test_load_missing_step_is_a_clear_error(run_dir):
    with pytest.raises(FileNotFoundError, match="step 15 is not saved"):
        vgg_jax.load(run_dir[0], step=15)


def test_logits_match_the_model_on_mean_subtracted_input(classifier, run_dir):
    images = _images(3, 32)
    config = classifier.config
    mean = np.asarray(config.mean_rgb, np.float32)
    expected = _apply(models.from_config(config), run_dir[1][20], images.astype(np.float32) - mean)
    logits = classifier.logits(images)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_batches_are_chunked_without_changing_results(run_dir, classifier):
    images = _images(7, 32, seed=3)
    small = vgg_jax.load(run_dir[0])
    small.batch_size = 3  # 3 + 3 + 1 (padded)
    expected = classifier.logits(images)
    # Another batch size changes XLA's reduction order: float32 rounding, relative to the logits' scale.
    np.testing.assert_allclose(small.logits(images), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_predict_top_k(classifier):
    images = _images(4, 32, seed=1)
    prediction = classifier.predict(images, top_k=3)
    probabilities = np.asarray(jax.nn.softmax(classifier.logits(images)))
    assert prediction.class_ids.shape == prediction.probabilities.shape == (4, 3)
    np.testing.assert_array_equal(prediction.top1, probabilities.argmax(-1))
    np.testing.assert_allclose(prediction.probabilities, np.sort(probabilities, -1)[:, ::-1][:, :3], rtol=1e-6)
    if prediction.names is not None:
        assert prediction.names[0][0] == classifier.class_names[prediction.top1[0]]
    assert len(str(prediction).splitlines()) == 4
    assert classifier.predict(images, top_k=50).class_ids.shape == (4, 10)  # capped at the number of classes


def test_dense_prediction_at_crop_size_averages_image_and_flip(classifier):
    """At Q = crop the score map is 1×1: dense = mean of the crop head's posteriors of image and flip."""
    images = _images(2, 32, seed=2)
    dense = classifier.probabilities(images, dense=True, scales=32, flips="yes")  # the demo trained without flips
    crop = jax.nn.softmax(classifier.logits(images))
    flipped = jax.nn.softmax(classifier.logits(images[:, :, ::-1]))
    np.testing.assert_allclose(dense, 0.5 * (crop + flipped), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dense.sum(-1), 1.0, rtol=1e-5)


def test_dense_multi_scale_on_any_size(classifier, run_dir):
    images = np.random.default_rng(4).integers(0, 256, (2, 30, 45, 3), dtype=np.uint8)
    model = models.from_config(classifier.config)
    mean = np.asarray(classifier.config.mean_rgb, np.float32)

    def by_hand(q):
        resized = np.asarray(inference.resize_smaller_side(images, q))
        assert resized.shape[1:3] == (q, round(45 * q / 30))
        resized = protocols.centre_trim(resized)  # sides cut to multiples of 32, evenly (evaluate's default)
        posteriors = []
        for x in (resized, resized[:, :, ::-1]):
            scores = _apply(model, run_dir[1][20], x.astype(np.float32) - mean, dense=True)
            posteriors.append(jax.nn.softmax(scores.mean(axis=(1, 2))))
        return 0.5 * (posteriors[0] + posteriors[1])

    expected = (by_hand(32) + by_hand(40) + by_hand(48)) / 3
    probabilities = classifier.probabilities(images, dense=True, scales=(32, 40, 48), flips="yes")
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    prediction = classifier.predict(images, dense=True, scales=(32, 40, 48), flips="yes")
    np.testing.assert_array_equal(prediction.top1, expected.argmax(-1))
    default = classifier.predict(images, dense=True, flips="yes")  # Q = config.eval_scale (36)
    np.testing.assert_allclose(default.probabilities[:, 0], by_hand(36).max(-1), atol=1e-6)


def test_features_shapes(classifier):
    images = _images(2, 32)
    widths = classifier.model.conv_widths()  # the demo's narrow E
    fc = classifier.model.fc_width
    expected = {
        "conv1_1": (2, 32, 32, widths[0]),
        "relu2_2": (2, 16, 16, widths[1]),
        "pool3": (2, 4, 4, widths[2]),
        "conv4_4": (2, 4, 4, widths[3]),
        "pool5": (2, 1, 1, widths[4]),
        "fc6": (2, fc),
        "fc7": (2, fc),
        "fc8": (2, 10),
    }
    features = classifier.features(images, layer=list(expected))  # one forward pass for all
    assert {name: value.shape for name, value in features.items()} == expected
    # Same weights, different batch shapes: oneDNN's blocking may reorder float sums (≈1e-5).
    np.testing.assert_allclose(features["fc8"], classifier.logits(images), rtol=1e-4, atol=1e-4)
    assert (features["fc7"] >= 0).all() and (features["conv1_1"] < 0).any()  # fc7 after ReLU, conv before
    np.testing.assert_allclose(classifier.features(images, layer="fc7"), features["fc7"], rtol=1e-4, atol=1e-4)
    dense = classifier.features(images, layer=["pool4", "fc7"], dense=True, scales=(32, 40))
    assert dense["pool4"].shape == (2, widths[3]) and dense["fc7"].shape == (2, fc)


def test_app_b_descriptor_is_unit_norm_and_flip_invariant(classifier, run_dir):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 40, 52, 3), dtype=np.uint8)
    descriptor = classifier.features(images, layer="fc7", dense=True, flips="yes", scales=(32, 40))
    assert descriptor.shape == (3, classifier.model.fc_width)
    np.testing.assert_allclose(np.linalg.norm(descriptor, axis=-1), 1.0, rtol=1e-5)
    # Flip invariance: exact up to float order where no resize happens (Q = 40 = the smaller side) …
    native = classifier.features(images, dense=True, flips="yes", scales=40)
    mirrored = classifier.features(images[:, :, ::-1], dense=True, flips="yes", scales=40)
    np.testing.assert_allclose(mirrored, native, atol=1e-6)
    # … and up to uint8 rounding of the antialiased resize (a pixel may round the other way) otherwise.
    flipped = classifier.features(images[:, :, ::-1], layer="fc7", dense=True, flips="yes", scales=(32, 40))
    np.testing.assert_allclose(flipped, descriptor, atol=1e-4)

    # A horizontally symmetric image: the flip adds nothing, so the descriptor is the
    # normalised global average of the image's own dense fc7 map (computed by hand).
    half = rng.integers(0, 256, (1, 36, 18, 3), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    model = models.from_config(classifier.config)
    mean = np.asarray(classifier.config.mean_rgb, np.float32)
    trimmed = protocols.centre_trim(symmetric)  # 36 → 32: 2 px off each side, still symmetric
    fc7 = _apply(model, run_dir[1][20], trimmed - mean, dense=True, outputs=("fc7",))["fc7"]
    pooled = np.asarray(fc7.mean(axis=(1, 2)))
    expected = pooled / np.linalg.norm(pooled)
    np.testing.assert_allclose(classifier.features(symmetric, dense=True, flips="yes", scales=36), expected, atol=1e-6)

    # Scales (App. B): the raw per-scale descriptors are averaged (or stacked), then L2-normalised once;
    # normalize_scales=True normalises each scale first (the former default, not the paper's).
    per_scale = [classifier.features(images, dense=True, flips="yes", scales=32), native]
    combined = per_scale[0] + per_scale[1]
    renormalised = classifier.features(images, dense=True, flips="yes", scales=(32, 40), normalize_scales=True)
    np.testing.assert_allclose(renormalised, combined / np.linalg.norm(combined, axis=-1, keepdims=True), atol=1e-6)
    raw = [classifier.features(images, dense=True, flips="yes", scales=q, normalize=False) for q in (32, 40)]
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw[0], axis=-1, keepdims=True), per_scale[0], atol=1e-6)
    mean = raw[0] + raw[1]
    np.testing.assert_allclose(descriptor, mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-6)
    stacked = classifier.features(images, dense=True, flips="yes", scales=(32, 40), combine="stack")
    both = np.concatenate(raw, axis=-1)
    np.testing.assert_allclose(stacked, both / np.linalg.norm(both, axis=-1, keepdims=True), atol=1e-6)


def test_prepare_rescales_and_centre_crops(classifier):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[:, 2:6, 2:6] = 255
    crops = classifier.prepare(images)  # 8 → eval_scale 36 → centre 32
    assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.uint8
    assert crops[0, 16, 16, 0] == 255 and crops[0, 0, 0, 0] == 0
    assert classifier.predict(crops).class_ids.shape == (2, 5)


def test_clear_errors(classifier):
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['fc9'\].*valid layers: \['conv1_1', 'relu1_1'"):
        classifier.features(_images(1, 32), layer="fc9")
    with pytest.raises(TypeError, match=r"uint8 .*\(N, 32, 32, 3\), got dtype float32"):
        classifier.logits(_images(1, 32).astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 3\).*got shape \(1, 48, 48, 3\).*dense=True"):
        classifier.logits(_images(1, 48))
    with pytest.raises(ValueError, match=r"got shape \(32, 32, 3\) \(add a batch axis"):
        classifier.predict(_images(1, 32)[0])
    with pytest.raises(ValueError, match="Q >= crop_size=32"):
        classifier.predict(_images(1, 40), dense=True, scales=(24, 32))
    with pytest.raises(FileNotFoundError, match="not a vgg_jax run directory"):
        vgg_jax.load("/nonexistent/run")


def test_odd_images_are_refused_with_the_way_out(classifier):
    grey, rgba = _images(2, 32)[..., :1], np.concatenate([_images(2, 32), _images(2, 32)[..., :1]], axis=-1)
    for odd in (grey, rgba):
        with pytest.raises(ValueError, match=r"got shape \(2, 32, 32, [14]\) \(grey: np.repeat\(x, 3, -1\); RGBA"):
            classifier.predict(odd)
    ragged = [_images(1, 40)[0], _images(1, 48)[0]]
    with pytest.raises(ValueError, match=r"list of 2 images of 2 different shapes \(\(40, 40, 3\), \(48, 48, 3\)\)"):
        classifier.predict(ragged, dense=True)
    same_size = [_images(1, 40)[0], _images(1, 40)[0]]
    assert classifier.predict(same_size, dense=True).class_ids.shape[0] == 2  # a list of one size is a batch
