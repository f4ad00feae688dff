"""The README is executable truth: its first command, run verbatim, and its Python examples.

The `readme_demo` fixture (conftest.py) runs the README's first bash block's
training command from the root of a copy of this checkout, relative workdir
and all, as a user pastes it (slow tier); `short_demo` runs the same command
cut to a few epochs (fast tier). The tests here check what the command printed,
that rerunning it resumes, and that every ```python block of the README runs.
"""

import json
import re
import subprocess
import sys

import pytest
from conftest import demo_config, readme_blocks

# What the README's examples leave to the reader, defined the way its comments describe them.
PREAMBLE = """
import numpy as np

rng = np.random.default_rng(0)
crops = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)  # 224² crops for the full-size nets
images = rng.integers(0, 256, (1, 256, 288, 3), dtype=np.uint8)  # whole images, any size >= 224²
photos = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)  # photos for the demo net (any size >= its crop)
"""

# Every line the demo writes to stderr is one of these (anything else is library chatter).
OUR_LINES = {
    "progress": r"\] step \d+/\d+  epoch [\d.]+  loss [\d.]+  top-1 err [\d.]+  top-5 err [\d.]+  lr \S+  "
    r"[\d.]+ img/s  ETA \d+:\d\d:\d\d$",
    "evaluation": r"\] eval \S+ at step \d+: loss",
    "checkpoint": r"\] checkpoint: step \d+ saved to \S+ \([\d.]+ s\)",
    "start": r"\] VGG-\S+ on \S+: \d+ steps",
    "resume": r"\] resumed from \S+ at step \d+",
    "checksum": r"\] process \d+: parameter checksum at step",
    "summary": r"\] summary: ",
    "preparation": r"\] Preparing the embedded data set",
}


def _kind(line: str) -> str | None:
    return next((kind for kind, pattern in OUR_LINES.items() if re.search(pattern, line)), None)


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _run_config(run):
    """The config the run trained with (config.json): the README's demo, with the short tier's overrides if any."""
    return json.loads((run.workdir / "config.json").read_text())


# Each check on both runs: the short one (fast tier) and the README's whole command, verbatim (slow tier).
BOTH_RUNS = pytest.mark.parametrize("run_name", ["short_demo", pytest.param("readme_demo", marks=pytest.mark.slow)])


@BOTH_RUNS
@pytest.mark.xdist_group("demo")
def test_demo_command_prints_one_screen_of_progress(run_name, request):
    run = request.getfixturevalue(run_name)
    config = _run_config(run)
    lines = [line for line in run.result.stderr.splitlines() if line.strip()]
    chatter = [line for line in lines if _kind(line) is None]
    assert not chatter, "library chatter in the demo's output:\n" + "\n".join(chatter[:20])

    rows = _rows(run.workdir)
    total_steps = max(row["step"] for row in rows)
    kinds = [_kind(line) for line in lines]
    assert kinds.count("progress") == total_steps // config["log_every_steps"]
    assert kinds.count("evaluation") == len([row for row in rows if row["split"] != "train"])
    assert kinds.count("start") == 1 and kinds.count("checksum") == 1
    # The resolved config, printed once on stdout.
    stdout = run.result.stdout
    assert stdout.count("variant: E") == 1 and stdout.count("width_multiplier:") == 1
    assert len(lines) + len(stdout.splitlines()) <= 60  # one screen


@BOTH_RUNS
@pytest.mark.xdist_group("demo")
def test_demo_metrics_hold_train_and_eval_rows(run_name, request):
    run = request.getfixturevalue(run_name)
    config, defaults = _run_config(run), demo_config()
    steps = config["num_train_steps"] if config["num_train_steps"] > 0 else 880  # 40 epochs of 22 steps
    if run_name == "readme_demo":
        assert config == json.loads(json.dumps(defaults.to_dict())) and steps == 880  # verbatim: the demo config
    rows = _rows(run.workdir)
    train_rows = [row for row in rows if row["split"] == "train"]
    eval_rows = [row for row in rows if row["split"] == config["eval_split"]]
    assert len(train_rows) + len(eval_rows) == len(rows)
    log_every = config["log_every_steps"]
    assert [row["step"] for row in train_rows] == list(range(log_every, steps + 1, log_every))
    assert [row["step"] for row in eval_rows][-1] == steps
    if run_name == "readme_demo":  # training fits the digits: the last logged loss is far below the first
        assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]


@BOTH_RUNS
@pytest.mark.xdist_group("demo")
def test_rerunning_the_demo_command_resumes(run_name, request):
    run = request.getfixturevalue(run_name)
    before = (run.workdir / "metrics.jsonl").read_text()
    again = subprocess.run(run.command, shell=True, cwd=run.root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    final = max(row["step"] for row in _rows(run.workdir))
    assert f"resumed from {run.workdir} at step {final}" in again.stderr
    assert (run.workdir / "metrics.jsonl").read_text() == before  # nothing trained twice


@pytest.mark.xdist_group("demo")
def test_readme_python_examples_run(short_demo, tmp_path):
    # That section downloads published weights: tests/test_pretrained.py runs it against a local server.
    blocks = readme_blocks("python", skip_sections=("Pretrained weights and features",))
    assert len(blocks) >= 2
    script = tmp_path / "readme_examples.py"
    body = "\n".join(f"# --- README python block {i}\n{block}" for i, block in enumerate(blocks))
    # Values the README's comments promise, checked where the examples still define them.
    checks = """
if "logits" in dir():
    assert logits.shape == (1, 1000), logits.shape
if "score_map" in dir():
    assert score_map.shape[0] == 1 and score_map.shape[-1] == 1000, score_map.shape
if "acts" in dir():
    assert sorted(acts) == ["fc7", "relu1_2", "relu3_3"], sorted(acts)
print("README examples ran")
"""
    script.write_text(PREAMBLE + body + checks)
    # From the root of the copy the README's command trained in: `runs/demo` is relative to it, as for a user.
    result = subprocess.run(
        [sys.executable, str(script)], cwd=short_demo.root, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "README examples ran" in result.stdout
