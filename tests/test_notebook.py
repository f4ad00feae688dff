"""examples/inference.ipynb runs top to bottom (nbclient) against a demo run directory.

The run is the README's demo cut to a few epochs (`short_demo_workdir`, fast tier) or
the whole command (`demo_workdir`, slow tier), trained once per session (tests/conftest.py).
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "inference.ipynb"


# The fc7 features' linear classifier: a few epochs already separate the digits; the whole demo, far better.
@pytest.mark.parametrize(
    "workdir_fixture,fc7_accuracy",
    [("short_demo_workdir", 0.7), pytest.param("demo_workdir", 0.8, marks=pytest.mark.slow)],
)
@pytest.mark.xdist_group("demo")
def test_inference_notebook_runs(workdir_fixture, fc7_accuracy, request, monkeypatch):
    notebook_workdir = request.getfixturevalue(workdir_fixture)
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
    assert accuracies["linear classifier on fc7 features"] > fc7_accuracy  # the trained net's features separate them
