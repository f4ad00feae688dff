"""Issue 24 fault injection: every state a crash or a user can leave behind resumes, or is refused clearly.

One uninterrupted tiny run (`straight`) is trained once; each test damages a copy of it the way a full
disk, a dead node, an interrupted copy, a kill or a user would, and checks that the next start resumes
to the same rows and parameters, or stops before any work with one message naming the culprit.
"""

import asyncio
import contextlib
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from test_train import tiny_config

import vgg_jax
from vgg_jax import inference, models, perceptual
from vgg_jax.checkpointing import checkpoints, run_lock
from vgg_jax.checkpointing import damage as checkpoint_damage
from vgg_jax.configs import loc as loc_configs
from vgg_jax.data import sources
from vgg_jax.runtime import parallel
from vgg_jax.training import optim, steps, train

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 uninterrupted steps: checkpoints at 2, 3, 4, 6 of which 3, 4, 6 are kept; metrics rows at 2, 3, 4, 6."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    train.train_and_evaluate(tiny_config(), str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "4", "6"]
    return workdir


def copy_run(straight, tmp_path, *, up_to=None):
    """A copy of the straight run; with `up_to`, as if it had stopped after saving that step."""
    run = pathlib.Path(shutil.copytree(straight, tmp_path / "run"))
    for step in (run / "checkpoints").iterdir():
        if up_to is not None and int(step.name) > up_to:
            shutil.rmtree(step)
    return run


def rows(workdir):
    """metrics.jsonl without the timing column (the only one that differs between equal runs)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_second"} for line in lines]


def assert_same_parameters(run, straight):
    ours, _, ours_step = checkpoints.restore_params(str(run))
    theirs, _, their_step = checkpoints.restore_params(str(straight))
    assert ours_step == their_step
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)


def no_data_set(monkeypatch):
    """Opening the data set (the first expensive step of a start) fails the test."""

    def expensive(*args, **kwargs):
        raise AssertionError("the run opened its data set before refusing")

    monkeypatch.setattr(sources, "dataset_metadata", expensive)


def largest_data_file(step_dir, item="params"):
    return max((step_dir / item).rglob("d/*"), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- damaged checkpoints


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(straight, tmp_path, caplog):
    run = copy_run(straight, tmp_path)
    damaged = largest_data_file(run / "checkpoints" / "6")
    size = damaged.stat().st_size // 2
    damaged.write_bytes(damaged.read_bytes()[:size])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(tiny_config(), str(run))
    aside = run / "damaged_checkpoints" / "6"
    assert "checkpoint step 6 cannot be restored (OUT_OF_RANGE" in caplog.text
    assert f"moved it to {aside}; resuming from step 4" in caplog.text
    assert (aside / damaged.relative_to(run / "checkpoints" / "6")).stat().st_size == size  # kept, not deleted
    assert rows(run) == rows(straight)  # steps 5-6 again, nothing doubled or lost
    assert_same_parameters(run, straight)
    assert not (run / run_lock.LOCK_FILE).exists()


@pytest.fixture(scope="module")
def host_state():
    """A fresh train state shaped as the tiny run's, and its sharding: what training restores into."""
    config = tiny_config()
    config.model.num_classes = 10
    model = models.from_config(config)
    tx = optim.create_optimizer(config)
    state = steps.create_train_state(config, model, tx, optim.PlateauControl(config))
    return state, parallel.replicated(parallel.create_mesh())


def _truncate(step_dir):
    path = largest_data_file(step_dir)
    path.write_bytes(path.read_bytes()[:100])


DAMAGES = {
    "truncated data file": _truncate,
    "missing data file": lambda step_dir: largest_data_file(step_dir, "train_state").unlink(),
    "missing train_state item": lambda step_dir: shutil.rmtree(step_dir / "train_state"),
    "empty array metadata": lambda step_dir: (step_dir / "params" / "_METADATA").write_text(""),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_passes_over_each_kind_of_damage(straight, tmp_path, host_state, damage):
    run = copy_run(straight, tmp_path)
    DAMAGES[damage](run / "checkpoints" / "6")
    like, sharding = host_state
    manager = checkpoints.create_manager(str(run), async_save=False)
    try:
        state = checkpoints.restore_train_state(manager, like, sharding)
        assert int(state.step) == 4 and manager.all_steps() == [3, 4]
    finally:
        manager.close()
    assert sorted(p.name for p in (run / "damaged_checkpoints").iterdir()) == ["6"]


def _unraisable(error, what=None):
    return types.SimpleNamespace(
        exc_type=type(error), exc_value=error, exc_traceback=error.__traceback__, err_msg=None, object=what
    )


def test_the_reads_a_failed_restore_abandons_end_quietly_and_nothing_else_does(monkeypatch):
    """Orbax's other reads of a step that failed go on in TensorStore's threads, each ending on the closed event
    loop or as a coroutine closed half way: dozens of screens of tracebacks in a user's resume, unless dropped."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    monkeypatch.setattr(checkpoint_damage, "_quieted", False)
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    checkpoint_damage.first_restorable([6, 4], lambda step: 1 / (step - 6), pathlib.Path("run"))
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed") as closed:
        loop.call_soon_threadsafe(print)  # what a read's callback from another thread meets

    async def _read_array_index_and_device_put():  # the name of Orbax's read coroutine
        pass

    read = _read_array_index_and_device_put()
    ours = ValueError("the user's own")
    for unraisable in (_unraisable(closed.value), _unraisable(RuntimeError("x"), read), _unraisable(ours)):
        sys.unraisablehook(unraisable)
    read.close()
    assert [unraisable.exc_value for unraisable in reported] == [ours]
    (quiet,) = logging.getLogger("asyncio").filters
    task = "Task exception was never retrieved\nfuture: <Task finished name='Task-9' coro=<{}() done, defined at x>>"
    for coroutine, kept in (("async_deserialize", False), ("fetch_rows", True)):
        record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, task.format(coroutine), None, None)
        assert quiet.filter(record) is kept


def test_no_restorable_checkpoint_lists_every_step_tried_and_moves_nothing(straight, tmp_path, host_state):
    run = copy_run(straight, tmp_path)
    for step in ("3", "4", "6"):
        _truncate(run / "checkpoints" / step)
    manager = checkpoints.create_manager(str(run), async_save=False)
    try:
        with pytest.raises(checkpoints.CheckpointError) as error:
            checkpoints.restore_train_state(manager, *host_state)
    finally:
        manager.close()
    message = str(error.value)
    assert f"no checkpoint of {run} restores completely" in message
    assert message.index("step 6: OUT_OF_RANGE") < message.index("step 4: ") < message.index("step 3: ")
    assert "\n" not in message and "Nothing was moved or deleted" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "4", "6"]


def test_load_and_evaluate_use_the_newest_restorable_step_and_name_a_damaged_explicit_one(straight, tmp_path, caplog):
    run = copy_run(straight, tmp_path)
    shutil.rmtree(run / "checkpoints" / "6" / "params")  # a copy stopped half way
    with caplog.at_level(logging.WARNING):
        classifier = vgg_jax.load(str(run))
    assert classifier.step == 4
    assert "checkpoint step 6 of" in caplog.text and "using step 4" in caplog.text
    assert checkpoints.resolve_step(str(run)) == 4  # the step `evaluate` reports and restores
    assert (run / "checkpoints" / "6").exists()  # a reader never changes the run
    with pytest.raises(checkpoints.CheckpointError, match=r"step 6 of .* cannot be restored: .*Ask for step 'latest'"):
        vgg_jax.load(str(run), step=6)
    with pytest.raises(ValueError, match=r"'six' is not a checkpoint step; expected 'latest', 'best' or a step"):
        vgg_jax.load(str(run), step="six")
    with pytest.raises(FileNotFoundError, match=r"step 5 is not saved .* saved steps: \[3, 4, 6\]"):
        vgg_jax.load(str(run), step=5)


# ----------------------------------------------------------------------------- torn and damaged files


def test_torn_last_lines_are_repaired_on_resume(straight, tmp_path, caplog):
    run = copy_run(straight, tmp_path)
    history_before = (run / "config_history.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as stream:
        stream.write('{"step": 7, "epoch": 0.04, "sp')  # killed mid-write
    with open(run / "config_history.jsonl", "a") as stream:
        stream.write('{"time": "2026-12-06T10:00:00+00:00", "st')
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(tiny_config(num_train_steps=6), str(run))
    for name in ("metrics.jsonl", "config_history.jsonl"):
        assert f"{run / name}: its last line was cut short" in caplog.text
    assert rows(run) == rows(straight)
    history = (run / "config_history.jsonl").read_text()
    assert history.startswith(history_before) and len(history.splitlines()) == 2
    assert json.loads(history.splitlines()[1])["resumed"] is True


@pytest.mark.parametrize("name", ["metrics.jsonl", "config_history.jsonl"])
def test_damage_before_the_last_line_is_named_before_any_work(straight, tmp_path, monkeypatch, name):
    run = copy_run(straight, tmp_path)
    lines = (run / name).read_text().splitlines(keepends=True)
    lines.insert(0, '{"step": 2, "lo\n')
    (run / name).write_text("".join(lines))
    before = (run / name).read_text()
    no_data_set(monkeypatch)
    with pytest.raises(ValueError, match=rf"{re.escape(str(run / name))} line 1 is not a JSON row .*fix or delete"):
        train.train_and_evaluate(tiny_config(), str(run))
    assert (run / name).read_text() == before
    assert not (run / run_lock.LOCK_FILE).exists()  # released on the way out


def test_a_torn_config_json_is_named(straight, tmp_path):
    run = copy_run(straight, tmp_path)
    (run / "config.json").write_text('{"model": {"var')
    with pytest.raises(ValueError, match=rf"{re.escape(str(run / 'config.json'))} is damaged .*config_history"):
        vgg_jax.load(str(run))


# ----------------------------------------------------------------------------- disk full, read-only


def test_a_failed_save_names_the_newest_complete_step_and_the_way_out(tmp_path):
    """The error a save that cannot be written raises (the slow test below runs it in training, disk full)."""
    from etils import epath

    root = tmp_path / "checkpoints"
    for name in ("2", "4", f"6{checkpoints.UNFINISHED_MARK}-1"):
        (root / name).mkdir(parents=True)
    full = OSError(errno.ENOSPC, "No space left on device", str(root / "6"))
    message = str(checkpoint_damage.write_error(types.SimpleNamespace(directory=epath.Path(root)), 6, full))
    assert f"checkpoint step 6 (or the save before it) could not be written to {root}: " in message
    assert "No space left on device" in message and "The newest complete checkpoint is step 4" in message
    assert "rerun the same command: it resumes from there" in message
    empty = types.SimpleNamespace(directory=epath.Path(tmp_path / "none"))
    assert "The newest complete checkpoint is none" in str(checkpoint_damage.write_error(empty, None, full))


# A third resume of the straight run; the fast tier resumes past damaged checkpoints (above)
@pytest.mark.slow
def test_disk_full_while_saving_stops_clearly_and_the_rerun_resumes(straight, tmp_path, monkeypatch):
    from etils import epath

    path_class = type(epath.Path(str(tmp_path)))
    write_text = path_class.write_text

    def full(self, *args, **kwargs):
        if "checkpoints/6.orbax-checkpoint-tmp" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    run = copy_run(straight, tmp_path, up_to=4)  # steps 5 and 6 to go
    with monkeypatch.context() as patch:
        patch.setattr(path_class, "write_text", full)
        with pytest.raises(checkpoints.CheckpointError) as error:
            train.train_and_evaluate(tiny_config(), str(run))
    message = str(error.value)
    assert "No space left on device" in message and "The newest complete checkpoint is step 4" in message
    assert "rerun the same command" in message
    train.train_and_evaluate(tiny_config(), str(run))  # space freed: the same command
    assert rows(run) == rows(straight)
    assert_same_parameters(run, straight)
    assert not [p for p in (run / "checkpoints").iterdir() if checkpoints.UNFINISHED_MARK in p.name]


@contextlib.contextmanager
def read_only(directory):
    """Makes `directory` refuse new files, for root too (chattr +i), or skips when this machine cannot."""
    os.chmod(directory, 0o555)
    immutable = (
        os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
    )
    try:
        probe = directory / "probe"
        with contextlib.suppress(OSError):
            probe.write_text("")
            probe.unlink()
            pytest.skip("cannot make a directory read-only here (root without chattr)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        os.chmod(directory, 0o755)


def test_a_read_only_checkpoint_directory_is_refused_before_any_work(straight, tmp_path, monkeypatch):
    run = copy_run(straight, tmp_path)
    listing = sorted(p.name for p in (run / "checkpoints").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    no_data_set(monkeypatch)
    with read_only(run / "checkpoints"):
        with pytest.raises(
            PermissionError, match=rf"{re.escape(str(run / 'checkpoints'))} is not writable .*warm_start"
        ):
            train.train_and_evaluate(tiny_config(num_train_steps=8), str(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == listing
    assert (run / "metrics.jsonl").read_text() == metrics and not (run / run_lock.LOCK_FILE).exists()


# ----------------------------------------------------------------------------- two runs on one workdir

HOLDER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from test_train import tiny_config
from vgg_jax.training import reporting, train

append = reporting.Reporter._append

def torn(self, step, split, values):  # the process is killed half way through writing step 6's train row
    if step == 6 and split == "train":
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as stream:
            stream.write(json.dumps(dict(step=step, split=split, **values))[:25])
        open({ready!r}, "w").close()
        time.sleep(600)
    append(self, step, split, values)

reporting.Reporter._append = torn
train.train_and_evaluate(tiny_config(), {workdir!r})
"""


# A killed holder, in a fresh interpreter; the fast tier refuses held locks in-process (next test)
@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_holder_is_taken_over(straight, tmp_path, monkeypatch, caplog):
    run, ready = copy_run(straight, tmp_path, up_to=4), tmp_path / "ready"  # the holder trains steps 5 and 6
    script = HOLDER.format(tests=str(TESTS), ready=str(ready), workdir=str(run))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    holder = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert holder.poll() is None and time.time() < deadline, holder.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        with monkeypatch.context() as patch:
            no_data_set(patch)
            with pytest.raises(run_lock.WorkdirInUseError) as refused:
                train.train_and_evaluate(tiny_config(), str(run))
        message = str(refused.value)
        assert f"--workdir={run} is in use by another run: pid {holder.pid} on host {socket.gethostname()}" in message
        assert "Wait for it to end" in message and "another --workdir" in message
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(tiny_config(), str(run))
    assert f"taking over the lock of pid {holder.pid}" in caplog.text and "is no longer running" in caplog.text
    assert f"{run / 'metrics.jsonl'}: its last line was cut short" in caplog.text
    assert rows(run) == rows(straight)
    assert_same_parameters(run, straight)
    assert not (run / run_lock.LOCK_FILE).exists()


def _lock_file(workdir, **fields):
    owner = dict(host="other-host", pid=4242, job="", started="2026-12-06T10:00:00+00:00", heartbeat=time.time())
    (workdir / run_lock.LOCK_FILE).write_text(json.dumps(owner | fields))


def test_a_lock_held_on_another_host_is_refused_until_stale_or_of_this_job(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("VGG_JAX_JOB_ID", raising=False)
    _lock_file(tmp_path)
    with pytest.raises(run_lock.WorkdirInUseError, match=r"pid 4242 on host other-host.*taken over 600 s after"):
        run_lock.acquire(str(tmp_path))
    for fields, reason in (
        ({"heartbeat": time.time() - 700}, r"its last heartbeat was 7\d\d s ago \(the limit is 600 s\)"),
        ({"job": "job-7"}, r"it is this job's \(id job-7\): the job was restarted"),
    ):
        monkeypatch.setenv("VGG_JAX_JOB_ID", "job-7")
        _lock_file(tmp_path, **fields)
        with caplog.at_level(logging.WARNING), run_lock.acquire(str(tmp_path)) as lock:
            assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid() == lock.owner["pid"]
        assert re.search(reason, caplog.text)
        assert not (tmp_path / run_lock.LOCK_FILE).exists()
        monkeypatch.delenv("VGG_JAX_JOB_ID")


# ----------------------------------------------------------------------------- degenerate inputs


def test_empty_batches_give_empty_results(straight):
    classifier = vgg_jax.load(str(straight))
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    for images in (empty, []):
        prediction = classifier.predict(images, top_k=3)
        assert prediction.class_ids.shape == prediction.probabilities.shape == (0, 3) and prediction.names == []
        assert classifier.predict(images, dense=True).class_ids.shape == (0, 5)
        assert classifier.features(images, "fc7").shape == (0, 16)
        assert classifier.features(images, "conv1_1").shape == (0, 32, 32, 4)
        assert classifier.features(images, "fc7", dense=True).shape == (0, 16)
    localiser = inference.Classifier(loc_configs.get_config("demo"), {})
    result = localiser.localise([])
    assert len(result) == 0 and result.class_ids.shape == (0, 5) and result.boxes.shape == (0, 5, 4)


def test_perceptual_features_refuse_images_outside_their_declared_range(straight):
    net, params = perceptual.from_classifier(vgg_jax.load(str(straight)), ("relu1_1",))  # declared [0, 1]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match=r"dtype uint8 .*input_range=\(0, 1\).*x / 255"):
        net(params, pixels)
    with pytest.raises(ValueError, match=r"values in \[0, 255\] into a net declared input_range=\(0, 1\)"):
        net(params, pixels.astype(np.float32))
    assert net(params, pixels / 255 * 1.005)["relu1_1"].shape == (2, 32, 32, 4)  # resampling overshoot passes
    traced = jax.jit(lambda x: net(params, x)["relu1_1"])(pixels.astype(np.float32))  # unchecked inside jit
    assert traced.shape == (2, 32, 32, 4)
    empty = np.zeros((0, 32, 32, 3), np.float32)
    assert net(params, empty)["relu1_1"].shape == (0, 32, 32, 4)
    with pytest.raises(ValueError, match=r"perceptual_loss of an empty batch"):
        perceptual.perceptual_loss(net, params, empty, empty)
    deep = perceptual.from_classifier(vgg_jax.load(str(straight)), ("relu5_1",))[0]
    with pytest.raises(ValueError, match=r"relu5_1 needs images of at least 16x16"):  # degenerate: too small
        deep(params, np.zeros((1, 8, 8, 3), np.float32))


# ----------------------------------------------------------------------------- command lines


def test_every_command_names_a_bad_argument_in_one_line(command_lines, tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config(:\n    pass\n")
    work = f"--workdir={tmp_path / 'w'}"
    main = "vgg_jax.main"
    cases = [
        (main, [f"--config={bad}", work], [f"{bad} line 1 is not valid Python"]),
        (main, ["--config=no/such/net.py", work], ["--config=no/such/net.py: no config file", "configs/d.py"]),
        (main, ["--config=configs/a.py:demo", "--config.no_such_field=1", work], ["--config.no_such_field: "]),
        (main, ["--config=configs/a.py:scale=abc", work], ["scale='abc' is not a training scale", "scale=256-512"]),
        (main, ["--config=configs/a.py:demo", "--config.num_train_steps=abc", work], ["=abc: expected an integer"]),
        (main, ["--config=configs/a.py:demo"], ["--workdir is required"]),
        (
            "vgg_jax.evaluation.evaluate",
            ["--checkpoint=r", "--step=abc"],
            ["--step=abc: 'abc' is not a checkpoint step"],
        ),
        (
            "vgg_jax.evaluation.evaluate",
            ["--checkpoint=r", "--max_examples=all"],
            ["--max_examples=all: expected an integer"],
        ),
        (
            "vgg_jax.evaluation.transfer",
            ["--checkpoint=r", "--dataset=d", "--scales=256,big"],
            ["--scales=256,big: expected"],
        ),
        (
            "vgg_jax.weights.convert",
            ["--source=caffe", "--weights=w", "--variant=D", "--out=o"],
            ["--source=caffe: expected"],
        ),
        ("vgg_jax.weights.convert", ["--source=keras", "--variant=D", "--out=o"], ["--weights is required"]),
        (
            "vgg_jax.localisation.evaluate",
            ["--checkpoint=r", "--step=final"],
            ["--step=final: 'final' is not a checkpoint"],
        ),
        (
            "vgg_jax.data.mean_rgb",
            ["--dataset=d", "--max_examples=all"],
            ["--max_examples=all: expected a non-negative integer"],
        ),
        ("vgg_jax", ["trian", "--config=configs/a.py:demo"], ["'trian' is not a vgg-jax command", "train"]),
        ("vgg_jax", ["evaluate", "--checkpoint=r", "--step=abc"], ["--step=abc: 'abc' is not a checkpoint step"]),
    ]
    verbose = [
        (main, ["--config=no/such/net.py", work], {"VGG_JAX_VERBOSE": "1"}),
        ("vgg_jax.evaluation.evaluate", ["--checkpoint=r", "--step=abc", "--verbosity=1"], {}),
    ]
    results = [command_lines.run(module, *args) for module, args, _ in cases]
    results += [command_lines.run(module, *args, env=env) for module, args, env in verbose]
    wrong = []  # every command line that is not one `error:` line naming the argument, with status 2
    for (module, args, expected), result in zip(cases, results, strict=False):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        named = len(lines) == 1 and lines[0].startswith("error: ") and all(text in lines[0] for text in expected)
        if result.returncode != 2 or not named:
            wrong.append((module, args, result.returncode, result.stderr[-600:]))
    assert not wrong, "\n".join(map(str, wrong))
    for result in results[len(cases) :]:
        assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr, result
        assert result.stderr.rstrip().splitlines()[-1].startswith("error: ")
