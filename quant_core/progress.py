"""A dependency-free terminal progress bar for the command line: tensors/s, ETA, current tensor."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .convert import TensorReport


class ProgressBar:
    """Redraws one line on a terminal; prints a line every few seconds when output is a log file."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 24):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.started = time.perf_counter()
        self.tty = self.stream.isatty()
        self._last_line = 0.0

    def __call__(self, report: TensorReport) -> None:
        elapsed = time.perf_counter() - self.started
        rate = report.index / elapsed if elapsed > 0 else 0.0
        eta = (report.total - report.index) / rate if rate > 0 else 0.0
        filled = int(self.width * report.index / max(1, report.total))
        bar = "#" * filled + "." * (self.width - filled)
        error = f" err {report.error_after:.3%}" if report.quantized else ""
        line = (
            f"{self.label} [{bar}] {report.index}/{report.total} {rate:.1f} t/s ETA {_clock(eta)}{error} {report.name}"
        )
        done = report.index == report.total
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
