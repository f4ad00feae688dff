"""The embedded data set (vgg_jax/data/embedded.py): prepares offline, documented sizes and contents."""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vgg_jax.data import embedded


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepares sklearn_digits with every network connection refused."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))

    def no_network(*args, **kwargs):
        raise OSError("network access during preparation")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "create_connection", no_network)
        builder = tfds.builder("sklearn_digits", data_dir=data_dir)
        assert not builder.is_prepared()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
        )
    return builder


def test_registered_on_import():
    assert embedded.SklearnDigits.name == "sklearn_digits"
    assert "sklearn_digits" in tfds.list_builders()


def test_sizes_and_features(prepared):
    info = prepared.info
    assert prepared.is_prepared()
    assert info.splits["train"].num_examples == embedded.NUM_TRAIN == 1437
    assert info.splits["test"].num_examples == embedded.NUM_TEST == 360
    assert info.features["label"].names == [str(d) for d in range(10)]
    assert info.features["image"].shape == (8, 8, 3)
    assert info.features["image"].encoding_format == "png"


def test_stored_as_rgb_png_matching_sklearn(prepared):
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = prepared.as_dataset(split="test", decoders={"image": tfds.decode.SkipDecoding()})
    decoded = prepared.as_dataset(split="test")
    count = 0
    for encoded, example in zip(raw.take(20), decoded.take(20), strict=True):
        assert encoded["image"].numpy()[:8] == b"\x89PNG\r\n\x1a\n"
        image, index = example["image"].numpy(), int(example["index"])
        assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
        expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(image[:, :, 0], expected)
        np.testing.assert_array_equal(image[:, :, 1], image[:, :, 2])
        assert int(example["label"]) == digits.target[index]
        count += 1
    assert count == 20


def test_split_is_fixed_stratified_and_disjoint(prepared):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    indices = {}
    for split in ("train", "test"):
        ds = prepared.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        indices[split] = np.array(sorted(int(ex["index"]) for ex in ds))
    assert not set(indices["train"]) & set(indices["test"])
    assert len(indices["train"]) + len(indices["test"]) == 1797
    np.testing.assert_array_equal(indices["test"], embedded.split_indices()["test"])
    per_class = np.bincount(labels[indices["test"]], minlength=10)
    assert per_class.min() >= 35 and per_class.max() <= 37
