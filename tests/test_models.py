"""Paper §2 / Table 1: the six configurations, LRN, head in crop and dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import layers, models
from vgg_jax.models import VARIANTS, VGG

PAPER_COUNTS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_parameter_counts(variant):
    assert models.parameter_count(variant) == PAPER_COUNTS[variant]


def test_variants_tuple():
    assert VARIANTS == ("A", "A-LRN", "B", "C", "D", "E")


def _param_names(variant):
    shapes = jax.eval_shape(
        VGG(variant=variant).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    )
    return list(shapes["params"].keys()), shapes["params"]


def test_layer_names_d_and_e_match_caffe_in_order():
    caffe_d = [
        "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
        "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8",
    ]  # fmt: skip
    caffe_e = [
        "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
        "conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3", "conv5_4",
        "fc6", "fc7", "fc8",
    ]  # fmt: skip
    assert models.layer_names("D") == caffe_d
    assert models.layer_names("E") == caffe_e
    names_d, params_d = _param_names("D")
    assert names_d == caffe_d  # parameter dict keeps the forward order
    assert params_d["conv3_2"]["kernel"].shape == (3, 3, 256, 256)
    assert params_d["fc6"]["kernel"].shape == (7 * 7 * 512, 4096)
    assert _param_names("E")[0] == caffe_e


def test_config_c_has_one_by_one_convs_at_the_end_of_blocks_3_to_5():
    _, params = _param_names("C")
    one_by_one = sorted(n for n, p in params.items() if n.startswith("conv") and p["kernel"].shape[0] == 1)
    assert one_by_one == ["conv3_3", "conv4_3", "conv5_3"]
    assert params["conv3_3"]["kernel"].shape == (1, 1, 256, 256)
    assert params["conv5_3"]["kernel"].shape == (1, 1, 512, 512)
    assert params["conv3_2"]["kernel"].shape == (3, 3, 256, 256)


def test_a_lrn_places_lrn_after_conv1_1_before_pool1():
    names = models.feature_names("A-LRN")
    assert names[:4] == ["conv1_1", "relu1_1", "norm1", "pool1"]
    assert "norm1" not in models.feature_names("A")
    # Same parameters as A: LRN has none.
    assert _param_names("A-LRN")[0] == _param_names("A")[0]


def test_a_lrn_output_differs_from_a_with_same_params():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3)) * 50
    kwargs = dict(num_classes=5, width_multiplier=1 / 16, fc_width=16, crop_size=32)
    params = VGG(variant="A", **kwargs).init(jax.random.key(0), x)
    norm = VGG(variant="A-LRN", **kwargs).apply(params, x, outputs=["relu1_1", "norm1"])
    expected = layers.local_response_norm(norm["relu1_1"])
    np.testing.assert_allclose(norm["norm1"], expected, rtol=1e-6)
    assert not np.allclose(norm["norm1"], norm["relu1_1"])


def _lrn_numpy(a, size=5, k=2.0, alpha=1e-4, beta=0.75, alpha_over_size=False):
    channels = a.shape[-1]
    out = np.empty_like(a)
    scale = alpha / size if alpha_over_size else alpha
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + size // 2)
        window = np.sum(a[..., lo : hi + 1] ** 2, axis=-1)
        out[..., c] = a[..., c] / (k + scale * window) ** beta
    return out


@pytest.mark.parametrize("alpha_over_size", [False, True])
def test_lrn_matches_numpy_formula(alpha_over_size):
    a = np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 5, 11)) * 30, np.float64)
    got = layers.local_response_norm(jnp.asarray(a, jnp.float32), alpha_over_size=alpha_over_size)
    np.testing.assert_allclose(got, _lrn_numpy(a, alpha_over_size=alpha_over_size), rtol=1e-5)
    # The two conventions genuinely differ on this input.
    other = _lrn_numpy(a, alpha_over_size=not alpha_over_size)
    assert not np.allclose(got, other, rtol=1e-4)


def _narrow(variant="D", crop=64, **kw):
    return VGG(variant=variant, num_classes=7, width_multiplier=1 / 16, fc_width=32, crop_size=crop, **kw)


@pytest.mark.parametrize("variant", ["A", "C", "E"])
def test_dense_head_on_crop_equals_crop_head(variant):
    model = _narrow(variant, crop=64, initializer="glorot")
    x = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
    params = model.init(jax.random.key(1), x)
    logits = model.apply(params, x)
    score_map = model.apply(params, x, dense=True)
    assert logits.shape == (3, 7)
    assert score_map.shape == (3, 1, 1, 7)
    np.testing.assert_allclose(score_map[:, 0, 0], logits, rtol=1e-5, atol=1e-6 * float(jnp.abs(logits).max()))
    assert float(jnp.abs(logits).max()) > 0


def test_dense_score_map_shape_on_larger_image():
    model = _narrow("D", crop=224)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    out = jax.eval_shape(lambda p, x: model.apply(p, x, dense=True), params, jnp.zeros((2, 256, 320, 3)))
    # 256/32 = 8 and 320/32 = 10 positions, minus the 7x7 fc6 window plus one.
    assert out.shape == (2, 8 - 7 + 1, 10 - 7 + 1, 7)


def test_dense_map_cell_is_the_dense_head_on_its_pool5_window():
    # fc6 as a 2x2 conv (crop 64) must read the pool5 window in NHWC-flatten order.
    model = _narrow("B", crop=64, initializer="glorot")
    image = jax.random.normal(jax.random.key(5), (1, 96, 128, 3))
    params = model.init(jax.random.key(1), image[:, :64, :64])
    score_map = np.asarray(model.apply(params, image, dense=True))
    pool5 = np.asarray(model.apply(params, image, dense=True, outputs=["pool5"])["pool5"])
    assert pool5.shape[1:3] == (3, 4) and score_map.shape == (1, 2, 3, 7)
    p = {k: {n: np.asarray(v) for n, v in params["params"][k].items()} for k in ("fc6", "fc7", "fc8")}
    for i in range(2):
        for j in range(3):
            window = pool5[:, i : i + 2, j : j + 2].reshape(1, -1)
            h = np.maximum(window @ p["fc6"]["kernel"] + p["fc6"]["bias"], 0)
            h = np.maximum(h @ p["fc7"]["kernel"] + p["fc7"]["bias"], 0)
            expected = h @ p["fc8"]["kernel"] + p["fc8"]["bias"]
            np.testing.assert_allclose(score_map[:, i, j], expected, rtol=1e-4, atol=1e-5)


def test_wrong_input_sizes_are_named():
    model = _narrow("A", crop=64)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="64x64"):
        model.apply(params, jnp.zeros((1, 96, 64, 3)))
    with pytest.raises(ValueError, match="at least crop_size=64"):
        model.apply(params, jnp.zeros((1, 32, 96, 3)), dense=True)
    with pytest.raises(ValueError, match="unknown VGG variant 'F'"):
        VGG(variant="F").init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="relu9_9"):
        model.apply(params, jnp.zeros((1, 64, 64, 3)), outputs=["relu9_9"])


def test_conv_activations_take_any_size_their_pools_allow():
    """Only conv-stage outputs (perceptual losses): no crop-size check, one pixel after the pools suffices."""
    model = _narrow("A", crop=64)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    acts = model.apply(params, jnp.zeros((1, 40, 24, 3)), outputs=["relu2_1", "pool3"])
    assert acts["relu2_1"].shape[1:3] == (20, 12) and acts["pool3"].shape[1:3] == (5, 3)
    with pytest.raises(ValueError, match="pool5 needs images of at least 32x32"):
        model.apply(params, jnp.zeros((1, 31, 64, 3)), outputs=["pool5"])
    with pytest.raises(ValueError, match="64x64"):  # asking for a head layer keeps the crop check
        model.apply(params, jnp.zeros((1, 40, 24, 3)), outputs=["relu2_1", "fc6"])


def test_named_activations_shapes():
    model = _narrow("D", crop=64)
    x = jnp.ones((2, 64, 64, 3))
    params = model.init(jax.random.key(0), x)
    names = ["relu1_2", "pool1", "relu3_3", "pool5", "fc6", "fc7", "fc8"]
    acts = model.apply(params, x, outputs=names)
    widths = model.conv_widths()
    assert acts["relu1_2"].shape == (2, 64, 64, widths[0])
    assert acts["pool1"].shape == (2, 32, 32, widths[0])
    assert acts["relu3_3"].shape == (2, 16, 16, widths[2])
    assert acts["pool5"].shape == (2, 2, 2, widths[4])
    assert acts["fc6"].shape == acts["fc7"].shape == (2, 32)
    assert float(acts["fc7"].min()) >= 0  # taken after ReLU
    np.testing.assert_allclose(acts["fc8"], model.apply(params, x), rtol=1e-6)
    # Dense features keep their spatial layout.
    dense = model.apply(params, jnp.ones((1, 96, 128, 3)), dense=True, outputs=["fc7"])
    assert dense["fc7"].shape == (1, 2, 3, 32)


def test_dropout_only_when_training():
    model = _narrow("A", crop=32, initializer="glorot")
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    params = model.init(jax.random.key(1), x)
    eval_a = model.apply(params, x)
    eval_b = model.apply(params, x, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    train_b = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)
    # Named activations are available in training mode too.
    fc7_in = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(4)}, outputs=["fc7"])
    assert fc7_in["fc7"].shape == (4, 32)


@pytest.mark.parametrize("init,expected_std", [("normal", 0.01), ("glorot", None)])
def test_initialisers(init, expected_std):
    model = VGG(variant="A", num_classes=10, width_multiplier=0.5, fc_width=512, crop_size=64, initializer=init)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    kernel = np.asarray(params["conv3_1"]["kernel"])
    fan_in, fan_out = 9 * kernel.shape[2], 9 * kernel.shape[3]
    std = expected_std or np.sqrt(2.0 / (fan_in + fan_out))
    assert abs(kernel.mean()) < 0.1 * std
    assert kernel.std() == pytest.approx(std, rel=0.05)
    for name, layer in params.items():
        assert not np.any(np.asarray(layer["bias"])), name


def test_bfloat16_compute_keeps_float32_params():
    model = _narrow("A", crop=32, dtype=jnp.bfloat16)
    x = jnp.ones((1, 32, 32, 3))
    params = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert model.apply(params, x).dtype == jnp.bfloat16


def test_remat_keeps_names_and_gradients_and_recomputes_blocks():
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    plain, remat = _narrow("A-LRN", crop=32), _narrow("A-LRN", crop=32, remat=True)
    params = jax.jit(plain.init)(jax.random.key(1), x)
    remat_shapes = jax.eval_shape(remat.init, jax.random.key(1), x)
    assert jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(params)

    def loss(model):
        return lambda p: jnp.sum(model.apply(p, x) ** 2)

    grads = [jax.jit(jax.grad(loss(model)))(params) for model in (plain, remat)]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)
    assert str(jax.make_jaxpr(jax.grad(loss(remat)))(params)).count("remat") >= 5  # a region per block
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss(plain)))(params))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_2x2_equals_flax_max_pool_value_and_gradient(shape):
    """The strided-maxima pool and its mask gradient are flax's 2×2/2 'VALID' max-pool, ties included
    (the first pixel of a window in row-major order takes the gradient), odd sizes floored."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    x = jnp.asarray(np.round(rng.normal(size=shape) * 2), jnp.float32)  # rounded: many ties
    x = x.at[0, 0, :2, 0].set(-jnp.inf)  # Caffe's ceil-mode padding value
    weights = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)

    def flax_pool(v):
        return nn.max_pool(v, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(layers.max_pool_2x2(x), flax_pool(x))
    ours = jax.grad(lambda v: jnp.sum(jnp.where(jnp.isinf(p := layers.max_pool_2x2(v)), 0, p) * weights))(x)
    theirs = jax.grad(lambda v: jnp.sum(jnp.where(jnp.isinf(p := flax_pool(v)), 0, p) * weights))(x)
    np.testing.assert_array_equal(ours, theirs)
    assert float(jnp.sum(ours != 0)) <= weights.size  # one pixel per window at most


def test_sliding_patches_times_the_kernel_is_the_valid_convolution():
    """Dense fc6 (paper §3.2): each k×k patch in the kernel's row order times the fc kernel = the k×k conv."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3 * 3 * 4, 5)), jnp.float32)
    conv = jax.lax.conv_general_dilated(
        x, kernel.reshape(3, 3, 4, 5), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    patches = layers.sliding_patches(x, 3)
    assert patches.shape == (2, 4, 7, 36)
    np.testing.assert_allclose(patches @ kernel, conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layers.sliding_patches(x, 1), x)
