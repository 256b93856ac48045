"""The read / compute / write pipeline every conversion runs through: every item exactly once,
memory bounded by bytes in flight, and errors from any stage reaching the caller."""

from __future__ import annotations

import threading
import time
import weakref

import pytest

from quant_core.convert import ConvertOptions, convert, plan_conversion
from quant_core.io import SafetensorsReader
from quant_core.pipeline import run_pipeline


class Tracker:
    """Records the bytes in flight as the pipeline counts them: an item's source from the start of
    its read to the end of its compute, then half of it (its result) until written."""

    def __init__(self, delay: float = 0.0):
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.written: list[int] = []
        self.devices: set[str] = set()
        self.delay = delay

    def read(self, item: int) -> int:
        with self.lock:
            self.in_flight += item
            self.peak = max(self.peak, self.in_flight)
        time.sleep(self.delay)
        return item

    def compute(self, item: int, data: int, device: str) -> tuple[int, int]:
        self.devices.add(device)
        time.sleep(self.delay)
        with self.lock:  # the source goes; the result keeps half of it until written (see ``held``)
            self.in_flight -= item - item // 2
        return item, data * 2

    def write(self, result: tuple[int, int]) -> None:
        item, doubled = result
        assert doubled == 2 * item
        self.written.append(item)
        with self.lock:
            self.in_flight -= item // 2


def run(tracker: Tracker, items: list[int], budget: int, devices=("cpu",)) -> None:
    cost = lambda item: item  # noqa: E731
    held = lambda result: result[0] // 2  # noqa: E731 - a result holds half its source, like fp8 from bf16
    run_pipeline(items, tracker.read, tracker.compute, tracker.write, list(devices), cost, held, budget)


def test_every_item_is_written_once():
    tracker = Tracker()
    items = list(range(1, 200))
    run(tracker, items, budget=50)
    assert sorted(tracker.written) == items


@pytest.mark.parametrize("budget", [10, 25, 100])
def test_bytes_in_flight_stay_within_the_budget(budget):
    tracker = Tracker(delay=0.001)
    items = [3, 7, 10, 1, 9, 4, 10, 2, 8, 5] * 3
    run(tracker, items, budget=budget)
    assert sorted(tracker.written) == sorted(items)
    assert tracker.peak <= budget
    assert tracker.in_flight == 0


def test_an_item_larger_than_the_budget_goes_through_alone():
    tracker = Tracker(delay=0.001)
    run(tracker, [2, 50, 3], budget=10)
    assert sorted(tracker.written) == [2, 3, 50]
    assert tracker.peak == 50, "the oversized item is read only when nothing else is in flight"


def test_stages_overlap_when_the_budget_allows():
    tracker = Tracker(delay=0.002)
    run(tracker, [5] * 20, budget=10)
    assert tracker.peak == 10, "with room for two items, one is read while another is computed or written"


def test_every_device_takes_items():
    tracker = Tracker(delay=0.005)
    run(tracker, [1] * 40, budget=10, devices=("cuda:0", "cuda:1"))
    assert tracker.devices == {"cuda:0", "cuda:1"}
    assert len(tracker.written) == 40


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_an_error_in_any_stage_reaches_the_caller_and_stops_the_threads(stage, exc):
    tracker = Tracker()
    calls = []

    def failing(original):
        def wrapped(*args):
            calls.append(1)
            if len(calls) == 3:
                raise exc(stage)
            return original(*args)

        return wrapped

    setattr(tracker, stage, failing(getattr(tracker, stage)))
    before = threading.active_count()
    with pytest.raises(exc, match=stage):
        run(tracker, [1] * 50, budget=4)
    assert threading.active_count() == before, "no stage thread is left running"
    assert len(tracker.written) < 50


# ---------------------------------------------------------------------------------------------- in convert


class CountingSource:
    """A ``TensorSource`` over a file that records the bytes of the tensors it handed out that are
    still alive (on a GPU, that is VRAM)."""

    def __init__(self, reader, device: str | None):
        self.reader, self.tensors, self.metadata = reader, reader.tensors, reader.metadata
        if device:
            self.device = device  # where the tensors would be (they stay on the CPU in this test)
        self.alive = self.peak = 0
        self.lock = threading.Lock()

    def read(self, name):
        tensor = self.reader.read(name)
        with self.lock:
            self.alive += tensor.nbytes
            self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self.freed, tensor.nbytes)
        return tensor

    def freed(self, nbytes: int) -> None:
        with self.lock:
            self.alive -= nbytes


@pytest.mark.parametrize(("device", "items"), [(None, 2), ("cuda:0", 1)])
def test_a_source_on_a_gpu_has_one_item_in_flight(flux_file, tmp_path, device, items):
    with SafetensorsReader(flux_file) as reader:
        source = CountingSource(reader, device)
        plan = plan_conversion(source, ConvertOptions(rounding="nearest"))
        largest = max(sum(source.tensors[name].nbytes for name in item) for item in plan.items)
        convert(source, tmp_path / "out.safetensors", ConvertOptions(rounding="nearest", device="cpu"))
    assert source.alive == 0
    assert source.peak <= items * largest  # on a GPU: one item's sources, however the threads interleave
