"""A dependency-free terminal progress bar for the command line: tensors/s, ETA, current tensor.

The bar fills with the share of the work done and the ETA is the engine's (``estimate.Estimate``,
carried by each report and activity): "estimating…" until the engine has measured some of the
work that costs.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .convert import TensorReport
from .job import Activity


class ProgressBar:
    """Redraws one line on a terminal; prints a line every few seconds when output is a log file.

    Called with each finished tensor; ``activity`` shows the tensor being rounded in between
    (how far its rounding got), so that a long tensor ticks instead of freezing the line.
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 24):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.started = time.perf_counter()
        self.tty = self.stream.isatty()
        self._last_line = 0.0
        self._index, self._total = 0, 0
        self._eta: float | None = None
        self._share: float | None = None

    def __call__(self, report: TensorReport) -> None:
        self._index, self._total, self._eta, self._share = report.index, report.total, report.eta, report.share
        error = f" err {report.error_after:.3%}" if report.quantized else ""
        self._show(f"{error} {report.name}", done=report.index == report.total)

    def activity(self, activity: Activity) -> None:
        steps = f" {activity.done}/{activity.total} {activity.unit}" if activity.total else ""
        where = f" {activity.name} ({activity.method}{steps})"
        if activity.cancelling:
            self._show(" cancelling…" + (where if activity.name else ""), done=True)
        else:
            self._eta, self._share = activity.eta, activity.share
            self._show(f"{where} {activity.seconds:.0f} s", done=False)

    def _show(self, detail: str, done: bool) -> None:
        elapsed = time.perf_counter() - self.started
        rate = self._index / elapsed if elapsed > 0 else 0.0
        eta = "estimating…" if self._eta is None else _clock(self._eta)
        # the bar fills with the work done (the engine's share); the count beside it is of tensors
        done = self._share if self._share is not None else self._index / max(1, self._total)
        filled = int(self.width * done)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {self._index}/{self._total} {rate:.1f} t/s ETA {eta}{detail}"
        if not self._total:  # inside the first tensor: no tensor to count yet
            line = f"{self.label} ETA {eta}{detail}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160) + ("\n" if done else ""))
            self.stream.flush()
        elif done or elapsed - self._last_line >= 5:
            self._last_line = elapsed
            self.stream.write(line + "\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
