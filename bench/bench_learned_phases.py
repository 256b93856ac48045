"""Benchmark: where one iteration of the learned-rounding optimiser spends its time, and the whole
``round_learned`` against a baseline.

Usage (from the repository root)::

    .venv/bin/python bench/bench_learned_phases.py [--columns 3072] [--samples 96] [--rounds 3]
    git archive <rev> quant_core | tar -x -C /tmp/base     # the code to compare with
    .venv/bin/python bench/bench_learned_phases.py --baseline /tmp/base [--weight 12288x3072] [--iterations 40]

Phases: one block of rows as ``rounding.round_learned`` cuts it (``_LEARNED_BLOCK_ELEMENTS`` weights
of a random bf16 weight with ``--columns`` inputs), on one thread with subnormals flushed, as the
optimiser's own threads run it. The step's products and its element-wise part are timed alone and
together (CPU time of this thread, the fastest of ``--rounds``), for the compiled element-wise step
(``native.learned_step``) and for the torch passes, beside ``torch.matmul`` at the same shapes in
float32 (the FLOP/s reference) and in the optimiser's matmul dtype. Figures are ns per weight and
iteration: the step's useful work is ``4 * samples`` FLOPs per weight-iteration.

``--baseline``: the whole ``round_learned`` of one random bf16 weight (``--weight``, random calibration
inputs, ``--iterations``), this checkout and the baseline interleaved ``--repeat`` times, in CPU
seconds of the process (the blocks run on torch's threads); beside each, its useful FLOPs per CPU
second against one-thread float32 ``torch.matmul`` at its own block's shapes (as ``bench_convert.py``'s
``optimiser`` table), its held-out error and how many fp8 codes differ from the baseline's.
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

from bench_gptq import load_baseline  # noqa: E402  (bench/ is the script's own folder)

from quant_core import fp8, native, rounding  # noqa: E402
from quant_core.calibration import RandomCalibration  # noqa: E402
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


def phases(compiled: bool, rows: int, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The step's parts on one block, with the compiled element-wise step or the torch passes."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, args.columns, generator=generator).bfloat16()
    scale = fp8.scale_for(fp8.absmax(weight), torch.float8_e4m3fn)
    choices = rounding._Grid(weight, scale, torch.float8_e4m3fn).block(slice(0, rows))
    options = LearnedOptions(calib_samples=args.samples)
    matmul = rounding._matmul_dtype(options, weight.device)
    inputs = torch.randn(args.samples, args.columns, generator=generator).to(matmul)
    both = (inputs, inputs.T.contiguous())  # as ``rounding._optimise_block`` passes them
    work = rounding._Workspace(choices, matmul, 1)
    assert work.compiled == compiled
    adam = rounding._Adam(choices.logits.clone(), options.lr, 1 << 30)
    loss = work.losses[0]
    regulariser = rounding._Regulariser(10.0, options.reg_lambda, weight.numel())
    buffers = (work.product, work.gradient)
    product = rounding._output_product(both, work.delta, args.samples, 1.0, buffers, loss)

    def products() -> torch.Tensor:
        return rounding._output_product(both, work.delta, args.samples, 1.0, buffers, loss)

    def step(regularised: rounding._Regulariser | None) -> None:
        work.update(products(), 1e-3, adam, regularised, loss)

    return {
        "products (both, and the loss)": products,
        "element-wise, warm-up (no regulariser)": lambda: work.update(product, 1e-3, adam, None, loss),
        "element-wise, regularised": lambda: work.update(product, 1e-3, adam, regulariser, loss),
        "whole step, warm-up": lambda: step(None),
        "whole step, regularised": lambda: step(regulariser),
    }


def print_phases(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rows = max(1, rounding._LEARNED_BLOCK_ELEMENTS // args.columns)
    n = rows * args.columns
    matmul = rounding._matmul_dtype(LearnedOptions(), torch.device("cpu"))
    print(f"one block of {rows} x {args.columns} weights, {args.samples} calibration rows, one thread, matmul {matmul}")
    print(f"load before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.samples, args.columns, generator=generator)
    delta = torch.randn(rows, args.columns, generator=generator)
    single = (inputs, inputs.T.contiguous(), delta, delta @ inputs.T.contiguous())  # row-major, as the step's
    low = tuple(part.to(matmul) for part in single)
    references = {
        f"torch.matmul, both products, {matmul}": lambda: (low[2] @ low[1], low[3] @ low[0]),
        "torch.matmul, both products, float32": lambda: (single[2] @ single[1], single[3] @ single[0]),
    }
    times = {name: cpu_ns(function, n, args.rounds) for name, function in references.items()}
    if native.library() is not None:
        times |= {f"compiled: {k}": cpu_ns(f, n, args.rounds) for k, f in phases(True, rows, args).items()}
    library = native.library
    native.library = lambda: None  # the torch passes
    try:
        times |= {f"torch: {k}": cpu_ns(f, n, args.rounds) for k, f in phases(False, rows, args).items()}
    finally:
        native.library = library
    width = max(map(len, times))
    reference = times["torch.matmul, both products, float32"]
    for name, value in times.items():
        share = f"  ({reference / value:.0%} of the float32 matmul rate)" if "whole step" in name else ""
        print(f"  {name:<{width}}  {value:6.2f} ns per weight-iteration{share}")
    print(f"load after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def one_thread_matmul_rate(rows: int, columns: int, samples: int) -> float:
    """FLOP per CPU-second of one-thread float32 ``torch.matmul`` at a block's two products' shapes
    (the fastest call; as ``bench_convert.py``'s reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = []
        for left, right in (((samples, columns), (columns, rows)), ((rows, samples), (samples, columns))):
            a, b = torch.randn(*left), torch.randn(*right)
            a @ b
            best = min(_product_seconds(a, b) for _ in range(20))
            rates.append(2 * left[0] * left[1] * right[1] / best)
        return 2 / (1 / rates[0] + 1 / rates[1])  # the two products alternate, equal FLOPs
    finally:
        torch.set_num_threads(threads)


def _product_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    started = time.thread_time()
    a @ b
    return time.thread_time() - started


def compare_whole(args: argparse.Namespace) -> None:
    baseline = load_baseline(args.baseline, "rounding")
    rows, columns = map(int, args.weight.split("x"))
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).bfloat16()
    scale = fp8.scale_for(fp8.absmax(weight), torch.float8_e4m3fn)
    options = LearnedOptions(num_iter=args.iterations, calib_samples=args.samples)
    print(f"round_learned of one {rows}x{columns} bf16 weight, {args.iterations} iterations, {args.samples} samples")
    print(f"load before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print("| code | block rows | CPU s | weight-iterations | ns per weight-iteration | GFLOP per CPU-s | one-thread "
          "matmul GFLOP/s | ratio | held-out error (RTN) | codes differing |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    codes = {}
    for _ in range(args.repeat):
        for label, module in (("baseline", baseline), ("this checkout", rounding)):
            started = time.process_time()
            result = module.round_learned("w", weight, scale, torch.float8_e4m3fn, RandomCalibration(), options)
            cpu = time.process_time() - started
            block = max(1, module._LEARNED_BLOCK_ELEMENTS // columns)
            flops = 4 * args.samples * result.work + 8 * args.samples * weight.numel()  # as bench_convert.py
            reference = one_thread_matmul_rate(block, columns, args.samples)
            codes.setdefault(label, result.quantized.view(torch.uint8))
            differing = int((result.quantized.view(torch.uint8) != codes["baseline"]).sum())
            print(
                f"| {label} | {block} | {cpu:.2f} | {result.work / 1e6:.1f} M | {cpu / result.work * 1e9:.2f} | "
                f"{flops / cpu / 1e9:.1f} | {reference / 1e9:.1f} | {flops / cpu / reference:.0%} | "
                f"{result.error:.7%} ({result.error_rtn:.7%}) | {differing} of {weight.numel()} |",
                flush=True,
            )
    print(f"load after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--columns", type=int, default=3072, help="input features of the weight (default 3072)")
    parser.add_argument("--samples", type=int, default=96, help="calibration rows (default 96, as --calib_samples)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per phase, fastest kept (default 3)")
    parser.add_argument("--baseline", type=Path, help="a checkout (or `git archive` of quant_core) to compare with")
    parser.add_argument("--weight", default="12288x3072", help="rows x columns of the whole-weight comparison")
    parser.add_argument("--iterations", type=int, default=40, help="optimiser iterations of the whole comparison")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds of the whole comparison")
    args = parser.parse_args(argv)
    if args.baseline:
        compare_whole(args)
    else:
        print_phases(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
