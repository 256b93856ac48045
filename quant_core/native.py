"""Compiled column loops for GPTQ and its polish (``native.c``), built on first use with the
machine's C compiler and called through ``ctypes``; where none can be built, the torch code runs.

Why: a GPTQ or polish column is a handful of whole-row operations, and on the CPU their count, not
their arithmetic, is what a calibrated conversion's time was made of (docs/benchmarks.md). A C
loop takes a tile of outputs through a whole block of columns in registers instead. One plain C
file and no torch headers, so the build needs only a C compiler (about a second, once per
machine; no ninja, no Python headers) and the library is cached by a hash of its source, the
compiler and this CPU (it is built for the CPU it runs on).

``QUANT_CORE_NATIVE=0`` turns it off; CUDA tensors always take the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import fp8

SOURCE = Path(__file__).with_name("native.c")
SWITCH = "QUANT_CORE_NATIVE"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
_log = logging.getLogger("quant_core")


def usable(tensor: torch.Tensor) -> bool:
    """Whether the compiled loops can work on ``tensor`` (a CPU tensor, and a library built)."""
    return tensor.device.type == "cpu" and library() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (switched off, no compiler, or the build failed: said once in the log)."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        _log.info("no C compiler found (CC, cc, gcc, clang): GPTQ's column loops run in torch")
        return None
    try:
        return _declare(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.SubprocessError) as error:
        _log.warning("building the compiled GPTQ loops failed, they run in torch: %s", error)
        return None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU, compiled into the cache unless it is there.

    Compiled to a temporary name and renamed, so that a concurrent or interrupted build never
    leaves a half-written library under the final name.
    """
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *_FLAGS, _cpu()]).encode()).hexdigest()
    folder = _cache_folder()
    target = folder / f"native-{key[:24]}.so"
    if target.exists():
        return target
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".native-", suffix=".so")
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *_FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "fp8-scaled-learned"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:  # a read-only home: the temp folder still works
        folder = Path(tempfile.gettempdir()) / "fp8-scaled-learned"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where the OS lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.gptq_block.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer, real, ctypes.c_uint32]
    lib.gptq_block.argtypes += [ctypes.c_int32]
    lib.gptq_block.restype = None
    flag = ctypes.c_int32
    lib.polish_sweep.argtypes = [pointer, size, size, pointer, flag, *[pointer] * 5, *[flag] * 4]
    lib.polish_sweep.restype = None
    lib.polish_errors.argtypes = [pointer, pointer, size, flag, flag, flag]
    lib.polish_errors.restype = None
    lib.heldout_deltas.argtypes = [pointer, flag, size, real, pointer, pointer, flag, flag, flag, flag, real]
    lib.heldout_deltas.argtypes += [ctypes.c_uint32, flag]
    lib.heldout_deltas.restype = None
    lib.unpermute_columns.argtypes = [pointer, size, size, pointer, pointer]
    lib.unpermute_columns.restype = None
    lib.add_and_round.argtypes = [pointer, pointer, pointer, size]
    lib.add_and_round.restype = None
    return lib


def _address(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    if tensor.dtype != dtype or not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError(f"the compiled loops take contiguous CPU {dtype} tensors, not {tensor.dtype} {tensor.shape}")
    return tensor.data_ptr()


def gptq_block(
    block: torch.Tensor,
    relative: torch.Tensor,
    diagonal: torch.Tensor,
    values: torch.Tensor,
    errors: torch.Tensor,
    grid: fp8.GridRounding,
) -> None:
    """``gptq._BlockRounding`` in C: ``values`` and ``errors`` (divided by ``diagonal``) of ``block``."""
    rows, width = block.shape
    f32 = torch.float32
    library().gptq_block(
        _address(block, f32),
        rows,
        width,
        _address(relative, f32),
        _address(diagonal, f32),
        _address(values, f32),
        _address(errors, f32),
        grid.limit,
        grid.shift,
        grid.lowest,
    )


def polish_sweep(
    codes: torch.Tensor,
    base: torch.Tensor,
    residual: torch.Tensor | None,
    error: torch.Tensor,
    local: torch.Tensor,
    inverse: torch.Tensor,
    steps: torch.Tensor,
) -> None:
    """``gptq._Descent.sweep`` in C: ``codes`` moved, ``error`` and ``steps`` (float32 or bfloat16) written."""
    rows, width = codes.shape
    f32, bf16 = torch.float32, torch.bfloat16
    library().polish_sweep(
        _address(codes.view(torch.uint8), torch.uint8),
        rows,
        width,
        _address(base, base.dtype if base.dtype == bf16 else f32),
        base.dtype == bf16,
        None if residual is None else _address(residual, f32),
        _address(error, f32),
        _address(local, f32),
        _address(inverse, f32),
        _address(steps, steps.dtype if steps.dtype == bf16 else f32),
        steps.dtype == bf16,
        *_grid(codes.dtype),
    )


def polish_errors(codes: torch.Tensor, scaled: torch.Tensor) -> None:
    """``scaled`` becomes the values of the fp8 ``codes`` minus it (``gptq._polish``'s start)."""
    if codes.shape != scaled.shape:
        raise ValueError(f"shapes differ: {codes.shape}, {scaled.shape}")
    library().polish_errors(
        _address(codes.view(torch.uint8), torch.uint8),
        _address(scaled, torch.float32),
        scaled.numel(),
        *_grid(codes.dtype),
    )


def add_and_round(state: torch.Tensor, update: torch.Tensor, rounded: torch.Tensor) -> None:
    """``state += update; rounded.copy_(state)`` in one pass: float32 ``state``, bfloat16 ``update`` and ``rounded``."""
    bf16 = torch.bfloat16
    if update.shape != state.shape or rounded.shape != state.shape:
        raise ValueError(f"shapes differ: {state.shape}, {update.shape}, {rounded.shape}")
    library().add_and_round(
        _address(state, torch.float32), _address(update, bf16), _address(rounded, bf16), state.numel()
    )


def heldout_deltas(
    weight: torch.Tensor,
    scale: float,
    codes: torch.Tensor | None,
    out: torch.Tensor,
    dtype: torch.dtype,
    grid: fp8.GridRounding,
) -> None:
    """``gptq._Deltas`` in C: ``out`` = the ``dtype`` values (of ``codes``, else of ``weight``'s
    round-to-nearest by ``grid``) times ``scale`` minus ``weight``; bfloat16 or float32 each."""
    if (codes is not None and codes.shape != weight.shape) or out.shape != weight.shape:
        raise ValueError(f"shapes differ: {weight.shape}, {out.shape}")
    bf16, f32 = torch.bfloat16, torch.float32
    library().heldout_deltas(
        _address(weight, bf16 if weight.dtype == bf16 else f32),
        weight.dtype == bf16,
        weight.numel(),
        scale,
        None if codes is None else _address(codes.view(torch.uint8), torch.uint8),
        _address(out, bf16 if out.dtype == bf16 else f32),
        out.dtype == bf16,
        *_grid(dtype),
        grid.limit,
        grid.shift,
        grid.lowest,
    )


def unpermute_columns(rows: torch.Tensor, rank: torch.Tensor, out: torch.Tensor) -> None:
    """``out.copy_(rows[rank].T)`` for one-byte ``rows`` (one per weight column) and int64 ``rank``."""
    columns, width = rows.shape
    if rank.shape != (columns,) or out.shape != (width, columns) or out.dtype != rows.dtype:
        raise ValueError(f"shapes differ: {rows.shape}, {rank.shape}, {out.shape}")
    library().unpermute_columns(
        _address(rows.view(torch.uint8), torch.uint8),
        columns,
        width,
        _address(rank, torch.int64),
        _address(out.view(torch.uint8), torch.uint8),
    )


@functools.cache
def _grid(dtype: torch.dtype) -> tuple[int, int, int]:
    """What the C code needs of an fp8 format's grid (``struct fp8_grid``): its mantissa bits,
    ``127 - bias - mantissa`` (float32's exponent bias folded in), and its largest finite magnitude code."""
    info = torch.finfo(dtype)
    mantissa = round(-math.log2(info.eps))
    bias = 1 - round(math.log2(info.smallest_normal))
    top = int(torch.tensor(info.max).to(dtype).view(torch.uint8))
    return mantissa, 127 - bias - mantissa, top
