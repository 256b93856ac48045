"""Every GPU path of the converter against its CPU result, in one command.

    python bench/gpu_check.py              # on a CUDA machine (sized for < 5 min on one GPU; not yet run on one)
    python bench/gpu_check.py --self-test     # anywhere: the same checks, CPU against CPU

It builds a small transformer-shaped model (``--blocks`` blocks of attention q/k/v/o and a 4x MLP
at width ``--hidden``), records its Linear inputs, and converts its bf16 checkpoint along every
path twice: on the CPU (the reference) and on CUDA (the candidate). Paths: round-to-nearest;
learned rounding with and without ``--use_amp``; GPTQ from exact and from sketched statistics;
the Recorder on a CUDA model (statistics compared directly); ``--parallel`` over every GPU (GPTQ,
exact statistics). It prints one table: time and peak VRAM of each candidate, and how far its
output is from the reference. ``--self-test`` runs the candidate on the CPU as well, with a
different number of threads (so different summation orders), which is what the unit test runs.
After the table it prints the learned optimiser's figures on the candidate device: its time on one
``4 hidden x hidden`` weight and its useful FLOP/s against ``torch.matmul`` at the same shapes.

What counts as a mismatch (exit status 1), per quantized layer:

- scale: the two scales differ by more than 1e-6 relative (both come from the exact maximum);
- step: an fp8 value differs by more than one grid step (adjacent representable values), for
  round-to-nearest and learned rounding, which both pick one of the two neighbours of ``w / scale``.
  Not for GPTQ: once float noise flips one of its decisions, the error feedback moves the targets
  of the columns after it, by several steps for a few values (measured: Gram matrices perturbed
  by 1e-5 relative changed 1e-4 of the values of a 1024 x 1024 layer, some by 12 steps, with the
  same error to 1e-7);
- diff: the fraction of fp8 values that differ at all exceeds the path's budget: 1e-4 for
  round-to-nearest (only ties of ``w / scale`` computed with another rounding), 1e-2 for GPTQ
  (100 times what that 1e-5 perturbation gave), none for learned rounding (the candidate draws its
  random calibration inputs from the GPU's own generator, so the two fits see different data);
- quality: the candidate's relative output error ``||X (Wq - W)^T|| / ||X W^T||`` on fixed
  standard-normal inputs (float64, the same X for both) exceeds the reference's by more than the
  path's budget: 0.1 % relative for round-to-nearest, 2 % for GPTQ, 10 % for learned rounding;
- left: device memory still allocated after the conversion (CUDA only; cuBLAS's workspaces, which
  torch keeps per thread, are cleared first).

The Recorder path passes when every layer's row counts and input maximum are equal, exact Gram
matrices and sketches agree to 1e-4 relative (Frobenius), and the held-out row samples agree to
1e-6 relative (they are the same rows, only moved between devices).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_core import fp8, rounding  # noqa: E402
from quant_core.calibration import Gram, LayerStatistics, RandomCalibration, Recorder  # noqa: E402
from quant_core.convert import ConvertOptions, convert_file  # noqa: E402
from quant_core.io import SafetensorsReader, write_file  # noqa: E402
from quant_core.options import LearnedOptions  # noqa: E402

SCALE_TOLERANCE = 1e-6
STATISTICS_TOLERANCE = 1e-4
SAMPLE_TOLERANCE = 1e-6
EVAL_ROWS = 256


@dataclass(frozen=True)
class Budget:
    """How far a candidate may be from its reference (see the module docstring)."""

    max_fraction: float | None  # of fp8 values that differ at all; None: not bounded
    max_step: int | None  # grid steps between two values; None: not bounded
    quality: float  # relative excess of the output error


NEAREST, GPTQ, LEARNED = Budget(1e-4, 1, 1e-3), Budget(1e-2, None, 2e-2), Budget(None, 1, 0.10)


@dataclass
class Row:
    """One line of the table."""

    path: str
    seconds: float = 0.0
    peak_mib: float | None = None
    detail: str = ""
    problems: list[str] = field(default_factory=list)


class Model(nn.Module):
    """``blocks.N.attn.{q,k,v,o}`` and ``blocks.N.mlp.{0,2}``: shared-scale groups of four and two."""

    def __init__(self, hidden: int, blocks: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)

        def linear(n_in: int, n_out: int) -> nn.Linear:
            layer = nn.Linear(n_in, n_out)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(n_out, n_in, generator=generator) / math.sqrt(n_in))
                layer.bias.copy_(0.1 * torch.randn(n_out, generator=generator))
            return layer

        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.attn = nn.ModuleDict({k: linear(hidden, hidden) for k in ("q", "k", "v", "o")})
            block.mlp = nn.Sequential(linear(hidden, 4 * hidden), nn.GELU(), linear(4 * hidden, hidden))
            self.blocks.append(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            attn = block.attn
            x = x + attn["o"](torch.tanh(attn["q"](x)) * attn["k"](x) + attn["v"](x))
            x = x + block.mlp(x)
        return x


@dataclass
class Setup:
    """What every path shares: the checkpoint, calibration files, evaluation inputs, devices."""

    folder: Path
    checkpoint: Path
    exact: Path
    sketched: Path
    model: Model
    inputs: torch.Tensor
    reference: Callable[[], contextlib.AbstractContextManager]  # how the reference runs
    candidate: Callable[[], contextlib.AbstractContextManager]  # how the candidate runs
    candidate_device: torch.device
    rounding: LearnedOptions
    rank: int
    references: dict[str, Path] = field(default_factory=dict)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_setup(args: argparse.Namespace, folder: Path) -> Setup:
    model = Model(args.hidden, args.blocks)
    checkpoint = folder / "model_bf16.safetensors"
    write_file(checkpoint, {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()})
    inputs = torch.randn(args.rows, 4, args.hidden, generator=torch.Generator().manual_seed(1))
    exact, sketched = folder / "exact.safetensors", folder / "sketched.safetensors"
    for path, limit in ((exact, 1 << 30), (sketched, 0)):  # every layer exact, or every layer sketched
        with Recorder(model, rank=args.rank, exact_limit=limit) as recorder, torch.no_grad():
            model(inputs)
        recorder.save(path)
    cores = torch.get_num_threads()
    if args.self_test:
        reference, candidate = (lambda: threads(max(2, cores))), (lambda: threads(1))
        device = torch.device("cpu")
    else:
        reference, candidate = contextlib.nullcontext, contextlib.nullcontext
        device = torch.device("cuda", 0)
    rounding = LearnedOptions(num_iter=args.num_iter, calib_samples=args.calib_samples)
    return Setup(folder, checkpoint, exact, sketched, model, inputs, reference, candidate, device, rounding, args.rank)


def fp8_ordinal(values: torch.Tensor) -> torch.Tensor:
    """Each fp8 value's position on the grid (sign-magnitude bits made monotone; +0 and -0 are both 0),
    so that adjacent representable values differ by exactly 1."""
    bits = values.view(torch.uint8).to(torch.int32)  # e4m3fn and e5m2 alike: sign in the top bit
    magnitude = bits & 0x7F
    return torch.where(bits >= 0x80, -magnitude, magnitude)


def read_layers(path: Path) -> dict[str, tuple[torch.Tensor, float]]:
    """Every quantized layer of a ``comfy`` file: its fp8 weight and scale."""
    with SafetensorsReader(path) as reader:
        return {
            key.removesuffix("_scale"): (reader.read(key.removesuffix("_scale")), float(reader.read(key)))
            for key in reader.tensors
            if key.endswith(".weight_scale")
        }


def output_errors(weight: torch.Tensor, *quantized: tuple[torch.Tensor, float]) -> list[float]:
    """``||X (Wq - W)^T|| / ||X W^T||`` of each ``(fp8, scale)`` on fixed standard-normal X, in float64."""
    generator = torch.Generator().manual_seed(weight.shape[1])
    x = torch.randn(EVAL_ROWS, weight.shape[1], generator=generator, dtype=torch.float64)
    exact = weight.double()
    norm = (x @ exact.T).norm()
    return [float((x @ (fp8.double() * scale - exact).T).norm() / norm) for fp8, scale in quantized]


def compare_files(reference: Path, candidate: Path, original: Path, budget: Budget) -> tuple[str, list[str]]:
    """The table's detail for one path and every problem found (see the module docstring)."""
    ours, theirs = read_layers(candidate), read_layers(reference)
    problems = [f"layers differ: {sorted(set(ours) ^ set(theirs))}"] if set(ours) != set(theirs) else []
    differing = total = 0
    worst_step = 0
    errors = []
    with SafetensorsReader(original) as source:
        for name in sorted(set(ours) & set(theirs)):
            (fp8, scale), (fp8_ref, scale_ref) = ours[name], theirs[name]
            if abs(scale / scale_ref - 1) > SCALE_TOLERANCE:
                problems.append(f"{name}: scale {scale:.9g} against {scale_ref:.9g}")
            steps = (fp8_ordinal(fp8) - fp8_ordinal(fp8_ref)).abs()
            worst_step = max(worst_step, int(steps.max()))
            differing += int((steps > 0).sum())
            total += steps.numel()
            weight = source.read(name).float()
            error, error_ref = output_errors(weight, (fp8, scale), (fp8_ref, scale_ref))
            errors.append((error, error_ref))
            if error > error_ref * (1 + budget.quality) + 1e-9:
                problems.append(f"{name}: output error {error:.4%} against {error_ref:.4%}")
    if budget.max_step is not None and worst_step > budget.max_step:
        problems.append(f"fp8 values {worst_step} grid steps apart")
    fraction = differing / total if total else 0.0
    if budget.max_fraction is not None and fraction > budget.max_fraction:
        problems.append(f"{fraction:.2e} of fp8 values differ (budget {budget.max_fraction:.0e})")
    mean = sum(e for e, _ in errors) / len(errors) if errors else 0.0
    mean_ref = sum(r for _, r in errors) / len(errors) if errors else 0.0
    detail = f"diff {fraction:.1e}, max step {worst_step}, error {mean:.3%} vs {mean_ref:.3%}"
    return detail, problems


@contextlib.contextmanager
def measured(row: Row, device: torch.device) -> Iterator[None]:
    """Time the block; on CUDA also its peak VRAM over every GPU and what it leaves allocated."""
    cuda = device.type == "cuda"
    gpus = range(torch.cuda.device_count()) if cuda else range(0)
    for index in gpus:
        torch.cuda.synchronize(index)
        torch.cuda.reset_peak_memory_stats(index)
    before = [torch.cuda.memory_allocated(index) for index in gpus]
    started = time.perf_counter()
    yield
    for index in gpus:
        torch.cuda.synchronize(index)
    row.seconds = time.perf_counter() - started
    if cuda:
        gc.collect()  # what is only garbage does not count as left
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces:  # cuBLAS's per-thread workspaces: torch's cache, not the converter's tensors
            clear_workspaces()
        row.peak_mib = (
            sum(torch.cuda.max_memory_allocated(index) - b for index, b in zip(gpus, before, strict=True)) / 2**20
        )
        left = sum(torch.cuda.memory_allocated(index) - b for index, b in zip(gpus, before, strict=True))
        if left:
            row.problems.append(f"{left} bytes of device memory left allocated")


def conversion_path(setup: Setup, label: str, reference_key: str, budget: Budget, **overrides) -> Row:
    """Convert on the CPU (once per ``reference_key``) and on the candidate device; compare."""
    base = dict(format="comfy", preset="generic", include=[r"^blocks\."], learned=setup.rounding)
    base.update(overrides)
    if reference_key not in setup.references:
        reference = setup.folder / f"reference_{reference_key}.safetensors"
        with setup.reference():
            convert_file(setup.checkpoint, reference, ConvertOptions(**base, device="cpu"))
        setup.references[reference_key] = reference
    row = Row(label)
    output = setup.folder / f"candidate_{label.replace(' ', '_')}.safetensors"
    device = (
        None if overrides.get("parallel") and setup.candidate_device.type == "cuda" else str(setup.candidate_device)
    )
    with setup.candidate(), measured(row, setup.candidate_device):
        convert_file(setup.checkpoint, output, ConvertOptions(**base, device=device))
    row.detail, problems = compare_files(setup.references[reference_key], output, setup.checkpoint, budget)
    row.problems += problems
    return row


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def compare_statistics(ours: LayerStatistics, theirs: LayerStatistics, name: str) -> list[str]:
    """Problems between two recordings of the same inputs (see the module docstring)."""
    problems = []
    if (ours.count, ours.count_heldout) != (theirs.count, theirs.count_heldout):
        problems.append(f"{name}: row counts differ")
    if ours.input_absmax != theirs.input_absmax:
        problems.append(f"{name}: input maximum {ours.input_absmax} against {theirs.input_absmax}")
    if type(ours.fit) is not type(theirs.fit):
        return problems + [f"{name}: kinds of statistics differ"]
    if isinstance(ours.fit, Gram):
        pairs = [(ours.fit.matrix, theirs.fit.matrix), (ours.heldout.matrix, theirs.heldout.matrix)]
    else:  # a sketch: its implied matrix, its exact diagonal
        fit, fit_ref = ours.fit, theirs.fit
        pairs = [(fit.factor @ fit.factor.T, fit_ref.factor @ fit_ref.factor.T), (fit.diagonal(), fit_ref.diagonal())]
        if relative(ours.heldout.rows, theirs.heldout.rows) > SAMPLE_TOLERANCE:
            problems.append(f"{name}: held-out row samples differ")
    for a, b in pairs:
        if relative(a, b) > STATISTICS_TOLERANCE:
            problems.append(f"{name}: statistics differ by {relative(a, b):.2e}")
    return problems


def recorder_path(setup: Setup, label: str, exact: bool) -> Row:
    """The Recorder on a model on the candidate device against the same model on the CPU."""
    limit = 1 << 30 if exact else 0

    def record(device: torch.device) -> dict[str, LayerStatistics]:
        model = setup.model.to(device)
        with Recorder(model, rank=setup.rank, exact_limit=limit) as recorder, torch.no_grad():
            model(setup.inputs.to(device))
        setup.model.to("cpu")
        return recorder.statistics()

    with setup.reference():
        reference = record(torch.device("cpu"))
    row = Row(label)
    with setup.candidate(), measured(row, setup.candidate_device):
        candidate = record(setup.candidate_device)
    for name in sorted(reference):
        row.problems += compare_statistics(candidate[name], reference[name], name)
    row.detail = f"{len(reference)} layers, {'exact' if exact else 'sketched'} statistics"
    return row


def run(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        setup = make_setup(args, Path(tmp))
        exact, sketched = str(setup.exact), str(setup.sketched)
        return [
            conversion_path(setup, "round-to-nearest", "nearest", NEAREST, rounding="nearest"),
            conversion_path(setup, "learned, use_amp", "learned", LEARNED, rounding="learned"),
            conversion_path(
                setup,
                "learned, no use_amp",
                "learned",
                LEARNED,
                rounding="learned",
                learned=LearnedOptions(num_iter=args.num_iter, calib_samples=args.calib_samples, use_amp=False),
            ),
            conversion_path(setup, "GPTQ, exact statistics", "gptq_exact", GPTQ, calibration=exact),
            conversion_path(setup, "GPTQ, sketched statistics", "gptq_sketched", GPTQ, calibration=sketched),
            recorder_path(setup, "Recorder, exact", exact=True),
            recorder_path(setup, "Recorder, sketched", exact=False),
            conversion_path(setup, "--parallel, GPTQ", "gptq_exact", GPTQ, calibration=exact, parallel=True),
        ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(left: tuple[int, int], right: tuple[int, int], dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of ``torch.matmul`` at these shapes and dtype on ``device``: the best of repeated runs."""
    a = torch.randn(*left, device=device).to(dtype)
    b = torch.randn(*right, device=device).to(dtype)
    best, spent = math.inf, 0.0
    while spent < 0.5:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize(device)
        took = (time.perf_counter() - started) / 10
        best, spent = min(best, took), spent + 10 * took
    return 2 * left[0] * left[1] * right[1] / best


def learned_figures(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Learned rounding's optimiser on one ``4 hidden x hidden`` bf16 weight on ``device``, with and
    without ``use_amp``: its time, its useful FLOP/s (``4 x calib_samples`` per weight and iteration)
    and that as a share of ``torch.matmul``'s rate at the optimiser's own shapes (its block of rows
    against the calibration rows, forward and gradient) in the dtype it multiplies in."""
    generator = torch.Generator().manual_seed(2)
    weight = (torch.randn(4 * args.hidden, args.hidden, generator=generator) * 0.02).to(torch.bfloat16).to(device)
    scale = fp8.scale_for(fp8.absmax(weight), torch.float8_e4m3fn)
    samples = args.calib_samples
    block = rounding._LEARNED_BLOCK_ELEMENTS_CUDA if device.type == "cuda" else rounding._LEARNED_BLOCK_ELEMENTS
    rows = min(weight.shape[0], max(1, block // weight.shape[1]))
    lines = [
        f"learned optimiser on {device}: one {weight.shape[0]}x{weight.shape[1]} bf16 weight, blocks of {rows} rows"
    ]
    for use_amp in (True, False):
        options = LearnedOptions(num_iter=args.num_iter, calib_samples=samples, use_amp=use_amp)
        dtype = rounding._matmul_dtype(options, device)
        synchronize(device)
        started = time.perf_counter()
        result = rounding.round_learned(
            "check.weight", weight, scale, torch.float8_e4m3fn, RandomCalibration(), options
        )
        synchronize(device)
        seconds = time.perf_counter() - started
        useful = 4 * samples * result.work / seconds
        forward = matmul_rate((samples, weight.shape[1]), (weight.shape[1], rows), dtype, device)
        backward = matmul_rate((rows, samples), (samples, weight.shape[1]), dtype, device)
        rate = 2 / (1 / forward + 1 / backward)  # the two products alternate, equal FLOPs
        lines.append(
            f"  use_amp={use_amp} ({str(dtype).removeprefix('torch.')} products): {seconds:.2f} s for "
            f"{result.work / 1e6:.0f} M weight-iterations ({result.iterations} iterations"
            f"{', kept RTN' if result.fell_back else ''}); useful {useful / 1e9:.1f} GFLOP/s = "
            f"{useful / rate:.0%} of torch.matmul's {rate / 1e9:.1f} GFLOP/s at these shapes"
        )
    return lines


def table(rows: list[Row], where: str) -> str:
    lines = [
        f"GPU check: candidate {where} against the CPU",
        f"{'path':28} {'time s':>7} {'peak MiB':>9}  {'result':6}  detail",
    ]
    for row in rows:
        peak = f"{row.peak_mib:9.1f}" if row.peak_mib is not None else f"{'-':>9}"
        verdict = "FAIL" if row.problems else "ok"
        lines.append(f"{row.path:28} {row.seconds:7.2f} {peak}  {verdict:6}  {row.detail}")
        lines += [f"    {problem}" for problem in row.problems[:10]]
    failed = sum(bool(row.problems) for row in rows)
    lines.append(f"{len(rows) - failed} of {len(rows)} paths match" + (f"; {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true", help="candidate on the CPU too (other thread count)")
    parser.add_argument("--hidden", type=int, default=None, help="model width (default 1024; 32 with --self-test)")
    parser.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 2; 1 with --self-test)")
    parser.add_argument("--rows", type=int, default=None, help="calibration batches of 4 tokens (default 256; 16)")
    parser.add_argument("--rank", type=int, default=None, help="sketch rank (default 128; 8 with --self-test)")
    parser.add_argument("--num-iter", type=int, default=None, help="learned rounding iterations (default 200; 10)")
    parser.add_argument("--calib-samples", type=int, default=None, help="learned rounding rows (default 96; 16)")
    parser.add_argument("--workdir", default=None, help="folder for the temporary files (default: the system's)")
    args = parser.parse_args(argv)
    small = args.self_test
    for name, full, tiny in (("hidden", 1024, 32), ("blocks", 2, 1), ("rows", 256, 16), ("rank", 128, 8)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    for name, full, tiny in (("num_iter", 200, 10), ("calib_samples", 96, 16)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    if not args.self_test and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --self-test for the CPU-only check")
    where = "CPU, 1 thread" if args.self_test else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    rows = run(args)
    print(table(rows, where))
    print("\n".join(learned_figures(args, torch.device("cpu") if args.self_test else torch.device("cuda", 0))))
    return 1 if any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
