"""A running conversion: its stop flag, and what its workers are rounding right now.

The pipeline rounds in worker threads, but interrupts arrive in the caller's thread: Ctrl-C as a
``KeyboardInterrupt`` in the main thread, ComfyUI's Cancel through the host's ``check_interrupt``.
So the caller's thread polls (``Job.poll``: the host's check, then the in-tensor progress display)
and stops the workers by setting one flag (``Job.stop``). Rounding code sees neither: it calls a
``Step`` between units of work (an optimiser iteration, a GPTQ column block, a block of rows), which
records how far it got and raises ``Cancelled`` once the flag is set. A step is an attribute read
and two stores, nothing next to an iteration's tensor work, so a conversion stops within one unit
of work of the interrupt whatever the tensor's size, and a tensor's progress is visible as it runs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .estimate import Estimate

# what one step of each rounding method is, for progress displays
UNITS = {"learned": "optimiser steps", "gptq": "columns", "nearest": "rows"}


class Cancelled(Exception):
    """Raised inside a worker once its conversion stops; the caller's own exception (Ctrl-C, the
    host's interrupt, an error in another stage) is what reaches the user."""


@dataclass
class Activity:
    """The tensor being rounded right now, for progress displays."""

    name: str
    method: str  # learned, gptq or nearest
    done: int  # steps done out of ``total``; see ``UNITS``
    total: int
    seconds: float  # since the tensor's rounding started
    cancelling: bool = False  # the user interrupted: the run is stopping
    eta: float | None = None  # seconds left in the whole conversion; None: no basis yet (``estimate``)
    share: float | None = None  # of the whole conversion's work, done (0..1); None: nothing to round

    @property
    def unit(self) -> str:
        return UNITS.get(self.method, "steps")


Step = Callable[[int, int], None]  # step(done, total): called between units of work; may raise Cancelled
ActivityCallback = Callable[[Activity], None]


def no_step(done: int, total: int) -> None:
    """The ``Step`` of rounding done outside a conversion: never stops, shows nothing."""


class _Work:
    """One tensor's ``Step``: the progress a worker made, and the conversion's stop flag."""

    __slots__ = ("name", "method", "started", "done", "total", "_stop")

    def __init__(self, name: str, method: str, stop: threading.Event):
        self.name, self.method, self._stop = name, method, stop
        self.started = time.perf_counter()
        self.done = self.total = 0

    def __call__(self, done: int, total: int) -> None:
        if self._stop.is_set():
            raise Cancelled(f"{self.name}: stopped after {done} of {total} {UNITS.get(self.method, 'steps')}")
        self.done, self.total = done, total

    def activity(self, cancelling: bool = False, eta: float | None = None, share: float | None = None) -> Activity:
        seconds = time.perf_counter() - self.started
        return Activity(self.name, self.method, self.done, self.total, seconds, cancelling, eta, share)


class Job:
    """One conversion's stop flag and in-tensor progress, shared by the caller's thread and the workers.

    ``check_interrupt`` (the host's: it raises to cancel) and ``activity`` are only ever called in
    the caller's thread, from ``poll``; ``activity`` at most every ``interval`` seconds while a
    tensor is being rounded, and once more with ``cancelling`` set when an interrupt stops the run.
    ``estimate``, once the conversion knows its work, gives each activity and finished tensor an ETA.
    """

    def __init__(
        self,
        check_interrupt: Callable[[], None] | None = None,
        activity: ActivityCallback | None = None,
        interval: float = 0.5,
    ):
        self.check_interrupt, self.activity, self.interval = check_interrupt, activity, interval
        self._stop = threading.Event()
        self._working: dict[int, _Work] = {}
        self._lock = threading.Lock()
        self._shown = time.perf_counter()
        self.estimate: Estimate | None = None

    def finished(self, name: str) -> None:
        """Count a written tensor in the estimate."""
        if self.estimate is not None:
            self.estimate.finished(name)

    def eta(self) -> float | None:
        """The seconds left, counting the share of every tensor being rounded now; None without a basis."""
        return None if self.estimate is None else self.estimate.eta(self._shares())

    def share(self) -> float | None:
        """The fraction of the work done (``Estimate.share``); None before the work is known or when
        there is nothing to round."""
        return None if self.estimate is None else self.estimate.share(self._shares())

    def _shares(self) -> dict[str, float]:
        with self._lock:
            return {w.name: w.done / w.total for w in self._working.values() if w.total}

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        """Raise ``Cancelled`` once the job stopped (for the pipeline's stages, between items)."""
        if self._stop.is_set():
            raise Cancelled("the conversion stopped")

    @contextlib.contextmanager
    def tensor(self, name: str, method: str) -> Iterator[Step]:
        """The ``Step`` for rounding ``name`` with ``method``, shown by ``poll`` while it runs."""
        work = _Work(name, method, self._stop)
        work(0, 0)
        with self._lock:
            self._working[id(work)] = work
        try:
            yield work
        finally:
            with self._lock:
                del self._working[id(work)]

    def poll(self) -> None:
        """In the caller's thread, between waits: the host's interrupt check, then the display."""
        if self.check_interrupt:
            self.check_interrupt()
        now = time.perf_counter()
        if self.activity and now - self._shown >= self.interval:
            work = self._oldest()
            if work is not None:
                self._shown = now
                self.activity(work.activity(eta=self.eta(), share=self.share()))

    def stop(self, cancelling: bool = False) -> None:
        """Tell the workers to stop at their next step; with ``cancelling`` (an interrupt, not an
        error) the display hears it at once, before the workers have stopped and the file is removed."""
        first = not self._stop.is_set()
        self._stop.set()
        if first and cancelling and self.activity:
            work = self._oldest()
            self.activity(work.activity(cancelling=True) if work else Activity("", "", 0, 0, 0.0, True))

    def _oldest(self) -> _Work | None:
        """The tensor rounded longest (with ``--parallel`` several are; the slowest is the one to show)."""
        with self._lock:
            return min(self._working.values(), key=lambda w: w.started, default=None)
