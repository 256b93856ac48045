"""Benchmark: convert a generated Flux-shaped bf16 checkpoint (~2 GB) and report wall time and peak RSS.

Usage (from the repository root)::

    .venv/bin/python bench/bench_convert.py [--size-gb 2] [--workdir bench/out] [--configs simple,learned] [--keep]

What it does, in one run:

1. Generates (once; cached in ``--workdir``) a bf16 checkpoint with Flux-dev's widths (hidden 3072,
   context 4096, vec 768) and the numbers of double/single blocks that bring it near ``--size-gb``,
   streaming one tensor at a time (``quant_core.example.write_synthetic``).
2. Reads the input once so that every measurement below sees it in the page cache, then measures
   the baseline: copying the file once (read + write + fsync, as the converter fsyncs its output).
   Every configuration's time is reported as a multiple of that copy time.
3. Runs each configuration as its own child process, ``python -m quant_core --input … --output …
   --overwrite --quiet …``, and takes its wall time and its own peak RSS (``ru_maxrss`` from
   ``os.wait4``), so no configuration's memory leaks into another's figure.

On Linux a child's ``ru_maxrss`` is at least the *parent's* peak RSS at the time it was spawned
(``exec`` records the high-water mark of the address space it replaces, which a vfork child
borrows from its parent). So this process never imports torch and holds no large buffer: the
generation and the header analysis run in helper child processes, and the parent's own peak RSS is
printed as the floor under every figure.

Learned rounding on 2 CPU cores costs seconds per iteration for a 3072-wide weight, so the default
``learned`` configuration optimises only the largest shared-scale group (``single_blocks.0``:
``linear1`` + ``linear2``, the work item that sets peak memory) with a reduced ``--num_iter``; every
other tensor is excluded (kept in bf16). Its settings are printed in the table; ``--learned-iter``,
``--learned-calib`` and ``--learned-subset`` change them. Wall times are single measurements unless
``--repeat`` is given: then the baseline and all configurations run in interleaved rounds, and the
fastest time and the largest peak RSS of each are reported. The CPU time other processes used
during the measurements is printed: other work on the machine makes every figure slower.

Sizes: MB = 10^6 bytes, GB = 10^9 bytes. The memory target is peak RSS < 1 GB (10^9 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 10**6
GB = 10**9
RSS_LIMIT = 1 * GB
WIDTHS = {"hidden": 3072, "context": 4096, "vec": 768}  # Flux-dev's
DEFAULT_CONFIGS = ("simple", "simple-parallel", "learned")


@dataclass
class Config:
    name: str
    args: list[str]
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def settings(self) -> str:
        text = shlex.join(self.args)
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{env} {text}".strip() if env else text

    def excludes(self) -> list[str]:
        return [self.args[i + 1] for i, a in enumerate(self.args) if a == "--exclude"]


@dataclass
class Result:
    config: Config
    wall: float = float("inf")
    rss: int = 0  # bytes
    returncode: int = 0
    output_bytes: int = 0
    summary: str = ""
    error: str = ""


def build_configs(args: argparse.Namespace) -> dict[str, Config]:
    learned = ["--num_iter", str(args.learned_iter), "--calib_samples", str(args.learned_calib)]
    learned += ["--exclude", f"^(?!(?:{args.learned_subset}))"]
    parallel = ["--simple", "--parallel"]
    return {
        "simple": Config("simple", ["--simple"], "round-to-nearest, every eligible weight"),
        "simple-parallel": Config("simple-parallel", parallel, "RTN, read/compute/write overlapped"),
        "learned": Config("learned", learned, f"learned rounding of '{args.learned_subset}' only, rest kept bf16"),
        # Opt-in experiments on how --parallel behaves on a CPU (not run by default).
        "simple-omp1": Config("simple-omp1", ["--simple"], "as simple, one OpenMP thread", {"OMP_NUM_THREADS": "1"}),
        "simple-parallel-omp1": Config(
            "simple-parallel-omp1", parallel, "as simple-parallel, one OpenMP thread", {"OMP_NUM_THREADS": "1"}
        ),
        "simple-parallel-passive": Config(
            "simple-parallel-passive",
            parallel,
            "as simple-parallel, idle OpenMP threads sleep instead of spinning",
            {"OMP_WAIT_POLICY": "PASSIVE"},
        ),
    }


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


def helper_describe(path: str, excludes_json: str) -> dict:
    """Parameter count, largest tensor, largest work item, and quantized elements per exclude list."""
    from quant_core.convert import ConvertOptions, plan_conversion
    from quant_core.io import SafetensorsReader

    with SafetensorsReader(path) as reader:
        tensors = reader.tensors
        largest = max(tensors.values(), key=lambda t: t.nbytes)
        plan = plan_conversion(reader, ConvertOptions())
        item = max(plan.items, key=lambda names: sum(tensors[n].nbytes for n in names))
        quantized = {}
        for key, excludes in json.loads(excludes_json).items():
            try:
                decisions = plan_conversion(reader, ConvertOptions(exclude=excludes)).decisions
            except ValueError:  # nothing to quantize: the child run reports it
                decisions = {}
            quantized[key] = sum(tensors[n].numel for n, (q, _) in decisions.items() if q)
        return {
            "params": sum(t.numel for t in tensors.values()),
            "count": len(tensors),
            "largest": [largest.name, list(largest.shape), largest.nbytes],
            "item": [item, sum(tensors[n].nbytes for n in item)],
            "quantized": quantized,
        }


HELPERS = {"generate": helper_generate, "describe": helper_describe}


# --- the parent: measurement without torch --------------------------------------------------------


def run_child(command: list[str], env: dict[str, str], log: Path) -> tuple[float, int, int, str]:
    """Run ``command``; returns (wall seconds, peak RSS bytes of that process, exit code, its output)."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
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


def copy_once(source: Path, workdir: Path) -> float:
    """Seconds to copy ``source`` to a new file and fsync it; the copy is deleted afterwards."""
    target = workdir / "copy_baseline.tmp"
    target.unlink(missing_ok=True)
    started = time.perf_counter()
    shutil.copyfile(source, target)
    with open(target, "rb+") as file:
        os.fsync(file.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def run_once(config: Config, source: Path, workdir: Path, result: Result, label: str) -> None:
    """One child run of ``config``; folds its time (fastest) and peak RSS (largest) into ``result``."""
    output = workdir / f"out_{config.name}.safetensors"
    command = [sys.executable, "-m", "quant_core", "--input", str(source), "--output", str(output)]
    command += ["--overwrite", "--quiet", *config.args]
    shown = " ".join([*(f"{k}={v}" for k, v in config.env.items()), shlex.join(command)])
    print(f"running {config.name} ({label}): {shown}", flush=True)
    wall, rss, code, text = run_child(command, {**os.environ, **config.env}, workdir / f"log_{config.name}.txt")
    print(f"  {wall:.1f} s, peak RSS {rss / MB:.0f} MB, exit {code}", flush=True)
    if code != 0:
        result.returncode = code
        result.error = text.strip().splitlines()[-1] if text.strip() else f"exit {code}"
        print(text, flush=True)
        return
    result.wall = min(result.wall, wall)
    result.rss = max(result.rss, rss)
    result.summary = text.strip()
    result.output_bytes = output.stat().st_size


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return " | ".join(cells).rstrip()

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--helper"]:  # internal: runs in a child process
        print(json.dumps(HELPERS[argv[1]](*argv[2:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size to generate, GB (default 2)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out", help="cache and output folder")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated subset (default {','.join(DEFAULT_CONFIGS)}; opt-in: simple-omp1, "
        "simple-parallel-omp1, simple-parallel-passive)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the converted files in --workdir")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (fastest time is kept)")
    parser.add_argument("--learned-iter", type=int, default=10, help="--num_iter of the learned config (default 10)")
    parser.add_argument("--learned-calib", type=int, default=96, help="--calib_samples of the learned config")
    parser.add_argument(
        "--learned-subset",
        default=r"single_blocks\.0\.",
        help=r"regex (matched at the key start) of the weights the learned config quantizes; the rest are kept "
        r"(default 'single_blocks\.0\.': the largest shared-scale group)",
    )
    args = parser.parse_args(argv)

    configs = build_configs(args)
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(configs)}")
    re.compile(args.learned_subset)
    repeat = max(1, args.repeat)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for pattern in (".flux_h3072_*.tmp", ".out_*.tmp"):  # temporaries left by an interrupted earlier run
        for stale in workdir.glob(pattern):
            stale.unlink()

    print(f"checkpoint of about {args.size_gb} GB in {workdir} ...", flush=True)
    made = helper(workdir, "generate", str(workdir), str(args.size_gb))
    source = Path(made["path"])
    print(f"  {'reused the cached' if made['cached'] else 'generated'} {source.name}", end="")
    print("" if made["cached"] else f" in {made['seconds']:.1f} s", flush=True)
    excludes = {name: configs[name].excludes() for name in chosen}
    info = helper(workdir, "describe", str(source), json.dumps({"all": [], **excludes}))
    file_bytes = source.stat().st_size
    largest_name, largest_shape, largest_bytes = info["largest"]
    item_names, item_bytes = info["item"]

    print(f"pre-reading the input into the page cache: {read_through(source):.1f} s", flush=True)
    floor_cmd = [sys.executable, "-c", "import quant_core.cli"]
    _, floor, _, _ = run_child(floor_cmd, dict(os.environ), workdir / "log_floor.txt")
    busy_before, started = busy_seconds(), time.perf_counter()

    # Rounds: the baseline, then every config once, repeated; so a disturbance hits all rows alike.
    copies = []
    results = {name: Result(configs[name]) for name in chosen}
    for round_ in range(repeat):
        copies.append(copy_once(source, workdir))
        print(f"baseline copy (read + write + fsync), round {round_ + 1}/{repeat}: {copies[-1]:.2f} s", flush=True)
        for name, result in results.items():
            if result.returncode == 0:
                run_once(configs[name], source, workdir, result, f"round {round_ + 1}/{repeat}")
    copy_s = min(copies)
    if not args.keep:
        for name in chosen:
            (workdir / f"out_{name}.safetensors").unlink(missing_ok=True)
    busy_after, elapsed = busy_seconds(), time.perf_counter() - started
    others = (busy_after[0] - busy_before[0]) - (busy_after[1] - busy_before[1])
    results = list(results.values())
    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print()
    print(f"input      {source}")
    print(
        f"           {file_bytes / GB:.3f} GB, {info['params'] / 1e9:.3f} B parameters in {info['count']} bf16 tensors"
    )
    print(f"           Flux widths hidden 3072, context 4096, vec 768; depth {made['depth']}, ", end="")
    print(f"depth_single {made['depth_single']}")
    print(f"largest    tensor {largest_name} {largest_shape}: {largest_bytes / MB:.1f} MB")
    print(f"           work item (shared-scale group) {' + '.join(item_names)}: ", end="")
    print(f"{item_bytes / MB:.1f} MB bf16, {2 * item_bytes / MB:.1f} MB as float32")
    rate = file_bytes / MB / copy_s
    print(f"baseline   copy once (read + write + fsync, input in page cache): {copy_s:.2f} s = {rate:.0f} MB/s")
    print(f"floors     peak RSS of `python -c 'import quant_core.cli'` (interpreter + torch): {floor / MB:.0f} MB;")
    print(f"           of this benchmark process (a lower bound on every child's figure): {parent_rss / MB:.0f} MB")
    print(f"machine    {os.cpu_count()} CPUs, python {sys.version.split()[0]}; runs per config: {repeat}", end="")
    print(" (fastest kept)")
    print(
        f"           other processes used {max(0.0, others):.1f} CPU-s while this ran ({elapsed:.0f} s, "
        f"{max(0.0, others) / elapsed / (os.cpu_count() or 1):.0%} of the machine; ~0 means undisturbed figures)"
    )
    if repeat > 1:
        print(f"           baseline copies: {', '.join(f'{c:.2f}' for c in copies)} s")
    print()
    header = ["config", "settings", "wall s", "MB/s in", "x copy", "peak RSS MB", "RSS/largest", "RSS < 1 GB"]
    rows = []
    for r in results:
        if r.returncode != 0:
            rows.append([r.config.name, r.config.settings(), "FAILED", "", "", "", "", r.error[:60]])
            continue
        rows.append(
            [
                r.config.name,
                r.config.settings(),
                f"{r.wall:.1f}",
                f"{file_bytes / MB / r.wall:.0f}",
                f"{r.wall / copy_s:.1f}",
                f"{r.rss / MB:.0f}",
                f"{r.rss / largest_bytes:.1f}",
                "yes" if r.rss < RSS_LIMIT else "NO",
            ]
        )
    print(table(rows, header))
    print()
    print("x copy = wall / baseline copy time; RSS/largest = peak RSS / largest input tensor (bf16 bytes)")
    everything = info["quantized"]["all"]
    for r in results:
        if r.returncode != 0:
            continue
        counts = next((ln.split(None, 1)[1] for ln in r.summary.splitlines() if ln.startswith("tensors")), "?")
        line = f"{r.config.name}: {r.config.note}; {counts}; output {r.output_bytes / GB:.3f} GB"
        if r.config.name == "learned":
            weights = info["quantized"]["learned"]
            speed = weights * args.learned_iter / r.wall
            line += (
                f"; {weights / 1e6:.1f} M weights x {args.learned_iter} iterations in {r.wall:.1f} s "
                f"= {speed / 1e6:.2f} M weight-iterations/s (I/O included). Rough extrapolation to all "
                f"{everything / 1e6:.0f} M quantized weights at the default 200 iterations with no early stop: "
                f"{everything * 200 / speed / 3600:.1f} h"
            )
        print(line)
    failed = [r.config.name for r in results if r.returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the helpers import quant_core from this checkout
    sys.exit(main())
