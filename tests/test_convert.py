"""convert.py: published Keras / torchvision weights → run directory, with logits parity."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # fast model building; an independent conv implementation

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch_vgg  # noqa: E402

import vgg_jax  # noqa: E402
from vgg_jax import convert, models, perceptual, preprocess, weight_formats  # noqa: E402
from vgg_jax.convert import ConversionError  # noqa: E402

KERAS_SIZE = 64  # full widths, small images: a 2×2×512 map before fc1 still checks the flatten order


def _randomise(weights, rng):
    """He-scaled kernels and non-zero biases (Keras initialises biases to zero, which would hide a bias mix-up)."""
    out = []
    for w in weights:
        scale = np.sqrt(2.0 / np.prod(w.shape[:-1])) if w.ndim > 1 else 0.1
        out.append((rng.standard_normal(w.shape, dtype=np.float32) * scale).astype(np.float32))
    return out


def _published_layout(model, path):
    """The layout of the published `vgg16_weights_tf_dim_ordering_tf_kernels.h5` (layer groups at the root)."""
    with h5py.File(path, "w") as f:
        names = []
        for layer in model.layers:
            names.append(layer.name.encode())
            group = f.create_group(layer.name)
            weight_names = []
            for suffix, value in zip(("W", "b"), layer.get_weights(), strict=False):
                weight_names.append(f"{layer.name}_{suffix}_1:0".encode())
                group.create_dataset(weight_names[-1].decode(), data=value)
            group.attrs["weight_names"] = weight_names
        f.attrs["layer_names"] = names


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    """Keras VGG16 / VGG19 (random weights, logits, 10 classes), their weight files and reference logits."""
    keras = pytest.importorskip("keras")
    root = tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, KERAS_SIZE, KERAS_SIZE, 3), dtype=np.uint8)
    files, logits = {}, {}
    for name, builder, module in (
        ("VGG16", keras.applications.VGG16, keras.applications.vgg16),
        ("VGG19", keras.applications.VGG19, keras.applications.vgg19),
    ):
        model = builder(weights=None, classifier_activation=None, input_shape=(KERAS_SIZE, KERAS_SIZE, 3), classes=10)
        model.set_weights(_randomise(model.get_weights(), rng))
        logits[name] = np.asarray(model(module.preprocess_input(images.astype(np.float32))))
        files[name, "keras3"] = root / f"{name}.weights.h5"
        model.save_weights(files[name, "keras3"])
        if name == "VGG16":
            files[name, "legacy_model"] = root / f"{name}.h5"
            model.save(files[name, "legacy_model"])  # Keras 3's legacy HDF5 format: groups under model_weights
            files[name, "published"] = root / f"{name}_published.h5"
            _published_layout(model, files[name, "published"])
        del model
    return dict(files=files, logits=logits, images=images)


def _assert_logits_close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize(
    "name,variant,layout",
    [("VGG16", "D", "keras3"), ("VGG16", "D", "legacy_model"), ("VGG16", "D", "published"), ("VGG19", "E", "keras3")],
)
def test_keras_parity(keras_files, tmp_path, name, variant, layout):
    out = tmp_path / "run"
    config = convert.convert("keras", keras_files["files"][name, layout], variant, out)
    assert config.model.variant == variant and config.model.num_classes == 10
    assert config.crop_size == KERAS_SIZE and config.model.width_multiplier == 1.0 and config.model.fc_width == 4096
    assert tuple(config.mean_rgb) == preprocess.CAFFE_MEAN_RGB
    assert config.preprocessing.source == "keras" and "BGR" in config.preprocessing.original
    classifier = vgg_jax.load(str(out))
    assert classifier.step == 0 and classifier.class_names is None
    ours = classifier.logits(keras_files["images"])
    assert ours.dtype == np.float32 and ours.shape == (2, 10)
    _assert_logits_close(ours, keras_files["logits"][name])


def test_keras_without_absorbing_preprocessing_differs(keras_files):
    """The BGR flip is what makes parity hold (the parity test can fail)."""
    path = keras_files["files"]["VGG16", "keras3"]
    absorbed = weight_formats.from_keras_h5(path, "D")
    raw = weight_formats.from_keras_h5(path, "D", absorb_preprocessing=False)
    np.testing.assert_array_equal(absorbed["conv1_1"]["kernel"], raw["conv1_1"]["kernel"][:, :, ::-1])
    np.testing.assert_array_equal(absorbed["fc6"]["kernel"], raw["fc6"]["kernel"])
    assert not np.allclose(absorbed["conv1_1"]["kernel"], raw["conv1_1"]["kernel"])


def test_keras_wrong_variant_is_a_clear_error(keras_files, tmp_path):
    files = keras_files["files"]
    with pytest.raises(
        ConversionError, match=r"missing layer\(s\) conv3_4 \(keras 'block3_conv4'\), conv4_4.*match variant D"
    ):
        weight_formats.from_keras_h5(files["VGG16", "keras3"], "E")
    with pytest.raises(
        ConversionError, match=r"not in VGG-D: conv3_4, conv4_4, conv5_4; the file's layers match variant E"
    ):
        weight_formats.from_keras_h5(files["VGG19", "keras3"], "D")
    with pytest.raises(ConversionError, match="VGG16 .variant D. and VGG19 .variant E. only"):
        weight_formats.from_keras_h5(files["VGG16", "keras3"], "A")
    out = tmp_path / "never"
    with pytest.raises(ConversionError):
        convert.convert("keras", files["VGG19", "keras3"], "D", out)
    assert not out.exists()  # nothing written on error


def _without_layers(source_path, path, dropped):
    with h5py.File(source_path, "r") as source, h5py.File(path, "w") as f:
        for key, group in source["layers"].items():
            if group["vars"].attrs["name"] not in dropped:
                source.copy(group, f.require_group("layers"), name=key)
    return path


def test_keras_notop_converts_and_foreign_files_are_clear_errors(keras_files, tmp_path):
    full_path = keras_files["files"]["VGG16", "keras3"]
    notop = _without_layers(full_path, tmp_path / "notop.weights.h5", ("fc1", "fc2", "predictions"))
    params, full = weight_formats.from_keras_h5(notop, "D"), weight_formats.from_keras_h5(full_path, "D")
    assert list(params) == models.conv_layer_names("D")
    for layer in params:
        np.testing.assert_array_equal(params[layer]["kernel"], full[layer]["kernel"])
    config = convert.convert("keras", notop, "D", tmp_path / "run")
    assert config.model.include_top is False and config.model.num_classes == 0 and config.class_names is None
    classifier = vgg_jax.load(str(tmp_path / "run"))
    crops = np.random.default_rng(5).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)  # the paper's crop size
    by_full_file = perceptual.VGGFeatures(variant="D", layers=["pool5"], input_range="0-255")(full, crops)["pool5"]
    _assert_logits_close(classifier.features(crops, "pool5"), np.asarray(by_full_file))
    with pytest.raises(ValueError, match="no classifier head.*notop"):
        classifier.predict(crops)
    partial = _without_layers(full_path, tmp_path / "partial.weights.h5", ("fc2",))
    with pytest.raises(ConversionError, match=r"missing layer\(s\) fc7 \(keras 'fc2'\)"):
        weight_formats.from_keras_h5(partial, "D")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ConversionError, match="not a Keras weight file"):
        weight_formats.from_keras_h5(foreign, "D")


# --------------------------------------------------------------------------- torchvision layout


def _torch_vgg(torch, variant, width_multiplier, fc_width, num_classes, window):
    return torch_vgg.torchvision_vgg(
        torch, variant, width_multiplier=width_multiplier, fc_width=fc_width, num_classes=num_classes, window=window
    )


@pytest.mark.parametrize(
    "variant,width_multiplier,crop",
    [("A", 1 / 8, 64), ("B", 1 / 8, 64), ("D", 1 / 8, 64), ("E", 1 / 8, 64), ("D", 1 / 16, 224)],
)
def test_torchvision_parity(tmp_path, variant, width_multiplier, crop):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = _torch_vgg(torch, variant, width_multiplier, fc_width=32, num_classes=7, window=crop // 32)
    path = tmp_path / "vgg.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "run"
    config = convert.convert("torchvision", path, variant, out)
    assert (config.crop_size, config.model.num_classes, config.model.fc_width) == (crop, 7, 32)
    assert config.model.width_multiplier == width_multiplier
    np.testing.assert_allclose(config.mean_rgb, 255 * np.asarray(weight_formats.TORCHVISION_MEAN), rtol=1e-6)
    images = np.random.default_rng(1).integers(0, 256, (2, crop, crop, 3), dtype=np.uint8)
    with torch.no_grad():
        theirs = net(torch_vgg.normalise(torch, images)).numpy()
    _assert_logits_close(vgg_jax.load(str(out)).logits(images), theirs)


def _small_state_dict(torch, variant="D", crop=64):
    torch.manual_seed(0)
    net = _torch_vgg(torch, variant, 1 / 8, fc_width=16, num_classes=5, window=crop // 32)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_torchvision_fc6_rows_are_reordered_to_nhwc():
    torch = pytest.importorskip("torch")
    state = _small_state_dict(torch)
    params = weight_formats.from_torchvision_state_dict(state, "D")
    weight = state["classifier.0.weight"].numpy()  # (F, C*2*2), NCHW order
    channels = weight.shape[1] // 4
    c, h, w, f = 5, 1, 0, 3
    assert params["fc6"]["kernel"][(h * 2 + w) * channels + c, f] == weight[f, c * 4 + h * 2 + w]
    np.testing.assert_array_equal(params["conv2_1"]["kernel"], state["features.5.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc8"]["bias"], state["classifier.6.bias"].numpy())


def test_torchvision_errors(tmp_path):
    torch = pytest.importorskip("torch")
    state = _small_state_dict(torch, "D")
    with pytest.raises(ConversionError, match=r"vgg19 \(variant E\) has 16 .*looks like vgg16 \(variant D\)"):
        weight_formats.from_torchvision_state_dict(state, "E")
    with pytest.raises(ConversionError, match="variants"):
        weight_formats.from_torchvision_state_dict(state, "C")
    bn = dict(state, **{"features.1.running_mean": torch.zeros(8)})
    with pytest.raises(ConversionError, match="batch-norm"):
        weight_formats.from_torchvision_state_dict(bn, "D")
    bad = dict(state, **{"classifier.3.weight": torch.zeros(16, 17)})
    with pytest.raises(
        ConversionError, match=r"fc7 \(torchvision 'classifier.3'\) kernel has shape \(17, 16\).*\(16, 16\)"
    ):
        weight_formats.from_torchvision_state_dict(bad, "D")
    bad = dict(state, **{"features.2.weight": torch.zeros(9, 8, 3, 3), "features.2.bias": torch.zeros(9)})
    with pytest.raises(ConversionError, match=r"conv1_2 \(torchvision 'features.2'\) kernel has shape \(3, 3, 8, 9\)"):
        weight_formats.from_torchvision_state_dict(bad, "D")
    missing = {k: v for k, v in state.items() if k != "classifier.6.bias"}
    with pytest.raises(ConversionError, match="classifier.6.bias is missing"):
        weight_formats.from_torchvision_state_dict(missing, "D")
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    out = tmp_path / "out"
    with pytest.raises(ConversionError):
        convert.convert("torchvision", path, "B", out)
    assert not out.exists()


def test_command_line_with_class_names(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    path = tmp_path / "vgg11.pth"
    torch.save(_small_state_dict(torch, "A"), path)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\nfish\nfrog\n\n")
    out = tmp_path / "run"
    argv = ["--source=torchvision", f"--weights={path}", "--variant=A", f"--out={out}", f"--class_names={names}"]
    convert.main(argv)
    assert "wrote" in capsys.readouterr().out
    classifier = vgg_jax.load(str(out))
    assert classifier.class_names == ["cat", "dog", "bird", "fish", "frog"]
    assert classifier.config.learning_rate == 1e-2  # a full config (the paper's recipe), not just the model
    assert classifier.config.preprocessing.source == "torchvision"
    assert classifier.model.variant == "A"
    prediction = classifier.predict(np.zeros((1, 64, 64, 3), np.uint8), top_k=2)
    assert len(prediction.names[0]) == 2 and prediction.names[0][0] in ("cat", "dog", "bird", "fish", "frog")
    with pytest.raises(SystemExit):  # the output exists now: refuse to overwrite
        convert.main(argv)
    assert "not empty" in capsys.readouterr().err


def test_safetensors_files_read_without_torch(tmp_path):
    """torchvision- and timm-layout .safetensors files (safetensors.numpy) give the state dict's parameters."""
    import weight_files
    from safetensors.numpy import save_file

    state = weight_files.torchvision_state(weight_files.random_params("B", num_classes=7, crop_size=64))
    expected = weight_formats.from_torchvision_state_dict(state, "B")
    save_file(state, str(tmp_path / "tv.safetensors"))
    save_file(weight_files.timm_state(state, window=2), str(tmp_path / "timm.safetensors"))
    for source, name in (("torchvision", "tv"), ("timm", "timm")):
        config = convert.convert(source, tmp_path / f"{name}.safetensors", "B", tmp_path / name)
        assert (config.crop_size, config.model.num_classes, config.preprocessing.source) == (64, 7, source)
        params = vgg_jax.load(str(tmp_path / name)).params
        for layer in expected:
            np.testing.assert_array_equal(params[layer]["kernel"], expected[layer]["kernel"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match="not a readable .safetensors"):
        weight_formats.from_timm_safetensors(tmp_path / "bad.safetensors", "B")


def test_truncated_or_corrupt_weight_files_are_clear_errors(keras_files, tmp_path):
    source = keras_files["files"]["VGG16", "published"]
    truncated = tmp_path / "vgg16_truncated.h5"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    with pytest.raises(ConversionError, match="not a readable HDF5 file.*truncated or corrupt"):
        convert.convert("keras", truncated, "D", tmp_path / "out_h5")
    garbage = tmp_path / "vgg16.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ConversionError, match="not a readable .safetensors file"):
        convert.convert("timm", garbage, "D", tmp_path / "out_st")
    assert not (tmp_path / "out_h5").exists() and not (tmp_path / "out_st").exists()


def test_truncated_torch_file_is_a_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "vgg11.pth"
    torch.save(_small_state_dict(torch, "A"), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="not a readable PyTorch weight file.*truncated or corrupt"):
        convert.convert("torchvision", path, "A", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_class_names_file_is_named(tmp_path, capsys):
    argv = ["--source=keras", f"--weights={tmp_path / 'w.h5'}", "--variant=D", f"--out={tmp_path / 'run'}"]
    with pytest.raises(SystemExit):
        convert.main([*argv, f"--class_names={tmp_path / 'no_names.txt'}"])
    assert f"--class_names file {tmp_path / 'no_names.txt'} not found" in capsys.readouterr().err
