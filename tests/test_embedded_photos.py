"""The second offline demo set, patches of real photographs (vgg_jax/data/embedded_photos.py; issue 17)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vgg_jax.configs import common
from vgg_jax.data import embedded_photos, sources

pytest.importorskip("skimage")


@pytest.mark.parametrize("name", embedded_photos.CLASSES)
def test_every_photo_is_rgb_and_large_enough(name):
    image = embedded_photos.photo(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 200 and image.std() > 10  # a photograph, not a flat card


def test_train_and_test_patches_never_share_a_pixel_and_cover_the_scene():
    for name in ("chelsea", "coffee", "china"):
        height, width = embedded_photos.photo(name).shape[:2]
        seen = {"train": np.zeros((height, width), bool), "test": np.zeros((height, width), bool)}
        for split in seen:
            for k in range(300):
                top, left, side = embedded_photos.patch_box(
                    height, width, split, np.random.default_rng([k, len(split)])
                )
                assert side >= 0.12 * min(height, width) - 1 and top >= 0 and left >= 0
                assert top + side <= height and left + side <= width
                grid = range(embedded_photos.GRID)
                holders = [
                    (row, column)
                    for row in grid
                    for column in grid
                    if (b := embedded_photos.tile_bounds(height, width, row, column))[0] <= top
                    and top + side <= b[2]
                    and b[1] <= left
                    and left + side <= b[3]
                ]
                assert len(holders) == 1 and sum(holders[0]) % 2 == (split == "test")  # inside a tile of its split …
                seen[split][top : top + side, left : left + side] = True
        assert not (seen["train"] & seen["test"]).any()  # … so the splits share no pixel
        for split, mask in seen.items():  # and each samples all four quarters of the scene
            quarters = [mask[: height // 2, : width // 2], mask[: height // 2, width // 2 :]]
            quarters += [mask[height // 2 :, : width // 2], mask[height // 2 :, width // 2 :]]
            assert min(q.mean() for q in quarters) > 0.2, split


def test_builder_prepares_offline_with_the_documented_splits(tmp_path):
    assert embedded_photos.SamplePhotos.name in sources.EMBEDDED_DATASETS
    builder = tfds.builder("sample_photos", data_dir=str(tmp_path))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    )
    assert builder.info.splits["train"].num_examples == embedded_photos.NUM_TRAIN == 6000
    assert builder.info.splits["test"].num_examples == embedded_photos.NUM_TEST == 1000
    assert builder.info.features["label"].names == list(embedded_photos.CLASSES)
    test = list(tfds.as_numpy(builder.as_dataset(split="test")))
    labels = np.array([example["label"] for example in test])
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10
    first = next(e for e in test if e["index"] == 1000)  # class 0 (astronaut), test split, k = 0
    expected = embedded_photos.sample_patch(
        embedded_photos.photo("astronaut"), "test", np.random.default_rng([11, 0, 1, 0])
    )
    np.testing.assert_array_equal(first["image"], expected)
    assert first["image"].shape == (40, 40, 3) and first["image"].std() > 1


def test_demo_config_on_photos_keeps_the_demo_recipe_and_flips():
    photos, digits = common.get_config("A", "demo,dataset=sample_photos"), common.get_config("A", "demo")
    assert photos.dataset == "sample_photos" and digits.dataset == "sklearn_digits"
    assert photos.random_flip is True and digits.random_flip is False  # a mirrored photo is still that photo
    for field in ("learning_rate", "crop_size", "scale_min", "scale_max", "global_batch_size"):
        assert photos[field] == digits[field], field
    # The same number of steps (≈ 900) over 4.2× the examples, the rate drops at the same fractions of the run.
    steps = {name: c.num_epochs * n / c.global_batch_size for name, c, n in (("p", photos, 6000), ("d", digits, 1437))}
    assert abs(steps["p"] - steps["d"]) / steps["d"] < 0.1
    assert [b / photos.num_epochs for b in photos.step_boundaries_epochs] == [
        b / digits.num_epochs for b in digits.step_boundaries_epochs
    ]
