"""vgg_jax.perceptual: feature parity with implementations we did not write (torchvision, Keras) at every
named conv-stage activation, at non-square sizes other than 224; gradients against PyTorch's autograd;
Gram matrices, losses, presets, bfloat16, image sizes; and no TensorFlow import.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_vgg

from vgg_jax import models, perceptual
from vgg_jax.weights import formats as weight_formats

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCHVISION_MEAN_RGB = tuple(255 * m for m in weight_formats.TORCHVISION_MEAN)


def _conv_stage(variant):
    return tuple(name for name in models.feature_names(variant) if not name.startswith("fc"))


def _assert_close(ours, theirs, name, rtol=1e-4):
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    scale = max(float(np.abs(theirs).max()), 1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale, err_msg=name)


def _torchvision_side(variant, seed, layers=(), **images):
    """torchvision's VGG layout in plain PyTorch: its state dict, features (NHWC), and loss/gradient if y is given."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    net = torch_vgg.torchvision_vgg(torch, variant, fc_width=8, num_classes=3)  # the features are under test
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    x = torch_vgg.normalise(torch, images["x"], scale=1.0).requires_grad_(True)
    fx = torch_vgg.named_features(torch, net, x)
    result = {"features": {k: torch_vgg.to_nhwc(v) for k, v in fx.items()}}
    if "y" in images:
        with torch.no_grad():
            fy = torch_vgg.named_features(torch, net, torch_vgg.normalise(torch, images["y"], scale=1.0))
        gram = torch_vgg.gram
        style = sum(((gram(fx[k]) - gram(fy[k])) ** 2).sum(dim=(1, 2)).mean() for k in layers)
        loss = style + sum(((fx[k] - fy[k]) ** 2).mean() for k in layers)
        loss.backward()
        std = np.asarray(torch_vgg.TORCHVISION_STD, np.float32)
        result["loss"] = loss.detach().numpy()
        result["grad"] = x.grad.numpy().transpose(0, 2, 3, 1) / std  # d/d(image in [0, 1])
    return state, result


@pytest.mark.parametrize("name,variant,size", [("vgg16", "D", (40, 72)), ("vgg19", "E", (96, 64))])
def test_features_match_torchvision_at_every_layer(tmp_path, name, variant, size):
    images = np.random.default_rng(0).random((2, *size, 3), dtype=np.float32)
    state, theirs = _torchvision_side(variant, 0, x=images)
    theirs = theirs["features"]
    params = perceptual.conv_params(weight_formats.from_torchvision_state_dict(state, variant))
    ours_net = perceptual.VGGFeatures(variant=variant, layers=_conv_stage(variant), mean_rgb=TORCHVISION_MEAN_RGB)
    ours = jax.jit(ours_net.__call__)(params, images)
    assert set(theirs) == set(ours)
    for layer in _conv_stage(variant):
        _assert_close(ours[layer], theirs[layer], layer)


@pytest.mark.slow  # full-width VGG-19 both ways; the fast tier checks every layer's features against PyTorch
def test_loss_gradients_match_pytorch_autograd(tmp_path):
    """Style + perceptual loss of VGG-19 (Gatys' layers) and its gradient w.r.t. the image, both frameworks."""
    layers = perceptual.PRESETS["gatys_style"].layers
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 48, 40, 3), dtype=np.float32), rng.random((2, 48, 40, 3), dtype=np.float32)
    state, theirs = _torchvision_side("E", 1, layers, x=x, y=y)
    params = perceptual.conv_params(weight_formats.from_torchvision_state_dict(state, "E"))
    net = perceptual.VGGFeatures(variant="E", layers=layers, mean_rgb=TORCHVISION_MEAN_RGB)

    def ours(images):
        return perceptual.style_loss(net, params, images, y) + perceptual.perceptual_loss(net, params, images, y)

    value, grad = jax.jit(jax.value_and_grad(ours))(x)
    _assert_close(value, theirs["loss"], "loss", rtol=1e-4)
    _assert_close(grad, theirs["grad"], "gradient", rtol=2e-3)


@pytest.mark.parametrize("application,variant", [("VGG16", "D"), ("VGG19", "E")])
def test_features_match_keras_notop_at_every_layer(tmp_path, application, variant):
    """Keras' VGG (TensorFlow's convolutions, BGR Caffe input) from a notop weight file, at 48×80."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    keras = pytest.importorskip("keras")
    model = getattr(keras.applications, application)(weights=None, include_top=False, input_shape=(None, None, 3))
    rng = np.random.default_rng(2)
    model.set_weights(
        [
            rng.standard_normal(w.shape).astype(np.float32)
            * (np.sqrt(2 / np.prod(w.shape[:-1])) if w.ndim > 1 else 0.1)
            for w in model.get_weights()
        ]
    )
    path = tmp_path / "notop.weights.h5"
    model.save_weights(path)
    params = weight_formats.from_keras_h5(path, variant)
    assert "fc6" not in params
    names = [layer.name for layer in model.layers if "conv" in layer.name or "pool" in layer.name]
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in names])
    images = rng.integers(0, 256, (2, 48, 80, 3)).astype(np.float32)
    module = getattr(keras.applications, application.lower())
    theirs = dict(zip(names, (np.asarray(t) for t in probe([module.preprocess_input(images.copy())])), strict=True))
    ours = perceptual.VGGFeatures(variant=variant, layers=_conv_stage(variant), input_range="0-255")(params, images)
    for name in names:  # Keras' convs include their ReLU: block{b}_conv{i} is our relu{b}_{i}
        block, rest = name[len("block") :].split("_")
        ours_name = f"pool{block}" if rest == "pool" else f"relu{block}_{rest[len('conv') :]}"
        _assert_close(ours[ours_name], theirs[name], f"{name} / {ours_name}")


@pytest.fixture(scope="module")
def narrow():
    """A narrow random VGG-11 (config A, width 1/8) with Gatys' layers: fast; the loss code is the same for all."""
    layers = perceptual.PRESETS["gatys_style"].layers
    model = models.VGG(variant="A", width_multiplier=1 / 8)
    init = jax.jit(model.init, static_argnames="outputs")  # conv1_1 … conv5_1 only: what the features use
    params = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), outputs=layers)
    net = perceptual.VGGFeatures(variant="A", layers=layers, width_multiplier=1 / 8)
    return net, params["params"]


def test_any_size_the_layers_allow_and_clear_errors(narrow):
    net, params = narrow
    images = jnp.full((1, 128, 96, 3), 0.5)
    features = net(params, images, ["conv1_1", "relu2_1"])  # 128×96: not the crop size; only convs asked for
    assert features["conv1_1"].shape == (1, 128, 96, 8) and features["relu2_1"].shape == (1, 64, 48, 16)
    assert float(features["conv1_1"].min()) < 0 <= float(features["relu2_1"].min())  # pre- vs post-ReLU
    assert net.min_size() == 16 and net.min_size(["pool5"]) == 32
    assert net(params, jnp.zeros((1, 16, 17, 3)))["relu5_1"].shape == (1, 1, 1, 64)
    with pytest.raises(ValueError, match="relu5_1 needs images of at least 16x16"):
        net(params, jnp.zeros((1, 15, 64, 3)))
    with pytest.raises(ValueError, match="non-convolutional.*fc7"):
        net(params, images, ["fc7"])
    with pytest.raises(ValueError, match="unknown input range"):
        perceptual.VGGFeatures(input_range="0-1")
    with pytest.raises(ValueError, match="the crop head expects"):  # the classifier still checks its crop
        models.VGG(variant="A", width_multiplier=1 / 8).apply({"params": params}, images)


def test_input_ranges_are_the_same_images(narrow):
    net, params = narrow
    images = np.random.default_rng(3).random((1, 32, 32, 3), dtype=np.float32)
    reference = net(params, images)
    for input_range, scaled in (("[-1,1]", images * 2 - 1), ("0-255", images * 255)):
        other = dataclasses.replace(net, input_range=input_range)
        for layer, value in other(params, scaled).items():
            _assert_close(value, reference[layer], layer, rtol=1e-4)


def test_gram_and_losses(narrow):
    net, params = narrow
    features_of = jax.jit(net.__call__)  # the losses run as called; the references need not compile op by op
    rng = np.random.default_rng(4)
    features = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    flat = features.reshape(2, 15, 4)
    np.testing.assert_allclose(perceptual.gram_matrix(features), flat.transpose(0, 2, 1) @ flat / 60, rtol=1e-5)
    x, y = rng.random((2, 32, 48, 3), dtype=np.float32), rng.random((2, 32, 48, 3), dtype=np.float32)
    style = rng.random((1, 40, 40, 3), dtype=np.float32)  # one style image of another size, for every image
    loss = perceptual.style_loss(net, params, x, style)
    grams = perceptual.gram_matrices(net, params, style)
    _assert_close(perceptual.style_loss(net, params, x, grams), loss, "precomputed Gram matrices")
    by_hand = sum(
        np.mean(np.sum((np.asarray(perceptual.gram_matrix(v)) - np.asarray(grams[k])) ** 2, axis=(1, 2)))
        for k, v in features_of(params, x).items()
    )
    _assert_close(loss, by_hand, "style loss by hand")
    assert float(perceptual.style_loss(net, params, x, x)) == 0.0
    mse = perceptual.perceptual_loss(net, params, x, y)
    fx, fy = features_of(params, x), features_of(params, y)
    _assert_close(perceptual.perceptual_loss(net, params, x, fy), mse, "target features")
    _assert_close(mse, sum(np.mean((np.asarray(fx[k]) - np.asarray(fy[k])) ** 2) for k in fx), "mse by hand")
    l1 = perceptual.perceptual_loss(net, params, x, y, distance="l1", weights=[1, 0, 0, 0, 2], layers=net.layers)
    l1_by_hand = np.mean(np.abs(fx["relu1_1"] - fy["relu1_1"])) + 2 * np.mean(np.abs(fx["relu5_1"] - fy["relu5_1"]))
    _assert_close(l1, l1_by_hand, "l1")


def test_jit_grad_and_bfloat16(narrow):
    net, params = narrow
    rng = np.random.default_rng(5)
    x, y = rng.random((2, 48, 48, 3), dtype=np.float32), rng.random((2, 48, 48, 3), dtype=np.float32)
    loss = jax.jit(jax.value_and_grad(perceptual.style_loss, argnums=2), static_argnums=0)
    value, grad = loss(net, params, x, y)
    assert grad.shape == x.shape and grad.dtype == jnp.float32 and np.all(np.isfinite(grad)) and np.any(grad != 0)
    # A finite difference along the gradient agrees (the loss is differentiable where ReLUs do not switch).
    step = 1e-3 * grad / jnp.linalg.norm(grad)
    slope = (loss(net, params, x + step, y)[0] - loss(net, params, x - step, y)[0]) / (2 * 1e-3)
    _assert_close(slope, jnp.linalg.norm(grad), "directional derivative", rtol=2e-2)
    half = dataclasses.replace(net, dtype=jnp.bfloat16)
    assert half(params, x)["relu3_1"].dtype == jnp.bfloat16
    value16, grad16 = loss(half, params, x, y)
    assert value16.dtype == jnp.float32 and grad16.dtype == jnp.float32
    assert abs(float(value16) - float(value)) < 0.05 * float(value)
    cosine = float(jnp.vdot(grad, grad16) / (jnp.linalg.norm(grad) * jnp.linalg.norm(grad16)))
    assert cosine > 0.95, cosine


def test_presets():
    for preset in perceptual.PRESETS.values():
        assert set(preset.layers) <= set(models.feature_names(preset.variant))
    assert perceptual.PRESETS["lpips"].layers == ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
    assert perceptual.PRESETS["gatys_style"].variant == "E"
    with pytest.raises(ValueError, match="unknown preset"):
        perceptual.pretrained("vgg")


_NO_TF = """
import sys
import jax, numpy as np
import vgg_jax
from vgg_jax import perceptual
net, params = perceptual.pretrained("johnson_content", url=sys.argv[1], sha256=sys.argv[2], cache_dir=sys.argv[3])
x = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
grad = jax.grad(perceptual.perceptual_loss, argnums=2)(net, params, x, x[:, ::-1])
assert grad.shape == x.shape
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "torch"))
print("LOADED", loaded)
"""


def test_no_tensorflow_or_torch_import(tmp_path):
    """Weights from a Keras notop file to a gradient, in a fresh process: no TensorFlow, Keras or torch."""
    import weight_files

    path = weight_files.write_keras_h5(tmp_path / "notop.h5", weight_files.random_params("D", head=False))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    args = [str(path), weight_files.digest(path), str(tmp_path / "cache")]
    result = subprocess.run([sys.executable, "-c", _NO_TF, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout


@pytest.mark.slow  # a benchmark's own run
def test_perceptual_benchmark_tiny_runs(tmp_path):
    """bench/perceptual.py is code too: its smoke mode runs (with PyTorch where installed) and reports."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(REPO / "bench" / "perceptual.py"), "--tiny", f"--json={out}"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["ours_s"] > 0 and "load average" in run.stdout
    if "torch_s" in result:  # the same loss in both frameworks
        assert result["ratio_ours_over_torch"] > 0
        np.testing.assert_allclose(result["ours_loss"], result["torch_loss"], rtol=1e-4)


def _full_width_d(seed):
    model = models.VGG(variant="D")
    init = jax.jit(model.init, static_argnames="outputs")
    return init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)), outputs=("relu5_3",))["params"]


def test_lpips_weights_are_the_lpips_packages():
    """The shipped lin weights are the lpips package's v0.1 VGG file (sums and first values recorded from it)."""
    names, weights = perceptual.lpips_weights()
    assert names == torch_vgg.LPIPS_LAYERS
    for weight, (total, first) in zip(weights, torch_vgg.LPIPS_V01_VGG_WEIGHTS, strict=True):
        recorded = [float(np.sum(weight, dtype=np.float64)), float(weight[0])]
        np.testing.assert_allclose(recorded, [total, first], rtol=1e-6)


def test_lpips_matches_the_lpips_formula_in_pytorch():
    """LPIPS v0.1 (VGG) against the lpips package's formula in PyTorch, on a torchvision-layout VGG-16."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(6)
    trunk = torch_vgg.torchvision_vgg(torch, "D", fc_width=2, num_classes=3)
    state = {k: v.numpy() for k, v in trunk.state_dict().items()}
    rng = np.random.default_rng(6)
    x, y = (rng.uniform(-1, 1, (2, 40, 56, 3)).astype(np.float32) for _ in range(2))
    _, weights = perceptual.lpips_weights()
    theirs = torch_vgg.lpips_distance(torch, trunk, [np.asarray(w) for w in weights], x, y)
    params = perceptual.conv_params(weight_formats.from_torchvision_state_dict(state, "D"))
    net = perceptual.VGGFeatures(
        variant="D", layers=perceptual.PRESETS["lpips"].layers, mean_rgb=TORCHVISION_MEAN_RGB, input_range="[-1,1]"
    )
    _assert_close(jax.jit(perceptual.lpips, static_argnums=0)(net, params, x, y), theirs, "lpips", rtol=1e-4)


def test_lpips_properties_and_checks():
    params = _full_width_d(7)
    layers = perceptual.PRESETS["lpips"].layers
    net = perceptual.VGGFeatures(variant="D", layers=layers, mean_rgb=TORCHVISION_MEAN_RGB)
    rng = np.random.default_rng(7)
    x, y = rng.random((2, 32, 32, 3), dtype=np.float32), rng.random((2, 32, 32, 3), dtype=np.float32)
    distance = jax.jit(perceptual.lpips, static_argnums=0)
    d = distance(net, params, x, y)
    assert d.shape == (2,) and np.all(np.asarray(d) > 0)
    _assert_close(distance(net, params, y, x), d, "symmetric")
    assert float(np.abs(distance(net, params, x, x)).max()) < 1e-6 * float(d.min())
    names, weights = perceptual.lpips_weights()
    assert names == layers and [w.shape[0] for w in weights] == [64, 128, 256, 512, 512]
    assert all(float(w.min()) >= 0 for w in weights)  # LPIPS clamps its lin weights to be non-negative
    # By hand: unit-normalise channels, weighted squared difference, mean over positions, sum over layers.
    features_of = jax.jit(net.__call__)
    fx, fy = features_of(params, x), features_of(params, y)
    by_hand = 0
    for layer, weight in zip(names, weights, strict=True):
        a = np.asarray(fx[layer]) / (np.linalg.norm(np.asarray(fx[layer]), axis=-1, keepdims=True) + 1e-10)
        b = np.asarray(fy[layer]) / (np.linalg.norm(np.asarray(fy[layer]), axis=-1, keepdims=True) + 1e-10)
        by_hand = by_hand + ((a - b) ** 2 @ np.asarray(weight)).mean(axis=(1, 2))
    _assert_close(d, by_hand, "by hand")
    with pytest.raises(ValueError, match="torchvision's VGG-16"):
        perceptual.lpips(dataclasses.replace(net, mean_rgb=(123.68, 116.779, 103.939)), params, x, y)
