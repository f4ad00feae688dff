"""examples/inference.ipynb runs top to bottom (nbclient) from the examples folder against the demo run, and
the committed notebooks carry their outputs, free of this machine's paths.

The run is the README's whole first command (`readme_demo`, slow tier), trained once per session
(tests/conftest.py) in a copy of the checkout.
"""

import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "inference.ipynb"


MACHINE_PATHS = ("/tmp/", "/home/", "/root/", "/work/", "/Users/", "site-packages")


def test_committed_notebooks_are_executed_without_machine_paths():
    for path in (NOTEBOOK, REPO / "examples" / "pretrained.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.get("outputs") for cell in code), f"{path.name}: commit it executed"
        text = json.dumps([cell["outputs"] for cell in code])
        assert not [p for p in MACHINE_PATHS if p in text], f"{path.name}: outputs name this machine's paths"


# On the whole demo run (slow tier): its calls run in the fast tier on the short run in test_docs (the
# inference page); running the notebook on the short run too would train that run in the slow tier just for it.
@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_inference_notebook_runs_from_the_examples_folder(readme_demo, monkeypatch):
    """From examples/ of the checkout the README's command trained in, as a user opens it: `../runs/demo`."""
    run = readme_demo
    monkeypatch.delenv("VGG_DEMO_WORKDIR", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    folder = run.root / "examples"
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 2, "expected the digits figure and the training curves"
    assert "run directory: ../runs/demo" in text
    accuracies = {
        line.split(":")[0].strip(): float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if "test accuracy" in line
    }
    assert set(accuracies) == {"linear classifier on fc7 features", "linear classifier on raw pixels"}
    assert all(0.0 <= value <= 1.0 for value in accuracies.values())
    assert accuracies["linear classifier on raw pixels"] > 0.9  # the data are the digits, correctly labelled
    assert accuracies["linear classifier on fc7 features"] > 0.8  # the trained net's features separate them
