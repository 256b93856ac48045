"""The time left in a conversion, from the work done so far: an ETA, or no ETA while there is no basis.

Work is counted in elements of the weights being quantized: rounding them is what takes the time
(learned rounding runs minutes per weight, round-to-nearest streams it), while a kept tensor is only
copied. Counting finished tensors, or the bytes of every tensor, would let the quick kept tensors
at the start of a file promise an end long before the first slow weight is even halfway; counting
quantized elements, with the share of the weights being rounded right now, bases the rate on the
work that costs. Until some of that work is done there is no rate to extrapolate, and the estimate
says so (``None``) instead of guessing. A learned weight may stop before its last optimiser step,
so the estimate may run long; it does not promise an end sooner than the work measured so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class Estimate:
    """Seconds left for a conversion whose work per tensor is known up front (``work``: name -> elements
    to round; kept tensors absent or 0). ``finished`` counts a written tensor; ``eta`` takes the shares
    of the tensors being rounded now and extrapolates the rate measured since the estimate started."""

    def __init__(self, work: Mapping[str, int], clock: Callable[[], float] = time.perf_counter):
        self.work = dict(work)
        self.total = sum(self.work.values())
        self.clock = clock
        self.started = clock()
        self.done = 0

    def finished(self, name: str) -> None:
        self.done += self.work.get(name, 0)

    def eta(self, working: Mapping[str, float] | None = None) -> float | None:
        """Seconds left; ``working``: name -> share (0..1) of each tensor being rounded. ``None``: no
        basis yet (no quantized element done). 0 once every weight is rounded."""
        done = self._done(working)
        left = self.total - done
        if left <= 0:
            return 0.0
        elapsed = self.clock() - self.started
        if done <= 0 or elapsed <= 0:
            return None
        return elapsed / done * left

    def share(self, working: Mapping[str, float] | None = None) -> float | None:
        """The fraction of the work done (0..1), with the shares of the tensors being rounded now:
        what a progress bar shows. ``None`` when there is nothing to round (a run that only copies)."""
        if self.total <= 0:
            return None
        return min(self._done(working) / self.total, 1.0)

    def _done(self, working: Mapping[str, float] | None) -> float:
        shares = (working or {}).items()
        return self.done + sum(min(max(share, 0.0), 1.0) * self.work.get(name, 0) for name, share in shares)
