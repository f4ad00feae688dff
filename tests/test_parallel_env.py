"""When jax.distributed starts (issue #13): SLURM steps of several tasks, not any SLURM job; no real init."""

import logging
import os

import pytest

from vgg_jax.runtime import parallel

STEP = {  # one task of `srun --ntasks=4` on two nodes
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
}
DEFAULTS = dict(
    initialize="auto", coordinator_address="", num_processes=-1, process_id=-1, heartbeat_timeout_seconds=60
)


@pytest.fixture
def calls(monkeypatch):
    """A clean environment and a recording stand-in for jax.distributed.initialize."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(name)
    recorded = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(parallel, "_already_initialized", lambda: False)
    return recorded


def start(monkeypatch, env, **settings):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parallel.initialize(dict(DEFAULTS, **settings))


def test_no_cluster_no_init(calls, monkeypatch):
    start(monkeypatch, {})
    assert calls == []


def test_lone_python_in_salloc_runs_single_process(calls, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    start(monkeypatch, {"SLURM_JOB_ID": "4242", "SLURM_NODELIST": "node001"})
    assert calls == []
    assert "SLURM job 4242 outside an srun step: running single-process" in caplog.text


def test_salloc_of_several_tasks_without_srun_says_how_to_use_them(calls, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    start(monkeypatch, {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_NODELIST": "node[001-002]"})
    assert calls == []
    assert "has 8 tasks" in caplog.text and "srun" in caplog.text
    assert "SLURM_STEP_NODELIST" in caplog.text and "SLURM_PROCID" in caplog.text


def test_srun_step_of_one_task_runs_single_process(calls, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    start(monkeypatch, dict(STEP, SLURM_NTASKS="1", SLURM_PROCID="0"))
    assert calls == []
    assert "step of one task: running single-process" in caplog.text


def test_srun_step_of_several_tasks_starts_jax_distributed_from_slurm(calls, monkeypatch):
    start(monkeypatch, STEP)
    # Address, count and id left to JAX's SlurmCluster, which reads the same variables.
    assert calls == [
        dict(
            coordinator_address=None,
            num_processes=None,
            process_id=None,
            heartbeat_timeout_seconds=60,
            initialization_timeout=300,
        )
    ]


def test_config_values_win_inside_a_slurm_step(calls, monkeypatch):
    start(
        monkeypatch,
        STEP,
        coordinator_address="node001:1234",
        num_processes=4,
        process_id=2,
        heartbeat_timeout_seconds=30,
        initialization_timeout_seconds=100,
    )
    assert calls == [
        dict(
            coordinator_address="node001:1234",
            num_processes=4,
            process_id=2,
            heartbeat_timeout_seconds=30,
            initialization_timeout=100,
        )
    ]


@pytest.mark.parametrize("missing", sorted(STEP))
def test_a_partial_step_environment_runs_single_process(calls, monkeypatch, missing):
    start(monkeypatch, {k: v for k, v in STEP.items() if k != missing})
    assert calls == []


def test_a_garbled_task_count_is_named(calls, monkeypatch):
    with pytest.raises(ValueError, match="SLURM_NTASKS='four'"):
        start(monkeypatch, dict(STEP, SLURM_NTASKS="four"))


def test_launch_script_environment_starts_it(calls, monkeypatch):
    start(monkeypatch, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:9999", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    assert [(c["coordinator_address"], c["num_processes"], c["process_id"]) for c in calls] == [
        ("127.0.0.1:9999", 2, 1)
    ]


def test_coordinator_address_in_the_config_starts_it(calls, monkeypatch):
    start(monkeypatch, {}, coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)
    assert [(c["coordinator_address"], c["num_processes"], c["process_id"]) for c in calls] == [("10.0.0.1:1234", 2, 0)]


def test_no_means_no_and_yes_means_yes(calls, monkeypatch):
    start(monkeypatch, STEP, initialize="no")
    assert calls == []
    for name in STEP:
        monkeypatch.delenv(name)
    start(monkeypatch, {}, initialize="yes")
    assert len(calls) == 1
