"""One test protocol, one executor: evaluate, transfer, the notebook API and App. A's protocol 2 agree exactly."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_jax
from vgg_jax import models
from vgg_jax.checkpointing import checkpoints
from vgg_jax.configs import common
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation import evaluate, transfer
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.localisation import dense as localise_dense

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random net A saved as a run (32-px crops, 7 classes, trained 'with flips', pooling ceil)."""
    config = common.get_config("A", "demo")
    config.model.num_classes, config.model.width_multiplier, config.model.fc_width = 7, 1 / 16, 16
    config.random_flip, config.dense_pooling = True, "ceil"
    shapes = jax.eval_shape(
        models.from_config(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )["params"]
    rng = np.random.default_rng(0)
    params = {
        layer: {
            "kernel": (
                rng.standard_normal(leaf["kernel"].shape) / np.sqrt(np.prod(leaf["kernel"].shape[:-1])) / 8
            ).astype(np.float32),
            "bias": rng.normal(0, 0.1, leaf["bias"].shape).astype(np.float32),
        }
        for layer, leaf in shapes.items()
    }
    directory = str(tmp_path_factory.mktemp("executor"))
    checkpoints.save_params_only(directory, params, config)
    return directory, config, params


@pytest.mark.parametrize("pooling", ["ceil", "centre"])
def test_the_four_consumers_share_one_executor(run, pooling):
    """The same images (at Q: no rescale) and options: evaluate's posteriors = Classifier.predict's = protocol 2's
    class scores; transfer's descriptors = Classifier.features'; protocol 2's score maps average to evaluate's."""
    directory, config, params = run
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 53, 3), (40, 40, 3), (40, 70, 3))]
    examples = [{"index": i, "label": 0, "scaled": {40: image}} for i, image in enumerate(images)]
    options = dict(scales=[40], flips="yes", pooling=pooling, batch_size=64)
    classifier = vgg_jax.load(directory)

    evaluated = evaluate.evaluate_params(config, params, TestProtocol("dense", **options), examples=examples)
    predicted = [classifier.probabilities(image[None], dense=True, scales=40, flips="yes", pooling=pooling)[0]
                 for image in images]  # fmt: skip
    net = (classifier, TestProtocol("dense", **options).resolve(config))
    scored = localise_dense.class_posteriors([net], examples)
    for i in range(3):
        np.testing.assert_array_equal(predicted[i], evaluated["posteriors"][i])
        np.testing.assert_array_equal(scored[i], evaluated["posteriors"][i])

    described = transfer.net_descriptors(config, params, examples, TestProtocol("descriptor", **options))
    features = [classifier.features(image[None], "fc7", dense=True, scales=40, flips="yes", pooling=pooling,
                                    normalize=False)[0] for image in images]  # fmt: skip
    for i in range(3):
        np.testing.assert_array_equal(features[i], described["descriptors"][i, 0])

    # App. A's maps are the same forward pass: each map averaged over its cells, soft-maxed, image and mirror averaged.
    maps = classifier.run(examples, TestProtocol("maps", **options))["maps"]
    for i in range(3):
        mirror_pair = maps[i][0]  # (2, h, w, classes): the image, its mirror
        region = protocols.dense_region(40, images[i].shape[1], pooling)
        assert mirror_pair.shape[1:3] == protocols.dense_map_size(region[2], region[3], 32)
        posterior = protocols.softmax(mirror_pair.mean(axis=(1, 2))).mean(axis=0)
        np.testing.assert_allclose(posterior, evaluated["posteriors"][i], atol=1e-6)


def test_protocols_resolve_per_net_and_refuse_bad_options(run):
    _, config, _ = run
    protocol = TestProtocol("both", ["single", "32,40"])
    assert protocol.resolve(config, 0).test_scales == (36,) and protocol.resolve(config, 1).test_scales == (32, 40)
    resolved = protocol.resolve(config, 1)
    assert (resolved.flips, resolved.pooling, resolved.batch_size) == (True, "ceil", config.eval_batch_size)
    assert TestProtocol(pooling="floor").resolve(config).pooling == "floor"
    with pytest.raises(ValueError, match="given 2 times for 3 nets"):
        protocol.check_nets(3)
    with pytest.raises(ValueError, match="not resolved"):
        _ = protocol.test_scales
    for bad, match in (
        (dict(method="tencrop"), "method must be one of"),
        (dict(scales="big"), "expected 'single', 'multi' or integers"),
        (dict(flips="maybe"), "flips must be one of"),
        (dict(pooling="round"), "dense_pooling must be one of"),
        (dict(buckets="none"), "dense_buckets must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            TestProtocol(**bad)
    with pytest.raises(ValueError, match=r"Q=\[16\] are smaller than crop_size=32"):
        TestProtocol(scales=16).resolve(config)


def test_modules_use_each_others_public_names_only():
    """No module reaches into the notebook API's private helpers (one executor, through `Classifier.run`)."""
    private = re.compile(r"\._(inputs|map|jitted|functions|variables|default_classifiers|replicated|mesh)\b")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "vgg_jax").rglob("*.py"))
        if path.name != "inference.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not offenders, offenders
