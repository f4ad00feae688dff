"""Every number of the paper's recipe, pinned against PAPER.md (§1 architecture, §2 training, §3 testing).

Each assertion names the paper's number; a change to configs/common.py, optim.py, models.py or
protocols.py that departs from it fails here. The numbers are written out, not imported.
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import layers, models, preprocess
from vgg_jax.configs import common, fields
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.training import optim


@pytest.fixture(params=["A", "A-LRN", "B", "C", "D", "E"])
def config(request):
    return common.get_config(request.param)


def test_optimisation(config):
    """§3.1: batch 256, momentum 0.9, coupled L2 5e-4 on weights, lr 1e-2 ÷10 on plateaus (3 times), 74 epochs."""
    assert config.global_batch_size == 256
    assert config.momentum == 0.9
    assert config.weight_decay == 5e-4
    assert config.decay_biases is False
    assert config.learning_rate == 1e-2
    assert config.lr_schedule == "plateau"
    assert config.plateau.factor == 0.1
    assert config.plateau.max_reductions == 3
    assert config.num_epochs == 74.0 and config.num_train_steps == -1
    assert config.model.dropout_rate == 0.5


def test_weight_decay_applies_to_weights_not_biases_and_is_coupled():
    params = {"conv1_1": {"kernel": jnp.ones((3, 3, 3, 2)), "bias": jnp.ones(2)}, "fc8": {"kernel": jnp.ones((4, 2))}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"conv1_1": {"kernel": True, "bias": False}, "fc8": {"kernel": True}}
    # One step from zero momentum with a zero loss gradient: the update is −lr · wd · w (coupled L2, before momentum).
    config = common.get_config("D")
    optimizer = optim.create_optimizer(config)
    state = optimizer.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    np.testing.assert_allclose(updates["conv1_1"]["kernel"], -1e-2 * 5e-4, rtol=1e-6)
    np.testing.assert_allclose(updates["conv1_1"]["bias"], 0.0)


def test_weight_decay_is_coupled_through_momentum():
    """§3.1 (PAPER.md): L2 added to the loss, so it passes through momentum: with zero loss gradients the second
    update is −lr·(1 + 0.9)·wd·w (decoupled, AdamW-style decay would give −lr·wd·w at every step)."""
    config = common.get_config("D")
    params = {"fc8": {"kernel": jnp.full((2, 2), 3.0)}}
    optimizer = optim.create_optimizer(config)
    state = optimizer.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, state = optimizer.update(zeros, state, params)
    updates, _ = optimizer.update(zeros, state, params)
    np.testing.assert_allclose(updates["fc8"]["kernel"], -1e-2 * 1.9 * 5e-4 * 3.0, rtol=1e-6)


def test_momentum_is_in_the_optimiser():
    """Two steps of a constant gradient g: the second update is −lr·(1 + 0.9)·g with momentum 0.9."""
    config = common.get_config("D")
    config.weight_decay = 0.0
    params = {"fc8": {"bias": jnp.zeros(1)}}
    optimizer = optim.create_optimizer(config)
    state = optimizer.init(params)
    grads = {"fc8": {"bias": jnp.ones(1)}}
    _, state = optimizer.update(grads, state, params)
    updates, _ = optimizer.update(grads, state, params)
    np.testing.assert_allclose(updates["fc8"]["bias"], -1e-2 * 1.9, rtol=1e-6)


def test_training_scales_and_their_learning_rates():
    """§3.1: S=256 from scratch/net A (lr 1e-2); S=384 from the S=256 net, lr 1e-3; jittered [256, 512] from S=384."""
    fixed = common.get_config("D")
    assert (fixed.scale_min, fixed.scale_max, fixed.learning_rate) == (256, 256, 1e-2)
    s384 = common.get_config("D", "scale=384")
    assert (s384.scale_min, s384.scale_max, s384.learning_rate, s384.warm_start.layers) == (384, 384, 1e-3, "all")
    jittered = common.get_config("D", "scale=256-512")
    assert (jittered.scale_min, jittered.scale_max, jittered.warm_start.layers) == (256, 512, "all")
    assert jittered.learning_rate == 1e-3  # [choice]: the paper fine-tunes from S=384 without a rate
    assert fixed.crop_size == 224


def test_warm_start_layers_from_net_a():
    """§3.1: deeper nets take conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8 from net A; A starts at random."""
    shared = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")
    assert fields.NET_A_SHARED_LAYERS == shared
    for variant in ("B", "C", "D", "E"):
        assert tuple(common.get_config(variant).warm_start.layers) == shared
    for variant in ("A", "A-LRN"):
        assert tuple(common.get_config(variant).warm_start.layers) == ()


def test_lrn_constants():
    """§2.2 (Krizhevsky et al.): k=2, n=5, α=1e-4, β=0.75, AlexNet's α (not Caffe's α/n) by default."""
    defaults = {k: v.default for k, v in inspect.signature(layers.local_response_norm).parameters.items()}
    assert (defaults["size"], defaults["k"], defaults["alpha"], defaults["beta"]) == (5, 2.0, 1e-4, 0.75)
    assert defaults["alpha_over_size"] is False and common.get_config("A-LRN").model.lrn_alpha_over_size is False
    x = jnp.full((1, 1, 1, 5), 10.0)
    expected = 10.0 / (2.0 + 1e-4 * 3 * 100.0) ** 0.75  # channel 0 sees channels 0-2 (window clipped)
    np.testing.assert_allclose(layers.local_response_norm(x)[0, 0, 0, 0], expected, rtol=1e-6)


def test_initialisation_normal_0_01_and_zero_biases(config):
    """§3.1: zero-mean normal with std 0.01 [choice: 'variance 1e-2' read as Caffe's std], biases zero."""
    assert config.model.initializer == "normal" and config.model.init_std == 0.01
    model = models.VGG(variant="A", num_classes=10, width_multiplier=1 / 8, fc_width=64, crop_size=32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernels = np.concatenate([np.ravel(params[name]["kernel"]) for name in params])
    assert abs(kernels.std() - 0.01) < 5e-4 and abs(kernels.mean()) < 5e-4
    assert all(not np.any(params[name]["bias"]) for name in params)


def test_architecture_widths_and_dropout():
    """§2: widths 64-128-256-512-512; fc 4096; crop 224; 1000 classes."""
    assert models.BLOCK_WIDTHS == (64, 128, 256, 512, 512)
    config = common.get_config("E")
    assert (config.model.fc_width, config.model.num_classes, config.model.width_multiplier) == (4096, 1000, 1.0)


def test_test_scales_and_crops():
    """§3.2/§4: Q = S or {S−32, S, S+32} (fixed S); 384 or {256, 384, 512} (jittered); 5×5 crops × 2 flips per scale."""
    assert protocols.paper_scales(common.get_config("D")) == [256]
    assert protocols.paper_scales(common.get_config("D"), multi=True) == [224, 256, 288]
    assert protocols.paper_scales(common.get_config("D", "scale=384"), multi=True) == [352, 384, 416]
    jittered = common.get_config("D", "scale=256-512")
    assert protocols.paper_scales(jittered) == [384] and jittered.eval_scale == 384
    assert protocols.paper_scales(jittered, multi=True) == [256, 384, 512]
    assert protocols.GRID == 5
    image = np.zeros((256, 300, 3), np.uint8)
    assert protocols.multicrop_views(image, 224).shape == (50, 224, 224, 3)


# ----------------------------------------------------------------------------- augmentation and preprocessing


def test_mean_rgb_and_pca_colour_shift_constants(config):
    """§1/§3.1: Caffe's mean RGB; Krizhevsky's PCA lighting noise with α ~ N(0, 0.1²) and ImageNet's eigen pairs."""
    assert preprocess.CAFFE_MEAN_RGB == (123.68, 116.779, 103.939)
    assert tuple(config.mean_rgb) == (123.68, 116.779, 103.939)
    assert config.color_shift_std == 0.1
    eigval = np.array([0.2175, 0.0188, 0.0045]) * 255.0  # on 0–255 pixels
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    key = jax.random.key(3)
    alpha = np.asarray(jax.random.normal(key, (2, 3), jnp.float32)) * 0.1
    expected = (alpha * eigval) @ eigvec.T  # (2, 3): Σ_i α_i λ_i v_i per image
    shifted = np.asarray(preprocess.color_shift(jnp.zeros((2, 1, 1, 3)), key, 0.1))[:, 0, 0]
    np.testing.assert_allclose(shifted, expected, rtol=1e-4, atol=1e-4)


def test_training_crops_are_flipped_half_the_time():
    """§3.1: a random horizontal flip per crop (the paper's configs; the digit demos turn it off)."""
    import tensorflow as tf

    from vgg_jax.data import image_ops

    assert all(common.get_config(v).random_flip is True for v in ("A", "D", "E"))
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    options = dict(scale_min=8, scale_max=8, crop=8, flip=True)  # the crop is the whole image
    flips = []
    for seed in range(16):
        crop, details = image_ops.random_rescaled_crop(tf.constant(pixels), tf.constant([seed, 1]), **options)
        flips.append(bool(details["flipped"]))
        np.testing.assert_array_equal(crop.numpy(), pixels[:, ::-1] if flips[-1] else pixels)
    assert 4 <= sum(flips) <= 12, flips


# ----------------------------------------------------------------------------- architecture: dropout, LRN, init


def test_dropout_follows_fc6_and_fc7_only():
    """§2: dropout 0.5 after fc6 and fc7 (training only), nowhere else."""
    model = models.VGG(variant="A", num_classes=5, width_multiplier=1 / 16, fc_width=8, crop_size=32)
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    calls = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and module.name != model.name:
            calls.append((type(module).__name__, module.name, getattr(module, "rate", None)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: model.apply(p, x, train=True, rngs={"dropout": jax.random.key(1)}), params)
    order = [name if kind != "Dropout" else f"dropout {rate}" for kind, name, rate in calls]
    assert order[-5:] == ["fc6", "dropout 0.5", "fc7", "dropout 0.5", "fc8"], order
    assert sum(kind == "Dropout" for kind, _, _ in calls) == 2


def test_lrn_sits_after_conv1_1_relu_and_before_pool1():
    """§2.2: A-LRN normalises relu(conv1_1) with LRN, then pools it."""
    model = models.VGG(variant="A-LRN", num_classes=5, width_multiplier=1 / 16, fc_width=8, crop_size=32)
    x = jnp.asarray(np.random.default_rng(0).normal(0, 50, (1, 32, 32, 3)), jnp.float32)
    names = ("conv1_1", "relu1_1", "norm1", "pool1")
    params = jax.jit(model.init)(jax.random.key(0), x)
    acts = jax.jit(lambda p: model.apply(p, x, outputs=names))(params)
    np.testing.assert_allclose(acts["relu1_1"], jnp.maximum(acts["conv1_1"], 0), rtol=1e-6)
    np.testing.assert_allclose(acts["norm1"], layers.local_response_norm(acts["relu1_1"]), rtol=1e-5)
    pooled = nn.max_pool(acts["norm1"], (2, 2), strides=(2, 2))
    np.testing.assert_allclose(acts["pool1"], pooled, rtol=1e-6)
    assert models.feature_names("A-LRN")[:4] == ["conv1_1", "relu1_1", "norm1", "pool1"]


def test_from_config_uses_init_std():
    """§3.1 [choice]: N(0, init_std²) kernels; a config's init_std reaches the network."""
    config = common.get_config("A", "demo")
    config.model.initializer, config.model.init_std = "normal", 0.05
    config.model.width_multiplier, config.model.fc_width = 1 / 16, 64
    params = models.from_config(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernels = np.concatenate([np.ravel(params[name]["kernel"]) for name in params])
    assert abs(kernels.std() - 0.05) < 2.5e-3


# ----------------------------------------------------------------------------- testing: Q follows S, dense pooling


def test_eval_scale_follows_the_training_scale():
    """§3.2/§4: single-scale testing at Q = S (fixed S) or (Smin + Smax)/2 (jittered)."""
    for arg, q in (("scale=256", 256), ("scale=384", 384), ("scale=320", 320), ("scale=256-512", 384)):
        config = common.get_config("D", arg)
        assert config.eval_scale == q and TestProtocol().resolve(config).test_scales == (q,), arg


def test_dense_evaluation_runs_on_the_whole_image_in_the_paper_configs(config):
    """§3.2: "the fully-convolutional net is applied to the whole (uncropped) image": ceil pools, no trim."""
    assert protocols.PAPER_POOLING == "ceil" and config.dense_pooling == "ceil"
    protocol = TestProtocol().resolve(config)
    assert protocol.pooling == "ceil" and protocols.dense_region(256, 341, protocol.pooling) == (0, 0, 256, 341)
    # A 256×341 image (4:3 at Q = 256): 8×11 pool5 cells, so 2×5 positions of the 7×7 fc6 window; no pixel left out.
    assert protocols.dense_map_size(256, 341, 224) == (2, 5)
