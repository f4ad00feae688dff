"""Paper §3.1 training, resumed: a run never silently changes meaning.

Rerunning the training command on a workdir with a checkpoint resumes it. `check` compares the new
config with the run's ``config.json`` before any expensive work: fields declared `may_change` in
`vgg_jax.configs.fields` (how long, the rate, intervals, where the data lives) may change, each logged
with its effect (`announce`); any other field fixes what the run is, and a change is refused with one
message listing each field's saved and new value and the two ways out (a new ``--workdir``, or a warm
start from this run). The stream is defined by the resolved ``input_shards``, not the host count.
`record_start` keeps ``config.json`` current, appends each start to ``config_history.jsonl``, stores
``class_names.json`` (loading a run never needs the data set) and cuts ``metrics.jsonl`` back to the
resumed step; a torn last .jsonl line is repaired, damage elsewhere stops the start.
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

from vgg_jax.checkpointing import checkpoints, jsonl
from vgg_jax.configs.fields import BY_PATH
from vgg_jax.configs.tree import flatten

HISTORY_FILE = "config_history.jsonl"
METRICS_FILE = "metrics.jsonl"

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


def effect(field: str) -> str | None:
    """What changing `field` on resume does (its declaration's `may_change`); None: the change is refused."""
    declared = BY_PATH.get(field)
    return declared.may_change if declared else None


def _absent_means(field: str) -> Any:
    """An older config.json lacks fields declared since: absent means the declared default."""
    declared = BY_PATH.get(field)
    return declared.default if declared and declared.may_be_absent else _MISSING


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
    old_flat, new_flat = flatten(saved), flatten(new)
    changes = []
    for field in sorted(set(old_flat) | set(new_flat)):
        if field == "input_shards":
            continue
        old = old_flat.get(field, _absent_means(field))
        value = new_flat.get(field, _absent_means(field))
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
            f"--workdir={workdir} holds imported weights (written by `vgg-jax convert`: parameters only, "
            "no optimiser state), not a training run to resume. Train in a new workdir starting from them: "
            f"--workdir=NEW_RUN --config.warm_start.checkpoint={workdir} --config.warm_start.layers=all"
        )
    if not (path / checkpoints.CONFIG_FILE).exists():
        logging.warning("%s has checkpoints but no config.json: the config cannot be compared with the run's", workdir)
        return []
    saved = json.loads((path / checkpoints.CONFIG_FILE).read_text())
    changes = differences(saved, as_json(config))
    refused = [change for change in changes if effect(change.field) is None]
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
            f"{', '.join(sorted(path for path, field in BY_PATH.items() if field.may_change))}."
        )
    return changes


def announce(changes: Sequence[Change], config: ml_collections.ConfigDict, plateau_scale: float, step: int) -> None:
    """Logs each allowed change and what it does; the rate's new value when the rate changed."""
    for change in changes:
        logging.info("resume: %s → %s", change, effect(change.field))
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
