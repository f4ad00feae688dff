"""Paper §3.1 training, kept safe: divergence and spike checks, and stopping on preemption on every host.

`LossGuard` keeps each step's metrics on device until the loop needs them (a log line, an evaluation,
a checkpoint), then checks on the host for a non-finite loss or parameters and, with
``spike_guard.factor`` > 0, a mean loss over ``factor`` × the median of the last ``spike_guard.window``
log-interval losses. Nothing is saved before its steps are checked, so no checkpoint holds a flagged
state. A verdict names the newest step the evidence vouches for (`Verdict.trusted_step`); the loop goes
back to a checkpoint at or before it, lowers the rate by ``plateau.factor`` and goes on, at most
``spike_guard.max_retries`` times, then stops. The paper reports no such mechanism, so its configs turn
it off: non-finite values stop the run at once, as in Caffe [choice]. `Stopper` turns SIGTERM or
``config.stop_after_steps`` into one stop step on every process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import statistics
from collections import deque
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils


class DivergedError(FloatingPointError):
    """Training diverged and the spike guard could not (or was not allowed to) recover."""


class NonFiniteLossError(DivergedError):
    """Training produced a NaN/Inf loss or parameters; the last good checkpoint was kept."""


class LossSpikeError(DivergedError):
    """The training loss jumped far above its recent level; the last good checkpoint was kept."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the guard found: a message, whether values were non-finite, and the newest trusted step."""

    message: str
    non_finite: bool
    trusted_step: int

    def error(self, detail: str) -> DivergedError:
        cls = NonFiniteLossError if self.non_finite else LossSpikeError
        return cls(f"{self.message}; stopping. {detail}")


def spike_settings(config: ml_collections.ConfigDict) -> tuple[float, int, int]:
    """(factor, window, max_retries) of ``config.spike_guard``; configs written before it existed mean 'off'."""
    settings = config.get("spike_guard") or {}
    return float(settings.get("factor", 0.0)), int(settings.get("window", 5)), int(settings.get("max_retries", 0))


class LossGuard:
    """Checks step metrics before anything is logged, evaluated or saved (see module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.factor, window, self.max_retries = spike_settings(config)
        self.retries = 0
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # on device, not yet checked
        self.checked: list[dict[str, float]] = []  # this log interval's checked metrics
        self.history: deque[float] = deque(maxlen=max(window, 1))  # recent log-interval mean losses

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def check(self) -> Verdict | None:
        """Fetches the pending metrics; None when they are fine, else the first problem found."""
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in self.pending]
        self.pending = []
        if not fetched:
            return None
        for step, metrics in fetched:
            # The loss of step s comes from the parameters after s - 1 updates; params_finite is after s.
            if not math.isfinite(metrics["loss"]):
                return Verdict(f"non-finite training loss ({metrics['loss']}) at step {step}", True, step - 2)
            if metrics.pop("params_finite") != 1.0:
                return Verdict(f"non-finite parameters after step {step}", True, step - 1)
        mean = float(np.mean([m["loss"] for _, m in fetched]))
        if self.factor > 0 and self.history:
            level = statistics.median(self.history)
            if mean > self.factor * level:
                first = fetched[0][0]
                message = (
                    f"training loss spike: mean {mean:.4g} over steps {first}-{fetched[-1][0]} > "
                    f"spike_guard.factor {self.factor:g} × recent median {level:.4g}"
                )
                return Verdict(message, False, first - 2)
        self.checked.extend(metrics for _, metrics in fetched)
        return None

    def take(self) -> list[dict[str, float]]:
        """The checked metrics of the log interval (call after `check`); their mean loss joins the history."""
        interval, self.checked = self.checked, []
        if interval:
            self.history.append(float(np.mean([m["loss"] for m in interval])))
        return interval

    def allow_retry(self, verdict: Verdict, last_good: int | None, workdir: str) -> None:
        """Counts one rollback, or raises the verdict's error when no retry is left (or nothing to go back to)."""
        where = (
            f"the last good checkpoint (step {last_good}) in {workdir} is untouched"
            if last_good is not None
            else (f"no checkpoint in {workdir} predates step {verdict.trusted_step + 1}")
        )
        if self.retries >= self.max_retries or last_good is None:
            tried = (
                f" after {self.retries} rollback(s) (spike_guard.max_retries={self.max_retries})"
                if self.retries
                else ""
            )
            raise verdict.error(
                f"{where}{tried} — lower config.learning_rate, check the data, or raise "
                "config.spike_guard.max_retries to go back and retry at a lower rate."
            )
        self.retries += 1
        self.pending, self.checked = [], []


# ---------------------------------------------------------------------------- stopping


class Stopper:
    """SIGTERM (preemption) or ``stop_after_steps`` → save and stop at the same step on every process.

    * One process: a SIGTERM handler sets a flag, read at every step: the run stops after the step in progress.
    * Several processes with JAX's preemption service (on by default in `jax.distributed`): JAX's own SIGTERM
      notifier, on whichever host gets the signal, tells every host, and
      `multihost_utils.reached_preemption_sync_point` — called at every step — names one step (the largest
      step any host has reached, + 1) at which all stop. The notice travels in about a second, so every host
      stops at the same step, at most about one second's worth of steps after the signal. Our handler is NOT
      installed then: it would replace JAX's notifier (a C handler Python cannot chain to).
    * Several processes without that service: our handler sets the flag, and the processes agree on it with an
      all-gather every `AGREE_EVERY_STEPS` steps: every host stops at the same step, within that many steps.

    A handler installed before ours (a Python callable) is called after ours, and restored on exit. Once a stop
    is decided it stays decided, so a spike-guard rollback in the same step cannot lose it. The sync point is
    asked with the training step, as Orbax's CheckpointManager asks it on each save (one counter for both).
    """

    AGREE_EVERY_STEPS = 10

    def __init__(self, config: ml_collections.ConfigDict, start_step: int) -> None:
        self.stop_after = int(config.get("stop_after_steps", -1))
        self.start_step = start_step
        self.requested = False
        self.stopping = False
        self.jax_sync = jax.process_count() > 1 and _preemption_service_running()
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Stopper:
        if self.jax_sync:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True
        if callable(self._previous):
            self._previous(signum, frame)

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def should_stop(self, step: int) -> bool:
        """Call once per step on every process; the same answer everywhere at the same step."""
        if self.stopping:
            return True
        if self.jax_sync:
            notice = multihost_utils.reached_preemption_sync_point(step)
            if notice:
                logging.warning("preemption notice: every process saves and stops at step %d", step)
        elif jax.process_count() > 1:
            notice = step % self.AGREE_EVERY_STEPS == 0 and bool(
                np.any(multihost_utils.process_allgather(np.asarray(self.requested)))
            )
        else:
            notice = self.requested
        limit = self.stop_after > 0 and step - self.start_step >= self.stop_after
        self.stopping = bool(notice or limit)
        return self.stopping


def _preemption_service_running() -> bool:
    try:
        from jax._src import distributed as _distributed  # no public query exists

        return _distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False
