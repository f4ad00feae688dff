"""Paper App. B (vgg_jax/evaluation/transfer.py): metrics, the SVM protocol, descriptors, end to end on offline data."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vgg_jax import inference, models
from vgg_jax.checkpointing import checkpoints
from vgg_jax.configs import common
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation import runner, transfer
from vgg_jax.evaluation.protocol import TestProtocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    config = common.get_config("A", "demo")  # the embedded digits, 32-px crops, trained without flips
    config.model.width_multiplier = 1 / 16
    config.model.fc_width = 32
    config.eval_batch_size = 64
    return config


def _params(config, seed=0):
    """He-scaled NumPy parameters (eager Flax init compiles slowly on a loaded CPU), conv1_1 damped for 0-255 input."""
    shapes = jax.eval_shape(
        models.from_config(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )["params"]
    rng = np.random.default_rng(seed)
    params = {}
    for layer, leaves in shapes.items():
        std = np.sqrt(2 / np.prod(leaves["kernel"].shape[:-1])) / (64.0 if layer == "conv1_1" else 1.0)
        params[layer] = {
            "kernel": (rng.standard_normal(leaves["kernel"].shape) * std).astype(np.float32),
            "bias": rng.normal(0, 0.05, leaves["bias"].shape).astype(np.float32),
        }
    return params


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("transfer_run"))
    config = _config()
    checkpoints.save_params_only(directory, _params(config), config)
    return directory


# ----------------------------------------------------------------------------- metrics and the SVM protocol


def test_voc07_eleven_point_ap_by_hand():
    # Ranked: positive, negative, positive (the 4th is difficult-only: ignored). Recall 0.5 at precision 1,
    # recall 1 at precision 2/3: t = 0 … 0.5 (6 points) give 1, t = 0.6 … 1 (5 points) give 2/3.
    ap = transfer.voc07_average_precision(np.array([0.9, 0.8, 0.7, 0.95]), np.array([1, 0, 1, -1]))
    assert ap == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert transfer.voc07_average_precision(np.array([1.0, 0.0]), np.array([1, 0])) == 1.0
    assert np.isnan(transfer.voc07_average_precision(np.array([1.0, 0.0]), np.array([0, -1])))
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])  # class 1 has no positive: left out of the mean
    assert transfer.mean_average_precision(scores, targets) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_mean_class_recall_and_per_class_splits():
    assert transfer.mean_class_recall(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx((2 / 3 + 1) / 2)
    labels = np.repeat(np.arange(4), [10, 8, 6, 12])
    train, test = transfer.per_class_split(labels, 5, 3, seed=0)
    assert np.bincount(labels[train]).tolist() == [5, 5, 5, 5]
    assert np.bincount(labels[test]).tolist() == [3, 3, 1, 3]
    assert not set(train) & set(test)
    other = transfer.per_class_split(labels, 5, 3, seed=1)[0]
    assert not np.array_equal(train, other)  # the splits are random, seeded


def test_svm_with_c_on_held_out_fifth():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16))
    labels = np.repeat(np.arange(3), 20)
    features = centres[labels] + 0.05 * rng.normal(0, 1, (60, 16))
    result = transfer.train_and_test((features, labels), (features, labels), multilabel=False, c_grid=(0.1, 1.0))
    assert result["score"] == 1.0 and result["C"] in (0.1, 1.0)
    targets = np.stack([labels == 0, labels != 1], axis=1).astype(np.int32)
    result = transfer.train_and_test((features, targets), (features, targets), multilabel=True, c_grid=(1.0,))
    assert result["score"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- one descriptor implementation


def test_runner_descriptor_equals_the_notebook_api_on_any_shape(run_dir):
    """Canvases (masked, bucketed) in the runner = `Classifier.features` on each image alone, averaged or stacked."""
    classifier = inference.load(run_dir)
    rng = np.random.default_rng(3)
    shapes = {32: [(32, 45), (50, 32), (32, 32)], 40: [(40, 56), (63, 40), (40, 40)]}
    images = {q: [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes[q]] for q in shapes}
    examples = [{"index": i, "label": 0, "scaled": {q: images[q][i] for q in shapes}} for i in range(3)]
    protocol = TestProtocol("descriptor", [32, 40], flips=True, batch_size=16).resolve(classifier.config)
    result = runner.run_evaluation(
        classifier.model, classifier.params, examples, protocol, mean_rgb=classifier.config.mean_rgb
    )
    assert result["descriptors"].shape == (3, 2, 32)
    for combine in ("average", "stack"):
        combined = protocols.combine_scales(result["descriptors"], combine)
        for i in range(3):
            raw = [
                classifier.features(images[q][i][None], dense=True, scales=q, normalize=False, flips="yes")[0]
                for q in (32, 40)
            ]
            expected = protocols.combine_scales(np.stack(raw)[None], combine)[0]
            np.testing.assert_allclose(combined[i], expected, atol=1e-5)


# ----------------------------------------------------------------------------- end to end


def test_caltech_style_protocol_on_the_digits(run_dir):
    row = transfer.run_transfer(
        [run_dir],
        "sklearn_digits",
        scales=[32, 40],
        combine="stack",
        train_split="train[:200]",
        test_split="test[:100]",
        train_per_class=8,
        test_per_class=5,
        num_splits=2,
        c_grid=(0.1, 10.0),
    )
    assert row["metric"] == "mean class recall" and row["descriptor_dim"] == 2 * 32
    assert len(row["splits"]) == 2 and row["std"] is not None
    assert row["mean"] > 0.3, row  # chance 0.1: frozen random conv features still separate digits
    table = transfer.format_row(row)
    assert "| A (" in table and "| sklearn_digits | 32,40 | stack | mean class recall |" in table


def test_voc_like_multilabel_set_with_mock_data(run_dir):
    with tfds.testing.mock_data(num_examples=12):
        row = transfer.run_transfer([run_dir, run_dir], "voc/2007", scales=[32], c_grid=(1.0,))
    assert row["metric"] == "mAP (VOC-07 11-point)" and row["descriptor_dim"] == 2 * 32  # D & E: stacked
    assert 0.0 <= row["mean"] <= 1.0 and row["std"] is None and row["net"].count(" & ") == 1


def test_cli(command_lines, run_dir, tmp_path):
    out = tmp_path / "row.json"
    command = ["vgg_jax.evaluation.transfer", f"--checkpoint={run_dir}", "--dataset=sklearn_digits"]
    flags = ["--scales=32", "--train_split=train[:60]", "--test_split=test[:30]", "--c_grid=1", f"--out={out}"]
    done = command_lines.run(*command, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| net | data set | test Q | scales | metric | result (%) |" in done.stdout
    assert json.loads(out.read_text())["scales"] == [32]
    failed = command_lines.run(*command, "--scales=16")
    assert failed.returncode == 1 and "smaller than crop_size" in failed.stderr
