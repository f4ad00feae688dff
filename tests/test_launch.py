"""launch/tpu_pod.sh renders remote commands that pass hostile values as single words and run detached.

The `--dry-run` lines are bash-quoted gcloud command lines; each `--command=` in them is what a
worker's shell would run. Here that shell is `bash -c` in a sandbox HOME, with `python3` replaced
by a stub that records its working directory and arguments (and, for training, waits for SIGTERM).
"""

import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_pod.sh"

# Print each --command= value of each dry-run line, NUL-terminated (the lines are printf %q output).
EXTRACT = r"""
while IFS= read -r line; do
  eval "words=($line)"
  for word in "${words[@]}"; do
    [[ $word == --command=* ]] && printf '%s\0' "${word#--command=}"
  done
done
"""

STUB = r"""#!/usr/bin/env bash
# python3 stand-in: one file per call, holding the working directory and the arguments, NUL-separated.
printf '%s\0' "$PWD" "$@" > "$HOME/calls/$$"
if [[ "${2:-}" == vgg_jax.main ]]; then
  trap 'kill "$child" 2>/dev/null; echo terminated > "$HOME/calls/$$.term"; exit 0' TERM
  sleep 60 &
  child=$!
  wait "$child"
fi
"""


def remote_commands(env, *args):
    """The --command= strings of `tpu_pod.sh --dry-run ARGS`, in order."""
    rendered = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    extracted = subprocess.run(["bash", "-c", EXTRACT], input=rendered, capture_output=True, text=True, check=True)
    return [command for command in extracted.stdout.split("\0") if command]


@pytest.fixture
def sandbox(tmp_path):
    home = tmp_path / "home"
    (home / "calls").mkdir(parents=True)
    (home / "vgg_jax").mkdir()  # the copied checkout
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return home, dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:/usr/bin:/bin")


def run_remote(command, worker_env):
    assert subprocess.run(["bash", "-n", "-c", command], capture_output=True).returncode == 0, command
    return subprocess.run(["bash", "-c", command], env=worker_env, capture_output=True, text=True, timeout=60)


def recorded_calls(home, count, timeout=30):
    """The stub's calls, [cwd, *args] each, once `count` of them have been written."""
    deadline = time.time() + timeout
    while True:
        files = [p for p in (home / "calls").iterdir() if p.suffix != ".term" and p.stat().st_size]
        if len(files) >= count or time.time() > deadline:
            break
        time.sleep(0.1)
    return [p.read_text().split("\0")[:-1] for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]


def stop_training(home):
    pid_file = home / "vgg_jax_train.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


HOSTILE = {
    "RUN_NAME": "a b; touch {pwned}",
    "BUCKET": "gs://b$(touch {pwned})`touch {pwned}`",
    "DATA_DIR": "gs://d'\"; touch {pwned} #",
    "REPO_URL": "https://example.com/x.git'; touch {pwned}; '",
}


@pytest.mark.parametrize("repo_url", [False, True], ids=["scp_checkout", "repo_url"])
def test_hostile_values_reach_the_workers_as_single_arguments(sandbox, tmp_path, repo_url):
    home, worker_env = sandbox
    pwned = tmp_path / "pwned"
    values = {name: value.format(pwned=pwned) for name, value in HOSTILE.items()}
    if not repo_url:
        del values["REPO_URL"]
    env = {k: v for k, v in os.environ.items() if k not in ("REPO_URL", "NUM_WORKERS", "PROJECT")}
    env.update(TPU_NAME="pod", ZONE="us-central2-b", **values)
    hostile_arg = f"--config.model.variant=E; touch {pwned}"
    install, train = remote_commands(env, "--", "--config=configs/d.py", hostile_arg)
    try:
        assert run_remote(install, worker_env).returncode == 0
        started = run_remote(train, worker_env)
        assert started.returncode == 0, started.stderr
        assert "started pid" in started.stdout
        calls = recorded_calls(home, 2)
    finally:
        stop_training(home)
    assert not pwned.exists()
    installed, trained = calls
    if repo_url:
        assert installed[1:] == ["-m", "pip", "install", "-q", "git+" + values["REPO_URL"], "jax[tpu]"]
        assert trained[0] == str(home)  # no checkout there: main finds configs/d.py in the package
    else:
        assert installed[1:] == ["-m", "pip", "install", "-q", "-e", f"{home}/vgg_jax", "jax[tpu]"]
        assert trained[0] == str(home / "vgg_jax")
    assert trained[1:] == [
        "-m",
        "vgg_jax.main",
        "--config=configs/d.py",
        hostile_arg,
        f"--workdir={values['BUCKET']}/runs/{values['RUN_NAME']}",
        f"--config.data_dir={values['DATA_DIR']}",
    ]


def test_training_is_detached_logged_refused_twice_and_stopped_by_sigterm(sandbox):
    home, worker_env = sandbox
    env = {k: v for k, v in os.environ.items() if k not in ("REPO_URL", "NUM_WORKERS", "PROJECT", "RUN_NAME")}
    env.update(TPU_NAME="pod", ZONE="z", BUCKET="gs://b")
    _, train = remote_commands(env, "--", "--config=configs/d.py")
    (stop,) = remote_commands(env, "--stop")
    (follow,) = remote_commands(env, "--follow")
    assert "tail" in follow and "~/vgg_jax_train.log" in follow
    try:
        started = run_remote(train, worker_env)  # returns at once: the run is not tied to the session
        assert started.returncode == 0, started.stderr
        pid = int((home / "vgg_jax_train.pid").read_text())
        recorded_calls(home, 1)
        # A new session, so a hang-up of the ssh session does not reach it.
        assert os.getsid(pid) == pid
        again = run_remote(train, worker_env)
        assert again.returncode == 1 and "already going" in again.stderr
        stopped = run_remote(stop, worker_env)
        assert stopped.returncode == 0 and f"SIGTERM sent to {pid}" in stopped.stdout
        deadline = time.time() + 30
        while not (home / "calls" / f"{pid}.term").exists():
            assert time.time() < deadline, "the run did not get SIGTERM"
            time.sleep(0.1)
        assert (home / "vgg_jax_train.log").exists()
        assert "no vgg_jax run going" in run_remote(stop, worker_env).stdout
    finally:
        stop_training(home)


def test_dry_run_of_every_worker_renders_one_training_command_each():
    env = {k: v for k, v in os.environ.items() if k not in ("REPO_URL", "RUN_NAME", "DATA_DIR")}
    env.update(TPU_NAME="pod", ZONE="z", BUCKET="gs://b", NUM_WORKERS="3")
    commands = remote_commands(env, "--", "--config=configs/d.py")
    trains = [c for c in commands if "vgg_jax.main" in c]
    assert len(trains) == 3 and len(set(trains)) == 1
    assert "setsid nohup python3 -m vgg_jax.main --config=configs/d.py --workdir=gs://b/runs/vgg" in trains[0]


def test_bad_worker_count_is_refused():
    env = dict(os.environ, TPU_NAME="pod", ZONE="z", BUCKET="gs://b", NUM_WORKERS="4; rm -rf /")
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "NUM_WORKERS" in result.stderr


def test_setsid_is_available_here():
    assert shutil.which("setsid"), "the detached start uses setsid (util-linux), as on TPU VM images"
