"""Paper §3.1 training, resumed: a run never silently changes meaning.

Rerunning the training command on a workdir that holds a checkpoint resumes
it. `check` compares the new config with the run's ``config.json`` before any
expensive work:

* fields in `MAY_CHANGE` (how long to train, the rate, how often to log /
  evaluate / save, how many checkpoints to keep, where the data lives, how the
  processes find each other, …) may change; each change is logged with what
  it does (`announce`);
* every other field fixes what the run *is* — the network, the data and its
  stream (seed, global batch, input shards, crops, scales, mean RGB, …), the
  optimiser, the validation that ranks checkpoints — and a change is refused
  with one message listing each field, its saved and its new value, and the
  two ways out (a new ``--workdir``, or a new run warm-started from this one).

The stream is defined by the number of input shards, so the *resolved*
``input_shards`` (0 = one per process) is what must not change: a run of 2
hosts may resume on 1 host with ``--config.input_shards=2``.

`record_start` keeps ``config.json`` the current config, appends every start
to ``config_history.jsonl`` (time, step, processes, shards, changed fields,
config), stores the data set's class names (``class_names.json``, so loading a
run never needs the data set), and cuts ``metrics.jsonl`` back to the resumed
step (rows written after the last checkpoint by a process that then died).
Both .jsonl files survive a torn last line (a kill mid-append): it is removed
on resume with a log line; damage elsewhere stops the start, naming the file
and line (`vgg_jax.jsonl`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from vgg_jax import checkpoints, jsonl

HISTORY_FILE = "config_history.jsonl"
METRICS_FILE = "metrics.jsonl"

# Fields that may change when resuming, and what the change does. A field not listed here may not change
# (new fields are therefore refused until someone decides otherwise). Groups end with '.'.
MAY_CHANGE: dict[str, str] = {
    "learning_rate": "the rate from the next step on (× the plateau scale under 'plateau')",
    "step_boundaries_epochs": "the 'step' schedule from the next step on",
    "plateau.patience": "the plateau rule from the next evaluation on",
    "plateau.threshold": "the plateau rule from the next evaluation on",
    "plateau.cooldown": "the plateau rule from the next evaluation on",
    "plateau.max_reductions": "the plateau rule from the next evaluation on (it never raises the rate)",
    "num_epochs": "where the run ends",
    "num_train_steps": "where the run ends",
    "log_every_steps": "how often it logs",
    "log_layer_stats": "what the train rows record",
    "eval_every_steps": "how often it evaluates",
    "checkpoint_every_steps": "how often it saves",
    "keep_checkpoints": "how many checkpoints are kept (from the next save)",
    "keep_best_checkpoints": "how many best checkpoints are kept (from the next save)",
    "stop_after_steps": "where this invocation stops",
    "eval_batch_size": "memory only: validation is exact for any batch",
    "remat": "memory only: the same arithmetic",
    "resample_on_device": "where the crops are resampled (host or accelerator): the same draws, crops within ±1",
    "resample_canvas": "the canvas the windows travel on (device resampling): the same crops",
    "data_dir": "where the same data set is read",
    "download": "whether a missing data set may be downloaded",
    "corrupt_images": "whether an undecodable record stops the run",
    "spike_guard.": "the spike guard from the next step on",
    "distributed.": "how the processes find each other",
    "warm_start.": "nothing: a resumed run does not warm start",
    "model.num_classes": "nothing: it follows the data set, which may not change",
}
# Optional fields (validation.FIELDS) and their meaning when absent from an older config.json.
_ABSENT_MEANS = {
    "resize_method": "exact",
    "dense_pooling": "ceil",
    "resample_on_device": False,
    "resample_canvas": 0,
}
_MISSING = "<absent>"


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"config.{self.field}: saved {_show(self.saved)}, new {_show(self.new)}"


def _show(value: Any) -> str:
    return value if value is _MISSING else json.dumps(value)


def _may_change(field: str) -> bool:
    return any(field == key or (key.endswith(".") and field.startswith(key)) for key in MAY_CHANGE)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it (tuples as lists), so saved and new values compare equal."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _saved_shards(workdir: epath.Path, saved: dict[str, Any]) -> int | None:
    """The run's resolved shard count: from the history, else a fixed config.input_shards; None if unknown."""
    history = workdir / HISTORY_FILE
    rows = jsonl.read(history)
    if rows and "input_shards" in rows[-1]:
        return int(rows[-1]["input_shards"])
    return int(saved.get("input_shards", 0)) or None


def differences(saved: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every field whose value differs, input_shards excluded (it is compared resolved)."""
    old_flat, new_flat = _flat(saved), _flat(new)
    changes = []
    for field in sorted(set(old_flat) | set(new_flat)):
        if field == "input_shards":
            continue
        old = old_flat.get(field, _ABSENT_MEANS.get(field, _MISSING))
        value = new_flat.get(field, _ABSENT_MEANS.get(field, _MISSING))
        if old != value:
            changes.append(Change(field, old, value))
    return changes


def check(config: ml_collections.ConfigDict, workdir: str, shards: int) -> list[Change] | None:
    """None for a fresh workdir; else the allowed changes of a resume. Raises ValueError for the others.

    `shards` is this run's resolved input shard count. Reads only small files: call it before any expensive work.
    """
    path = epath.Path(workdir)
    for name in (METRICS_FILE, HISTORY_FILE):
        jsonl.read(path / name)  # damage before the last line stops the start here, naming the file
    latest = checkpoints.latest_step(workdir)
    if latest is None:
        return None
    if not checkpoints.is_training_run(workdir):
        raise ValueError(
            f"--workdir={workdir} holds imported weights (written by `python -m vgg_jax.convert`: parameters only, "
            "no optimiser state), not a training run to resume. Train in a new workdir starting from them: "
            f"--workdir=NEW_RUN --config.warm_start.checkpoint={workdir} --config.warm_start.layers=all"
        )
    if not (path / checkpoints.CONFIG_FILE).exists():
        logging.warning("%s has checkpoints but no config.json: the config cannot be compared with the run's", workdir)
        return []
    saved = json.loads((path / checkpoints.CONFIG_FILE).read_text())
    changes = differences(saved, as_json(config))
    refused = [change for change in changes if not _may_change(change.field)]
    saved_shards = _saved_shards(path, saved)
    if saved_shards is None:
        logging.warning("%s predates config_history.jsonl: its input shard count cannot be checked", workdir)
    elif saved_shards != shards:
        refused.append(Change("input_shards (resolved; 0 = one per process)", saved_shards, shards))
    if refused:
        lines = "\n".join(f"  {change}" for change in refused)
        raise ValueError(
            f"--workdir={workdir} holds a run (step {latest}) whose config differs in field(s) that fix what the run "
            f"is:\n{lines}\nResuming would silently change its meaning. Either start a new run: --workdir=NEW_RUN, "
            f"or start a new run from this one's weights: --workdir=NEW_RUN --config.warm_start.checkpoint={workdir} "
            "(--config.warm_start.layers=all copies every layer). Fields that may change on resume: "
            f"{', '.join(sorted(MAY_CHANGE))}."
        )
    return changes


def announce(changes: Sequence[Change], config: ml_collections.ConfigDict, plateau_scale: float, step: int) -> None:
    """Logs each allowed change and what it does; the rate's new value when the rate changed."""
    for change in changes:
        logging.info("resume: %s → %s", change, MAY_CHANGE.get(change.field) or _group_effect(change.field))
    if any(change.field in ("learning_rate", "step_boundaries_epochs") for change in changes):
        if config.lr_schedule == "plateau":
            logging.warning(
                "resume: the learning rate from step %d is %.4g = config.learning_rate %.4g × plateau scale %.4g",
                step + 1,
                config.learning_rate * plateau_scale,
                config.learning_rate,
                plateau_scale,
            )
        else:
            logging.warning(
                "resume: from step %d the rate follows the 'step' schedule from %.4g (× scale %.4g)",
                step + 1,
                config.learning_rate,
                plateau_scale,
            )


def _group_effect(field: str) -> str:
    return next(effect for key, effect in MAY_CHANGE.items() if key.endswith(".") and field.startswith(key))


def record_start(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    step: int,
    shards: int,
    changes: Sequence[Change] | None,
    class_names: Sequence[str] | None,
) -> None:
    """config.json, config_history.jsonl, class_names.json, and metrics.jsonl cut to `step` (process 0)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir)
    checkpoints.save_config(workdir, config)
    row = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": step,
        "processes": jax.process_count(),
        "input_shards": shards,
        "resumed": changes is not None,
        "changed": {c.field: [c.saved, c.new] for c in changes or ()},
        "config": as_json(config),
    }
    jsonl.read(path / HISTORY_FILE, repair=True)  # a torn last line would swallow this row
    jsonl.append(path / HISTORY_FILE, row)
    if class_names is not None:
        checkpoints.write_atomically(path / checkpoints.CLASS_NAMES_FILE, json.dumps(list(class_names)))
    truncate_metrics(workdir, step)


def truncate_metrics(workdir: str, step: int) -> int:
    """Drops metrics.jsonl rows after `step` (written past the checkpoint the run goes on from); returns how many."""
    path = epath.Path(workdir) / METRICS_FILE
    if jax.process_index() != 0 or not path.exists():
        return 0
    rows = jsonl.read(path, repair=True)
    kept = [row for row in rows if row.get("step", 0) <= step]
    if len(kept) < len(rows):
        jsonl.rewrite(path, kept)
        logging.warning(
            "metrics.jsonl: dropped %d row(s) after step %d (the checkpoint goes on from there)",
            len(rows) - len(kept),
            step,
        )
    return len(rows) - len(kept)
