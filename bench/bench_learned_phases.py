"""Benchmark: where one iteration of the learned-rounding optimiser spends its time, phase by phase.

Usage (from the repository root)::

    .venv/bin/python bench/bench_learned_phases.py [--columns 3072] [--samples 96] [--rounds 3]

One block of rows as ``rounding.round_learned`` cuts it (``_LEARNED_BLOCK_ELEMENTS`` weights of a
random bf16 weight with ``--columns`` inputs), on one thread with subnormals flushed, as the
optimiser's own threads run it. Each phase of ``rounding._optimise_block``'s step is timed alone
(CPU time of this thread, the fastest of ``--rounds``), then the whole step, and beside them
``torch.matmul`` at the same shapes in float32 (what ``bench_convert.py``'s ``optimiser`` table
compares the useful FLOP/s with) and in the optimiser's own matmul dtype. Figures are ns per
weight and iteration; the machine's load is printed, since other processes slow every figure.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant_core import fp8, rounding  # noqa: E402
from quant_core.options import LearnedOptions  # noqa: E402


def cpu_ns(function: Callable[[], object], elements: int, rounds: int, repeats: int = 20) -> float:
    """This thread's CPU time per call and element in ns: the fastest of ``rounds`` runs of ``repeats`` calls."""
    function()
    best = math.inf
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(repeats):
            function()
        best = min(best, (time.thread_time() - started) / repeats)
    return best / elements * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--columns", type=int, default=3072, help="input features of the weight (default 3072)")
    parser.add_argument("--samples", type=int, default=96, help="calibration rows (default 96, as --calib_samples)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per phase, fastest kept (default 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)

    rows = max(1, rounding._LEARNED_BLOCK_ELEMENTS // args.columns)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, args.columns, generator=generator).bfloat16()
    scale = fp8.scale_for(fp8.absmax(weight), torch.float8_e4m3fn)
    choices = rounding._Grid(weight, scale, torch.float8_e4m3fn).block(slice(0, rows))
    options = LearnedOptions(calib_samples=args.samples)
    matmul = rounding._matmul_dtype(options, weight.device)
    inputs = torch.randn(args.samples, args.columns, generator=generator).to(matmul)
    both = (inputs, inputs.T.contiguous())  # as ``rounding._optimise_block`` passes them
    work = rounding._Workspace(choices, matmul, 1)
    adam = rounding._Adam(choices.logits.clone(), options.lr, options.num_iter)
    factors = (choices.step, 1e-3, 1.0)
    loss = work.losses[0]
    n = rows * args.columns
    buffers = (work.product, work.gradient)

    def regulariser() -> torch.Tensor:
        return rounding._regulariser_gradient(work.centred, 10.0, options.reg_lambda, work.power, loss)

    def step() -> None:
        rounding._output_gradient(both, work.delta, args.samples, factors, buffers, regulariser(), loss)
        rounding._chain_sigmoid(work.gradient, work.sigmoid, work.centred)
        adam.step(work.gradient)
        work.soften(adam.param)

    out = work.delta @ both[1]  # (X delta^T)^T: every product below multiplies row-major matrices
    single = tuple(part.float() for part in (*both, work.delta, out))
    phases = {
        "output gradient (products, loss, scaling)": lambda: rounding._output_gradient(
            both, work.delta, args.samples, factors, buffers, work.power, loss
        ),
        "regulariser": regulariser,
        "chain rule": lambda: rounding._chain_sigmoid(work.gradient, work.sigmoid, work.centred),
        "Adam": lambda: adam.step(work.gradient),
        "sigmoid, u and delta": lambda: work.soften(adam.param),
        "whole step": step,
        f"torch.matmul, both products, {matmul}": lambda: (work.delta @ both[1], out @ inputs),
        "torch.matmul, both products, float32": lambda: (single[2] @ single[1], single[3] @ single[0]),
    }
    print(f"one block of {rows} x {args.columns} weights, {args.samples} calibration rows, one thread, matmul {matmul}")
    print(f"load before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    times = {name: cpu_ns(function, n, args.rounds) for name, function in phases.items()}
    width = max(map(len, times))
    for name, value in times.items():
        print(f"  {name:<{width}}  {value:6.2f} ns per weight-iteration")
    reference = times["torch.matmul, both products, float32"]
    print(f"load after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(
        f"whole step / float32 matmul at these shapes: {times['whole step'] / reference:.2f}x "
        f"(the step alone is {reference / times['whole step']:.0%} of the matmul rate; dispatch between "
        f"iterations, the checks and each tensor's fixed cost come on top)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
