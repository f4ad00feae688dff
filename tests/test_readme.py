"""The README is executable truth: its first command, run verbatim, and its Python examples.

The `readme_demo` fixture (conftest.py) runs the README's first bash block's
training command from the root of a copy of this checkout, relative workdir
and all, as a user pastes it. The tests here check what that command printed,
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


def _needs_output(readme_demo):
    if readme_demo.result is None:
        pytest.skip("VGG_DEMO_WORKDIR reuses a finished run: the command's own output was not captured")


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_demo_command_prints_one_screen_of_progress(readme_demo):
    _needs_output(readme_demo)
    config = demo_config()
    lines = [line for line in readme_demo.result.stderr.splitlines() if line.strip()]
    chatter = [line for line in lines if _kind(line) is None]
    assert not chatter, "library chatter in the demo's output:\n" + "\n".join(chatter[:20])

    rows = _rows(readme_demo.workdir)
    total_steps = max(row["step"] for row in rows)
    kinds = [_kind(line) for line in lines]
    assert kinds.count("progress") == total_steps // config.log_every_steps
    assert kinds.count("evaluation") == len([row for row in rows if row["split"] != "train"])
    assert kinds.count("start") == 1 and kinds.count("checksum") == 1
    # The resolved config, printed once on stdout.
    stdout = readme_demo.result.stdout
    assert stdout.count("variant: E") == 1 and stdout.count("width_multiplier:") == 1
    assert len(lines) + len(stdout.splitlines()) <= 60  # one screen


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_demo_metrics_hold_train_and_eval_rows(readme_demo):
    config = demo_config()
    rows = _rows(readme_demo.workdir)
    train_rows = [row for row in rows if row["split"] == "train"]
    eval_rows = [row for row in rows if row["split"] == config.eval_split]
    assert len(train_rows) + len(eval_rows) == len(rows)
    assert [row["step"] for row in train_rows] == list(range(config.log_every_steps, 881, config.log_every_steps))
    assert [row["step"] for row in eval_rows][-1] == 880
    # Training fits the digits: the last logged training loss is far below the first.
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_rerunning_the_demo_command_resumes(readme_demo):
    _needs_output(readme_demo)
    before = (readme_demo.workdir / "metrics.jsonl").read_text()
    again = subprocess.run(
        readme_demo.command, shell=True, cwd=readme_demo.root, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    final = max(row["step"] for row in _rows(readme_demo.workdir))
    assert f"resumed from {readme_demo.workdir} at step {final}" in again.stderr
    assert (readme_demo.workdir / "metrics.jsonl").read_text() == before  # nothing trained twice


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_readme_python_examples_run(readme_demo, tmp_path):
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
        [sys.executable, str(script)], cwd=readme_demo.root, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "README examples ran" in result.stdout
