"""Checkpoints that do not restore: paper §3.1 training resumes from the newest step that does.

A disk that fills, a node that dies mid-copy, an rsync that stops: the newest
step is the one most likely to be damaged (a data file inside it cut short or
missing), while the older ones beside it are intact. `first_restorable` tries
the candidate steps in order and returns the first that restores completely
(on every process of a multi-host run, `vgg_jax.runtime.parallel.agree`); a resume
then moves the damaged newer steps to ``<run>/damaged_checkpoints/`` with a
log line naming each and the step resumed from (`set_aside`: renamed, never
deleted). When none restores, `CheckpointError` lists every step tried and
why, and nothing is moved.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vgg_jax.runtime import parallel

DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: what a resume could not restore


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written: the message names the step, the directory, the cause and the way out."""


def cause(error: BaseException) -> str:
    """The innermost cause's first line: Orbax wraps TensorStore's one-line reason in pages of array spec."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# Orbax's coroutines that read a step's arrays (orbax.checkpoint serialization).
_ORBAX_READS = ("_read_array_index_and_device_put", "async_deserialize")
_quieted = False


def _is_abandoned_read(unraisable: Any) -> bool:
    """Whether an unraisable exception (`sys.unraisablehook`'s argument) is the end of a read nobody awaits.

    After a step fails to restore, Orbax's other reads of it go on in TensorStore's threads: each ends by
    calling back into the event loop Orbax has closed, or as a coroutine closed half way.
    """
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        frames = traceback.walk_tb(unraisable.exc_traceback)
        return any(frame.f_code.co_name == "call_soon_threadsafe" for frame, _ in frames)
    return getattr(unraisable.object, "__name__", "") in _ORBAX_READS


class _AbandonedReadTasks(logging.Filter):
    """Drops asyncio's report of an Orbax read task whose exception nobody retrieved (its restore had failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        unretrieved = message.startswith("Task exception was never retrieved")
        return not (unretrieved and any(f"{name}()" in message for name in _ORBAX_READS))


def quiet_abandoned_reads() -> None:
    """From the first failed restore on, the abandoned reads' tracebacks are dropped, everything else kept.

    Without this a resume that passes over a damaged step prints up to dozens of screens of them, from other
    threads and at garbage collection, burying the one line that says which step was set aside and why.
    """
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedReadTasks())


def first_restorable(
    candidates: Sequence[int], restore: Callable[[int], Any], run: epath.Path, *, everywhere: bool = False
) -> tuple[int, Any, list[tuple[int, str]]]:
    """(step, what `restore(step)` gave, [(step, reason) passed over]) for the first candidate that restores.

    `everywhere`: a step counts only if it restored on every process (all processes must call this together).
    """
    tried: list[tuple[int, str]] = []
    for candidate in candidates:
        try:
            value, reason = restore(candidate), ""
        except Exception as error:  # any failure to read the step: try the next one
            value, reason = None, cause(error)
            quiet_abandoned_reads()
        restored = value is not None
        if everywhere:
            restored = parallel.agree(f"restore_{candidate}", restored)
        if restored:
            return candidate, value, tried
        tried.append((candidate, reason or "it did not restore on another process"))
    raise CheckpointError(
        f"no checkpoint of {run} restores completely. Tried, in order — "
        + "; ".join(f"step {step}: {reason}" for step, reason in tried)
        + ". Nothing was moved or deleted. Copy the run again if it was copied, or start a new run "
        "(--workdir=NEW_RUN); the damaged steps stay where they are for inspection"
    )


def restore_or_explain(restore: Callable[[int], Any], step: int, run: epath.Path) -> Any:
    """`restore(step)` for a step asked for by number: a failure is an error naming it (no other step is tried)."""
    try:
        return restore(step)
    except Exception as error:
        quiet_abandoned_reads()
        raise CheckpointError(
            f"step {step} of {run} cannot be restored: {cause(error)}. Ask for step 'latest' (the newest step that "
            "restores completely) or another saved step"
        ) from error


def report_passed_over(passed: Sequence[tuple[int, str]], run: epath.Path, used: int) -> None:
    """Logs each damaged step a reader passed over: a reader never changes the run directory."""
    for step, reason in passed:
        logging.warning(
            "checkpoint step %d of %s cannot be restored (%s): using step %d (step %d stays in place; a training "
            "run on this directory moves it aside)",
            step,
            run,
            reason,
            used,
            step,
        )


def set_aside(manager: ocp.CheckpointManager, damaged: Sequence[tuple[int, str]], resumed: int) -> None:
    """Moves damaged steps to ``<run>/damaged_checkpoints/`` (process 0; the others wait), so saves go on after."""
    if not damaged:
        return
    if jax.process_index() == 0:
        aside = manager.directory.parent / DAMAGED_DIR
        aside.mkdir(parents=True, exist_ok=True)
        for step, reason in damaged:
            target, suffix = aside / str(step), 1
            while target.exists():  # damaged before, and again
                target, suffix = aside / f"{step}.{suffix}", suffix + 1
            (manager.directory / str(step)).rename(target)
            logging.warning(
                "checkpoint step %d cannot be restored (%s): moved it to %s; resuming from step %d",
                step,
                reason,
                target,
                resumed,
            )
    parallel.barrier("damaged_checkpoints")
    manager.reload()


def write_error(manager: ocp.CheckpointManager, step: int | None, error: BaseException) -> CheckpointError:
    """A failed save (a full disk, lost write access), naming the newest complete step and the way out."""
    root = manager.directory
    complete = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
    which = "a checkpoint" if step is None else f"checkpoint step {step} (or the save before it)"
    return CheckpointError(
        f"{which} could not be written to {root}: {cause(error)}. The newest complete checkpoint is "
        f"{f'step {complete[-1]}' if complete else 'none'}; free space (or restore write access) and rerun the same "
        "command: it resumes from there, and the unfinished save is removed"
    )
