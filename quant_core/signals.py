"""Termination signals as exceptions, so that a stopped run cleans up as an interrupted one does.

By default SIGTERM (``kill``, a service or container stop) and SIGHUP (a closed terminal) end a
Python process on the spot: no ``finally`` runs, and a conversion leaves its temp file behind.
Inside ``stop_on_signals`` they raise ``Stopped`` in the main thread instead. ``Stopped`` is a
``KeyboardInterrupt``, so every path that handles Ctrl-C (stopping the pipeline's threads,
removing the temp file) handles these signals the same way.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise ``Stopped`` in the main thread on SIGTERM or SIGHUP, once: further ones are ignored
    while the run cleans up (SIGKILL still ends it). Previous handlers come back on exit.
    Elsewhere than the main thread (a host application's worker) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        for number in SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {number: signal.signal(number, stop) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
