"""A bounded three-stage pipeline: read on one thread, compute on one thread per device, write here.

``--parallel`` uses it so that disk reads, quantization and disk writes overlap, and so that
several GPUs each take whole work items. Queues hold at most two items per stage, which bounds
memory to a handful of work items in flight. Torch kernels and file I/O release the GIL, so
threads are enough. Results are written in completion order (the writer places each tensor by
its header offset, so order does not matter), and exceptions from any stage reach the caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

Item = TypeVar("Item")
_DONE = object()


def run_sequential(items: Iterable[Item], read: Callable, compute: Callable, write: Callable, device: Any) -> None:
    """The same stages one after the other, in the calling thread."""
    for item in items:
        write(compute(item, read(item), device))


def run_parallel(
    items: Sequence[Item], read: Callable, compute: Callable, write: Callable, devices: Sequence[Any]
) -> None:
    """Overlap ``read`` (1 thread), ``compute`` (1 thread per device) and ``write`` (caller's thread)."""
    stop = threading.Event()
    loaded: queue.Queue = queue.Queue(maxsize=2)
    done: queue.Queue = queue.Queue(maxsize=2 * len(devices))

    def put(target: queue.Queue, value: object) -> bool:
        while not stop.is_set():
            try:
                target.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in items:
                if not put(loaded, (item, read(item))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread
            put(done, exc)
        for _ in devices:
            put(loaded, _DONE)

    def worker(device: Any) -> None:
        while not stop.is_set():
            try:
                entry = loaded.get(timeout=0.1)
            except queue.Empty:
                continue
            if entry is _DONE:
                put(done, _DONE)
                return
            try:
                result = compute(entry[0], entry[1], device)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer thread
                put(done, exc)
                return
            if not put(done, result):
                return

    threads = [threading.Thread(target=reader, daemon=True)]
    threads += [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    for thread in threads:
        thread.start()
    try:
        finished = 0
        while finished < len(devices):
            result = done.get()
            if result is _DONE:
                finished += 1
            elif isinstance(result, BaseException):
                raise result
            else:
                write(result)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
