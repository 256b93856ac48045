"""A bounded three-stage pipeline: read on one thread, compute on one thread per device, write here.

Every conversion runs through it, so that disk reads, rounding and disk writes overlap (with
``io.BufferPool``, round-to-nearest of a 24 GB model on two CPU cores went from 2.3-2.6x to 1.3x
the time of copying the file), and so that with ``--parallel`` several GPUs each take whole work
items. Memory is bounded by bytes, not by a count of items: the reader starts an item only while
the bytes in flight (sources read but not yet computed, results computed but not yet written)
stay within ``budget``; one item is always allowed, whatever its size. Torch kernels and file
I/O release the GIL, so threads are enough. Results are written in completion order (the writer
places each tensor by its header offset, so order does not matter), and an exception from any
stage reaches the caller. Interrupts arrive in the caller's thread (Ctrl-C) or through its
``Job.poll``; either way the workers stop at their next step (``job.Job``) and every thread is
joined before the exception goes on: a thread still rounding at interpreter exit aborts Python
("terminate called without an active exception"). Then the queues are emptied: a failed stage's
frame in the exception's traceback refers to the stage's function, and through its closure to the
queues, so what a failure left unprocessed (GPU tensors included) would live as long as the exception.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from .job import Job

Item = TypeVar("Item")
_DONE = object()
_POLL = 0.05  # seconds between checks of the stop flag (and of the caller's ``Job.poll``) while a stage waits


class _ByteBudget:
    """Bytes in flight: an item's source from the start of its read until it is computed, then
    its result until written."""

    def __init__(self, limit: int, job: Job):
        self._limit, self._job = limit, job
        self._used = 0
        self._changed = threading.Condition()

    def acquire(self, nbytes: int) -> bool:
        """Wait until ``nbytes`` more fit (or nothing is in flight); False once the pipeline stops."""
        with self._changed:
            while self._used and self._used + nbytes > self._limit:
                if self._job.stopped:
                    return False
                self._changed.wait(_POLL)
            self._used += nbytes
            return not self._job.stopped

    def release(self, nbytes: int) -> None:
        with self._changed:
            self._used -= nbytes
            self._changed.notify_all()


def run_pipeline(
    items: Sequence[Item],
    read: Callable,
    compute: Callable,
    write: Callable,
    devices: Sequence[Any],
    cost: Callable[[Item], int],
    held: Callable[[Any], int],
    budget: int,
    job: Job | None = None,
) -> None:
    """Overlap ``read`` (1 thread), ``compute`` (1 thread per device) and ``write`` (caller's thread).

    ``cost(item)`` is an item's source bytes, counted from the start of its read; once computed,
    the item counts only ``held(result)``, the bytes its result keeps until written (an fp8
    weight is half its bf16 source). At most ``budget`` bytes are in flight. ``job`` is polled
    here between waits and stops the stages (``compute`` gets its steps from it).
    """
    job = job or Job()
    in_flight = _ByteBudget(budget, job)
    loaded: queue.Queue = queue.Queue()  # bounded by the budget, not by a count
    done: queue.Queue = queue.Queue()

    def reader() -> None:
        try:
            for item in items:
                if not in_flight.acquire(cost(item)):
                    return
                loaded.put((item, read(item)))
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread
            done.put(exc)
        for _ in devices:
            loaded.put(_DONE)

    def worker(device: Any) -> None:
        while not job.stopped:
            try:
                entry = loaded.get(timeout=_POLL)
            except queue.Empty:
                continue
            if entry is _DONE:
                done.put(_DONE)
                return
            item, data = entry
            del entry
            try:
                result = compute(item, data, device)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer thread
                done.put(exc)
                return
            del data  # the source tensors go as soon as they are rounded, not when the next item comes
            kept = held(result)
            in_flight.release(cost(item) - kept)
            done.put((kept, result))
            del result

    threads = [threading.Thread(target=reader, daemon=True)]
    threads += [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    for thread in threads:
        thread.start()
    try:
        finished = 0
        while finished < len(devices):
            job.poll()
            try:
                entry = done.get(timeout=_POLL)  # a timeout keeps Ctrl-C prompt on every platform
            except queue.Empty:
                continue
            if entry is _DONE:
                finished += 1
            elif isinstance(entry, BaseException):
                raise entry
            else:
                kept, result = entry
                write(result)
                del entry, result
                in_flight.release(kept)
    except BaseException as exc:
        job.stop(cancelling=not isinstance(exc, Exception))  # Ctrl-C or the host's interrupt
        raise
    finally:
        job.stop()
        try:
            _join(threads)
        finally:
            for pending in (loaded, done):
                with pending.mutex:
                    pending.queue.clear()


def _join(threads: list[threading.Thread]) -> None:
    """Wait for stopped threads (each within one step of work), through a second Ctrl-C too:
    leaving one running would abort the interpreter at exit; the interrupt is raised afterwards."""
    interrupted = None
    for thread in threads:
        while thread.is_alive():
            try:
                thread.join()
            except KeyboardInterrupt as exc:
                interrupted = exc
    if interrupted is not None:
        raise interrupted


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU kernels on one thread here; no effect on GPUs.

    For work made of many small or memory-bound steps, handing each to the thread pool costs
    more than it saves: the pool's threads spin-wait between steps on the core that the
    pipeline's reader and writer need. Round-to-nearest of a 2 GB model took 6.3 CPU-s of
    user time with two threads and 3.6 s with one, and 5.0 s of wall time against 4.5 s; GPTQ's column
    sequence on a 3072 x 15360 layer took 2.2 s on one thread and 11 s on two beside another
    process. Large matrix products keep every thread.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
