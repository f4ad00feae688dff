"""A folder of your own photos as a data set (vgg_jax.data.folder): layouts, the held-out split, TFDS metadata,
the streams reading it, undecodable files, a changed folder. The folder is written from scikit-image's photos.
"""

import os

import numpy as np
import pytest
from PIL import Image

from vgg_jax.configs import e
from vgg_jax.data import embedded_photos, folder, sources, streams
from vgg_jax.runtime import paths

CLASSES = ("astronaut", "coffee", "chelsea")


def _config(root, data_dir, **overrides):
    config = e.get_config("demo")
    config.dataset, config.data_dir = f"folder:{root}", str(data_dir)
    config.eval_batch_size = 4
    for key, value in overrides.items():
        config[key] = value
    return config


def _labels_by_class(listing, split):
    counts = {}
    for _, name in listing.splits[split]:
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_one_split_folder_holds_out_a_fifth_of_each_class(tmp_path):
    embedded_photos.write_folder(str(tmp_path / "photos"), CLASSES, {"": 10})
    listing = folder.scan(str(tmp_path / "photos"))
    assert listing.classes == ("astronaut", "chelsea", "coffee")  # sorted folder names, as TFDS's ImageFolder
    assert _labels_by_class(listing, "test") == dict.fromkeys(CLASSES, 2)
    assert _labels_by_class(listing, "train") == dict.fromkeys(CLASSES, 8)
    assert not set(listing.splits["train"]) & set(listing.splits["test"])
    assert folder.scan(str(tmp_path / "photos")) == listing  # deterministic
    # A file added to one class leaves the other classes' held-out images where they were.
    Image.new("RGB", (40, 50), (1, 2, 3)).save(tmp_path / "photos" / "coffee" / "new.png")
    again = folder.scan(str(tmp_path / "photos"))
    held_out = {name: {path for path, n in again.splits["test"] if n == name} for name in CLASSES}
    assert held_out["astronaut"] == {path for path, n in listing.splits["test"] if n == "astronaut"}
    assert again.fingerprint != listing.fingerprint and len(again.splits["train"]) + len(again.splits["test"]) == 31


def test_split_folders_are_kept_and_bad_layouts_are_refused(tmp_path):
    written = embedded_photos.write_folder(str(tmp_path / "split"), CLASSES[:2], {"train": 3, "validation": 2})
    (tmp_path / "split" / "train" / "coffee" / "notes.txt").write_text("not an image")
    listing = folder.scan(str(tmp_path / "split"))
    assert {split: len(items) for split, items in listing.splits.items()} == {"train": 6, "validation": 4}
    assert sorted(os.path.join(str(tmp_path / "split"), p) for p, _ in listing.splits["validation"]) == sorted(
        written["validation"]
    )
    embedded_photos.write_folder(str(tmp_path / "only_train"), CLASSES[:2], {"train": 5})
    assert {s: len(i) for s, i in folder.scan(str(tmp_path / "only_train")).splits.items()} == {"train": 8, "test": 2}

    with pytest.raises(FileNotFoundError, match="no such directory"):
        folder.scan(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.jpg")
    with pytest.raises(ValueError, match=r"expected PATH/<class>/<image> or PATH/<split>/<class>/<image>"):
        folder.scan(str(tmp_path / "flat"))
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="expected PATH/<class>/<image>"):
        folder.scan(str(tmp_path / "empty"))


def test_paths_resolve_the_folder_and_leave_pretrained_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config("photos", "")
    config.warm_start.checkpoint = "pretrained:vgg16"
    paths.resolve_config_paths(config)
    assert config.dataset == f"folder:{tmp_path / 'photos'}" and config.warm_start.checkpoint == "pretrained:vgg16"


def test_folder_reads_like_a_tfds_set(tmp_path):
    embedded_photos.write_folder(str(tmp_path / "photos"), CLASSES, {"": 10})
    config = _config(tmp_path / "photos", tmp_path / "tfds")
    metadata = sources.dataset_metadata(config)
    assert (metadata.num_classes, metadata.class_names) == (3, ["astronaut", "chelsea", "coffee"])
    assert [metadata.num_examples(s) for s in ("train", "test", "train[:50%]")] == [24, 6, 12]
    records = list(sources.read_records(metadata.builder, "test", 0).as_numpy_iterator())
    assert sorted(r["index"] for r in records) == list(range(6))
    for record in records:  # the file's own bytes, its folder's label, its path as the record's name
        path = record["id"].decode()
        assert open(path, "rb").read() == record["image"]
        assert metadata.class_names[record["label"]] == os.path.basename(os.path.dirname(path))
    images = list(streams.load_eval_images(config).as_numpy_iterator())
    assert len(images) == 6 and all(image["image"].ndim == 3 and image["image"].shape[2] == 3 for image in images)
    first = records[[r["index"] for r in records].index(images[0]["index"])]["id"].decode()
    expected = np.asarray(Image.open(first).convert("RGB"))
    if first.endswith(".png"):  # lossless: the stream decodes exactly what PIL does
        np.testing.assert_array_equal(images[0]["image"], expected)
    else:
        assert images[0]["image"].shape == expected.shape
    batches = list(streams.create_eval_iterator(config))
    assert sum(int(batch["mask"].sum()) for batch in batches) == 6
    assert batches[0]["image"].shape == (4, 32, 32, 3)


def test_undecodable_files_follow_corrupt_images(tmp_path):
    embedded_photos.write_folder(str(tmp_path / "photos"), CLASSES[:2], {"train": 4, "test": 2})
    good = tmp_path / "photos" / "test" / "coffee" / "coffee_000.jpg"
    broken = tmp_path / "photos" / "test" / "coffee" / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:200])  # a truncated JPEG
    (tmp_path / "photos" / "test" / "astronaut" / "noise.png").write_bytes(b"\x89PNG not really")
    skipping = list(streams.create_eval_iterator(_config(tmp_path / "photos", tmp_path / "tfds")))
    assert sum(int(batch["mask"].sum()) for batch in skipping) == 4  # the six files less the two broken ones
    failing = _config(tmp_path / "photos", tmp_path / "tfds", corrupt_images="fail")
    with pytest.raises(sources.CorruptImageError, match=r"(broken\.jpg|noise\.png)"):
        list(streams.create_eval_iterator(failing))


def test_a_changed_folder_is_prepared_again(tmp_path):
    embedded_photos.write_folder(str(tmp_path / "photos"), CLASSES[:2], {"train": 4, "test": 2})
    config = _config(tmp_path / "photos", tmp_path / "tfds")
    before = folder.builder(config.dataset, config.data_dir)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "photos" / "train" / "coffee" / "red.png")
    after = folder.builder(config.dataset, config.data_dir)
    assert before.data_dir != after.data_dir
    assert (sources.num_examples(before, "train"), sources.num_examples(after, "train")) == (8, 9)
