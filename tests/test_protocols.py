"""Paper §3.2 arithmetic shared by training, evaluation and the notebook API (vgg_jax/evaluation/arithmetic.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax.evaluation import arithmetic as protocols


def test_topk_correct_is_the_same_rule_in_jnp_numpy_and_bfloat16_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 6, (400, 8)).astype(np.float32)  # many ties at every place
    logits[::37, 3] = np.nan
    labels = rng.integers(0, 8, 400)
    for k in (1, 3, 5):
        on_host = protocols.topk_correct(logits, labels, k)
        assert isinstance(on_host, np.ndarray)
        jitted = jax.jit(protocols.topk_correct, static_argnums=2)
        np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(logits), jnp.asarray(labels), k)), on_host)
        np.testing.assert_array_equal(
            np.asarray(jitted(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), k)), on_host
        )
        errors = protocols.topk_errors(logits, labels, ks=(k,))[f"top{k}_error"]
        assert errors == pytest.approx(1.0 - on_host.mean())
    assert protocols.topk_correct(logits[::37], labels[::37], 8).sum() == 0  # non-finite rows are wrong


def test_float64_scores_are_not_rounded_to_float32():
    scores = np.array([[1.0, 1.0 + 1e-12]])  # equal in float32
    assert protocols.topk_errors(scores, np.array([1]), ks=(1,))["top1_error"] == 0.0


def test_center_crop_one_image_or_a_batch():
    batch = np.arange(2 * 6 * 9 * 3, dtype=np.int32).reshape(2, 6, 9, 3)
    crops = protocols.center_crop(batch, 4)
    np.testing.assert_array_equal(crops, batch[:, 1:5, 2:6])
    np.testing.assert_array_equal(protocols.center_crop(batch[0], 4), crops[0])
    np.testing.assert_array_equal(protocols.center_crop(jnp.asarray(batch), (2, 9)), batch[:, 2:4])
    with pytest.raises(ValueError, match="smaller than the crop size 7"):
        protocols.center_crop(batch, 7)


def test_check_scales_and_rescaled_size():
    protocols.check_scales([32, 40], 32)
    with pytest.raises(ValueError, match=r"Q=\[16\] are smaller than crop_size=32: testing needs Q >= crop_size=32"):
        protocols.check_scales([16, 32], 32)
    with pytest.raises(ValueError, match="at least one test scale"):
        protocols.check_scales([], 32)
    assert protocols.rescaled_size(30, 45, 32) == (32, 48)
    assert protocols.rescaled_size(45, 30, 32) == (48, 32)
    assert protocols.resize_smaller_side(np.zeros((1, 30, 45, 3), np.uint8), 32).shape == (1, 32, 48, 3)


def test_dense_flip_posterior_masks_cells_and_averages_posteriors():
    rng = np.random.default_rng(1)
    maps = jnp.asarray(rng.normal(0, 3, (4, 2, 3, 5)), jnp.float32)  # 2 images, then their flips
    cells = protocols.top_left_mask(jnp.array([2, 1]), jnp.array([3, 2]), (2, 3))
    posterior = np.asarray(protocols.dense_flip_posterior(maps, cells))
    scores = [np.asarray(maps[0]).mean((0, 1)), np.asarray(maps[1, :1, :2]).mean((0, 1))]
    flipped = [np.asarray(maps[2]).mean((0, 1)), np.asarray(maps[3, :1, :2]).mean((0, 1))]
    for i in range(2):
        expected = 0.5 * (protocols.softmax(scores[i]) + protocols.softmax(flipped[i]))
        np.testing.assert_allclose(posterior[i], expected, atol=1e-6)
    images = jnp.asarray(rng.integers(0, 256, (1, 2, 5, 3)), jnp.uint8)
    mirrored = protocols.with_flips(images, jnp.array([3]))[1]
    np.testing.assert_array_equal(mirrored[:, :3], images[0, :, 2::-1])  # mirrored inside its width 3
    np.testing.assert_array_equal(mirrored[:, 3:], images[0, :, 3:])  # the padding stays in place
