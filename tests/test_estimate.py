"""The ETA is based on the quantized work done, says "no basis" until there is some, and counts the
share of the weight being rounded now (a fake clock: no timing in unit tests)."""

from __future__ import annotations

import io

import pytest
import torch

from quant_core.convert import TensorReport, convert_file
from quant_core.estimate import Estimate
from quant_core.io import write_file
from quant_core.job import Activity, Job
from quant_core.options import ConvertOptions
from quant_core.progress import ProgressBar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_eta_before_any_quantized_work_is_done():
    clock = Clock()
    estimate = Estimate({"a.weight": 4000, "b.weight": 4000, "a.bias": 0}, clock=clock)
    assert estimate.eta() is None
    clock.now += 3
    estimate.finished("a.bias")  # a kept tensor: copied, no basis for the rounding's rate
    estimate.finished("norm.scale")  # not in the work at all
    assert estimate.eta() is None
    assert estimate.eta({"a.weight": 0.0}) is None  # the first weight started, no step done


def test_inside_the_first_slow_weight_the_eta_counts_every_weight_left():
    """10 % of the first of two equal weights in 30 s: 570 s left, however quick the kept tensors were."""
    clock = Clock()
    estimate = Estimate({"a.weight": 4000, "b.weight": 4000}, clock=clock)
    for _ in range(20):
        estimate.finished("bias")
    clock.now += 30
    assert estimate.eta({"a.weight": 0.1}) == pytest.approx(30 / 400 * 7600)
    clock.now += 30  # the same share after twice the time: the estimate grows, it never counts down blindly
    assert estimate.eta({"a.weight": 0.1}) == pytest.approx(60 / 400 * 7600)


def test_finished_weights_and_shares_add_up_to_the_end():
    clock = Clock()
    estimate = Estimate({"a.weight": 1000, "b.weight": 3000}, clock=clock)
    clock.now += 10
    estimate.finished("a.weight")
    assert estimate.eta() == pytest.approx(10 / 1000 * 3000)
    clock.now += 10
    assert estimate.eta({"b.weight": 0.5}) == pytest.approx(20 / 2500 * 1500)
    assert estimate.eta({"b.weight": 1.5}) == 0.0  # a share is at most the whole weight
    estimate.finished("b.weight")
    assert estimate.eta() == 0.0


def test_the_job_gives_each_activity_the_eta_with_the_share_being_rounded():
    clock = Clock()
    shown: list[Activity] = []
    job = Job(activity=shown.append, interval=0.0)
    job.estimate = Estimate({"a.weight": 1000, "b.weight": 1000}, clock=clock)
    with job.tensor("a.weight", "learned") as step:
        step(0, 200)
        job.poll()
        clock.now += 5
        step(50, 200)
        job.poll()
    clock.now += 15
    job.finished("a.weight")
    assert job.eta() == pytest.approx(20 / 1000 * 1000)
    assert job.share() == 0.5
    assert [a.eta for a in shown] == [None, pytest.approx(5 / 250 * 1750)]
    assert [a.share for a in shown] == [0.0, 50 / 200 / 2]


def test_the_share_counts_the_work_not_the_tensors():
    """Twenty quick biases and half of one of two equal weights: a quarter of the work, whatever the
    tensor count says; nothing to round at all: no share (a bar counts tensors then)."""
    estimate = Estimate({"a.weight": 4000, "b.weight": 4000})
    for _ in range(20):
        estimate.finished("bias")
    assert estimate.share() == 0.0
    assert estimate.share({"a.weight": 0.5}) == 0.25
    estimate.finished("a.weight")
    assert estimate.share({"b.weight": 2.0}) == 1.0  # a share is at most the whole weight
    assert Estimate({"a.bias": 0}).share() is None


def test_a_conversion_reports_no_eta_until_a_weight_is_rounded_and_zero_at_the_end(tmp_path):
    source = tmp_path / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {f"blocks.{i}.{kind}.weight": torch.randn(64, 64, generator=generator) for i in range(3) for kind in "ab"}
    write_file(source, {"aa.bias": torch.randn(64), **tensors, "zz.bias": torch.randn(64)})
    reports = []
    convert_file(source, tmp_path / "out.safetensors", ConvertOptions(preset="none"), progress=reports.append)
    first = next(i for i, r in enumerate(reports) if r.quantized)
    assert first > 0  # the kept bias is written first
    assert all(r.eta is None for r in reports[:first])
    assert all(r.eta is not None and r.eta >= 0 for r in reports[first:])
    assert reports[-1].eta == 0.0
    shares = [r.share for r in reports]
    assert shares[:first] == [0.0] * first and shares[-1] == 1.0
    assert shares == sorted(shares)  # the bar never goes back


class Terminal(io.StringIO):
    def isatty(self) -> bool:  # the bar redraws every call on a terminal
        return True


def test_the_command_lines_bar_shows_the_engines_eta_or_estimating():
    stream = Terminal()
    bar = ProgressBar("convert", stream)
    bar.activity(Activity("a.weight", "learned", 0, 200, 1.0))
    bar.activity(Activity("a.weight", "learned", 50, 200, 5.0, eta=75.0))
    bar(TensorReport("a.weight", 1, 2, 100, True, "", eta=None))
    lines = stream.getvalue().lstrip("\r").split("\r")
    assert "ETA estimating…" in lines[0] and "ETA 01:15" in lines[1] and "ETA estimating…" in lines[2]


def test_the_command_lines_bar_fills_with_the_work_done():
    """One of two tensors written, but only a tenth of the work (a bias before a large weight)."""
    stream = Terminal()
    bar = ProgressBar("convert", stream, width=20)
    bar(TensorReport("a.bias", 1, 2, 100, False, "", share=0.0))
    bar.activity(Activity("b.weight", "learned", 20, 200, 5.0, eta=75.0, share=0.1))
    bar(TensorReport("b.weight", 2, 2, 100, True, "", share=1.0))
    lines = stream.getvalue().lstrip("\r").split("\r")
    assert "[" + "." * 20 + "] 1/2" in lines[0]
    assert "[##" + "." * 18 + "] 1/2" in lines[1]
    assert "[" + "#" * 20 + "] 2/2" in lines[2]
