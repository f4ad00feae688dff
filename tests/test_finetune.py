"""Fine-tuning published VGG on a folder of photos: per-layer rates (frozen, a tenth, full), the head of another
class count re-initialised, the recipe config, and the README's command end to end on random weights in the
published Keras layout standing in for the download (through vgg_jax.pretrained's hash check and cache).
"""

import dataclasses
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import weight_files
from markdown_blocks import REPO

from vgg_jax import models, pretrained
from vgg_jax.checkpointing import checkpoints
from vgg_jax.configs import finetune, validation
from vgg_jax.data import embedded_photos
from vgg_jax.training import optim, warm_start

D_LAYERS = models.layer_names("D")


def _tiny_params(value: float = 1.0) -> dict:
    return {layer: {"kernel": jnp.full((2, 2), value), "bias": jnp.full((2,), value)} for layer in D_LAYERS}


def test_the_recipe_sets_rates_by_layer():
    config = finetune.get_config()
    config.dataset = "folder:/photos"
    validation.validate(config)  # valid once the folder is named
    rates = optim.layer_rate_multipliers(config, D_LAYERS)
    assert [layer for layer in D_LAYERS if rates[layer] == 0] == models.conv_layer_names("D")[:7]  # to conv3_3
    assert {rates[layer] for layer in D_LAYERS[7:-1]} == {0.1} and rates["fc8"] == 1.0
    assert (finetune.get_config("vgg19").model.variant, finetune.get_config("vgg19").finetune.freeze_through) == (
        "E",
        "conv3_4",
    )
    assert finetune.get_config().warm_start.checkpoint == "pretrained:vgg16"
    with pytest.raises(ValueError, match="expected one of"):
        finetune.get_config("vgg17")
    config.finetune.freeze_through = "conv3_4"  # VGG-16 has none
    with pytest.raises(ValueError, match=r"config.finetune.freeze_through: \['conv3_4'\] not a layer of VGG-D"):
        optim.create_optimizer(config)
    config.finetune.freeze_through = "conv9_9"
    assert any("finetune.freeze_through='conv9_9'" in line for line in validation.problems(config))


def test_frozen_layers_stay_and_the_others_move_at_their_share_of_the_rate():
    """Against the paper's SGD on the same gradients: body updates are a tenth of it, the head's equal, frozen 0."""
    config = finetune.get_config()
    params, grads = _tiny_params(1.0), _tiny_params(0.5)
    plain_config = finetune.get_config()
    del plain_config.finetune
    tuned, plain = optim.create_optimizer(config), optim.create_optimizer(plain_config)
    tuned_state, plain_state = tuned.init(params), plain.init(params)
    for _ in range(2):  # the second step carries momentum
        ours, tuned_state = tuned.update(grads, tuned_state, params)
        theirs, plain_state = plain.update(grads, plain_state, params)
    frozen = models.conv_layer_names("D")[:7]  # conv1_1 … conv3_3
    for layer in D_LAYERS:
        expected = 0.0 if layer in frozen else 1.0 if layer == "fc8" else 0.1
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(ours[layer][leaf], expected * theirs[layer][leaf], rtol=1e-6, err_msg=layer)
    assert float(jnp.abs(ours["conv1_1"]["kernel"]).max()) == 0.0  # no update, weight decay included
    assert float(jnp.abs(theirs["conv1_1"]["kernel"]).max()) > 0.0
    # The rate lives where the train step sets it, as for the paper's optimiser.
    assert float(optim.current_learning_rate(tuned_state)) == pytest.approx(1e-2)
    assert float(optim.current_learning_rate(optim.with_learning_rate(tuned_state, 0.5))) == 0.5
    # The train step's ‖update‖: from the momentum for the paper's optimiser, from the updates here.
    np.testing.assert_allclose(optim.update_norm(plain_state), optim.global_norm(theirs), rtol=1e-6)
    assert optim.update_norm(tuned_state) is None
    stats = optim.update_statistics(grads, ours, params, update_size=optim.update_norm(tuned_state))
    np.testing.assert_allclose(stats["update_ratio"], optim.global_norm(ours) / optim.global_norm(params), rtol=1e-6)


def test_a_head_of_another_class_count_starts_fresh_and_says_so(caplog):
    conv = {"kernel": np.zeros((3, 3, 3, 4))}
    fresh = {"conv1_1": conv, "fc8": {"kernel": np.zeros((16, 5)), "bias": np.zeros(5)}}
    source = {"conv1_1": conv, "fc8": {"kernel": np.ones((16, 1000)), "bias": np.ones(1000)}}
    with caplog.at_level(logging.INFO):
        assert warm_start.layers_to_copy(fresh, source, "all") == ["conv1_1"]
    assert "fc8 has 1000 classes in the source, 5 here: it starts from random init" in caplog.text
    same = {"fc8": {"kernel": np.ones((16, 5))}}
    assert warm_start.layers_to_copy(fresh, same, ("fc8",)) == ["fc8"]
    wider = {"fc8": {"kernel": np.ones((32, 1000))}}  # another fc7 width: not a class count, still an error later
    assert warm_start.layers_to_copy(fresh, wider, ("fc8",)) == ["fc8"]
    with pytest.raises(ValueError, match=r"fc8.*\(32, 1000\).*\(16, 5\)"):
        checkpoints.warm_start(fresh, wider, ["fc8"])


# ----------------------------------------------------------------------------- the README's command


def _readme_commands() -> list[str]:
    """The commands of the README's fine-tuning section's first bash block, one per line."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Fine-tune VGG-16 on your photos", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def published_vgg16(tmp_path_factory):
    """A cache holding 'pretrained:vgg16' as vgg_jax.pretrained made it from a file in Keras' layout (narrow,
    random) served locally and checked against the table's hash: what a user's first fine-tune fetches."""
    root = tmp_path_factory.mktemp("published")
    entry = pretrained.lookup("vgg16", "keras")
    path = weight_files.write_keras_h5(root / entry.filename, weight_files.random_params("D", 0))  # width 1/16
    patched = dataclasses.replace(entry, digest=weight_files.digest(path, "md5"))
    saved = pretrained.WEIGHTS[("keras", "vgg16")]
    pretrained.WEIGHTS[("keras", "vgg16")] = patched
    try:
        with weight_files.serve(root) as server:
            cache = root / "cache"
            converted = pretrained.fetch("vgg16", cache_dir=cache, url=f"{server.url}/{entry.filename}")
    finally:
        pretrained.WEIGHTS[("keras", "vgg16")] = saved
    return cache, checkpoints.restore_params(str(converted))[0]  # as converted: Caffe's BGR folded into conv1_1


@pytest.mark.slow
def test_readme_finetune_command_trains_and_evaluates_on_a_folder(published_vgg16, tmp_path):
    """The README's command on a folder written from scikit-image's photos, narrow weights, a few steps."""
    cache, source = published_vgg16
    home = tmp_path / "home"
    embedded_photos.write_folder(str(home / "my_photos"), ("astronaut", "coffee", "chelsea"), {"": 10}, max_side=96)
    command = next(line for line in _readme_commands() if "vgg_jax.main" in line)
    assert "--config=configs/finetune.py" in command and "folder:~/my_photos" in command
    tiny = (
        " --config.model.width_multiplier=0.0625 --config.model.fc_width=16 --config.num_train_steps=6"
        " --config.global_batch_size=8 --config.eval_batch_size=8 --config.eval_every_steps=3"
        " --config.log_every_steps=3"
    )
    env = dict(os.environ, HOME=str(home), VGG_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu")  # ~ is the test's
    run = subprocess.run(
        command.replace("python ", f"{sys.executable} ", 1) + tiny,
        shell=True,
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    workdir = home / "runs" / "my_photos"
    assert "fc8 has 1000 classes in the source, 3 here: it starts from random init" in run.stderr
    assert json.loads((workdir / "class_names.json").read_text()) == ["astronaut", "chelsea", "coffee"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["num_examples"]) for row in rows if row["split"] == "test"] == [(3, 6), (6, 6)]
    final, _, _ = checkpoints.restore_params(str(workdir))
    for layer in models.layer_names("D"):
        moved = not np.array_equal(final[layer]["kernel"], source[layer]["kernel"])
        assert moved == (layer not in models.conv_layer_names("D")[:7]), layer  # conv1_1 … conv3_3 frozen
    summary = [line.split("] ", 1)[1] for line in run.stderr.splitlines() if "] summary: " in line]
    assert len(summary) == 3 and re.search(r"top-1 err [\d.]+ .* at the final step 6; best [\d.]+", summary[0])
    assert re.fullmatch(rf"summary: checkpoints in {workdir / 'checkpoints'} \(steps? 6, the final.*", summary[1])
    evaluate = re.search(r"`(python -m vgg_jax evaluate [^`]+)`", summary[2]).group(1)
    assert evaluate in _readme_commands() or evaluate == f"python -m vgg_jax evaluate --checkpoint={workdir}"
    again = subprocess.run(  # as validation measured it: centre crops at Q, no flips
        evaluate.replace("python ", f"{sys.executable} ", 1) + " --method=center_crop --flips=no",
        shell=True,
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    last = next(row for row in reversed(rows) if row["split"] == "test")
    table_row = next(line for line in again.stdout.splitlines() if line.startswith("| ") and "centre crop" in line)
    top1 = float([cell.strip() for cell in table_row.split("|")][5])
    assert top1 == pytest.approx(100 * last["top1_error"], abs=0.051)  # the same net, images and error


def test_finetune_benchmark_reads_its_runs(tmp_path):
    """bench/finetune.py's arithmetic on runs it did not make: the last evaluation, the table."""
    spec = importlib.util.spec_from_file_location("bench_finetune", REPO / "bench" / "finetune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"step": 30, "split": "test", "top1_error": 0.5}, {"step": 60, "split": "train", "top1_error": 0.1}]
    rows.append({"step": 60, "split": "test", "top1_error": 0.25})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert bench.final_error(tmp_path) == {"final": 0.25, "step": 60, "curve": [0.5, 0.25]}
    assert bench.final_error(tmp_path / "missing")["step"] == 0
    table = bench.table({"fine-tune": [{"final": 0.25, "step": 60}, {"final": 0.5, "step": 60}]})
    assert table.splitlines()[-1] == "| fine-tune | 60 | 25.0 % / 50.0 % | 37.5 % |"
    arms = bench.arms(tmp_path / "folder", tmp_path / "source")
    assert all(any(a.startswith("--config=configs/") for a in arguments) for arguments in arms.values())
    assert f"--config.warm_start.checkpoint={tmp_path / 'source'}" in arms["fine-tune"]
