"""The command line: resolved config printed, clear errors for bad fields, data sets and workdirs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/a.py:demo",
    "--config.model.width_multiplier=0.0625",
    "--config.model.fc_width=16",
    "--config.global_batch_size=8",
    "--config.num_train_steps=2",
    "--config.eval_every_steps=2",
    "--config.log_every_steps=1",
]


def test_cli_trains_prints_config_and_progress(command_lines, tmp_path):
    result = command_lines.run("vgg_jax.main", *TINY, f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "variant: A" in result.stdout and "width_multiplier: 0.0625" in result.stdout
    log = result.stderr
    assert "step 2/2" in log and "img/s" in log and "ETA" in log and "loss" in log
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "test"] == [2]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]  # log_every_steps=1
    assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 2


def test_cli_unknown_field_is_named(command_lines, tmp_path):
    result = command_lines.run("vgg_jax.main", *TINY, "--config.no_such_field=3", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "no_such_field" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_missing_dataset_is_named(command_lines, tmp_path):
    result = command_lines.run("vgg_jax.main", *TINY, "--config.dataset=no_such_dataset_xyz", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "no_such_dataset_xyz" in result.stderr
    assert "demo" in result.stderr  # points at the data set that needs no download


def test_cli_unwritable_workdir_is_named(command_lines, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = command_lines.run("vgg_jax.main", *TINY, f"--workdir={blocker}/run")
    assert result.returncode != 0
    assert "workdir" in result.stderr and str(blocker) in result.stderr


@pytest.mark.slow  # a full command killed and rerun; test_faults/test_reliability kill mid-save in the fast tier
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(command_lines, tmp_path):
    import signal
    import time

    from vgg_jax.checkpointing import checkpoints

    args = [sys.executable, "-m", "vgg_jax.main", *TINY, "--config.num_train_steps=100000", f"--workdir={tmp_path}"]
    args = [a for a in args if not a.startswith("--config.num_train_steps=2")]
    log = tmp_path.parent / f"{tmp_path.name}.log"
    with open(log, "w") as stream:
        proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=stream, stderr=stream)
        try:
            deadline = time.time() + 300
            while "step 3/" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "SIGTERM received" in text and "stopped early: saved step" in text
    saved = checkpoints.resolve_step(str(tmp_path))
    assert saved >= 3
    resumed = command_lines.run(
        "vgg_jax.main", *TINY, "--config.num_train_steps=" + str(saved + 1), f"--workdir={tmp_path}"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path} at step {saved}" in resumed.stderr
    assert checkpoints.resolve_step(str(tmp_path)) == saved + 1
