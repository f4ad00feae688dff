"""Issue 17: the README's demo converges for a seed nobody tuned it on (bench/convergence.py measured 0–4)."""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import readers_env

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_demo_converges_for_an_extra_seed(tmp_path):
    # The README's first command as a user types it (relative config path, from the repository root), seed 5,
    # compiled as a reader's is (880 steps run 4x slower without XLA's optimisations).
    workdir = tmp_path / "demo_seed5"
    command = [sys.executable, "-m", "vgg_jax.main", "--config=configs/e.py:demo", f"--workdir={workdir}"]
    run = subprocess.run(
        [*command, "--config.seed=5"], cwd=REPO, env=readers_env(), capture_output=True, text=True, timeout=2400
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    errors = [row["top1_error"] for row in rows if row["split"] == "test"]
    assert len(errors) == 8 and rows[-1]["step"] == 880
    # bench/RESULTS.md, "Convergence": seeds 0–4 end at ≤ 5 % and within 2 points of their best evaluation.
    assert errors[-1] <= 0.06, errors
    assert errors[-1] - min(errors) <= 0.02, errors
