"""Perceptual losses as people use them: average pools (Gatys et al.), per-image losses (`reduction`), the LPIPS
distance map (`spatial=True`), each against its formula (and PyTorch's bilinear upsampling where installed).
"""

import dataclasses

import jax
import numpy as np
import pytest
from test_perceptual import TORCHVISION_MEAN_RGB, _assert_close, _full_width_d

from vgg_jax import models, perceptual


@pytest.fixture(scope="module")
def narrow():
    """A narrow random VGG-11 with Gatys' layers (the loss code is the same for every net)."""
    net = perceptual.VGGFeatures(variant="A", layers=perceptual.PRESETS["gatys_style"].layers, width_multiplier=1 / 8)
    init = jax.jit(models.VGG(variant="A", width_multiplier=1 / 8).init, static_argnames="outputs")
    return net, init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), outputs=net.layers)["params"]


# Compiled whole, once per net, shape and option: op by op, each of a VGG's ops compiles for every new shape.
_features = jax.jit(lambda net, params, images, layers: net(params, images, layers), static_argnums=(0, 3))
_jitted_losses = {
    loss: jax.jit(loss, static_argnums=0, static_argnames="reduction")
    for loss in (perceptual.perceptual_loss, perceptual.style_loss)
}


def _pool_2x2(x, how):
    n, h, w, c = x.shape
    blocks = np.asarray(x)[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    return blocks.mean(axis=(2, 4)) if how == "avg" else blocks.max(axis=(2, 4))


def test_average_pooling_replaces_every_max_pool(narrow):
    net, params = narrow
    images = np.random.default_rng(0).random((2, 36, 44, 3), dtype=np.float32)
    layers = ("relu1_1", "pool1", "relu2_1", "pool2", "relu5_1")
    averaged = dataclasses.replace(net, pooling="avg")
    ours, theirs = _features(averaged, params, images, layers), _features(net, params, images, layers)
    for block in (1, 2):  # each pool is the 2×2/2 mean of the block's last activation (floor: odd edges dropped)
        _assert_close(ours[f"pool{block}"], _pool_2x2(ours[f"relu{block}_1"], "avg"), f"avg pool{block}")
        _assert_close(theirs[f"pool{block}"], _pool_2x2(theirs[f"relu{block}_1"], "max"), f"max pool{block}")
    np.testing.assert_array_equal(ours["relu1_1"], theirs["relu1_1"])  # the convolutions are the same
    assert not np.allclose(ours["relu5_1"], theirs["relu5_1"])
    grad = jax.jit(jax.grad(lambda x: perceptual.style_loss(averaged, params, x, images[:1])))(images)
    assert grad.shape == images.shape and np.all(np.isfinite(grad)) and np.any(grad != 0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        dataclasses.replace(net, pooling="min")


def test_per_image_losses(narrow):
    net, params = narrow
    rng = np.random.default_rng(1)
    x, y = rng.random((3, 32, 40, 3), dtype=np.float32), rng.random((3, 32, 40, 3), dtype=np.float32)
    style = rng.random((1, 48, 48, 3), dtype=np.float32)
    for function, target in ((perceptual.perceptual_loss, y), (perceptual.style_loss, style)):
        loss = _jitted_losses[function]
        each = loss(net, params, x, target, reduction="none")
        assert each.shape == (3,)
        alone = [
            float(loss(net, params, x[i : i + 1], target if target is style else target[i : i + 1])) for i in range(3)
        ]
        name = function.__name__
        _assert_close(each, np.asarray(alone), f"{name} per image", rtol=1e-5)
        _assert_close(loss(net, params, x, target), np.mean(alone), f"{name} mean", rtol=1e-5)
        _assert_close(loss(net, params, x, target, reduction="sum"), np.sum(alone), f"{name} sum", rtol=1e-5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        perceptual.perceptual_loss(net, params, x, y, reduction="batchmean")


def _bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode='bilinear', align_corners=False), as its documentation defines it:
    source coordinate (i + 0.5)·in/out − 0.5, clamped at 0, linear between the two nearest pixels."""

    def axis(out: int, size: int):
        source = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(int), size - 1)
        return low, np.minimum(low + 1, size - 1), source - low

    (top, bottom, fy), (left, right, fx) = axis(height, maps.shape[1]), axis(width, maps.shape[2])
    rows = maps[:, top] * (1 - fy)[None, :, None] + maps[:, bottom] * fy[None, :, None]
    return rows[:, :, left] * (1 - fx) + rows[:, :, right] * fx


def test_lpips_spatial_map():
    params = _full_width_d(8)
    net = perceptual.VGGFeatures(variant="D", layers=perceptual.PRESETS["lpips"].layers, mean_rgb=TORCHVISION_MEAN_RGB)
    rng = np.random.default_rng(2)
    x, y = rng.random((2, 36, 44, 3), dtype=np.float32), rng.random((2, 36, 44, 3), dtype=np.float32)
    spatial = jax.jit(perceptual.lpips, static_argnums=0, static_argnames="spatial")(net, params, x, y, spatial=True)
    assert spatial.shape == (2, 36, 44)
    names, weights = perceptual.lpips_weights()
    fx, fy = _features(net, params, x, None), _features(net, params, y, None)
    maps = []
    for layer, weight in zip(names, weights, strict=True):
        a = np.asarray(fx[layer]) / (np.linalg.norm(np.asarray(fx[layer]), axis=-1, keepdims=True) + 1e-10)
        b = np.asarray(fy[layer]) / (np.linalg.norm(np.asarray(fy[layer]), axis=-1, keepdims=True) + 1e-10)
        maps.append((a - b) ** 2 @ np.asarray(weight))  # (N, h, w): 36×44, 18×22, 9×11, 4×5, 2×2
    _assert_close(spatial, sum(_bilinear(m, 36, 44) for m in maps), "spatial map by formula", rtol=1e-5)
    distance = jax.jit(perceptual.lpips, static_argnums=0)(net, params, x, y)
    _assert_close(distance, sum(m.mean(axis=(1, 2)) for m in maps), "distance", rtol=1e-5)
    try:
        import torch
    except ImportError:
        return
    upsampled = [
        torch.nn.functional.interpolate(
            torch.from_numpy(m[:, None]), size=(36, 44), mode="bilinear", align_corners=False
        )
        for m in maps
    ]
    _assert_close(spatial, sum(u[:, 0].numpy() for u in upsampled), "spatial map vs torch", rtol=1e-5)
