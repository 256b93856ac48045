"""Compiled column loops for GPTQ and its polish (``native.c``), built on first use with the
machine's C compiler and called through ``ctypes``; where none can be built, the torch code runs.

Why: a GPTQ or polish column is a handful of whole-row operations, and on the CPU their count, not
their arithmetic, is what a calibrated conversion's time was made of (docs/benchmarks.md). A C
loop takes a tile of outputs through a whole block of columns in registers instead. One plain C
file and no torch headers, so the build needs only a C compiler (about a second, once per
machine; no ninja, no Python headers) and the library is cached by a hash of its source, the
compiler and this CPU (it is built for the CPU it runs on).

Learned rounding's optimiser (``rounding._Workspace``) runs the element-wise part of each
iteration here too: one pass over a block instead of a dozen ATen passes (``learned_step``).

``QUANT_CORE_NATIVE=0`` turns it off; CUDA tensors always take the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
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
    lib.polish_sweep.argtypes = [pointer, pointer, size, size, *[pointer] * 8]
    lib.polish_sweep.restype = None
    lib.learned_soften.argtypes = [size, *[pointer] * 5, ctypes.c_int32]
    lib.learned_soften.restype = None
    lib.learned_step.argtypes = [size, pointer, ctypes.c_int32, *[pointer] * 7, ctypes.c_int32, ctypes.c_int32]
    lib.learned_step.argtypes += [real] * 6
    lib.learned_step.restype = ctypes.c_double
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
    gradient: torch.Tensor,
    local: torch.Tensor,
    inverse: torch.Tensor,
    steps: torch.Tensor,
    tables: NeighbourTables,
) -> None:
    """``gptq._Descent.sweep`` in C: ``steps`` for a block, ``codes`` moved by them."""
    rows, width = codes.shape
    f32 = torch.float32
    library().polish_sweep(
        _address(codes.view(torch.uint8), torch.uint8),
        _address(gradient, f32),
        rows,
        width,
        _address(local, f32),
        _address(inverse, f32),
        _address(steps, f32),
        *(_address(table, f32) for table in (tables.up, tables.down)),
        *(_address(table, torch.uint8) for table in (tables.up_code, tables.down_code, tables.same_code)),
    )


def learned_soften(
    logits: torch.Tensor, step: torch.Tensor, middle: torch.Tensor, sigmoid: torch.Tensor, delta: torch.Tensor
) -> None:
    """``rounding._Workspace.soften`` in C: ``sigmoid(logits)`` and the delta ``middle - u step / 2`` it gives."""
    f32 = torch.float32
    library().learned_soften(
        logits.numel(), *(_address(tensor, f32) for tensor in (logits, step, middle, sigmoid)), *_either(delta)
    )


def learned_step(
    product: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    delta: torch.Tensor,
    coefficient: float,
    regulariser: tuple[float, float] | None,
    adam: tuple[float, float, float],
) -> float:
    """The element-wise part of a learned-rounding iteration (``rounding._Workspace.update``) in C, in
    one pass: ``state = (step, middle, logits, exp_avg, exp_avg_sq, sigmoid)``, the last four updated
    in place, and the next ``delta``. ``regulariser``: its ``(log c, beta - 2)``, None in the warm-up;
    ``adam``: ``(lr / bias correction 1, sqrt(bias correction 2), eps)``. Returns the regulariser's
    sum of ``power * u``, from which the caller adds its loss."""
    if product.dtype == torch.bfloat16 and delta.dtype != torch.bfloat16:
        raise ValueError("a bfloat16 product comes with a bfloat16 delta (the C step has no loop for the mix)")
    log_coefficient, exponent = regulariser or (0.0, 0.0)
    return library().learned_step(
        product.numel(),
        *_either(product),
        *(_address(tensor, torch.float32) for tensor in state),
        *_either(delta),
        regulariser is not None,
        coefficient,
        log_coefficient,
        exponent,
        *adam,
    )


def _either(tensor: torch.Tensor) -> tuple[int, bool]:
    """The address of a bfloat16 or float32 tensor and whether it is bfloat16: the C loops take either."""
    sixteen = tensor.dtype == torch.bfloat16
    return _address(tensor, torch.bfloat16 if sixteen else torch.float32), sixteen


class NeighbourTables:
    """Per fp8 code: the steps to its grid neighbours above and below, and the codes of the values
    one step up, one step down and no step (``-0`` becomes ``+0``, as ``x + 0`` makes it)."""

    def __init__(self, value: torch.Tensor, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> None:
        self.up, self.down = up.float().cpu().contiguous(), down.float().cpu().contiguous()
        value = value.float().cpu()

        def codes(values: torch.Tensor) -> torch.Tensor:
            return values.add(0.0).to(dtype).view(torch.uint8).contiguous()

        self.up_code, self.down_code, self.same_code = codes(value + self.up), codes(value + self.down), codes(value)
