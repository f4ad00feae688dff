"""vgg_jax.perceptual: feature parity with implementations we did not write (torchvision, Keras) at every
named conv-stage activation, at non-square sizes other than 224; gradients against PyTorch's autograd;
Gram matrices, losses, presets, bfloat16, image sizes; and no TensorFlow import.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import convert, models, perceptual

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCHVISION_MEAN_RGB = tuple(255 * m for m in convert.TORCHVISION_MEAN)


def _conv_stage(variant):
    return tuple(name for name in models.feature_names(variant) if not name.startswith("fc"))


def _assert_close(ours, theirs, name, rtol=1e-4):
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    scale = max(float(np.abs(theirs).max()), 1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale, err_msg=name)


def _torchvision():
    torch = pytest.importorskip("torch")
    try:
        import torchvision
    except Exception as error:  # noqa: BLE001 (a torchvision built for another torch fails with RuntimeError)
        pytest.skip(f"torchvision not usable here: {error}")
    return torch, torchvision


def _random_torchvision_vgg(torch, torchvision, name, seed):
    """torchvision's own VGG with random weights, and non-zero biases (its init zeroes them, hiding bias bugs)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        for module in net.features:
            if isinstance(module, torch.nn.Conv2d):
                module.bias.normal_(0.0, 0.1)
    return net


def _torch_features(torch, net, x):
    """{our name: activation (NHWC)} walking torchvision's `features` (Conv2d, ReLU, …, MaxPool2d)."""
    out, block, index = {}, 1, 1
    for module in net.features:
        x = module(x)
        if isinstance(module, torch.nn.Conv2d):
            name = f"conv{block}_{index}"
        elif isinstance(module, torch.nn.ReLU):
            name, index = f"relu{block}_{index}", index + 1
        else:
            name, block, index = f"pool{block}", block + 1, 1
        out[name] = x.clone()  # torchvision's ReLUs are in place: keep the pre-activation as it was
    return out


def _torch_inputs(torch, images01):
    x = (images01 - np.asarray(convert.TORCHVISION_MEAN, np.float32)) / np.asarray(convert.TORCHVISION_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name,variant,size", [("vgg16", "D", (40, 72)), ("vgg19", "E", (96, 64))])
def test_features_match_torchvision_at_every_layer(name, variant, size):
    torch, torchvision = _torchvision()
    net = _random_torchvision_vgg(torch, torchvision, name, seed=0)
    params = convert.from_torchvision_state_dict(net.state_dict(), variant)
    ours_net = perceptual.VGGFeatures(variant=variant, layers=_conv_stage(variant), mean_rgb=TORCHVISION_MEAN_RGB)
    images = np.random.default_rng(0).random((2, *size, 3), dtype=np.float32)
    ours = jax.jit(ours_net.__call__)(perceptual.conv_params(params), images)
    with torch.no_grad():
        theirs = _torch_features(torch, net, _torch_inputs(torch, images))
    assert set(theirs) == set(ours)
    for layer in _conv_stage(variant):
        _assert_close(ours[layer], theirs[layer].numpy().transpose(0, 2, 3, 1), layer)


def test_loss_gradients_match_pytorch_autograd():
    """Style + perceptual loss of VGG-19 (Gatys' layers) and its gradient w.r.t. the image, both frameworks."""
    torch, torchvision = _torchvision()
    tv = _random_torchvision_vgg(torch, torchvision, "vgg19", seed=1)
    params = perceptual.conv_params(convert.from_torchvision_state_dict(tv.state_dict(), "E"))
    layers = perceptual.PRESETS["gatys_style"].layers
    net = perceptual.VGGFeatures(variant="E", layers=layers, mean_rgb=TORCHVISION_MEAN_RGB)
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 48, 40, 3), dtype=np.float32), rng.random((2, 48, 40, 3), dtype=np.float32)

    def ours(images):
        return perceptual.style_loss(net, params, images, y) + perceptual.perceptual_loss(net, params, images, y)

    value, grad = jax.jit(jax.value_and_grad(ours))(x)

    def gram(f):  # (N, C, H, W) → Σ φφᵀ / (C·H·W)
        n, c, h, w = f.shape
        flat = f.reshape(n, c, h * w)
        return flat @ flat.transpose(1, 2) / (c * h * w)

    tx = _torch_inputs(torch, x).requires_grad_(True)
    fx, fy = _torch_features(torch, tv, tx), _torch_features(torch, tv, _torch_inputs(torch, y))
    loss = sum(((gram(fx[k]) - gram(fy[k].detach())) ** 2).sum(dim=(1, 2)).mean() for k in layers)
    loss = loss + sum(((fx[k] - fy[k].detach()) ** 2).mean() for k in layers)
    loss.backward()
    # d/d(image in [0,1]) = d/d(normalised input) / std.
    theirs = tx.grad.numpy().transpose(0, 2, 3, 1) / np.asarray(convert.TORCHVISION_STD, np.float32)
    _assert_close(value, loss.item(), "loss", rtol=1e-4)
    _assert_close(grad, theirs, "gradient", rtol=2e-3)


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
    params = convert.from_keras_h5(path, variant)
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
    """A narrow random VGG-19 (width 1/8): fast, and its features behave like the full net's."""
    model = models.VGG(variant="E", width_multiplier=1 / 8, fc_width=8, num_classes=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    net = perceptual.VGGFeatures(variant="E", layers=perceptual.PRESETS["gatys_style"].layers, width_multiplier=1 / 8)
    return net, params


def test_any_size_the_layers_allow_and_clear_errors(narrow):
    net, params = narrow
    images = jnp.full((1, 128, 96, 3), 0.5)
    features = net(params, images, ["conv1_1", "relu2_2"])  # 128×96: not the crop size; only convs asked for
    assert features["conv1_1"].shape == (1, 128, 96, 8) and features["relu2_2"].shape == (1, 64, 48, 16)
    assert float(features["conv1_1"].min()) < 0 <= float(features["relu2_2"].min())  # pre- vs post-ReLU
    assert net.min_size() == 16 and net.min_size(["pool5"]) == 32
    assert net(params, jnp.zeros((1, 16, 17, 3)))["relu5_1"].shape == (1, 1, 1, 64)
    with pytest.raises(ValueError, match="relu5_1 needs images of at least 16x16"):
        net(params, jnp.zeros((1, 15, 64, 3)))
    with pytest.raises(ValueError, match="non-convolutional.*fc7"):
        net(params, images, ["fc7"])
    with pytest.raises(ValueError, match="unknown input range"):
        perceptual.VGGFeatures(input_range="0-1")
    with pytest.raises(ValueError, match="the crop head expects"):  # the classifier still checks its crop
        models.VGG(variant="E", width_multiplier=1 / 8, fc_width=8, num_classes=3).apply({"params": params}, images)


def test_input_ranges_are_the_same_images(narrow):
    net, params = narrow
    images = np.random.default_rng(3).random((1, 32, 32, 3), dtype=np.float32)
    reference = net(params, images)
    for input_range, scaled in (("[-1,1]", images * 2 - 1), ("0-255", images * 255)):
        other = perceptual.VGGFeatures(variant="E", layers=net.layers, width_multiplier=1 / 8, input_range=input_range)
        for layer, value in other(params, scaled).items():
            _assert_close(value, reference[layer], layer, rtol=1e-4)


def test_gram_and_losses(narrow):
    net, params = narrow
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
        for k, v in net(params, x).items()
    )
    _assert_close(loss, by_hand, "style loss by hand")
    assert float(perceptual.style_loss(net, params, x, x)) == 0.0
    mse = perceptual.perceptual_loss(net, params, x, y)
    _assert_close(perceptual.perceptual_loss(net, params, x, net(params, y)), mse, "target features")
    fx, fy = net(params, x), net(params, y)
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
    half = perceptual.VGGFeatures(variant="E", layers=net.layers, width_multiplier=1 / 8, dtype=jnp.bfloat16)
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
