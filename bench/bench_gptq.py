"""Calibrated (GPTQ) rounding of one weight per Flux shape: CPU seconds per phase, against a baseline.

    git archive main quant_core | tar -x -C /tmp/base      # the code to compare with
    python bench/bench_gptq.py --baseline /tmp/base [--shapes 3072x3072,21504x3072] [--passes 2] [--exact]

Each weight (bf16, random, a few outliers) gets rank-128 synthetic statistics as
``bench/synthetic_calibration.py`` writes them for Flux (every layer of a Flux-sized model is sketched:
its exact statistics would not fit the recorder's memory); ``--exact`` gives each the exact statistics
of random correlated inputs instead, as a recording keeps for the narrowest layers. Baseline and this
checkout round the same weight in the same process, one after the other, on one thread as in a
conversion; the figures are the rounding thread's CPU seconds per phase (GPTQ's column loop, the
polishing passes, the held-out check), so a busy machine stretches them less than wall time. ``codes``
says whether both wrote the same fp8 bytes; ``held-out / RTN`` is each one's held-out output error
relative to round-to-nearest's. ``--passes`` (a list) rounds this checkout's code once per count of
polishing passes given. Where ``round_gptq`` takes a ``pool`` (an ``io.BufferPool``, as a conversion
lends it), each weight is rounded once untimed first: a model repeats its shapes, so in a conversion
the pool's buffers for a shape are already faulted in.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic_calibration import layer_statistics  # noqa: E402

from quant_core import fp8, gptq  # noqa: E402
from quant_core.calibration import Gram, LayerStatistics  # noqa: E402

FLUX_SHAPES = "3072x3072,3072x15360,21504x3072,12288x3072,3072x12288"


def load_baseline(root: Path, module: str = "gptq") -> ModuleType:
    """``quant_core.<module>`` of another checkout, imported as the package ``baseline_quant_core``."""
    package = root / "quant_core"
    spec = importlib.util.spec_from_file_location(
        "baseline_quant_core", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    baseline = importlib.util.module_from_spec(spec)
    sys.modules["baseline_quant_core"] = baseline
    spec.loader.exec_module(baseline)
    return importlib.import_module(f"baseline_quant_core.{module}")


def exact_statistics(in_features: int, seed: int) -> LayerStatistics:
    """Exact ``H`` of both halves of 4096 correlated input rows, as a recording keeps for narrow layers."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    inputs = torch.randn(4096, in_features, generator=generator) @ mixing
    fit, heldout = inputs[::2], inputs[1::2]
    return LayerStatistics(Gram(fit.T @ fit), Gram(heldout.T @ heldout), 2048, 2048, 10.0)


def statistics_for(module: ModuleType, stats: LayerStatistics):
    """``stats`` rebuilt from ``module``'s own classes: the engine dispatches on them with ``isinstance``,
    and a baseline imported as another package has classes of its own."""
    if isinstance(stats.fit, Gram):
        fit, heldout = module.Gram(stats.fit.matrix), module.Gram(stats.heldout.matrix)
    else:
        fit = module.LowRankGram(stats.fit.factor, stats.fit.exact_diagonal)
        heldout = module.RowSample(stats.heldout.rows)
    return module.LayerStatistics(fit, heldout, stats.count, stats.count_heldout, stats.input_absmax)


def flux_like_weight(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    outliers = torch.randint(0, weight.numel(), (max(1, weight.numel() // 10000),), generator=generator)
    weight.view(-1)[outliers] *= 20
    return weight.bfloat16()


def timed_rounding(module: ModuleType, weight: torch.Tensor, stats, passes: int | None) -> dict:
    """One ``round_gptq`` call: thread CPU seconds per phase, the codes and the held-out ratio."""
    scale = fp8.scale_for(fp8.absmax(weight), torch.float8_e4m3fn)
    columns, marks = weight.shape[1], {}

    def step(done: int, total: int) -> None:
        if done >= columns:
            marks.setdefault("polish", time.thread_time())
        if done >= total:
            marks.setdefault("check", time.thread_time())

    extra = {} if passes is None else {"passes": passes}
    if "pool" in inspect.signature(module.round_gptq).parameters:
        extra["pool"] = module.BufferPool()
        module.round_gptq(weight, scale, torch.float8_e4m3fn, stats, **extra)  # faults in the pool's buffers
    started = time.thread_time()
    result = module.round_gptq(weight, scale, torch.float8_e4m3fn, stats, step=step, **extra)
    ended = time.thread_time()
    polish = marks.get("polish", marks["check"])
    return {
        "gptq": polish - started,
        "polish": marks["check"] - polish,
        "check": ended - marks["check"],
        "total": ended - started,
        "codes": result.quantized.view(torch.uint8),
        "ratio": result.error / result.error_rtn if result.error_rtn else 1.0,
        "fell_back": result.fell_back,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a checkout (or `git archive` of quant_core) to compare with")
    parser.add_argument("--shapes", default=FLUX_SHAPES, help="out x in of each weight, comma-separated")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--passes", default="", help="counts of polishing passes to round this checkout with")
    parser.add_argument("--exact", action="store_true", help="exact statistics (narrow layers) instead of sketches")
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = load_baseline(args.baseline) if args.baseline else None
    sweep = [int(p) for p in args.passes.split(",") if p] or [None]
    kind = "exact statistics" if args.exact else f"rank-{args.rank} sketches"
    print(f"load average {os.getloadavg()[0]:.1f} at start; thread CPU seconds; {kind}")
    header = "| weight | code | passes | GPTQ | polish | check | total | vs baseline | codes | held-out / RTN |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for seed, shape in enumerate(args.shapes.split(",")):
        rows, columns = (int(n) for n in shape.split("x"))
        weight = flux_like_weight(rows, columns, seed)
        stats = exact_statistics(columns, seed) if args.exact else layer_statistics(columns, args.rank, seed)
        runs = [("baseline", baseline, None)] if baseline else []
        runs += [("this", gptq, passes) for passes in sweep]
        reference = None
        for label, module, passes in runs:
            figures = timed_rounding(module, weight, statistics_for(module, stats), passes)
            reference = reference or figures
            same = "same" if torch.equal(figures["codes"], reference["codes"]) else "differ"
            speed = f"{reference['total'] / figures['total']:.2f}x"
            shown = module.POLISH_PASSES if passes is None else passes
            print(
                f"| {rows} x {columns} | {label} | {shown} | {figures['gptq']:.2f} | {figures['polish']:.2f} | "
                f"{figures['check']:.2f} | {figures['total']:.2f} | {speed} | {same} | "
                f"{figures['ratio']:.4f}{' (fell back)' if figures['fell_back'] else ''} |",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
