"""examples/inference.ipynb runs top to bottom (nbclient) against a demo run directory.

The real demo run comes from the session fixture `demo_workdir` (tests/conftest.py);
where that fixture is not defined, a tiny fake run stands in: narrow E with random
parameters, the demo config and a synthetic metrics.jsonl.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from configs import common
from vgg_jax import checkpoints, convert

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "inference.ipynb"


def _fake_demo_run(directory: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
    config = common.get_config("E", "demo")
    config.data_dir = str(data_dir)
    rng = np.random.default_rng(0)
    params = {}
    for layer, shapes in convert.expected_shapes(
        "E",
        width_multiplier=config.model.width_multiplier,
        fc_width=config.model.fc_width,
        num_classes=config.model.num_classes,
        crop_size=config.crop_size,
    ).items():
        kernel = rng.standard_normal(shapes["kernel"]) * np.sqrt(2 / np.prod(shapes["kernel"][:-1]))
        params[layer] = {"kernel": kernel.astype(np.float32), "bias": np.zeros(shapes["bias"], np.float32)}
    checkpoints.save_params_only(str(directory), params, config, meta={"note": "fake demo run for the notebook test"})
    with open(directory / "metrics.jsonl", "w") as f:
        for step in range(0, 400, 20):
            lr = 0.02 if step < 300 else 0.002
            loss = 2.3 * np.exp(-step / 150)
            train = dict(step=step, epoch=step / 23, split="train", loss=loss, top1_error=0.9 * np.exp(-step / 100))
            f.write(json.dumps(dict(train, top5_error=0.5 * np.exp(-step / 80), lr=lr)) + "\n")
            if step % 100 == 0:
                f.write(
                    json.dumps(dict(step=step, epoch=step / 23, split="test", loss=loss * 1.1, top1_error=0.5)) + "\n"
                )
    return directory


@pytest.fixture
def notebook_workdir(request, tmp_path_factory):
    """The shared demo run if the session provides one, else a fake run directory."""
    try:
        return pathlib.Path(request.getfixturevalue("demo_workdir"))
    except pytest.FixtureLookupError:
        root = tmp_path_factory.mktemp("fake_demo")
        return _fake_demo_run(root / "run", root / "tensorflow_datasets")


@pytest.mark.xdist_group("demo")
def test_inference_notebook_runs(notebook_workdir, monkeypatch):
    monkeypatch.setenv("VGG_DEMO_WORKDIR", str(notebook_workdir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 2, "expected the digits figure and the training curves"
    assert f"run directory: {notebook_workdir}" in text
    accuracies = {
        line.split(":")[0].strip(): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if "test accuracy" in line
    }
    assert set(accuracies) == {"linear classifier on fc7 features", "linear classifier on raw pixels"}
    assert all(0.0 <= value <= 1.0 for value in accuracies.values())
    assert accuracies["linear classifier on raw pixels"] > 0.9  # the data are the digits, correctly labelled
