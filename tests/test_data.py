"""vgg_jax.data: paper §3.1 training data, §3.2 test preprocessing; vgg_jax.preprocess: the on-device colour shift."""

import importlib.util
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from vgg_jax import preprocess
from vgg_jax.configs import common, validation
from vgg_jax.data import image_ops, mean_rgb, sources, streams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data_dir="", **overrides):
    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            dataset="sklearn_digits",
            data_dir=data_dir,
            train_split="train",
            eval_split="test",
            crop_size=16,
            scale_min=16,
            scale_max=20,
            eval_scale=18,
            random_flip=True,
            color_shift_std=0.1,
            mean_rgb=preprocess.CAFFE_MEAN_RGB,
            shuffle_buffer=512,
            corrupt_images="skip",
            global_batch_size=256,
            eval_batch_size=200,
        )
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A data_dir where get_dataset_builder prepares the embedded set on first use."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = sources.get_dataset_builder(make_config(data_dir))
    assert builder.is_prepared()
    return data_dir


def photo(index=0):
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[index]  # 427×640 RGB


def jpeg_bytes(array, quality=90):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ mock_data (real TFDS specs)


@pytest.mark.parametrize("name, num_classes", [("imagenet2012", 1000), ("stl10", 10)])
def test_mock_data_train_and_eval(name, num_classes):
    config = make_config(dataset=name, eval_split="test" if name == "stl10" else "validation")
    config.update(global_batch_size=4, eval_batch_size=6, crop_size=24, scale_min=24, scale_max=40, eval_scale=32)
    with tfds.testing.mock_data(num_examples=8):
        meta = sources.dataset_metadata(config)
        assert meta.num_classes == num_classes and len(meta.class_names) == num_classes
        assert streams.steps_per_epoch(config, process_count=1) == 2
        it = streams.create_train_iterator(config, process_index=0, process_count=1)
        for _ in range(3):  # crosses an epoch boundary
            batch = next(it)
            assert set(batch) == {"image", "label"}
            assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
            assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
            assert ((batch["label"] >= 0) & (batch["label"] < num_classes)).all()
            assert batch["image"].std() > 0  # decoded random pixels, not padding
        batches = list(streams.create_eval_iterator(config, process_index=0, process_count=1))
        assert len(batches) == streams.num_eval_batches(config, process_count=1) == 2
        assert [b["mask"].sum() for b in batches] == [6, 2]
        assert batches[1]["image"][2:].max() == 0
        assert all(b["image"].shape == (6, 24, 24, 3) and b["label"].dtype == np.int32 for b in batches)


# ------------------------------------------------------------------------------------ preprocessing ops


def _in_map(fn, *inputs):
    """`fn` inside a tf.data map, traced as the streams trace theirs (`sources.graph_function`)."""
    mapped = sources.graph_function(lambda *a: fn(*a))
    ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(x) for x in inputs)).map(mapped)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds)))


def test_rescale_smaller_side_eager_and_in_map():
    image = photo()  # 427×640
    eager = image_ops.rescale_smaller_side(image, 256).numpy()
    assert eager.shape == (256, 384, 3) and eager.dtype == np.uint8
    np.testing.assert_array_equal(eager, _in_map(lambda x: image_ops.rescale_smaller_side(x, 256), image))
    portrait = image_ops.rescale_smaller_side(image.transpose(1, 0, 2), 100).numpy()
    assert portrait.shape == (150, 100, 3)
    # Against PIL's antialiased bilinear resize: same picture up to resampling details.
    reference = np.asarray(Image.fromarray(image).resize((384, 256), Image.BILINEAR)).astype(float)
    assert np.abs(eager - reference).mean() < 3.0
    grey = image_ops.rescale_smaller_side(image[:, :, :1], 64).numpy()
    assert grey.shape == (64, 96, 3) and (grey[..., 0] == grey[..., 2]).all()


@pytest.mark.parametrize("encode", ["jpeg", "png", "raw"])
@pytest.mark.parametrize("size", [300, 500])  # shrinking the 427×640 photo (ScaleAndTranslate) / enlarging it
def test_rescaled_crop_equals_rescale_then_crop(encode, size):
    image = photo(1)
    data = {"jpeg": jpeg_bytes, "png": png_bytes, "raw": lambda a: a}[encode](image)
    decoded = tf.io.decode_image(data, channels=3).numpy() if encode != "raw" else image
    full = image_ops.rescale_smaller_side(decoded, size).numpy()  # 300×450 or 500×749
    bottom, right = full.shape[0] - 224, full.shape[1] - 224
    for oy, ox in [(0, 0), (bottom, right), (37, 101), (0, right), (bottom, 0)]:

        def offsets(h, w, oy=oy, ox=ox):
            return tf.constant(oy), tf.constant(ox)

        eager = image_ops.rescaled_crop(data, size, 224, offsets).numpy()
        mapped = _in_map(lambda x, offsets=offsets: image_ops.rescaled_crop(x, size, 224, offsets), data)
        np.testing.assert_array_equal(eager, mapped)
        expected = full[oy : oy + 224, ox : ox + 224].astype(int)
        assert np.abs(eager.astype(int) - expected).max() <= 1
        assert (eager.astype(int) != expected).mean() < 0.01  # ±1 only from float rounding, rarely
    if size != 300:
        return
    centre = image_ops.rescaled_crop(data, 300, 224).numpy().astype(int)
    assert np.abs(centre - full[38:262, 113:337].astype(int)).max() <= 1
    fast = image_ops.rescaled_crop(data, 300, 224, resize="fast").numpy().astype(int)
    assert fast.shape == (224, 224, 3) and 0 < np.abs(fast - centre).mean() < 4.0


def test_random_rescaled_crop_eager_equals_map_and_grey_jpeg():
    data = jpeg_bytes(photo(0))
    seed = tf.constant([3, 4], tf.int64)
    kwargs = dict(scale_min=256, scale_max=512, crop=224, flip=True)
    eager, details = image_ops.random_rescaled_crop(data, seed, **kwargs)
    mapped, mapped_details = _in_map(lambda x, s: image_ops.random_rescaled_crop(x, s, **kwargs), data, seed)
    np.testing.assert_array_equal(eager.numpy(), mapped)
    assert int(details["scale"]) == int(mapped_details["scale"])
    grey = jpeg_bytes(photo(0)[:, :, 1])
    out, _ = image_ops.random_rescaled_crop(grey, seed, **kwargs)
    assert out.shape == (224, 224, 3) and (out.numpy()[..., 0] == out.numpy()[..., 1]).all()


def test_augmentation_statistics():
    """S within [Smin, Smax] and spread over it; crops inside the image and showing it; flips about half."""
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    smin, smax, crop, n = 24, 40, 20, 600

    def sample(i):
        seed = tf.stack([tf.constant(7, tf.int64), i])
        out, d = image_ops.random_rescaled_crop(
            tf.constant(image), seed, scale_min=smin, scale_max=smax, crop=crop, flip=True
        )
        return out, d["scale"], d["offset_y"], d["offset_x"], d["flipped"]

    outs, scales, oys, oxs, flips = (
        np.array(x)
        for x in zip(*tf.data.Dataset.range(n).map(sources.graph_function(sample)).as_numpy_iterator(), strict=True)
    )
    assert scales.min() == smin and scales.max() == smax
    assert set(np.unique(scales)) == set(range(smin, smax + 1))
    assert abs(scales.mean() - (smin + smax) / 2) < 1.0  # uniform: mean 32, sd of the mean ≈ 0.2
    heights = scales  # 30 < 40: the height is the smaller side
    widths = np.round(40 * scales / 30)
    assert (oys >= 0).all() and (oxs >= 0).all()
    assert (oys + crop <= heights).all() and (oxs + crop <= widths).all()
    assert oys.max() > 0 and oxs.max() > 0
    assert 0.42 < flips.mean() < 0.58  # 600 fair coins: sd 0.02
    for k in range(8):  # the crop shows what the rescaled image has there (mirrored when flipped)
        full = image_ops.rescale_smaller_side(image, int(scales[k])).numpy()
        expected = full[oys[k] : oys[k] + crop, oxs[k] : oxs[k] + crop]
        expected = expected[:, ::-1] if flips[k] else expected
        assert np.abs(outs[k].astype(int) - expected.astype(int)).max() <= 1
    no_flip = image_ops.random_rescaled_crop(
        image, tf.constant([1, 1], tf.int64), scale_min=20, scale_max=20, crop=20, flip=False
    )
    assert not bool(no_flip[1]["flipped"])


# ------------------------------------------------------------------------------------ on-device ops


def test_color_shift_covariance():
    n, std = 40_000, 0.1
    images = jnp.zeros((n, 2, 2, 3), jnp.float32)
    shifted = np.asarray(preprocess.color_shift(images, jax.random.key(0), std=std), np.float64)
    assert (shifted == shifted[:, :1, :1, :]).all()  # one shift per image, the same on every pixel
    shifts = shifted[:, 0, 0, :]
    eigval = np.asarray(preprocess.PCA_EIGVAL) * 255.0
    eigvec = np.asarray(preprocess.PCA_EIGVEC)  # columns are eigenvectors
    # shift = Σ_i α_i λ_i v_i with α_i ~ N(0, std²)  ⇒  Cov = std² Σ_i λ_i² v_i v_iᵀ
    expected = std**2 * (eigvec * eigval**2) @ eigvec.T
    covariance = np.cov(shifts, rowvar=False)
    assert np.abs(shifts.mean(axis=0)).max() < 0.1
    assert np.abs(covariance - expected).max() < 0.03 * np.abs(expected).max()
    # Not std² Σ λ_i v_i v_iᵀ (λ not squared): that one is far off.
    assert np.abs(covariance - std**2 * (eigvec * eigval) @ eigvec.T).max() > 0.5 * np.abs(expected).max()


def test_preprocess_for_model():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 3, 3, 3)), jnp.uint8)
    mean = (10.0, 20.0, 30.0)
    plain = preprocess.preprocess_for_model(images, mean_rgb=mean)
    np.testing.assert_allclose(plain, np.asarray(images, np.float32) - np.asarray(mean, np.float32))
    assert plain.dtype == jnp.float32
    np.testing.assert_allclose(preprocess.subtract_mean(images.astype(jnp.float32), mean), plain)
    key = jax.random.key(1)
    same = preprocess.preprocess_for_model(images, mean_rgb=mean, key=key, color_shift_std=0.0)
    np.testing.assert_array_equal(same, plain)
    jitted = jax.jit(lambda x, k: preprocess.preprocess_for_model(x, mean_rgb=mean, key=k, color_shift_std=0.1))
    shifted = jitted(images, key)
    delta = np.asarray(shifted - plain)
    assert np.abs(delta).max() > 0.5 and np.allclose(delta, delta[:, :1, :1, :], atol=1e-4)
    half = preprocess.preprocess_for_model(images, mean_rgb=mean, key=key, color_shift_std=0.1, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------ the embedded set end to end


def test_metadata_and_steps(digits_dir):
    config = make_config(digits_dir, global_batch_size=64)
    meta = sources.dataset_metadata(config)
    assert meta.num_classes == 10 and meta.class_names == [str(d) for d in range(10)]
    assert meta.num_examples("train") == 1437 and meta.num_examples("test") == 360
    assert streams.steps_per_epoch(config, process_count=1) == 1437 // 64
    assert streams.steps_per_epoch(config, process_count=2) == (1437 // 2) // 32


def test_determinism_and_resume(digits_dir):
    config = make_config(digits_dir)  # 256 per batch: 5 steps per epoch
    assert streams.steps_per_epoch(config, process_count=1) == 5

    def take(cfg, n, start=0):
        it = streams.create_train_iterator(cfg, start_step=start, process_index=0, process_count=1)
        return [next(it) for _ in range(n)]

    first = take(config, 7)
    again = take(config, 7)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    resumed = take(config, 3, start=4)  # steps 4, 5, 6: across the epoch boundary
    for k, batch in enumerate(resumed):
        np.testing.assert_array_equal(batch["image"], first[4 + k]["image"])
        np.testing.assert_array_equal(batch["label"], first[4 + k]["label"])
    other = take(make_config(digits_dir, seed=1), 1)
    assert not np.array_equal(other[0]["label"], first[0]["label"])
    assert not np.array_equal(first[0]["label"], first[5]["label"])  # reshuffled each epoch


def test_train_shards_disjoint_and_cover(digits_dir):
    config = make_config(digits_dir)  # 2 processes: 128 each, 5 steps, 640 of 718/719 examples per epoch
    seen = []
    for index in range(2):
        ds, _ = streams._train_dataset(config, start_step=0, process_index=index, process_count=2, with_details=True)
        batches = list(ds.take(5).as_numpy_iterator())
        indices = np.concatenate([b["index"] for b in batches])
        assert len(indices) == len(set(indices)) == 640 and (np.concatenate([b["epoch"] for b in batches]) == 0).all()
        seen.append(set(indices))
    assert not seen[0] & seen[1]
    assert max(seen[0]) < 719 <= min(seen[1]) and max(seen[1]) < 1437


def test_input_shards_make_one_process_see_what_two_hosts_see(digits_dir):
    config = make_config(digits_dir, global_batch_size=64, input_shards=2)
    assert streams.steps_per_epoch(config, process_count=1) == streams.steps_per_epoch(config, process_count=2) == 22
    alone = streams.create_train_iterator(config, start_step=3, process_index=0, process_count=1)
    hosts = [streams.create_train_iterator(config, start_step=3, process_index=i, process_count=2) for i in range(2)]
    for _ in range(2):
        batch = next(alone)
        parts = [next(host) for host in hosts]
        assert batch["image"].shape == (64, 16, 16, 3) and parts[0]["image"].shape == (32, 16, 16, 3)
        np.testing.assert_array_equal(batch["image"], np.concatenate([p["image"] for p in parts]))
        np.testing.assert_array_equal(batch["label"], np.concatenate([p["label"] for p in parts]))
    with pytest.raises(ValueError, match="input_shards=3"):
        streams.create_train_iterator(make_config(digits_dir, input_shards=3), process_index=0, process_count=2)


def test_eval_shards_disjoint_cover_and_padding(digits_dir):
    config = make_config(digits_dir, eval_batch_size=6)
    split = "test[:10]"  # 3 processes: shards of 4, 3, 3 examples; local batch 2 → 2 batches everywhere
    assert streams.num_eval_batches(config, split, process_count=3) == 2
    indices, labels = [], {}
    for index in range(3):
        images = list(streams.load_eval_images(config, split, process_index=index, process_count=3).as_numpy_iterator())
        assert all(x["image"].shape == (8, 8, 3) and x["image"].dtype == np.uint8 for x in images)
        indices += [int(x["index"]) for x in images]
        labels.update({int(x["index"]): int(x["label"]) for x in images})
        batches = list(streams.create_eval_iterator(config, split, process_index=index, process_count=3))
        assert len(batches) == 2
        mask = np.concatenate([b["mask"] for b in batches])
        assert mask.sum() == len(images) and mask[: len(images)].all()
        got = np.concatenate([b["label"] for b in batches])[mask]
        assert list(got) == [int(x["label"]) for x in images]
        assert np.concatenate([b["image"] for b in batches])[~mask].max(initial=0) == 0
    assert sorted(indices) == list(range(10))
    # The full test split on 2 processes: 180 each → batches of 100 + 80 valid.
    config = make_config(digits_dir)
    batches = list(streams.create_eval_iterator(config, process_index=1, process_count=2))
    assert [int(b["mask"].sum()) for b in batches] == [100, 80]
    assert batches[0]["image"].shape == (100, 16, 16, 3)


def test_mean_rgb(digits_dir, capsys):
    from sklearn.datasets import load_digits

    from vgg_jax.data.embedded import split_indices

    images = np.round(load_digits().images * 255 / 16)[split_indices()["train"]]
    expected = images.mean()
    rgb = mean_rgb.compute_mean_rgb(make_config(digits_dir))
    np.testing.assert_allclose(rgb, [expected] * 3, rtol=1e-6)
    with pytest.raises(SystemExit) as done:
        mean_rgb.run(["--dataset=sklearn_digits", f"--data_dir={digits_dir}", "--max_examples=50"])
    assert not done.value.code and "mean_rgb = (" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ real photos


def test_real_jpeg_decode_matches_pil():
    import skimage
    import sklearn.datasets

    files = [
        os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name) for name in ("china.jpg", "flower.jpg")
    ]
    rocket = os.path.join(os.path.dirname(skimage.__file__), "data", "rocket.jpg")
    files += [rocket] if os.path.exists(rocket) else []
    for path in files:
        data = open(path, "rb").read()
        assert data[:2] == b"\xff\xd8"
        reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
        decoded = image_ops._decode_full(tf.constant(data)).numpy().astype(int)
        assert decoded.shape == reference.shape
        difference = np.abs(decoded - reference)  # libjpeg builds differ in chroma upsampling / IDCT details
        assert difference.mean() < 2.5 and np.percentile(difference, 99) <= 10
        crop = image_ops.rescaled_crop(data, 256, 224).numpy()  # window-only decode
        full = image_ops.rescale_smaller_side(decoded.astype(np.uint8), 256).numpy()
        h, w = full.shape[:2]
        oy, ox = (h - 224) // 2, (w - 224) // 2
        assert np.abs(crop.astype(int) - full[oy : oy + 224, ox : ox + 224]).max() <= 1


# ------------------------------------------------------------------------------------ corrupt records


def _corrupt_as_dataset(self, *args, **kwargs):
    good = jpeg_bytes(photo(0)[:64, :64])
    records = [good, good[: len(good) // 2], b"not an image at all", png_bytes(photo(1)[:40, :50]), good + b"\0tail"]
    return tf.data.Dataset.from_tensor_slices(
        {
            "image": records,
            "label": np.arange(len(records), dtype=np.int64),
            "tfds_id": [f"fake-test.tfrecord-00000-of-00001__{i}" for i in range(len(records))],
        }
    )


def test_corrupt_records_skip_and_fail():
    config = make_config(dataset="imagenet2012", eval_split="validation", eval_batch_size=8, global_batch_size=3)
    with tfds.testing.mock_data(as_dataset_fn=_corrupt_as_dataset):
        it = streams.create_eval_iterator(config, process_index=0, process_count=1)
        (batch,) = list(it)
        assert batch["mask"].sum() == 3 and list(batch["label"][batch["mask"]]) == [0, 3, 4]
        assert it.num_skipped_corrupt == 2
        train = streams.create_train_iterator(config, process_index=0, process_count=1)
        labels = np.concatenate([next(train)["label"] for _ in range(4)])  # batches of 3 span epochs
        assert set(labels) <= {0, 3, 4} and train.num_skipped_corrupt >= 1
        config.corrupt_images = "fail"
        with pytest.raises(sources.CorruptImageError, match=r"fake-test\.tfrecord-00000-of-00001__1"):
            list(streams.create_eval_iterator(config, process_index=0, process_count=1))


# ------------------------------------------------------------------------------------ clear errors


def test_clear_errors(tmp_path, digits_dir):
    with pytest.raises(ValueError, match=r"no_such_set.*configs/e\.py:demo"):
        sources.get_dataset_builder(make_config(str(tmp_path), dataset="no_such_set"))
    with pytest.raises(FileNotFoundError, match=r"downloads/manual.*ILSVRC2012_img_train\.tar.*configs/e\.py:demo"):
        sources.get_dataset_builder(make_config(str(tmp_path), dataset="imagenet2012"))
    assert not os.path.exists(tmp_path / "imagenet2012" / "5.1.0" / "dataset_info.json")
    # What depends on the process count or the data set is checked by the stream itself ...
    cases = [
        (dict(global_batch_size=100), 3, r"global_batch_size=100.*multiple of the number of processes \(3\)"),
        (dict(train_split="trian"), 1, r"train_split='trian' is not a split"),
    ]
    for overrides, count, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            streams.create_train_iterator(make_config(digits_dir, **overrides), process_index=0, process_count=count)
    # ... and the fields' own values by the one validation every command runs first (configs/fields.py).
    for overrides, pattern in (
        (dict(scale_min=300, scale_max=256), r"scale_min=300 > config\.scale_max=256"),
        (dict(crop_size=64), r"crop_size=64 > config\.scale_min=32"),
        (dict(corrupt_images="ignore"), r"corrupt_images='ignore'"),
        (dict(resize_method="bicubic"), r"resize_method='bicubic'"),
    ):
        config = common.get_config("A", "demo")
        config.update(overrides)
        with pytest.raises(ValueError, match=pattern):
            validation.validate(config)
    with pytest.raises(ValueError, match=r"crop_size=16 is larger than the test scale Q=12"):
        streams.create_eval_iterator(make_config(digits_dir), scale=12, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"eval_batch_size=200.*\(3\)"):
        streams.create_eval_iterator(make_config(digits_dir), process_index=0, process_count=3)


# ------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow  # a benchmark run; test_bench covers the harness in the fast tier
def test_bench_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_input_pipeline", os.path.join(REPO, "bench", "input_pipeline.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--tiny", f"--json={tmp_path / 'bench.json'}"])
    rates = {r["pipeline"]: r["median"] for r in summary["results"]}
    assert set(rates) == {"tf_fast", "tf_canvas", "pil"} and min(rates.values()) > 0
    assert (tmp_path / "bench.json").exists()
    assert all("foreign_cores" in r["load"] for r in summary["results"])  # each row says how busy the machine was


@pytest.mark.slow  # a benchmark run of every stage
def test_bench_components_time_each_stage():
    command = [sys.executable, os.path.join(REPO, "bench", "input_pipeline.py"), "--components"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.rsplit(None, 2) for line in run.stdout.splitlines() if line.endswith(" ms")]
    times = {name.strip(): float(value) for name, value, _ in rows}
    assert len(times) == 8 and all(t > 0 for t in times.values())
    assert times["decode 330² window"] < times["whole op, S = 256 (shrinking)"]
    assert "window on a 448² canvas, S = 256 (resample_on_device)" in times
