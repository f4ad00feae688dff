"""Progress of long loops (training steps, evaluation images): rate and ETA, one definition.

Training logs one line per `log_every_steps` (step, epoch, loss, top-1/5, lr,
images/s, ETA) and evaluation one line every few seconds; both measure here.
clu's `periodic_actions.ReportProgress` was the alternative: it logs a line of
its own per report (a second line per log step) and counts steps, not images,
so the two loops share this small class instead.
"""

from __future__ import annotations

import time


def format_eta(seconds: float | None) -> str:
    """Seconds → 'h:mm:ss' ('?' when unknown)."""
    if seconds is None:
        return "?"
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Units done out of `total` (None: unknown); `measure` gives the rate since the last call and the ETA."""

    def __init__(self, total: int | None, done: int = 0) -> None:
        self.total = total
        self.start_time = self._last_time = time.perf_counter()
        self.start_done = self._last_done = done

    def measure(self, done: int) -> tuple[float, float | None]:
        """(units per second since the previous `measure`, seconds left at that rate or None)."""
        now = time.perf_counter()
        rate = (done - self._last_done) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_done = now, done
        eta = None if self.total is None else max(self.total - done, 0) / max(rate, 1e-9)
        return rate, eta

    def overall_rate(self, done: int) -> float:
        """Units per second since the start."""
        return (done - self.start_done) / max(time.perf_counter() - self.start_time, 1e-9)
