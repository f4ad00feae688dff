"""App. A localisation: the box head, the arithmetic, configs, training from a classifier, both test protocols."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_jax
from vgg_jax import models
from vgg_jax.checkpointing import checkpoints
from vgg_jax.configs import loc as loc_config
from vgg_jax.configs import validation
from vgg_jax.evaluation import arithmetic as protocols
from vgg_jax.localisation import arithmetic as localise
from vgg_jax.localisation import dense as localise_dense
from vgg_jax.localisation import evaluate as localise_eval
from vgg_jax.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("head, width", [("scr", 4), ("pcr", 4 * 7)])
def test_box_head_on_crops_and_densely(head, width):
    model = models.VGG(variant="A", num_classes=7, width_multiplier=1 / 16, fc_width=8, crop_size=32, box_head=head)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert "fc8_box" in params and "fc8" not in params  # its own name: a classifier's fc8 never fills it
    assert params["fc8_box"]["kernel"].shape == (8, width)
    assert model.apply({"params": params}, jnp.zeros((2, 32, 32, 3))).shape == (2, width)
    dense = model.apply({"params": params}, jnp.zeros((1, 64, 96, 3)), dense=True)
    assert dense.shape == (1, 2, 3, width)
    assert set(model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), outputs=["fc7", "fc8_box"])) == {
        "fc7",
        "fc8_box",
    }


def test_classifier_head_is_unchanged():
    assert models.parameter_count("D") == 138_357_544
    extra = models.parameter_count("D", box_head="pcr") - models.parameter_count("D")
    assert extra == 4096 * 4000 + 4000 - (4096 * 1000 + 1000)  # PCR: 4000 outputs for ImageNet


# ----------------------------------------------------------------------------- arithmetic


def test_box_parameters_and_iou():
    corners = np.asarray([[0.1, 0.2, 0.5, 0.8]])  # ymin, xmin, ymax, xmax
    params = localise.corners_to_params(corners)
    np.testing.assert_allclose(params, [[0.5, 0.3, 0.6, 0.4]], atol=1e-6)  # cx, cy, w, h
    np.testing.assert_allclose(localise.params_to_corners(params), corners, atol=1e-6)
    assert float(localise.iou(corners, corners)[0]) == pytest.approx(1.0)
    half = np.asarray([[0.1, 0.2, 0.5, 0.5]])
    assert float(localise.iou(corners, half)[0]) == pytest.approx(0.5)
    # IoU ignores a separate scaling of each axis: any normalised frame works.
    scaled = lambda b: b * np.asarray([3.0, 5.0, 3.0, 5.0])  # noqa: E731
    assert float(localise.iou(scaled(corners), scaled(half))[0]) == pytest.approx(0.5)


def test_training_target_is_the_most_visible_box_unclipped():
    boxes = np.asarray([[[-0.5, -0.5, 0.2, 0.2], [0.5, 0.3, 1.4, 0.9], [0, 0, 1, 1]]], np.float32)
    mask = np.asarray([[True, True, False]])
    target, weight = localise.training_target(boxes, mask)
    np.testing.assert_allclose(target, localise.corners_to_params(boxes[:, 1]), atol=1e-6)
    assert float(weight[0]) == 1.0
    _, weight = localise.training_target(np.asarray([[[1.2, 1.2, 1.5, 1.5]]]), np.asarray([[True]]))
    assert float(weight[0]) == 0.0  # no box in sight: no target


def test_pcr_selects_the_class_box_and_the_loss_is_caffes_euclidean():
    outputs = jnp.arange(2 * 12, dtype=jnp.float32).reshape(2, 12)  # 3 classes × 4
    chosen = localise.box_of_class(outputs, jnp.asarray([2, 0]), "pcr")
    np.testing.assert_array_equal(chosen, [[8, 9, 10, 11], [12, 13, 14, 15]])
    np.testing.assert_array_equal(localise.box_of_class(outputs[:, :4], jnp.asarray([2, 0]), "scr"), outputs[:, :4])
    loss = localise.euclidean_loss(jnp.ones((1, 4)), jnp.zeros((1, 4)))
    assert float(loss[0]) == 2.0  # ½ · 4


def test_dense_boxes_map_each_cell_through_its_window_and_flips_back():
    box_map = np.tile(np.asarray([0.5, 0.5, 0.5, 0.5], np.float32), (2, 3, 1, 1))  # centred half-size box
    corners = localise.dense_boxes(box_map, (64, 96), crop=32)
    # cell (1, 2) sees the window at (32, 64): its box is pixels 40..56 × 72..88.
    np.testing.assert_allclose(corners[1, 2, 0], [40 / 64, 72 / 96, 56 / 64, 88 / 96], atol=1e-6)
    np.testing.assert_allclose(localise.flip_boxes(localise.flip_boxes(corners)), corners, atol=1e-6)


@pytest.mark.parametrize("pooling, region", [("ceil", (0, 0, 80, 100)), ("centre", (8, 2, 64, 96))])
def test_cell_boxes_map_back_through_the_region_the_net_saw_and_its_mirror(pooling, region):
    """Protocol 2's geometry: a cell's box is window-relative, the window lies in the pooling rule's region."""
    assert protocols.dense_region(80, 100, pooling) == region
    top, left, rows, cols = region
    cells = protocols.dense_map_size(rows, cols, 64)
    maps = np.zeros((2, *cells, 4), np.float32)
    maps[:, 0, 1] = [0.5, 0.5, 0.5, 0.5]  # cell (0, 1): a centred half-size box in the window at (0, 32)
    image_view, mirror_view = localise_dense.cell_boxes(maps, (80, 100), pooling, 64)
    expected = np.asarray([top + 16, left + 48, top + 48, left + 80]) / np.asarray([80, 100, 80, 100])
    np.testing.assert_allclose(image_view.reshape(*cells, 4)[0, 1], expected, atol=1e-6)
    # The mirror's cell (0, 1) sees the window at (0, 32) of the mirrored region: x ↦ left + cols − x.
    mirrored = np.asarray([top + 16, left + cols - 80, top + 48, left + cols - 48]) / np.asarray([80, 100, 80, 100])
    np.testing.assert_allclose(mirror_view.reshape(*cells, 4)[0, 1], np.clip(mirrored, 0, 1), atol=1e-6)


def test_greedy_merge_averages_close_boxes_and_ranks_by_summed_score():
    boxes = np.asarray([[0, 0, 0.5, 0.5], [0.02, 0.02, 0.52, 0.52], [0.6, 0.6, 1, 1]], np.float32)
    merged, scores = localise.greedy_merge(boxes, np.asarray([0.3, 0.3, 0.5]), merge_iou=0.5)
    np.testing.assert_allclose(merged[0], [0.01, 0.01, 0.51, 0.51], atol=1e-6)  # 0.6 beats the lone 0.5
    np.testing.assert_allclose(scores, [0.6, 0.5], atol=1e-6)
    picked = localise.class_boxes(boxes[:, None], np.asarray([[0.3, 0], [0.3, 0], [0.5, 1]]), [1, 0], 0.5)
    np.testing.assert_allclose(picked[0], boxes[2])


def test_top5_rule():
    truth = np.asarray([[0.1, 0.1, 0.6, 0.6]])
    good, bad = [0.1, 0.1, 0.6, 0.6], [0.7, 0.7, 0.9, 0.9]
    classes = np.asarray([4, 3, 2, 1, 0])
    assert localise.top5_correct(classes, np.asarray([good, bad, bad, good, bad]), 1, truth) == (False, True)
    assert localise.top5_correct(classes, np.asarray([good] * 5), 4, truth) == (True, True)
    assert localise.top5_correct(classes, np.asarray([bad] * 5), 4, truth) == (False, False)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("arg", ["", "scr", "fc6-fc7", "scale=384", "demo", "demo,scr,fc6-fc7", "demo,classifier"])
def test_localisation_configs_validate(arg):
    config = loc_config.get_config(arg)
    with pytest.raises(ValueError, match="config.warm_start.checkpoint=''"):  # every stage starts from a run
        validation.validate(config)
    config.warm_start.checkpoint = "runs/cls"
    validation.validate(config)


def test_localisation_config_choices():
    config = loc_config.get_config("scr,scale=384")
    assert config.model.box_head == "scr" and config.learning_rate == 1e-3 and config.scale_min == 384
    assert "fc8" not in config.warm_start.layers and {"conv5_3", "fc6", "fc7"} <= set(config.warm_start.layers)
    with pytest.raises(ValueError, match="unknown localisation config argument"):
        loc_config.get_config("boxes")
    with pytest.raises(ValueError, match="fixed S"):
        loc_config.get_config("scale=256-512")


def test_bad_localisation_fields_are_named():
    config = loc_config.get_config("demo").to_dict()
    config["loc"].update(finetune="fc7", merge_iou=1.5, max_boxes=0, test_scales=(16,))
    config["model"]["box_head"] = "both"
    config["eval_method"] = "dense"
    text = str(pytest.raises(ValueError, validation.validate, config).value)
    for field in ("loc.finetune='fc7'", "loc.merge_iou=1.5", "loc.max_boxes=0", "loc.test_scales=(16,)"):
        assert f"config.{field}: expected" in text, text
    assert "config.model.box_head='both'" in text
    assert "loc" not in loc_config.get_config("demo,classifier")  # the classifier is a plain classification run


# ----------------------------------------------------------------------------- training and testing (tiny)


def tiny(arg, **overrides):
    config = loc_config.get_config(arg)
    config.warm_start.layers = () if "classifier" in arg else config.warm_start.layers  # tests: from random init
    config.model.width_multiplier, config.model.fc_width = 1 / 16, 16
    config.global_batch_size, config.eval_batch_size, config.shuffle_buffer = 8, 120, 64
    config.num_train_steps, config.eval_every_steps, config.log_every_steps, config.checkpoint_every_steps = 4, 4, 2, 4
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny classifier, then an all-layers PCR net and an fc6–fc7 SCR net started from it."""
    root = tmp_path_factory.mktemp("loc")
    train.train_and_evaluate(tiny("demo,classifier"), str(root / "cls"))
    runs = {"cls": root / "cls"}
    for name, arg in (("pcr", "demo"), ("scr", "demo,scr,fc6-fc7")):
        config = tiny(arg)
        config.warm_start.checkpoint = str(root / "cls")
        train.train_and_evaluate(config, str(root / name))
        runs[name] = root / name
    return runs


def test_localisation_nets_start_from_the_classifier(tiny_runs):
    source, _, _ = checkpoints.restore_params(str(tiny_runs["cls"]))
    all_layers, config, _ = checkpoints.restore_params(str(tiny_runs["pcr"]))
    assert config.model.box_head == "pcr" and all_layers["fc8_box"]["kernel"].shape == (16, 40)
    assert not np.allclose(all_layers["conv1_1"]["kernel"], source["conv1_1"]["kernel"])  # fine-tuned
    frozen, _, _ = checkpoints.restore_params(str(tiny_runs["scr"]))
    # fc6–fc7 only: the conv layers keep the classifier's weights
    for layer in models.conv_layer_names(config.model.variant):
        np.testing.assert_array_equal(frozen[layer]["kernel"], source[layer]["kernel"])
    assert not np.allclose(frozen["fc7"]["kernel"], source["fc7"]["kernel"])
    rows = [line for line in (tiny_runs["pcr"] / "metrics.jsonl").read_text().splitlines() if '"test"' in line]
    assert rows and '"top1_error"' in rows[-1]  # protocol-1 localisation error, per evaluation


def test_notebook_api_localises_photos(tiny_runs):
    localiser = vgg_jax.load(str(tiny_runs["pcr"]))
    photos = [np.zeros((64, 64, 3), np.uint8), np.full((48, 80, 3), 200, np.uint8)]
    found = localiser.localise(photos, top_k=3)
    assert found.class_ids.shape == (2, 3) and found.boxes.shape == (2, 3, 4)
    assert np.all((found.boxes >= 0) & (found.boxes <= 1))
    assert found.pixel_boxes(1, 48, 80).shape == (3, 4) and len(str(found).splitlines()) == 2
    with pytest.raises(ValueError, match="no box layer"):
        vgg_jax.load(str(tiny_runs["cls"])).localise(photos)


def test_both_protocols_report_table_rows(tiny_runs, capsys):
    args = [f"--checkpoint={tiny_runs['pcr']}", "--scales=80", f"--checkpoint={tiny_runs['scr']}", "--scales=80,96"]
    args += ["--classifier_scales=64,80", "--max_examples=3"]
    with pytest.raises(SystemExit) as done:
        localise_eval.run(args + ["--protocol=both"])
    assert not done.value.code
    out = capsys.readouterr().out
    assert "protocol 1" in out and "protocol 2" in out
    rows = [line for line in out.splitlines() if " S=" in line]
    assert len(rows) == 3  # two protocol-1 rows, one fused protocol-2 row (union of both nets' boxes)
    assert "at Q=80 + " in rows[2] and "at Q=80,96 |" in rows[2] and "A both Q=64,80" in rows[2], rows[2]
    assert all(0 <= float(cell) <= 100 for row in rows for cell in row.strip("|").split("|")[-1:])
    with pytest.raises(SystemExit) as refused:  # 3 --scales for 2 nets
        localise_eval.run(args[:4] + ["--scales=64", "--protocol=dense"])
    assert refused.value.code == 1
    assert "given 3 times for 2 nets" in capsys.readouterr().err


# Executes the notebook; the fast tier runs its calls (test_notebook_api_localises_photos)
@pytest.mark.slow
def test_localisation_notebook_runs(tiny_runs, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("VGG_LOC_WORKDIR", str(tiny_runs["pcr"]))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(REPO / "examples" / "localisation.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "expected the figure with boxes"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"localisation run: {tiny_runs['pcr']}" in text
