"""Cancel within one step of work, inside a long tensor: a real Ctrl-C (SIGINT) to the command line
in a child process, and an interrupt from the host's ``check_interrupt`` (what the nodes pass).

Each run is sized so that it could not finish during the test: learned rounding with a million
iterations (its warm-up alone is 200 000), GPTQ on a 4096 x 16384 layer with a rank-512 sketch
(11 s of CPU time; 60 s on two loaded cores). Each is interrupted once its progress shows it inside
the tensor. No timing is asserted beyond a generous bound; the measured latencies are in the note.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from quant_core.calibration import LayerStatistics, LowRankGram, RowSample, save_statistics
from quant_core.convert import ConvertOptions, convert_file
from quant_core.io import write_file
from quant_core.job import Activity, Cancelled, Job
from quant_core.options import LearnedOptions

ROOT = Path(__file__).resolve().parents[1]

pty = pytest.importorskip("pty")  # the child's progress goes to a terminal, redrawn as a tty bar is

STOPPED_WITHIN = 5.0  # seconds: generous for two loaded cores; the measured latency is ~0.05 s
LEARNED = ["--rounding", "learned", "--num_iter", "1000000", "--calib_samples", "256", "--preset", "none"]
WEIGHT = "blocks.0.attn.q.weight"


class Child:
    """``python -m quant_core ARGS`` with its stderr on a pseudo-terminal, read as it comes."""

    def __init__(self, args: list[str]):
        master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "quant_core", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=slave
        )
        os.close(slave)
        self._master, self._text, self._changed = master, "", threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            with self._changed:
                self._text += chunk.decode(errors="replace")
                self._changed.notify_all()
            if not chunk:
                os.close(self._master)
                return

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        with self._changed:
            found = self._changed.wait_for(lambda: re.search(pattern, self._text) or self.process.poll(), timeout)
            match = re.search(pattern, self._text)
        assert match, f"no {pattern!r} in the output (exit {found}):\n{self._text[-2000:]}"
        return match

    def interrupt(self, times: int = 1) -> float:
        """SIGINT (what Ctrl-C sends), ``times`` times 10 ms apart; seconds until the child exited."""
        sent = time.monotonic()
        for _ in range(times):
            self.process.send_signal(signal.SIGINT)
            time.sleep(0.01)
        self.process.wait(timeout=120)
        return time.monotonic() - sent

    @property
    def text(self) -> str:
        with self._changed:
            self._changed.wait_for(lambda: self._master < 0 or self._text.endswith("\n"), 5)
            return self._text


def _assert_stopped_inside(child: Child, seconds: float, out_dir: Path, method: str) -> None:
    assert child.process.returncode == 130, child.text
    assert seconds < STOPPED_WITHIN
    assert list(out_dir.iterdir()) == []  # neither the output nor its temp file
    done, total = (int(n) for n in re.search(rf"cancelling… {WEIGHT} \({method} (\d+)/(\d+) ", child.text).groups())
    assert 0 < done < total  # stopped inside the tensor, not after it
    assert "interrupted; no output was written" in child.text
    assert "terminate called" not in child.text and "Traceback" not in child.text


def test_ctrl_c_stops_learned_rounding_inside_a_tensor(tmp_path):
    source, out_dir = tmp_path / "one.safetensors", tmp_path / "out"
    write_file(source, {WEIGHT: torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).bfloat16()})
    out_dir.mkdir()
    child = Child(["--input", str(source), "--output", str(out_dir / "x.safetensors"), *LEARNED])
    child.wait_for(r"\(learned [1-9]\d*/\d+ optimiser steps\)")
    _assert_stopped_inside(child, child.interrupt(), out_dir, "learned")


def _sketched_layer(path: Path, calibration: Path, out_features: int, in_features: int, rank: int) -> None:
    """A wide weight and sketched statistics for it (made directly, not recorded: recording takes long)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    write_file(path, {WEIGHT: weight.bfloat16()})
    factor = torch.randn(in_features, rank, generator=generator) / rank**0.5
    fit = LowRankGram(factor, factor.square().sum(1) + 1.0)
    heldout = RowSample(torch.randn(rank, in_features, generator=generator))
    save_statistics(calibration, {WEIGHT: LayerStatistics(fit, heldout, 4 * rank, rank, 4.0)})


def test_two_ctrl_c_stop_gptq_inside_a_sketched_layer(tmp_path):
    """The second Ctrl-C used to abort Python ("terminate called without an active exception")."""
    source, calibration, out_dir = tmp_path / "wide.safetensors", tmp_path / "cal.safetensors", tmp_path / "out"
    _sketched_layer(source, calibration, 4096, 16384, 512)
    out_dir.mkdir()
    args = ["--input", str(source), "--calibration", str(calibration), "--preset", "none"]
    child = Child([*args, "--output", str(out_dir / "x.safetensors")])
    child.wait_for(r"\(gptq [1-9]\d*/\d+ columns\)")
    _assert_stopped_inside(child, child.interrupt(times=2), out_dir, "gptq")


@pytest.mark.parametrize("parallel", [False, True], ids=["default", "--parallel"])
def test_host_interrupt_stops_inside_a_tensor(tmp_path, parallel):
    """The nodes' path: the host's check raises (ComfyUI's interrupt is a BaseException) once the
    activity shows the tensor half-way; the run stops there and leaves no file."""
    source, out_dir = tmp_path / "one.safetensors", tmp_path / "out"
    write_file(source, {WEIGHT: torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).bfloat16()})
    out_dir.mkdir()
    seen: list[Activity] = []
    threads = set(threading.enumerate())

    class Interrupted(BaseException):
        pass

    def check_interrupt() -> None:
        if seen and seen[-1].done > 0 and not seen[-1].cancelling:
            raise Interrupted

    learned = LearnedOptions(num_iter=1_000_000, calib_samples=32)
    options = ConvertOptions(rounding="learned", learned=learned, preset="none", parallel=parallel)
    with pytest.raises(Interrupted):
        convert_file(source, out_dir / "x.safetensors", options, check_interrupt=check_interrupt, activity=seen.append)
    assert list(out_dir.iterdir()) == []
    running, cancelling = seen[-2], seen[-1]
    assert cancelling.cancelling and cancelling.name == WEIGHT and 0 < cancelling.done < cancelling.total
    assert running.name == WEIGHT and running.method == "learned" and running.unit == "optimiser steps"
    assert set(threading.enumerate()) <= threads  # the pipeline's threads were joined


def test_a_step_raises_once_the_job_stops_and_the_display_hears_it_once():
    shown: list[Activity] = []
    job = Job(activity=shown.append, interval=0.0)
    job.poll()  # nothing being rounded: nothing to show
    with job.tensor(WEIGHT, "gptq") as step:
        step(128, 1024)
        job.poll()
        job.stop(cancelling=True)
        job.stop(cancelling=True)
        with pytest.raises(Cancelled):
            step(256, 1024)
    assert [(a.name, a.done, a.total, a.unit, a.cancelling) for a in shown] == [
        (WEIGHT, 128, 1024, "columns", False),
        (WEIGHT, 128, 1024, "columns", True),
    ]
    with pytest.raises(Cancelled), job.tensor("next.weight", "learned"):
        pass  # a stopped job starts no further tensor
