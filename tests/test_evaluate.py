"""Paper §3.2 / §4 evaluation: dense, multi-crop, scales, flips, fusion, top-k (vgg_jax/evaluation/evaluate.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import readers_env, with_xla_flags

from vgg_jax import models
from vgg_jax.checkpointing import checkpoints
from vgg_jax.configs import common
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.evaluation import evaluate, executor, runner
from vgg_jax.evaluation.arithmetic import multicrop_offsets, multicrop_views, topk_errors
from vgg_jax.evaluation.protocol import TestProtocol
from vgg_jax.runtime import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 32
MEAN = (120.0, 110.0, 100.0)


def tiny_config(num_classes=10, crop=CROP):
    config = common.get_config("A", "demo")
    config.model.num_classes = num_classes
    config.model.width_multiplier = 1 / 16
    config.model.fc_width = 32
    config.crop_size = crop
    config.mean_rgb = MEAN
    config.eval_batch_size = 100
    return config


def random_params(model, seed):
    """He-normal kernels and small biases, drawn by NumPy (jax.random compiles slowly on a loaded CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, CROP, CROP, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0
        std = np.sqrt(2.0 / fan_in) if fan_in else 0.1
        if path[0].key == "conv1_1":
            std /= 64.0  # pixels are 0-255: keep the logits a few units wide
        return rng.normal(0.0, std, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def net():
    """A narrow net whose logits span several units, so that posteriors ≠ logits matters."""
    config = tiny_config()
    model = models.from_config(config)
    params = random_params(model, 0)
    apply = jax.jit(lambda x: model.apply({"params": params}, x))
    apply_dense = jax.jit(lambda x: model.apply({"params": params}, x, dense=True))
    return config, model, params, apply, apply_dense


def _images(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


def _examples(images_by_scale, labels=None):
    """`run_evaluation` examples: {'index', 'label', 'scaled': {Q: image}} from per-scale image lists."""
    scales = list(images_by_scale)
    count = len(images_by_scale[scales[0]])
    labels = labels if labels is not None else [i % 10 for i in range(count)]
    return [
        {"index": i, "label": labels[i], "scaled": {q: images_by_scale[q][i] for q in scales}} for i in range(count)
    ]


def _run(net, examples, method, scales, *, flips="yes", batch_size=100, **options):
    """The runner under TestProtocol(method, scales, **options), resolved for the tiny net (flips forced on)."""
    config, model, params, _, _ = net
    protocol = TestProtocol(method, list(scales), flips=flips, batch_size=batch_size, **options).resolve(config)
    return runner.run_evaluation(model, params, examples, protocol, mean_rgb=MEAN)


def _softmax(x):
    return np.asarray(jax.nn.softmax(jnp.asarray(x, jnp.float32), axis=-1))


# ----------------------------------------------------------------------------- multi-crop views


def test_multicrop_offsets_are_the_5x5_grid_with_corners():
    offsets = multicrop_offsets(50, 70, 32)
    assert offsets.shape == (25, 2)
    # linspace(0, 18, 5) = 0, 4.5, 9, 13.5, 18 and linspace(0, 38, 5) = 0, 9.5, 19, 28.5, 38, rounded.
    assert sorted(set(offsets[:, 0].tolist())) == [0, 4, 9, 14, 18]
    assert sorted(set(offsets[:, 1].tolist())) == [0, 10, 19, 28, 38]
    assert len({tuple(o) for o in offsets.tolist()}) == 25
    for corner in [(0, 0), (0, 38), (18, 0), (18, 38)]:
        assert corner in {tuple(o) for o in offsets.tolist()}
    assert {tuple(o) for o in multicrop_offsets(32, 32, 32).tolist()} == {(0, 0)}
    with pytest.raises(ValueError, match="smaller than the crop"):
        multicrop_offsets(31, 64, 32)


def test_multicrop_views_are_the_grid_crops_and_their_flips():
    height, width = 50, 70
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([rows, cols, rows * 0], axis=-1).astype(np.uint8)  # a pixel names its position
    views = multicrop_views(image, 32)
    assert views.shape == (50, 32, 32, 3)
    for i, (top, left) in enumerate(multicrop_offsets(height, width, 32)):
        assert views[i][0, 0, 0] == top and views[i][0, 0, 1] == left
        np.testing.assert_array_equal(views[i], image[top : top + 32, left : left + 32])
        np.testing.assert_array_equal(views[25 + i], image[top : top + 32, left : left + 32][:, ::-1])
    # Both flips: the mirrored views start at the right edge of their window.
    assert views[25][0, 0, 1] == 31


def test_150_views_over_3_scales():
    image = _images(0, [(40, 60)])[0]

    def rescale(img, q):  # nearest-neighbour, smaller side q
        h, w = img.shape[:2]
        size = (q, round(w * q / h)) if h <= w else (round(h * q / w), q)
        return img[np.arange(size[0]) * h // size[0]][:, np.arange(size[1]) * w // size[1]]

    views = protocols.multiscale_views(image, [32, 40, 48], 32, rescale)
    assert views.shape == (150, 32, 32, 3)
    for j, q in enumerate([32, 40, 48]):
        scaled = rescale(image, q)
        np.testing.assert_array_equal(views[50 * j], scaled[:32, :32])
        np.testing.assert_array_equal(views[50 * j + 24], scaled[-32:, -32:])


# ----------------------------------------------------------------------------- top-k


def _reference_topk(scores, labels, k):
    """Pessimistic ties, written differently: rank by score, the true class placed after equal scores."""
    wrong = []
    for row, label in zip(scores, labels, strict=True):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c == label))
        wrong.append(order.index(label) >= k)
    return np.array(wrong)


def test_topk_errors_against_numpy_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 12, (500, 12)).astype(np.float32)  # many ties
    labels = rng.integers(0, 12, 500)
    mask = rng.random(500) < 0.7
    result = topk_errors(scores, labels, mask, ks=(1, 3, 5))
    for k in (1, 3, 5):
        expected = (_reference_topk(scores, labels, k) & mask).sum() / mask.sum()
        assert result[f"top{k}_error"] == pytest.approx(expected)
    assert 0.05 < result["top5_error"] < result["top1_error"] < 0.95
    # Ties at the k-th place are frequent here: the optimistic rule would give other numbers.
    true = scores[np.arange(500), labels]
    for k in (1, 5):
        optimistic = (((scores > true[:, None]).sum(1) >= k) & mask).sum() / mask.sum()
        assert optimistic < result[f"top{k}_error"] - 0.02


def test_topk_tie_rule_by_hand():
    scores = np.array([[1.0, 1, 1, 1], [3, 2, 2, 0], [3, 2, 2, 0], [0, 0, 0, 0], [np.nan, 1, 0, 0]])
    labels = np.array([0, 1, 0, 2, 1])
    top1 = topk_errors(scores, labels, ks=(1,))["top1_error"]
    top2 = topk_errors(scores, labels, ks=(2,))["top2_error"]
    # row 0: all tied → wrong at k=1..3; row 1: tied second → wrong at 1 and 2; row 2: right;
    # row 3: constant → wrong; row 4: NaN → wrong.
    assert top1 == pytest.approx(4 / 5)
    assert top2 == pytest.approx(4 / 5)
    assert topk_errors(scores[1:3], labels[1:3], ks=(3,))["top3_error"] == 0.0
    assert topk_errors(scores, labels, mask=np.array([0, 0, 1, 0, 0]))["top1_error"] == 0.0


# ----------------------------------------------------------------------------- dense, flips, scales, fusion


def test_dense_on_crop_sized_image_equals_crop_head_with_posteriors_averaged(net):
    _, _, _, apply, _ = net
    images = _images(2, [(CROP, CROP)] * 3)
    result = _run(net, _examples({CROP: images}), "dense", [CROP])
    x = np.stack(images).astype(np.float32) - np.array(MEAN, np.float32)
    logits, logits_flip = np.asarray(apply(x)), np.asarray(apply(x[:, :, ::-1]))
    expected = 0.5 * (_softmax(logits) + _softmax(logits_flip))
    np.testing.assert_allclose(result["posteriors"]["dense"], expected, atol=2e-5)
    averaged_logits = _softmax(0.5 * (logits + logits_flip))
    assert np.abs(averaged_logits - expected).max() > 1e-3  # the test can tell the two apart


def test_multicrop_averages_posteriors_of_the_50_views(net):
    _, _, _, apply, _ = net
    images = _images(3, [(40, 52), (45, 40)])
    result = _run(net, _examples({40: images}), "multicrop", [40])
    for i, image in enumerate(images):
        views = multicrop_views(image, CROP).astype(np.float32) - np.array(MEAN, np.float32)
        logits = np.asarray(apply(views))
        np.testing.assert_allclose(result["posteriors"]["multicrop"][i], _softmax(logits).mean(0), atol=2e-5)
        assert np.abs(_softmax(logits.mean(0)) - _softmax(logits).mean(0)).max() > 1e-4


def test_scale_averaging_both_and_fusion_are_posterior_means(net):
    config, _, params, _, _ = net
    small, large = _images(4, [(32, 40)] * 4), _images(5, [(40, 50)] * 4)
    labels = [3, 1, 4, 1]
    examples = _examples({32: small, 40: large}, labels)
    # flips="yes": the helper `_run` mirrors; this config trained without flips ('auto' = no).
    protocol = TestProtocol("both", [32, 40], flips="yes")
    both = evaluate.evaluate_params(config, params, protocol, examples=examples)
    per_scale = {
        (m, q): _run(net, _examples({q: imgs}, labels), m, [q])["posteriors"][m]
        for m in ("dense", "multicrop")
        for q, imgs in ((32, small), (40, large))
    }
    for m in ("dense", "multicrop"):
        expected = 0.5 * (per_scale[(m, 32)] + per_scale[(m, 40)])
        np.testing.assert_allclose(both["by_method"][m]["posteriors"], expected, atol=1e-6)
    np.testing.assert_allclose(
        both["posteriors"],
        0.5 * (both["by_method"]["dense"]["posteriors"] + both["by_method"]["multicrop"]["posteriors"]),
    )
    np.testing.assert_allclose(both["posteriors"].sum(1), 1.0, atol=1e-5)
    assert both["num_examples"] == 4 and both["labels"].tolist() == labels
    expected_metrics = topk_errors(both["posteriors"], np.array(labels))
    assert both["top1_error"] == pytest.approx(expected_metrics["top1_error"])
    # Fusion: the mean of the nets' posteriors.
    a, b = both["by_method"]["dense"]["posteriors"], per_scale[("dense", 32)]
    np.testing.assert_allclose(protocols.fuse_posteriors([a, b]), (a + b) / 2)
    with pytest.raises(ValueError, match="different shapes"):
        protocols.fuse_posteriors([a, a[:, :5]])


# ----------------------------------------------------------------------------- bucketing


def test_dense_canvases_and_choice():
    canvases = protocols.dense_canvases(64, max_aspect=2.0, num_buckets=5)
    assert canvases == [(64, 64), (64, 80), (64, 96), (64, 112), (64, 128), (80, 64), (96, 64), (112, 64), (128, 64)]
    assert protocols.choose_canvas(64, 90, canvases) == (64, 96)
    assert protocols.choose_canvas(100, 64, canvases) == (112, 64)
    assert protocols.choose_canvas(64, 300, canvases) == (64, 128)  # too elongated: centre-cropped
    placed, size = protocols.place_on_canvas(np.ones((64, 300, 3), np.uint8), (64, 128))
    assert size == (64, 128) and placed.shape == (64, 128, 3)
    # Ceil-mode pools in dense evaluation: the map covers all 90 columns (a floor would stop at 64).
    assert protocols.dense_map_size(64, 90, 32) == (2, 3)
    assert protocols.dense_map_size(64, 90, 64) == (1, 2)  # a 2×2 fc6 window: windows of 64 at stride 32


def test_bucketed_dense_equals_exact_per_image_where_shapes_match(net):
    _, _, _, _, apply_dense = net
    # Q=64; 64×96 and 80×64 are canvas shapes; mixed orientations, several batches with padding rows.
    shapes = [(64, 96), (80, 64), (64, 64), (64, 96), (80, 64)]
    images = _images(6, shapes)
    # The canvas machinery under Caffe's ceil pools (the map reaches past a side that is not a multiple of 32).
    bucketed = _run(net, _examples({64: images}), "dense", [64], batch_size=4, pooling="ceil")
    exact = _run(net, _examples({64: images}), "dense", [64], buckets="exact", batch_size=4, pooling="ceil")
    np.testing.assert_allclose(bucketed["posteriors"]["dense"], exact["posteriors"]["dense"], atol=1e-6)
    assert bucketed["indices"].tolist() == [0, 1, 2, 3, 4]
    for i, image in enumerate(images):  # the exact computation, by hand, one image at a time
        x = image[None].astype(np.float32) - np.array(MEAN, np.float32)
        scores = [np.asarray(apply_dense(v)).mean((1, 2))[0] for v in (x, x[:, :, ::-1])]
        expected = 0.5 * (_softmax(scores[0]) + _softmax(scores[1]))
        np.testing.assert_allclose(bucketed["posteriors"]["dense"][i], expected, atol=2e-5)


def test_centre_pooling_trims_evenly_and_equals_the_centre_crop_on_one_window(net):
    config, _, _, apply, apply_dense = net
    assert config.dense_pooling == "centre"  # the digit demos' rule (the paper's configs: 'ceil')
    shapes = [(36, 36), (40, 75), (64, 90), (71, 64)]
    images = _images(13, shapes)
    result = _run(net, _examples({36: images}), "dense", [36], batch_size=4, flips=False)
    result["posteriors"] |= _run(net, _examples({36: images}), "center_crop", [36], flips=False)["posteriors"]
    for i, image in enumerate(images):
        trimmed = protocols.centre_trim(image)
        top, left = (image.shape[0] % 32) // 2, (image.shape[1] % 32) // 2
        assert trimmed.shape[:2] == (image.shape[0] // 32 * 32, image.shape[1] // 32 * 32)
        np.testing.assert_array_equal(trimmed, image[top : top + trimmed.shape[0], left : left + trimmed.shape[1]])
        x = trimmed[None].astype(np.float32) - np.array(MEAN, np.float32)
        expected = _softmax(np.asarray(apply_dense(x)).mean((1, 2))[0])
        np.testing.assert_allclose(result["posteriors"]["dense"][i], expected, atol=2e-5)
    # A 36×36 image holds one 32-px window: the dense map is the centre crop (crop 32 = fc6's 1×1 window).
    crop = protocols.center_crop(images[0], CROP)[None].astype(np.float32) - np.array(MEAN, np.float32)
    np.testing.assert_allclose(result["posteriors"]["dense"][0], _softmax(np.asarray(apply(crop))[0]), atol=2e-5)
    np.testing.assert_allclose(result["posteriors"]["dense"][0], result["posteriors"]["center_crop"][0], atol=2e-5)
    with pytest.raises(ValueError, match="dense_pooling must be one of"):
        TestProtocol(pooling="round")


def test_padded_dense_ignores_padding_and_keeps_the_exact_cells(net):
    _, model, params, _, apply_dense = net
    image = _images(7, [(64, 90)])[0]
    placed, size = protocols.place_on_canvas(image, (64, 96))
    garbage = placed.copy()
    garbage[:, 90:] = 255
    function = executor.forward("dense", model, MEAN, parallel.create_mesh(), True)
    meta = np.zeros((2, 5), np.int32)
    posteriors, _ = function(params, np.stack([placed, garbage]), np.array([size, size], np.int32), meta)
    posteriors = np.asarray(posteriors)
    np.testing.assert_allclose(posteriors[0], posteriors[1], atol=1e-6)  # padding content is invisible
    # The exact map of the 64×90 image has 2×3 cells (ceil-mode pools), as the canvas map: every conv is
    # masked to the image, so the result is the exact one (it used to be only close: border context differed).
    x = image[None].astype(np.float32) - np.array(MEAN, np.float32)
    assert np.asarray(apply_dense(x)).shape[1:3] == protocols.dense_map_size(64, 90, CROP)
    scores = [np.asarray(apply_dense(v)).mean((1, 2))[0] for v in (x, x[:, :, ::-1])]
    exact = 0.5 * (_softmax(scores[0]) + _softmax(scores[1]))
    np.testing.assert_allclose(posteriors[0], exact, atol=2e-5)


def test_every_example_counted_once_with_uneven_batches(net):
    shapes = [(40, 40), (40, 50), (50, 40), (40, 60), (40, 40), (40, 50), (40, 80)]
    images = _images(8, shapes)
    examples = _examples({40: images})
    config, model, params, _, _ = net
    for method in ("dense", "multicrop", "center_crop"):
        protocol = TestProtocol(method, [40], flips="yes", pooling="ceil", batch_size=3).resolve(config)
        result = runner.run_evaluation(model, params, examples, protocol, mean_rgb=MEAN, chunk_examples=2)
        assert result["indices"].tolist() == list(range(7))
        assert result["labels"].tolist() == [i % 10 for i in range(7)]
        single = [_run(net, [dict(e, index=0)], method, [40], batch_size=3, pooling="ceil") for e in examples]
        expected = np.concatenate([s["posteriors"][method] for s in single])
        np.testing.assert_allclose(result["posteriors"][method], expected, atol=1e-6)


# ----------------------------------------------------------------------------- scales and errors


def test_paper_scales():
    fixed, jittered = tiny_config(), tiny_config()
    fixed.scale_min = fixed.scale_max = 256
    jittered.scale_min, jittered.scale_max = 256, 512
    assert protocols.paper_scales(fixed) == [256] and protocols.paper_scales(fixed, multi=True) == [224, 256, 288]
    assert protocols.paper_scales(jittered) == [384]
    assert protocols.paper_scales(jittered, multi=True) == [256, 384, 512]
    assert protocols.resolve_scales("multi", jittered) == [256, 384, 512]
    assert protocols.resolve_scales("40,48", jittered) == [40, 48]
    with pytest.raises(ValueError, match=r"Q=\[16\].*crop_size=32"):
        protocols.resolve_scales("16,40", jittered)
    with pytest.raises(ValueError, match="integers"):
        protocols.resolve_scales("big", jittered)


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory, net):
    """Run directories with random narrow nets (sklearn_digits, 10 classes) and one with 7 classes."""
    config, model, params, _, _ = net
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, seed, classes in (("net_a", 0, 10), ("net_b", 1, 10), ("seven", 2, 7)):
        run_config = tiny_config(num_classes=classes)
        run_params = random_params(models.from_config(run_config), seed)
        checkpoints.save_params_only(str(root / name), run_params, run_config)
        dirs[name] = str(root / name)
    (root / "empty").mkdir()
    checkpoints.save_config(str(root / "no_ckpt"), config)
    dirs["empty"], dirs["no_ckpt"] = str(root / "empty"), str(root / "no_ckpt")
    return dirs


def test_clear_errors_before_any_work(fake_runs, net):
    config, _, params, _, _ = net
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.evaluate_checkpoints([fake_runs["net_a"], fake_runs["empty"]])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate.evaluate_checkpoints([fake_runs["no_ckpt"]])
    with pytest.raises(ValueError, match=r"net_a \(10 classes\).*seven \(7 classes\)"):
        evaluate.evaluate_checkpoints([fake_runs["net_a"], fake_runs["seven"]])
    with pytest.raises(ValueError, match="smaller than crop_size"):
        evaluate.evaluate_checkpoints([fake_runs["net_a"]], TestProtocol(scales=[24, 36]))
    with pytest.raises(ValueError, match="smaller than crop_size"):
        evaluate.evaluate_params(config, params, TestProtocol(scales=[16]))
    with pytest.raises(ValueError, match="method"):
        TestProtocol(method="tencrop")
    with pytest.raises(ValueError, match="given 3 times for 2 nets: give it once"):
        evaluate.evaluate_checkpoints([fake_runs["net_a"], fake_runs["net_b"]], TestProtocol(scales=["32", "36", "40"]))


def _check_report(report, out_path, methods, nets):
    with open(out_path) as stream:
        written = json.load(stream)
    assert written["rows"] == report["rows"]
    assert [row["method"] for row in report["rows"]] == methods * nets
    lines = report["table"].splitlines()[2:]
    assert len(lines) == len(report["rows"])
    for line, row in zip(lines, report["rows"], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == row["net"] and cells[3] == ",".join(map(str, row["scales"]))
        assert float(cells[4]) == pytest.approx(100 * row["top1_error"], abs=0.051)
        assert float(cells[5]) == pytest.approx(100 * row["top5_error"], abs=0.051)
        assert 0.0 <= row["top5_error"] <= row["top1_error"] <= 1.0
    return written


def test_fusion_of_checkpoints_end_to_end(fake_runs, tmp_path, capsys):
    out = str(tmp_path / "results.json")
    protocol = TestProtocol("both", "40,36")
    report = evaluate.evaluate_checkpoints(
        [fake_runs["net_a"], fake_runs["net_b"]], protocol, step="latest", out=out, max_examples=24
    )
    _check_report(report, out, ["dense", "multicrop", "both"], 3)
    assert all(row["num_examples"] == 24 for row in report["rows"])
    fused = [row for row in report["rows"] if "+" in row["net"]]
    assert [row["train_scale"] for row in fused] == ["fusion"] * 3
    assert report["table"] in capsys.readouterr().out
    # The fused errors are those of the mean posterior, recomputed here from each net's own evaluation.
    posteriors = []
    for name in ("net_a", "net_b"):
        params, config, _ = checkpoints.restore_params(fake_runs[name])
        result = evaluate.evaluate_params(config, params, TestProtocol("dense", [40, 36]), max_examples=24)
        posteriors.append(result["posteriors"])
    expected = topk_errors(np.mean(posteriors, axis=0), result["labels"])
    assert fused[0]["top1_error"] == pytest.approx(expected["top1_error"])
    assert fused[0]["top5_error"] == pytest.approx(expected["top5_error"])


def test_cli(command_lines, fake_runs, tmp_path):
    out = tmp_path / "cli.json"
    command = ["vgg_jax.evaluation.evaluate", f"--checkpoint={fake_runs['net_a']}", "--method=dense"]
    done = command_lines.run(*command, "--scales=36", "--max_examples=12", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["num_examples"] == 12 and rows[0]["scales"] == [36]
    assert "| top-1 error (%) |" in done.stdout
    assert "images/s" in done.stderr  # progress
    failed = command_lines.run(*command, "--scales=16")
    assert failed.returncode == 1 and "smaller than crop_size" in failed.stderr


def test_two_devices_give_the_same_posteriors(tmp_path):
    """Rows sharded over 2 (CPU) devices, batches padded to a device multiple: same result as 1 device."""
    script = tmp_path / "two.py"
    script.write_text(
        "import sys, jax, jax.numpy as jnp, numpy as np\n"
        "sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
        "from tests.test_evaluate import two_device_case\n"
        "np.savez(sys.argv[2], n=jax.device_count(), **two_device_case())\n"
    )
    env = with_xla_flags(dict(os.environ, JAX_PLATFORMS="cpu"), "--xla_force_host_platform_device_count=2")
    path = tmp_path / "out.npz"
    done = subprocess.run([sys.executable, str(script), REPO, str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = np.load(path), two_device_case()
    assert two["n"] == 2 and jax.device_count() == 1
    for method in ("dense", "multicrop"):
        np.testing.assert_allclose(two[method], one[method], atol=1e-6)


def two_device_case():
    model = models.from_config(tiny_config())
    params = random_params(model, 0)
    examples = _examples({40: _images(9, [(40, 40), (40, 52), (52, 40), (40, 40), (40, 60)])})
    protocol = TestProtocol("both", [40], flips="yes", pooling="ceil", batch_size=4).resolve(tiny_config())
    return runner.run_evaluation(model, params, examples, protocol, mean_rgb=MEAN)["posteriors"]


@pytest.mark.slow  # a benchmark's own run
def test_bench_tiny():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_evaluation", os.path.join(REPO, "bench", "evaluation.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run_benchmark(variant="A", crop=32, num_images=2, batch_size=16, repeats=1)
    assert [(row["method"], row["views"]) for row in rows] == [
        ("dense", "1 scale"),
        ("dense", "3 scales"),
        ("multicrop", "50 crops"),
        ("multicrop", "150 crops"),
    ]
    assert rows[0]["scales"] == [37] and rows[1]["scales"] == [32, 37, 41]
    assert all(row["images_per_s"] > 0 for row in rows) and rows[0]["speed_relative_to_dense_1_scale"] == 1.0
    # Analytic cost: 50 crop-sized forwards vs 2 canvas-sized ones (Q=37 → a 37x49 canvas, 1x1 score map).
    assert rows[2]["gmacs_per_image"] > 10 * rows[0]["gmacs_per_image"]
    assert rows[3]["gmacs_per_image"] > 2.5 * rows[2]["gmacs_per_image"]


# ----------------------------------------------------------------------------- the demo net


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_demo_net_well_below_chance(demo_workdir, tmp_path):
    # The evaluate command as a reader runs it, compiled as theirs is: under the tests' unoptimised XLA flags
    # the dense and multi-crop passes over the 360 test digits took 210 s instead of ~40 s.
    out = tmp_path / "demo.json"
    command = [sys.executable, "-m", "vgg_jax.evaluation.evaluate", f"--checkpoint={demo_workdir}", "--method=both"]
    done = subprocess.run([*command, f"--out={out}"], env=readers_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(out.read_text())
    assert [row["method"] for row in written["rows"]] == ["dense", "multicrop", "both"]
    assert "| top-1 error (%) |" in done.stdout
    for row in written["rows"]:
        assert row["scales"] == [36] and row["num_examples"] == 360
        assert row["step"] == 880 and row["flips"] is False  # the final net; trained without flips
        # chance: 0.9 / 0.5. bench/RESULTS.md, "Dense evaluation fidelity": dense 0.3 %, multi-crop 0.6 %, both
        # 0.6 % (the centre crop: 0.3 %); with ceil pools dense was 7.5 %, with floor pools 3.9 %.
        limit = {"dense": 0.03, "multicrop": 0.03, "both": 0.03}[row["method"]]
        assert row["top1_error"] < limit, row
        assert row["top5_error"] < 0.02, row


# ----------------------------------------------------------------------------- fidelity: pooling, flips, step


def test_pooling_rules_choose_the_part_of_the_image_the_net_runs_on(net):
    """ceil: the whole image (the map reaches past it, every pixel counts); centre / floor: a multiple of 32."""
    _, _, _, _, apply_dense = net
    image = _images(10, [(36, 45)])[0]
    x = image[None].astype(np.float32) - np.array(MEAN, np.float32)
    ceil_map = np.asarray(apply_dense(x))
    assert ceil_map.shape[1:3] == protocols.dense_map_size(36, 45, CROP) == (2, 2)
    changed = x.copy()
    changed[:, 33:, 40:] += 50.0  # the bottom-right corner: a cell of its own under ceil
    assert np.abs(np.asarray(apply_dense(changed))[:, 1, 1] - ceil_map[:, 1, 1]).max() > 1e-3
    assert protocols.dense_region(36, 45, "ceil") == (0, 0, 36, 45)
    assert protocols.dense_region(36, 45, "centre") == (2, 6, 32, 32)
    assert protocols.dense_region(36, 45, "floor") == (0, 0, 32, 32)
    np.testing.assert_array_equal(protocols.dense_input(image, "floor"), image[:32, :32])
    np.testing.assert_array_equal(protocols.dense_input(image, "centre"), image[2:34, 6:38])
    for pooling, view in (("floor", x[:, :32, :32]), ("centre", x[:, 2:34, 6:38]), ("ceil", x)):
        result = _run(net, _examples({36: [image]}), "dense", [36], flips="no", pooling=pooling)
        expected = _softmax(np.asarray(apply_dense(view)).mean((1, 2))[0])
        np.testing.assert_allclose(result["posteriors"]["dense"][0], expected, atol=2e-5)


def test_flips_follow_training_and_the_final_step_is_reported(fake_runs, net):
    config, _, params, _, _ = net
    assert config.random_flip is False  # the demo's digits
    examples = _examples({40: _images(12, [(40, 48)] * 3)})
    auto = evaluate.evaluate_params(config, params, TestProtocol("multicrop", [40]), examples=examples)
    forced = evaluate.evaluate_params(config, params, TestProtocol("multicrop", [40], "yes"), examples=examples)
    assert auto["flips"] is False and forced["flips"] is True
    views = [protocols.multicrop_views(e["scaled"][40], CROP, flips=False) for e in examples]
    _, _, _, apply, _ = net
    expected = [_softmax(np.asarray(apply(v.astype(np.float32) - np.array(MEAN, np.float32)))).mean(0) for v in views]
    np.testing.assert_allclose(auto["posteriors"], np.stack(expected), atol=2e-5)
    assert np.abs(auto["posteriors"] - forced["posteriors"]).max() > 1e-4
    with pytest.raises(ValueError, match="flips"):
        protocols.resolve_flips("maybe", config)
    report = evaluate.evaluate_checkpoints([fake_runs["net_a"]], TestProtocol("center_crop", "36"), max_examples=8)
    step = checkpoints.resolve_step(fake_runs["net_a"], "latest")
    assert report["rows"][0]["step"] == step and report["steps"] == {fake_runs["net_a"]: step}
    assert report["table"].splitlines()[0].endswith("| step | flips |")
    assert report["table"].splitlines()[2].endswith(f"| {step} | no |")
