"""Issue #13 reliability: resume checks the config, divergence rolls back, crashes leave no debris or duplicates."""

import json
import logging
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_train import poison_step, read_metrics, tiny_config

from vgg_jax import inference
from vgg_jax.checkpointing import checkpoints
from vgg_jax.data import sources
from vgg_jax.training import guard, resume, train


def _history(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "config_history.jsonl").read_text().splitlines()]


def test_resume_refuses_a_changed_run_before_any_work_and_lists_every_field(tmp_path, monkeypatch):
    train.train_and_evaluate(tiny_config(num_train_steps=2, eval_every_steps=2), str(tmp_path))
    saved_config = (tmp_path / "config.json").read_text()
    changed = tiny_config(num_train_steps=4, seed=1, global_batch_size=16, mean_rgb=(1.0, 2.0, 3.0), input_shards=2)

    def expensive(*args, **kwargs):
        raise AssertionError("the data set was opened before the config was compared")

    monkeypatch.setattr(sources, "dataset_metadata", expensive)
    with pytest.raises(ValueError) as error:
        train.train_and_evaluate(changed, str(tmp_path))
    message = str(error.value)
    for line in (
        "config.seed: saved 0, new 1",
        "config.global_batch_size: saved 8, new 16",
        "config.mean_rgb: saved [123.68, 116.779, 103.939], new [1.0, 2.0, 3.0]",
        "config.input_shards (resolved; 0 = one per process): saved 1, new 2",
    ):
        assert line in message, message
    assert "num_train_steps" not in message.split("Fields that may change")[0]  # allowed: not listed as a problem
    assert "--workdir=NEW_RUN" in message and f"--config.warm_start.checkpoint={tmp_path}" in message
    assert (tmp_path / "config.json").read_text() == saved_config  # nothing rewritten
    assert len(_history(tmp_path)) == 1


# Two training runs; the fast tier refuses a changed resume (above) and resumes exactly (test_train)
@pytest.mark.slow
def test_allowed_changes_resume_log_and_are_kept_in_the_history(tmp_path, caplog):
    config = tiny_config(lr_schedule="plateau", num_train_steps=2, eval_every_steps=1, learning_rate=0.01)
    config.plateau.patience = 1
    config.plateau.threshold = 0.5  # the second evaluation is a plateau: scale 0.1
    train.train_and_evaluate(config, str(tmp_path))
    assert [r["lr"] for r in read_metrics(tmp_path)] == pytest.approx([0.01, 0.01])

    resumed = tiny_config(lr_schedule="plateau", num_train_steps=4, eval_every_steps=1, learning_rate=0.05)
    resumed.plateau.patience, resumed.plateau.threshold = 1, 0.5
    resumed.log_every_steps = 1
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(resumed, str(tmp_path))
    # The new rate × the plateau scale (0.1) from the very next step, not from the next evaluation.
    assert read_metrics(tmp_path, "train")[-2]["step"] == 3
    assert read_metrics(tmp_path, "train")[-2]["lr"] == pytest.approx(0.005)
    assert "learning rate from step 3 is 0.005" in caplog.text
    assert "config.learning_rate: saved 0.01, new 0.05" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.05
    history = _history(tmp_path)
    assert [row["step"] for row in history] == [0, 2]
    assert history[1]["changed"]["learning_rate"] == [0.01, 0.05] and history[1]["input_shards"] == 1
    assert history[0]["config"]["learning_rate"] == 0.01


def test_converted_weights_as_workdir_say_what_they_are(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=1, eval_every_steps=1), str(tmp_path / "run"))
    params, config, _ = checkpoints.restore_params(str(tmp_path / "run"))
    checkpoints.save_params_only(str(tmp_path / "weights"), params, config)  # what vgg_jax.weights.convert writes
    with pytest.raises(ValueError, match=r"imported weights.*vgg-jax convert.*warm_start\.checkpoint="):
        train.train_and_evaluate(tiny_config(), str(tmp_path / "weights"))


def test_spike_rolls_back_to_the_last_good_checkpoint_and_lowers_the_rate(tmp_path, monkeypatch, caplog):
    config = tiny_config(num_train_steps=8)  # log/save every 2, evaluate every 3
    config.spike_guard.factor = 10.0
    config.spike_guard.max_retries = 1
    poison_step(monkeypatch, 5, how="spike", only_at_base_rate=True)
    with caplog.at_level(logging.WARNING):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 8
    # Steps 5-6 spiked; step 4's parameters produced step 5's loss, so step 3 is the newest trusted checkpoint.
    assert "spike guard: training loss spike" in caplog.text and "back to step 3" in caplog.text
    rows = read_metrics(tmp_path, "train") + read_metrics(tmp_path)
    steps_seen = sorted((r["step"], r["split"]) for r in rows)
    assert len(steps_seen) == len(set(steps_seen))  # the abandoned rows were dropped, nothing is doubled
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path, "train")}
    assert lrs[2] == pytest.approx(0.01) and lrs[4] == pytest.approx(0.001) and lrs[8] == pytest.approx(0.001)
    assert max(r["loss"] for r in read_metrics(tmp_path, "train")) < 10
    params, _, _ = checkpoints.restore_params(str(tmp_path))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(params))


# The bound on the rollbacks the fast tier checks (above)
@pytest.mark.slow
def test_spike_retries_are_bounded_then_the_run_stops_clearly(tmp_path, monkeypatch):
    config = tiny_config(num_train_steps=8)
    config.spike_guard.max_retries = 1
    poison_step(monkeypatch, 5)  # NaN at step 5 at every rate: the retry fails too
    with pytest.raises(guard.NonFiniteLossError, match=r"after 1 rollback\(s\).*max_retries=1"):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpoints.resolve_step(str(tmp_path)) == 4


# Three training runs; the fast tier resumes after a kill's torn rows and damaged saves (test_faults)
@pytest.mark.slow
def test_a_kill_mid_save_leaves_no_temporary_directories_and_no_duplicate_rows(tmp_path):
    straight = tmp_path / "straight"
    train.train_and_evaluate(tiny_config(), str(straight))
    run = tmp_path / "run"
    train.train_and_evaluate(tiny_config(stop_after_steps=4), str(run))
    # As if the process died after logging step 5-6 and while saving step 6.
    with (run / "metrics.jsonl").open("a") as stream:
        stream.write(json.dumps({"step": 6, "epoch": 0.1, "split": "train", "loss": 9.0}) + "\n")
    unfinished = run / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    (unfinished / "params").mkdir(parents=True)
    (unfinished / "params" / "blob").write_bytes(b"\0" * 1024)
    train.train_and_evaluate(tiny_config(), str(run))
    assert not unfinished.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "4", "6"]

    def rows(path):
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_second"} for line in lines]

    assert rows(run) == rows(straight)


def test_unfinished_saves_are_removed_and_nothing_else(tmp_path, caplog):
    """What a kill mid-save leaves (Orbax's temporary step directory) goes at the next start; the rest stays.
    The whole story, with training runs around it, is the slow test above."""
    root = tmp_path / checkpoints.CHECKPOINT_DIR
    unfinished = root / f"6{checkpoints.UNFINISHED_MARK}-1234567"
    (unfinished / "params").mkdir(parents=True)
    (unfinished / "params" / "blob").write_bytes(b"\0" * 1024)
    (root / "4" / "params").mkdir(parents=True)
    (root / f"notes{checkpoints.UNFINISHED_MARK}.txt").write_text("a file, not a save")
    with caplog.at_level(logging.WARNING):
        assert checkpoints.remove_unfinished_saves(str(tmp_path)) == [unfinished.name]
    assert sorted(p.name for p in root.iterdir()) == ["4", f"notes{checkpoints.UNFINISHED_MARK}.txt"]
    assert f"removed 1 unfinished checkpoint save(s) in {root}: {unfinished.name}" in caplog.text
    assert checkpoints.remove_unfinished_saves(str(tmp_path / "no_run")) == []


def test_keep_last_and_keep_best_delete_the_others(tmp_path):
    manager = checkpoints.create_manager(str(tmp_path), keep=2, keep_best=1, async_save=False)
    params = {"fc8": {"kernel": np.zeros((2, 2), np.float32)}}
    errors = {1: 0.5, 2: 0.2, 3: 0.4, 4: None, 5: 0.6, 6: 0.7}
    for step, error in errors.items():
        metrics = {"top1_error": error} if error is not None else None
        meta = {"step": step, **(metrics or {})}  # as training writes it: 'best' reads the meta
        checkpoints.save(manager, step, params=params, train_state=None, meta=meta, metrics=metrics)
    manager.close()
    assert sorted(checkpoints.steps_with_meta(str(tmp_path))) == [2, 5, 6]  # the last two and the best (0.2)
    assert checkpoints.resolve_step(str(tmp_path), "best") == 2


def test_class_names_are_stored_and_loading_never_opens_the_data_set(tmp_path, monkeypatch, caplog):
    train.train_and_evaluate(tiny_config(num_train_steps=1, eval_every_steps=1), str(tmp_path))
    assert json.loads((tmp_path / "class_names.json").read_text()) == [str(i) for i in range(10)]

    def no_data(*args, **kwargs):
        raise AssertionError("vgg_jax.load opened the data set")

    monkeypatch.setattr(sources, "get_dataset_builder", no_data)
    assert inference.load(str(tmp_path)).class_names == [str(i) for i in range(10)]
    (tmp_path / "class_names.json").unlink()  # a run from before class_names.json
    with caplog.at_level(logging.WARNING):
        assert inference.load(str(tmp_path)).class_names is None
    assert "no class names stored with this run" in caplog.text


# A training run over damaged records; the fast tier counts and refuses them in the streams (test_data)
@pytest.mark.slow
def test_corrupt_eval_records_are_counted_not_silently_dropped(tmp_path, caplog):
    from test_data import _corrupt_as_dataset

    config = tiny_config(dataset="imagenet2012", train_split="train", eval_split="validation", eval_batch_size=8)
    config.model.num_classes = 1000
    config.num_train_steps = 1
    config.eval_every_steps = 1
    with tfds.testing.mock_data(as_dataset_fn=_corrupt_as_dataset), caplog.at_level(logging.WARNING):
        config.global_batch_size = 2
        train.train_and_evaluate(config, str(tmp_path))
    (row,) = read_metrics(tmp_path)
    assert row["num_examples"] == 3 and row["skipped"] == 2
    assert "2 of 5 records could not be decoded" in caplog.text


def test_metrics_truncation_keeps_rows_up_to_the_step(tmp_path):
    rows = [{"step": s, "split": "train"} for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert resume.truncate_metrics(str(tmp_path), 4) == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_sigterm_handler_chains_to_the_one_before_and_is_restored():
    import os
    import signal

    from vgg_jax.training import guard

    seen = []

    def earlier(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, earlier)
    try:
        config = tiny_config(stop_after_steps=-1)
        with guard.Stopper(config, start_step=0) as stopper:
            assert not stopper.should_stop(1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert stopper.should_stop(2) and stopper.should_stop(3)  # the next step stops, and stays stopped
        assert seen == [signal.SIGTERM]  # the earlier handler still ran
        assert signal.getsignal(signal.SIGTERM) is earlier  # ours is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
