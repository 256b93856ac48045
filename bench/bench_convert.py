"""Benchmark: conversion speed and peak memory against the machine's limits and against a peer tool.

Usage (from the repository root; one command prints every table)::

    .venv/bin/python bench/bench_convert.py --size-gb 1,2,4 --repeat 2 [--peer-python /path/to/python]

What it does, in one run:

1. Generates (once; cached in ``--workdir``) a bf16 checkpoint with Flux-dev's widths (hidden 3072,
   context 4096, vec 768) and the numbers of double/single blocks that bring it near each
   ``--size-gb`` (24 gives Flux-dev's own 19 + 38 blocks), streaming one tensor at a time.
2. Reads the input once so that every measurement below sees it in the page cache (where it fits),
   then measures the machine's copy limit: copying the file once (read + write + fsync, as the
   converter fsyncs its output). Every configuration's time is also reported as a multiple of it.
3. Runs each configuration as its own child process and takes its wall time and its own peak RSS
   (``ru_maxrss`` from ``os.wait4``), so no configuration's memory leaks into another's figure.
   Peak RSS is checked against the bound "2 x the largest tensor + a fixed 500 MB" (the
   interpreter with torch alone is about 230 MB of the fixed part).
4. Scores each output the same way, whichever tool wrote it: the relative output error
   ``||X (dequant(Wq) - W)^T|| / ||X W^T||`` of every quantized layer on held-out standard-normal
   inputs ``X`` (a fixed seed, the same for both tools; at most ``QUALITY_ROWS`` output rows per
   layer), averaged over layers. Biases are not part of it (the peer also corrects biases).
5. Against the peer, convert-to-quant (PyPI), when ``--peer-python`` (or the environment variable
   ``CONVERT_TO_QUANT_PYTHON``) names a Python that has it installed: its round-to-nearest mode on
   the whole checkpoint, and its learned mode on a subset file (``--subset``, the same file for
   both tools; learned rounding of a whole model is hours on 2 cores for either tool). Our runs
   in the comparison use ``--preset none --no-use_shared_scales``, so both tools quantize the same
   tensors with a per-tensor scale from the tensor's own maximum. The bench never installs it.
6. ``calibrated`` (opt-in): GPTQ with ``--calibration``, fed a synthetic rank-128 sketched
   recording of the checkpoint's shapes (``bench/synthetic_calibration.py``, written once beside
   the checkpoint): the time and memory of calibrated rounding at any size.
7. ``optimiser``: our learned optimiser alone on the subset's weights, in a child process: its
   useful matrix-multiply FLOPs (``4 x calib_samples`` per weight per iteration, plus the fixed
   RTN and held-out products), the FLOP/s achieved, and the ``torch.matmul`` rate measured there
   and then at the optimiser's own shapes and at 2048 x 2048 x 2048.

On Linux a child's ``ru_maxrss`` is at least the *parent's* peak RSS at the time it was spawned
(``exec`` records the high-water mark of the address space it replaces, which a vfork child
borrows from its parent). So this process never imports torch and holds no large buffer: the
generation, the analysis and the scoring run in helper child processes, and the parent's own peak
RSS is printed as the floor under every figure.

Wall times are the fastest of ``--repeat`` interleaved rounds, peak RSS the largest. The CPU time
other processes used while the benchmark ran is printed: other work on the machine makes every
figure slower. Sizes: MB = 10^6 bytes, GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 10**6
GB = 10**9
RSS_FIXED = 500 * MB  # the fixed part of the memory bound: interpreter, torch, buffers
WIDTHS = {"hidden": 3072, "context": 4096, "vec": 768}  # Flux-dev's
DEFAULT_CONFIGS = ("simple", "learned-mem", "rtn-matched", "peer-rtn", "learned-matched", "peer-learned", "optimiser")
QUALITY_ROWS = 2048  # output rows scored per layer (rows are independent; the first ones suffice)
QUALITY_INPUTS = 128  # held-out input rows
QUALITY_SEED = 20240601
MATCHED = ["--preset", "none", "--no-use_shared_scales"]  # ours, set up to quantize what the peer does
PEER_COMMON = ["--comfy_quant", "--device", "cpu", "--low-memory", "--manual_seed", "0", "--verbose", "MINIMAL"]
PEER_MAIN = "import sys; from convert_to_quant.convert_to_quant import main; sys.argv[0] = 'convert_to_quant'; main()"
PEER_DEFAULT_ITER = 4000  # convert-to-quant 1.3.4's default --num_iter
OURS_DEFAULT_ITER = 200


@dataclass
class Config:
    name: str
    args: list[str]
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)
    peer: bool = False  # run convert-to-quant instead of quant_core
    subset: bool = False  # run on the subset file (once), not on every generated checkpoint
    calibrated: bool = False  # with --calibration: a synthetic sketched recording of the checkpoint's shapes

    def settings(self) -> str:
        text = shlex.join(self.args)
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{env} {text}".strip() if env else text

    def command(self, python: str, source: Path, output: Path) -> list[str]:
        if self.peer:
            return [python, "-c", PEER_MAIN, "-i", str(source), "-o", str(output), *self.args]
        ours = [python, "-m", "quant_core", "--input", str(source), "--output", str(output), "--overwrite", "--quiet"]
        calibration = ["--calibration", str(calibration_path(source))] if self.calibrated else []
        return [*ours, *self.args, *calibration]


def calibration_path(source: Path) -> Path:
    return source.with_name(f"{source.stem}_calibration.safetensors")


@dataclass
class Result:
    config: Config
    wall: float = float("inf")
    convert: float = float("inf")  # our own "time" line: the conversion without interpreter start-up
    rss: int = 0  # bytes
    returncode: int = 0
    error: str = ""
    quality: dict | None = None


def build_configs(args: argparse.Namespace) -> dict[str, Config]:
    iters = ["--num_iter", str(args.learned_iter)]
    one_weight = ["--num_iter", "1", "--exclude", r"^(?!(?:double_blocks\.0\.img_attn\.qkv\.))"]
    return {
        "simple": Config("simple", ["--simple"], "round-to-nearest, default settings"),
        "simple-parallel": Config("simple-parallel", ["--simple", "--parallel"], "RTN, a worker per GPU (CPU: simple)"),
        "calibrated": Config(
            "calibrated", [], "GPTQ on a rank-128 sketched recording (bench/synthetic_calibration.py)", calibrated=True
        ),
        "learned-mem": Config(
            "learned-mem",
            ["--rounding", "learned", *one_weight],
            "learned rounding of one 9216x3072 weight, 1 iteration: a memory check",
        ),
        "rtn-matched": Config("rtn-matched", ["--simple", *MATCHED], "RTN, every 2-D weight, per-tensor scales"),
        "peer-rtn": Config("peer-rtn", ["--simple", *PEER_COMMON], "convert-to-quant --simple", peer=True),
        "learned-matched": Config(
            "learned-matched",
            ["--rounding", "learned", *MATCHED, *iters, "--calib_samples", "96"],
            "learned rounding",
            subset=True,
        ),
        "peer-learned": Config(
            "peer-learned", [*PEER_COMMON, *iters], "convert-to-quant, learned", peer=True, subset=True
        ),
        "optimiser": Config("optimiser", [], "our optimiser alone, in process", subset=True),
    }


def learned_counts(args: argparse.Namespace) -> list[int]:
    """The iteration counts of the learned comparison: ``--learned-iters``, else ``--learned-iter``."""
    return [int(n) for n in args.learned_iters.split(",") if n.strip()] if args.learned_iters else [args.learned_iter]


def learned_sweep(configs: list[Config], counts: list[int]) -> list[Config]:
    """Each learned config once per iteration count (named ``NAME@N``), the others unchanged."""
    swept = []
    for config in configs:
        if "--num_iter" not in config.args or config.name == "learned-mem":
            swept.append(config)
            continue
        at = config.args.index("--num_iter") + 1
        for count in counts:
            args = [*config.args[:at], str(count), *config.args[at + 1 :]]
            swept.append(Config(f"{config.name}@{count}", args, config.note, config.env, config.peer, config.subset))
    return swept


# --- helpers that run in child processes (they import torch; the parent must not) -----------------


def _checkpoint_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        count = 1
        for n in shape:
            count *= n
        total += 2 * count  # bf16
    return total


def choose_depths(target: float) -> tuple[int, int]:
    """Double/single block counts for a checkpoint near ``target`` bytes.

    Among the sizes within 5 % of the target (or else the closest one), the block counts nearest to
    Flux-dev's 1:2 ratio (19 double, 38 single blocks) win, then the size nearest the target.
    """
    from quant_core.example import flux_shapes

    candidates = []
    for depth in range(1, 101):
        for depth_single in range(0, 201):
            size = _checkpoint_bytes(flux_shapes(depth=depth, depth_single=depth_single, **WIDTHS))
            candidates.append((abs(size - target), abs(depth_single - 2 * depth), depth, depth_single))
            if size > target:
                break
    near = [c for c in candidates if c[0] <= 0.05 * target] or [min(candidates)]
    _, _, depth, depth_single = min(near, key=lambda c: (c[1], c[0]))
    return depth, depth_single


def helper_generate(workdir: str, size_gb: str) -> dict:
    """Write (or reuse) the checkpoint; returns its path and block counts."""
    from quant_core.example import flux_shapes, write_synthetic
    from quant_core.io import SafetensorsReader

    depth, depth_single = choose_depths(float(size_gb) * GB)
    shapes = flux_shapes(depth=depth, depth_single=depth_single, **WIDTHS)
    path = Path(workdir) / f"flux_h3072_d{depth}_s{depth_single}_bf16.safetensors"
    cached = False
    if path.exists():
        with SafetensorsReader(path) as reader:
            cached = {k: v.shape for k, v in reader.tensors.items()} == shapes
    seconds = 0.0
    if not cached:
        started = time.perf_counter()
        write_synthetic(path, shapes)
        seconds = time.perf_counter() - started
    return {"path": str(path), "depth": depth, "depth_single": depth_single, "cached": cached, "seconds": seconds}


def helper_subset(source: str, pattern: str, target: str) -> dict:
    """Copy the tensors whose names match ``pattern`` (at the start) into ``target``, streamed."""
    from quant_core.io import SafetensorsReader, TensorInfo, write_stream

    with SafetensorsReader(source) as reader:
        names = [n for n in reader.tensors if re.match(pattern, n)]
        if not names:
            raise SystemExit(f"--subset {pattern!r} matches no tensor of {source}")
        entries = [TensorInfo(n, reader.tensors[n].dtype, reader.tensors[n].shape) for n in names]
        write_stream(target, entries, ((n, reader.read(n)) for n in names))
    return {"names": names}


def helper_describe(path: str) -> dict:
    """Parameter count and largest tensor."""
    from quant_core.io import SafetensorsReader

    with SafetensorsReader(path) as reader:
        tensors = reader.tensors
        largest = max(tensors.values(), key=lambda t: t.nbytes)
        return {
            "params": sum(t.numel for t in tensors.values()),
            "count": len(tensors),
            "largest": [largest.name, list(largest.shape), largest.nbytes],
        }


def _dequantized_layers(path: str):
    """(weight name, float32 dequantized weight) for every fp8 weight with a scale, in either tool's layout."""
    import torch

    from quant_core.io import SafetensorsReader

    with SafetensorsReader(path) as reader:
        for name, info in reader.tensors.items():
            if not name.endswith(".weight") or info.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                continue
            base = name[: -len(".weight")]
            scale_key = next(k for k in (f"{base}.weight_scale", f"{base}.scale_weight") if k in reader.tensors)
            rows = min(QUALITY_ROWS, info.shape[0])
            yield name, reader.read(name)[:rows].float() * reader.read(scale_key).float()


def helper_quality(source: str, output: str) -> dict:
    """Mean and worst relative output error over the quantized layers of ``output`` (see the module doc)."""
    import torch

    from quant_core.io import SafetensorsReader

    errors = {}
    with SafetensorsReader(source) as reader:
        for name, dequantized in _dequantized_layers(output):
            weight = reader.read(name)[: dequantized.shape[0]].float()
            generator = torch.Generator().manual_seed(QUALITY_SEED + weight.shape[1])
            inputs = torch.randn(QUALITY_INPUTS, weight.shape[1], generator=generator)
            reference = torch.linalg.vector_norm(inputs @ weight.T)
            errors[name] = float(torch.linalg.vector_norm(inputs @ (dequantized - weight).T) / reference)
    worst = max(errors, key=errors.get)
    return {"layers": len(errors), "mean": sum(errors.values()) / len(errors), "worst": errors[worst], "at": worst}


def _matmul_rate(
    left: tuple[int, int], right: tuple[int, int], seconds: float = 1.0, clock: Callable[[], float] = time.perf_counter
) -> float:
    """FLOP/s of ``torch.matmul`` for these float32 shapes: the fastest of repeated runs over ``seconds``
    of ``clock`` (``time.thread_time`` on one thread: FLOP per CPU-second, which other processes on
    the machine disturb far less than wall time)."""
    import torch

    a, b = torch.randn(*left), torch.randn(*right)
    a @ b  # warm-up
    best, spent = float("inf"), 0.0
    while spent < seconds:
        started = clock()
        a @ b
        took = clock() - started
        best, spent = min(best, took), spent + took
    return 2 * left[0] * left[1] * right[1] / best


def _matmul_cpu_rate(left: tuple[int, int], right: tuple[int, int]) -> float:
    """FLOP per CPU-second of ``torch.matmul`` on one thread, as the optimiser runs each block."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _matmul_rate(left, right, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)


def helper_optimiser(path: str, iterations: str, calib: str) -> dict:
    """Our learned rounding of every 2-D weight in ``path``: time, useful matmul FLOPs, and matmul rates."""
    import torch

    from quant_core import fp8, rounding
    from quant_core.calibration import RandomCalibration
    from quant_core.io import SafetensorsReader
    from quant_core.options import LearnedOptions

    options = LearnedOptions(num_iter=int(iterations), calib_samples=int(calib))
    samples, seconds, cpu, flops, work, weights, shapes = int(calib), 0.0, 0.0, 0, 0, 0, []
    with SafetensorsReader(path) as reader:
        for name, info in reader.tensors.items():
            if len(info.shape) != 2:
                continue
            weight = reader.read(name)
            scale = fp8.scale_for(fp8.absmax(weight), torch.float8_e4m3fn)
            started, cpu_started = time.perf_counter(), time.process_time()
            result = rounding.round_learned(name, weight, scale, torch.float8_e4m3fn, RandomCalibration(), options)
            seconds += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
            # 4 S per weight-iteration (forward + gradient), 2 S per weight for the RTN loss and 3 held-out products
            flops += 4 * samples * result.work + 8 * samples * weight.numel()
            work, weights = work + result.work, weights + weight.numel()
            shapes.append(list(info.shape))
    columns = shapes[0][1]
    rows = max(1, rounding._LEARNED_BLOCK_ELEMENTS // columns)  # the optimiser's block
    forward = _matmul_rate((samples, columns), (columns, rows))
    gradient = _matmul_rate((rows, samples), (samples, columns))
    forward_cpu = _matmul_cpu_rate((samples, columns), (columns, rows))
    gradient_cpu = _matmul_cpu_rate((rows, samples), (samples, columns))
    return {
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "flops": flops,
        "work": work,
        "weights": weights,
        "shapes": shapes,
        "block": [rows, columns],
        "rate_shapes": 2 / (1 / forward + 1 / gradient),  # the two products alternate, equal FLOPs
        "cpu_rate_shapes": 2 / (1 / forward_cpu + 1 / gradient_cpu),
        "rate_square": _matmul_rate((2048, 2048), (2048, 2048)),
    }


def helper_stages(source: str, output: str) -> dict:
    """One round-to-nearest conversion in this process, its time split by stage.

    Each stage's calls are wrapped to sum their wall time and the CPU time of the thread that made
    them (reads and the bit-pattern counts inside them on the reader thread, rounding on the
    compute thread, writes on the calling thread), so the figures say which thread bounds the run.
    """
    started = time.perf_counter()
    import torch  # noqa: F401 - timed: the start-up every run pays

    imported_torch = time.perf_counter() - started
    from quant_core import atomic, convert, io, rounding
    from quant_core.options import ConvertOptions

    imported = time.perf_counter() - started
    labels = {
        "plan": "plan (header, policy)",
        "read": "read (preadv, counts included)",
        "count": "  count bit patterns (in read)",
        "absmax": "absmax (tensors not counted)",
        "round": "round to fp8 (table lookup)",
        "write": "write (pwrite + writeback)",
        "fsync": "fsync",
    }
    stages: dict[str, list[float]] = {label: [0, 0.0, 0.0] for label in labels.values()}

    def timed(owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                entry = stages[labels[label]]
                entry[0] += 1
                entry[1] += time.perf_counter() - wall
                entry[2] += time.thread_time() - cpu

        setattr(owner, name, wrapper)

    timed(convert, "plan_conversion", "plan")
    timed(io.SafetensorsReader, "read", "read")
    timed(rounding.PatternCounts, "add", "count")
    timed(convert.fp8, "absmax", "absmax")
    timed(convert.Rounder, "round", "round")
    timed(io.SafetensorsWriter, "write", "write")
    timed(atomic.os, "fsync", "fsync")
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    convert.convert_file(source, output, ConvertOptions(rounding="nearest", overwrite=True))
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    Path(output).unlink()
    return {
        "import_torch": imported_torch,
        "import_quant_core": imported - imported_torch,
        "convert": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "stages": stages,
    }


def helper_gptq_phases(source: str, calibration: str) -> dict:
    """Where calibrated rounding's time goes: for each weight shape the conversion rounds with GPTQ,
    one weight rounded in process (one thread, as in the conversion), its phases timed through the
    progress callback, times the number of weights of that shape. CPU seconds of that thread: on a
    shared machine they count the work, not the waits for a core. As in the conversion, a buffer
    pool lends the rounding its memory, and each shape is rounded once untimed first: a model
    repeats its shapes, so the pool's buffers are already faulted in for all but the first."""
    import torch

    from quant_core import fp8
    from quant_core.convert import ConvertOptions, plan_conversion
    from quant_core.gptq import round_gptq
    from quant_core.io import BufferPool, SafetensorsReader

    totals = {"gptq": 0.0, "polish": 0.0, "check": 0.0}
    shapes: dict[tuple[int, ...], list[str]] = {}
    with SafetensorsReader(source) as reader, plan_conversion(reader, ConvertOptions(calibration=calibration)) as plan:
        for name, (quantized, _) in plan.decisions.items():
            if quantized and plan.statistics.key(name) is not None:
                shapes.setdefault(tuple(reader.tensors[name].shape), []).append(name)
        rows = []
        for shape, names in sorted(shapes.items()):
            weight = reader.read(names[0])
            stats = plan.statistics.get(names[0], shape[1])
            scale = fp8.scale_for(fp8.absmax(weight), plan.dtype)
            marks: dict[str, float] = {}

            def step(done: int, total: int, columns: int = shape[1], marks: dict = marks) -> None:
                if done >= columns:
                    marks.setdefault("polish", time.thread_time())
                if done >= total:
                    marks.setdefault("check", time.thread_time())

            pool = BufferPool()
            round_gptq(weight, scale, plan.dtype, stats, pool=pool)
            started = time.thread_time()
            round_gptq(weight, scale, plan.dtype, stats, step=step, pool=pool)
            ended = time.thread_time()
            phases = {
                "gptq": marks["polish"] - started,
                "polish": marks["check"] - marks["polish"],
                "check": ended - marks["check"],
            }
            for phase, seconds in phases.items():
                totals[phase] += seconds * len(names)
            rows.append([list(shape), len(names), phases])
    return {"totals": totals, "shapes": rows, "threads": torch.get_num_threads()}


HELPERS = {
    "generate": helper_generate,
    "subset": helper_subset,
    "describe": helper_describe,
    "quality": helper_quality,
    "optimiser": helper_optimiser,
    "stages": helper_stages,
    "gptq-phases": helper_gptq_phases,
}


# --- the parent: measurement without torch --------------------------------------------------------


def run_child(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> tuple[float, int, int, str]:
    """Run ``command``; returns (wall seconds, peak RSS bytes of that process, exit code, its output)."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    log.unlink()
    return wall, usage.ru_maxrss * 1024, proc.returncode, text  # ru_maxrss is in KiB on Linux


def helper(workdir: Path, name: str, *args: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--helper", name, *args]
    _, _, code, text = run_child(command, dict(os.environ), workdir / f"log_helper_{name}.txt")
    if code != 0:
        raise SystemExit(f"helper {name} failed:\n{text}")
    return json.loads(text.strip().splitlines()[-1])


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds all processes on the machine have used, CPU seconds this process and its children used)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    machine = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        ours += usage.ru_utime + usage.ru_stime
    return machine, ours


def read_through(path: Path) -> float:
    """Read the whole file once (warms the page cache) with a small buffer; returns seconds."""
    started = time.perf_counter()
    buffer = bytearray(2**20)
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buffer):
            pass
    return time.perf_counter() - started


def copy_once(source: Path, workdir: Path, limit: int) -> float:
    """Seconds to copy ``source`` to a new file and fsync it; the copy is deleted afterwards.

    Only the first ``limit`` bytes when that is positive and the file is larger (to spare disk
    space); the time is then scaled up to the whole file.
    """
    target = workdir / "copy_baseline.tmp"
    target.unlink(missing_ok=True)
    size = source.stat().st_size
    part = min(size, limit) if limit > 0 else size
    started = time.perf_counter()
    with open(source, "rb") as src, open(target, "wb") as dst:
        copied = 0
        while copied < part:
            copied += os.sendfile(dst.fileno(), src.fileno(), copied, part - copied)
        os.fsync(dst.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds * size / copied


def output_path(workdir: Path, config: Config, source: Path) -> Path:
    return workdir / f"out_{config.name}_{source.stem}.safetensors"


def run_once(config: Config, python: str, source: Path, workdir: Path, result: Result, label: str) -> None:
    """One child run of ``config``; folds its time (fastest) and peak RSS (largest) into ``result``."""
    output = output_path(workdir, config, source)
    output.unlink(missing_ok=True)  # the peer has no --overwrite
    command = config.command(python, source.resolve(), output.resolve())  # the peer runs in a folder of its own
    shown = " ".join([*(f"{k}={v}" for k, v in config.env.items()), shlex.join(command)])
    print(f"running {config.name} ({label}): {shown}", flush=True)
    log = workdir / f"log_{config.name}.txt"
    # the peer keeps a calibration cache (ctq_calib_*) in its working folder: one of its own per run,
    # so that removing it never touches another run's
    with tempfile.TemporaryDirectory(prefix="peer_", dir=workdir) as scratch:
        cwd = Path(scratch) if config.peer else REPO
        wall, rss, code, text = run_child(command, {**os.environ, **config.env}, log, cwd)
    print(f"  {wall:.1f} s, peak RSS {rss / MB:.0f} MB, exit {code}", flush=True)
    if code != 0 or not output.exists():
        result.returncode = code or 1
        result.error = text.strip().splitlines()[-1] if text.strip() else f"exit {code}"
        print(text[-4000:], flush=True)
        return
    result.wall = min(result.wall, wall)
    result.rss = max(result.rss, rss)
    reported = re.search(r"^time\s+([0-9.]+) s", text, re.MULTILINE)  # the summary, printed even with --quiet
    if reported:
        result.convert = min(result.convert, float(reported.group(1)))


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        numeric = [bool(re.fullmatch(r"[-+0-9.,x%<≤ ]+|FAILED|-", c)) for c in cells]
        cells = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric, strict=True)]
        return " | ".join(cells).rstrip()

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


@dataclass
class SizeRun:
    """One generated checkpoint and what was measured on it."""

    source: Path
    made: dict
    info: dict
    copies: list[float] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    phases: dict | None = None  # where calibrated rounding's time goes (helper_gptq_phases)

    @property
    def copy_s(self) -> float:
        return min(self.copies)

    @property
    def bound(self) -> int:
        return 2 * self.info["largest"][2] + RSS_FIXED


def measure(
    configs: list[Config],
    python_of: dict[str, str],
    source: Path,
    workdir: Path,
    repeat: int,
    run: SizeRun | None,
    copy_limit: int = 0,
) -> dict[str, Result]:
    """Interleaved rounds (the copy baseline when ``run`` is given, then every config once), repeated."""
    results = {c.name: Result(c) for c in configs}
    for round_ in range(repeat):
        if run is not None:
            run.copies.append(copy_once(source, workdir, copy_limit))
            print(f"copy (read + write + fsync), round {round_ + 1}/{repeat}: {run.copies[-1]:.2f} s", flush=True)
        for config in configs:
            if results[config.name].returncode == 0:
                label = f"{source.name}, round {round_ + 1}/{repeat}"
                run_once(config, python_of[config.name], source, workdir, results[config.name], label)
    return results


def score(results: dict[str, Result], source: Path, workdir: Path, keep: bool, enabled: bool = True) -> None:
    """The quality helper on each successful output; outputs are deleted afterwards unless ``keep``."""
    for result in results.values():
        output = output_path(workdir, result.config, source)
        if enabled and result.returncode == 0 and output.exists():
            print(f"scoring {output.name} ...", flush=True)
            result.quality = helper(workdir, "quality", str(source), str(output))
        if not keep:
            output.unlink(missing_ok=True)


def size_rows(runs: list[SizeRun]) -> list[list[str]]:
    rows = []
    for run in runs:
        file_mb = run.source.stat().st_size / MB
        for r in run.results.values():
            head = [f"{file_mb / 1000:.2f}", r.config.name]
            if r.returncode != 0:
                rows.append([*head, "FAILED", "", "", "", "", "", "", "", r.error[:50]])
                continue
            quality = f"{r.quality['mean']:.4%}" if r.quality else "-"
            within = "yes" if r.rss <= run.bound else "NO"
            rss = [f"{r.rss / MB:.0f}", f"{run.bound / MB:.0f}", within]
            speed = [f"{r.wall:.1f}", f"{file_mb / r.wall:.0f}", f"{r.wall / run.copy_s:.1f}"]
            if r.convert < float("inf"):
                speed += [f"{r.convert:.1f}", f"{r.convert / run.copy_s:.1f}"]
            else:
                speed += ["-", "-"]
            rows.append([*head, *speed, *rss, quality])
    return rows


def ratio(ours: float, theirs: float) -> str:
    return f"{theirs / ours:.1f}x" if ours else "-"


def peer_rows(pairs: list[tuple[str, Result | None, Result | None]]) -> list[list[str]]:
    rows = []
    for label, ours, theirs in pairs:
        if ours is None or theirs is None or ours.returncode or theirs.returncode:
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", "-"])
            continue
        errors = [f"{r.quality['mean']:.4%} ({r.quality['layers']})" if r.quality else "-" for r in (ours, theirs)]
        times = [f"{ours.wall:.1f}", f"{theirs.wall:.1f}", ratio(ours.wall, theirs.wall)]
        rss = [f"{ours.rss / MB:.0f}", f"{theirs.rss / MB:.0f}", ratio(ours.rss, theirs.rss)]
        rows.append([label, *times, *rss, *errors])
    return rows


def print_learned(results: dict[str, Result], counts: list[int], subset: str) -> None:
    """The learned table: ours against the peer at each iteration count, on the same subset file."""
    rows = []
    for count in counts:
        ours, theirs = results.get(f"learned-matched@{count}"), results.get(f"peer-learned@{count}")
        row = [str(count)]
        for result in (ours, theirs):
            ok = result is not None and not result.returncode
            row.append(f"{result.wall:.1f}" if ok else "-")
        both = all(r is not None and not r.returncode for r in (ours, theirs))
        row.append(ratio(ours.wall, theirs.wall) if both else "-")
        row.append(f"{ours.convert:.1f}" if ours is not None and ours.convert < float("inf") else "-")
        for result in (ours, theirs):
            quality = result.quality if result is not None else None
            row.append(f"{quality['mean']:.4%}" if quality else "-")
        rows.append(row)
    header = ["iterations", "ours s", "peer s", "faster", "ours convert s", "ours err", "peer err"]
    print(f"learned rounding, ours vs convert-to-quant, subset {subset!r} (the same file for both)")
    print(table(rows, header))
    print("faster = peer wall / ours wall (start-up included); err = mean relative output error on held-out inputs")
    for name in sorted(results):
        print(f"  {name}: {results[name].config.settings()}")


def print_optimiser(report: dict, iterations: int, peer: Result | None) -> None:
    achieved = report["flops"] / report["seconds"]
    matmul_s = report["flops"] / report["rate_shapes"]
    shapes = ", ".join("x".join(map(str, s)) for s in report["shapes"])
    print(f"learned optimiser alone ({shapes}; blocks of {report['block'][0]} rows; {report['threads']} torch threads)")
    print(f"  time {report['seconds']:.1f} s for {report['work'] / 1e6:.0f} M weight-iterations")
    print(f"  useful matmul work {report['flops'] / 1e9:.1f} GFLOP -> {achieved / 1e9:.1f} GFLOP/s achieved")
    print(f"  torch.matmul here and now: {report['rate_shapes'] / 1e9:.1f} GFLOP/s at the optimiser's shapes, ", end="")
    print(f"{report['rate_square'] / 1e9:.1f} GFLOP/s at 2048^3")
    print(
        f"  matrix work is {matmul_s:.1f} s of the {report['seconds']:.1f} s ({matmul_s / report['seconds']:.0%}): "
        f"achieved / matmul rate at these shapes = {achieved / report['rate_shapes']:.0%}; the rest is element-wise"
    )
    cpu_achieved = report["flops"] / report["cpu_seconds"]
    print(
        f"  in CPU time (what a busy machine disturbs least): {report['cpu_seconds']:.1f} CPU-s -> "
        f"{cpu_achieved / 1e9:.1f} GFLOP per CPU-second; torch.matmul on one thread at these shapes "
        f"{report['cpu_rate_shapes'] / 1e9:.1f}: {cpu_achieved / report['cpu_rate_shapes']:.0%} of the matmul rate"
    )
    per_iteration = report["seconds"] / iterations
    print(f"  at our default {OURS_DEFAULT_ITER} iterations, no early stop: ~{per_iteration * OURS_DEFAULT_ITER:.0f} s")
    if peer is not None and not peer.returncode:
        print(
            f"  peer, same tensors, {iterations} iterations: {peer.wall:.0f} s end to end; at its default "
            f"{PEER_DEFAULT_ITER} iterations ~{peer.wall / iterations * PEER_DEFAULT_ITER / 60:.0f} min "
            f"(linear in iterations; its early stop needs a 1000-iteration stall)"
        )


# --- round-to-nearest against an fsync'd copy (``--rtn-copy``; issue 15 target 3) -----------------

RTN_COPY_TARGET = 1.2  # round-to-nearest's whole command, start-up included, at most this x the copy


def dd_command(source: Path, target: Path, limit: int, direct: bool = False) -> list[str]:
    """``dd conv=fsync`` of ``source`` in 16 MiB blocks; only the first ``limit`` bytes (whole blocks) if positive.
    ``direct``: both sides around the page cache, what the disk itself can do."""
    block = 16 * 2**20
    count = [f"count={-(-limit // block)}"] if 0 < limit < source.stat().st_size else []
    flags = ["iflag=direct", "oflag=direct"] if direct else []
    return ["dd", f"if={source}", f"of={target}", f"bs={block}", *count, *flags, "conv=fsync", "status=none"]


def dd_copy(source: Path, workdir: Path, limit: int, direct: bool = False) -> float:
    """Seconds ``dd conv=fsync`` takes to copy ``source`` (scaled up to the whole file when only
    ``limit`` bytes were copied); the copy is deleted afterwards."""
    target = workdir / "copy_baseline.tmp"
    target.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(dd_command(source, target, limit, direct), check=True)
    seconds = time.perf_counter() - started
    copied = target.stat().st_size
    target.unlink()
    return seconds * source.stat().st_size / copied


@dataclass
class RtnCopy:
    """Interleaved rounds on one checkpoint: the copy, the round-to-nearest command, the start-up alone."""

    source: Path
    copies: list[float] = field(default_factory=list)
    direct_copies: list[float] = field(default_factory=list)  # the disk's own speed
    walls: list[float] = field(default_factory=list)
    converts: list[float] = field(default_factory=list)  # the conversion's own time (its summary)
    torch_imports: list[float] = field(default_factory=list)
    rss: int = 0
    stages: dict = field(default_factory=dict)


def rtn_command(source: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "quant_core", "--input", str(source), "--output", str(output), "--overwrite"] + [
        "--quiet",
        "--simple",
    ]


def rtn_output(workdir: Path, source: Path) -> Path:
    return workdir / f"out_rtn-copy_{source.stem}.safetensors"


def measure_rtn_copy(source: Path, workdir: Path, repeat: int, limit: int) -> RtnCopy:
    """``repeat`` rounds of: the copy, the round-to-nearest command, ``import torch`` alone; then
    one conversion timed by stage (``helper_stages``)."""
    run = RtnCopy(source)
    output = rtn_output(workdir, source)
    for round_ in range(repeat):
        run.copies.append(dd_copy(source, workdir, limit))
        run.direct_copies.append(dd_copy(source, workdir, limit, direct=True))
        wall, rss, code, text = run_child(rtn_command(source, output), dict(os.environ), workdir / "log_rtn.txt")
        if code != 0:
            raise SystemExit(f"round-to-nearest failed:\n{text}")
        output.unlink()
        run.walls.append(wall)
        run.rss = max(run.rss, rss)
        run.converts.append(float(re.search(r"^time\s+([0-9.]+) s", text, re.MULTILINE).group(1)))
        floor = run_child([sys.executable, "-c", "import torch"], dict(os.environ), workdir / "log_torch.txt")
        run.torch_imports.append(floor[0])
        print(
            f"round {round_ + 1}/{repeat}, {source.name}: copy {run.copies[-1]:.2f} s (direct "
            f"{run.direct_copies[-1]:.2f} s), round-to-nearest "
            f"{wall:.2f} s (conversion {run.converts[-1]:.2f} s), import torch {floor[0]:.2f} s",
            flush=True,
        )
    run.stages = helper(workdir, "stages", str(source), str(output))
    return run


def print_rtn_copy(runs: list[RtnCopy], workdir: Path, limit: int, load: str) -> None:
    """The table of ``--rtn-copy``, the commands it timed, and where each conversion's time went."""
    rows = []
    for run in runs:
        copy, wall, conversion, imported = min(run.copies), min(run.walls), min(run.converts), min(run.torch_imports)
        rows.append(
            [
                f"{run.source.stat().st_size / GB:.2f}",
                f"{copy:.2f}",
                f"{wall:.2f}",
                f"{wall / copy:.2f}",
                "yes" if wall <= RTN_COPY_TARGET * copy else "NO",
                f"{imported:.2f}",
                f"{imported / copy:.2f}",
                f"{wall - conversion:.2f}",
                f"{conversion:.2f}",
                f"{conversion / copy:.2f}",
                f"{run.rss / MB:.0f}",
                f"{min(run.direct_copies):.2f}",
            ]
        )
    header = ["GB", "copy s", "RTN s", "x copy", f"<= {RTN_COPY_TARGET}x", "import torch s", "x copy"]
    print(table(rows, [*header, "start+exit s", "conversion s", "x copy", "peak RSS MB", "direct copy s"]))
    print(f"load: {load}")
    print("x copy = wall time / the copy's, fastest of the rounds each; start+exit = RTN wall - its conversion time")
    example = runs[0].source
    copy = workdir / "copy_baseline.tmp"
    print(f"  copy: {shlex.join(dd_command(example, copy, limit))}")
    print(f"  direct copy (the disk alone): {shlex.join(dd_command(example, copy, limit, direct=True))}")
    print(f"  RTN:  {shlex.join(rtn_command(example, rtn_output(workdir, example)))}")
    print("  import torch: " + shlex.join([sys.executable, "-c", "import torch"]))
    for run in runs:
        stages = run.stages
        print(
            f"where the time goes, {run.source.name} (one conversion in process): import torch "
            f"{stages['import_torch']:.2f} s + quant_core {stages['import_quant_core']:.2f} s; convert_file "
            f"{stages['convert']:.2f} s wall, {stages['user']:.2f} s user + {stages['sys']:.2f} s system CPU"
        )
        for label, (calls, wall, cpu) in stages["stages"].items():
            print(f"  {label:32s} {calls:5d} calls  {wall:6.2f} s wall  {cpu:6.2f} s CPU of its thread")


def rtn_copy_main(args: argparse.Namespace) -> int:
    """``--rtn-copy``: round-to-nearest's whole command against ``dd conv=fsync`` of the same file,
    at every ``--size-gb``, in interleaved rounds, with the machine's load."""
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    limit = int(args.copy_gb * GB)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    busy_before, started = busy_seconds(), time.perf_counter()
    runs = []
    for size in (float(s) for s in args.size_gb.split(",")):
        made = helper(workdir, "generate", str(workdir), str(size))
        source = Path(made["path"])
        print(f"{'reused' if made['cached'] else 'made'} {source.name}", flush=True)
        if source.stat().st_size < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2:  # it can stay cached
            print(f"pre-reading it: {read_through(source):.1f} s", flush=True)
        runs.append(measure_rtn_copy(source, workdir, max(1, args.repeat), limit))
    busy_after, elapsed = busy_seconds(), time.perf_counter() - started
    others = max(0.0, (busy_after[0] - busy_before[0]) - (busy_after[1] - busy_before[1]))
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    load = (
        f"other processes used {others:.0f} CPU-s in {elapsed:.0f} s ({others / elapsed / (os.cpu_count() or 1):.0%} "
        f"of {os.cpu_count()} CPUs); load average {' '.join(load_before)} before, {' '.join(load_after)} after"
    )
    print()
    print_rtn_copy(runs, workdir, limit, load)
    return 0


def print_phases(run: SizeRun) -> None:
    """What dominates a calibrated conversion: its rounding's phases against its wall time."""
    totals = run.phases["totals"]
    rounding = sum(totals.values())
    calibrated = run.results.get("calibrated")
    print(
        f"calibrated rounding of {run.source.name}, CPU s on one thread (one weight per shape, times the "
        f"weights of that shape): GPTQ's column loop {totals['gptq']:.0f}, polish {totals['polish']:.0f}, "
        f"held-out check {totals['check']:.0f}; sum {rounding:.0f} s"
    )
    if calibrated is not None and calibrated.convert < float("inf"):
        print(
            f"  the conversion took {calibrated.convert:.0f} s (its own time), the copy {run.copy_s:.0f} s: "
            f"rounding is {rounding / calibrated.convert:.0%} of it, reading and writing overlap with it"
        )
    for shape, count, phases in run.phases["shapes"]:
        per = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        print(f"  {shape[0]}x{shape[1]} x{count}: {per} s each")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--helper"]:  # internal: runs in a child process
        print(json.dumps(HELPERS[argv[1]](*argv[2:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", default="2", help="checkpoint sizes to generate, GB, comma-separated (default 2)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out", help="cache and output folder")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated subset (default {','.join(DEFAULT_CONFIGS)}; opt-in: simple-parallel, calibrated)",
    )
    parser.add_argument(
        "--copy-gb", type=float, default=0, help="copy at most this many GB for the baseline, time scaled up (0: all)"
    )
    parser.add_argument("--no-score", action="store_true", help="skip scoring the whole-checkpoint outputs")
    parser.add_argument("--keep", action="store_true", help="keep the converted files in --workdir")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (fastest time is kept)")
    parser.add_argument("--learned-iter", type=int, default=20, help="--num_iter of both learned configs (default 20)")
    parser.add_argument(
        "--learned-iters",
        default="",
        help="comma-separated --num_iter values: the learned comparison runs once per value, e.g. 10,40,200 "
        "(default: --learned-iter)",
    )
    parser.add_argument(
        "--subset",
        default=r"double_blocks\.0\.img_attn\.proj\.",
        help=r"regex (matched at the key start) of the tensors copied into the subset file that the learned "
        r"comparison and the optimiser run on (default 'double_blocks\.0\.img_attn\.proj\.': one 3072x3072 weight)",
    )
    parser.add_argument(
        "--peer-python",
        default=os.environ.get("CONVERT_TO_QUANT_PYTHON"),
        help="a Python with convert-to-quant installed (default: $CONVERT_TO_QUANT_PYTHON); peer configs are "
        "skipped without it",
    )
    parser.add_argument(
        "--rtn-copy",
        action="store_true",
        help="only round-to-nearest's whole command against `dd conv=fsync` of the same file, at each --size-gb",
    )
    args = parser.parse_args(argv)
    if args.rtn_copy:
        return rtn_copy_main(args)

    configs = build_configs(args)
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(configs)}")
    re.compile(args.subset)
    if any(configs[c].peer for c in chosen) and not args.peer_python:
        print("peer: skipped (no --peer-python or CONVERT_TO_QUANT_PYTHON: a Python with convert-to-quant installed)")
        chosen = [c for c in chosen if not configs[c].peer]
    python_of = {c: args.peer_python if configs[c].peer else sys.executable for c in configs}
    sizes = [float(s) for s in args.size_gb.split(",")]
    repeat = max(1, args.repeat)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    from quant_core.atomic import clear_stale_temp_files  # without torch, as this process must stay

    clear_stale_temp_files(workdir)  # the temp files interrupted runs left; a live run's (locked) are kept

    floor_cmd = [sys.executable, "-c", "import quant_core.cli"]
    startup, floor, _, _ = run_child(floor_cmd, dict(os.environ), workdir / "log_floor.txt")
    busy_before, started = busy_seconds(), time.perf_counter()
    full = [configs[c] for c in chosen if not configs[c].subset]
    runs = []
    for size in sizes:
        print(f"checkpoint of about {size} GB in {workdir} ...", flush=True)
        made = helper(workdir, "generate", str(workdir), str(size))
        source = Path(made["path"])
        print(f"  {'reused the cached' if made['cached'] else 'generated'} {source.name}", flush=True)
        run = SizeRun(source, made, helper(workdir, "describe", str(source)))
        if any(c.calibrated for c in full) and not calibration_path(source).exists():
            script = [sys.executable, str(REPO / "bench" / "synthetic_calibration.py"), str(source)]
            run_child([*script, str(calibration_path(source))], dict(os.environ), workdir / "log_calibration.txt")
        print(f"pre-reading the input: {read_through(source):.1f} s", flush=True)
        run.results = measure(full, python_of, source, workdir, repeat, run, int(args.copy_gb * GB))
        score(run.results, source, workdir, args.keep, not args.no_score)
        if any(c.calibrated for c in full):
            print("calibrated rounding by phase, one weight per shape ...", flush=True)
            run.phases = helper(workdir, "gptq-phases", str(source), str(calibration_path(source)))
        runs.append(run)

    subset_configs = [configs[c] for c in chosen if configs[c].subset and c != "optimiser"]
    subset_configs = learned_sweep(subset_configs, learned_counts(args))
    python_of.update({c.name: args.peer_python if c.peer else sys.executable for c in subset_configs})
    subset_results: dict[str, Result] = {}
    optimiser = None
    if subset_configs or "optimiser" in chosen:
        subset = workdir / "subset.safetensors"
        names = helper(workdir, "subset", str(runs[0].source), args.subset, str(subset))["names"]
        print(f"subset file: {', '.join(names)}", flush=True)
        subset_results = measure(subset_configs, python_of, subset, workdir, repeat, None)
        score(subset_results, subset, workdir, args.keep)
        if "optimiser" in chosen:
            print("optimiser alone ...", flush=True)
            optimiser = helper(workdir, "optimiser", str(subset), str(args.learned_iter), "96")

    busy_after, elapsed = busy_seconds(), time.perf_counter() - started
    others = max(0.0, (busy_after[0] - busy_before[0]) - (busy_after[1] - busy_before[1]))
    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print()
    for run in runs:
        largest_name, largest_shape, largest_bytes = run.info["largest"]
        print(
            f"input {run.source.name}: {run.source.stat().st_size / GB:.2f} GB, {run.info['params'] / 1e9:.2f} B "
            f"parameters, {run.info['count']} bf16 tensors; largest {largest_name} {largest_shape} "
            f"{largest_bytes / MB:.0f} MB; copy {run.copy_s:.2f} s = {run.source.stat().st_size / MB / run.copy_s:.0f} "
            f"MB/s (runs: {', '.join(f'{c:.2f}' for c in run.copies)})"
        )
    print(f"floors: `python -c 'import quant_core.cli'` (interpreter, torch) takes {startup:.1f} s and ", end="")
    print(f"peak RSS {floor / MB:.0f} MB; ", end="")
    print(f"of this benchmark process (a lower bound on every child's figure) {parent_rss / MB:.0f} MB")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; runs per config: {repeat}, fastest kept")
    print(
        f"other processes used {others:.0f} CPU-s while this ran ({elapsed:.0f} s, "
        f"{others / elapsed / (os.cpu_count() or 1):.0%} of the machine; ~0 means undisturbed figures)"
    )
    print()
    header = ["GB", "config", "wall s", "MB/s", "x copy", "convert s", "x copy", "peak RSS MB", "bound MB", "within"]
    print(table(size_rows(runs), [*header, "rel. out err"]))
    print(f"bound = 2 x largest tensor + {RSS_FIXED // MB} MB; x copy = wall / copy time of the same file")
    print("convert s = the conversion's own time (its summary), without starting Python and importing torch")
    for config in full:
        print(f"  {config.name}: {config.note}: {config.settings()}")
    for run in runs:
        if run.phases:
            print_phases(run)

    if args.peer_python and any(c.peer for c in full):
        print()
        pairs = [
            (f"RTN, {run.source.stat().st_size / GB:.1f} GB", run.results.get(ours), run.results.get(theirs))
            for run in runs
            for ours, theirs in [("rtn-matched", "peer-rtn")]
        ]
        header = ["ours vs convert-to-quant", "ours s", "peer s", "faster", "ours MB", "peer MB", "lower"]
        print(table(peer_rows(pairs), [*header, "ours err (layers)", "peer err (layers)"]))
        print("faster = peer time / ours; lower = peer peak RSS / ours; err = mean relative output error (held out)")
        for config in [configs[c] for c in ("rtn-matched", "peer-rtn")]:
            print(f"  {config.name}: {config.settings()}")
    if subset_results:
        print()
        print_learned(subset_results, learned_counts(args), args.subset)
    if optimiser:
        print()
        print_optimiser(optimiser, args.learned_iter, subset_results.get(f"peer-learned@{args.learned_iter}"))
    failed = [r.config.name for run in runs for r in run.results.values() if r.returncode]
    failed += [r.config.name for r in subset_results.values() if r.returncode]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the helpers import quant_core from this checkout
    sys.exit(main())
