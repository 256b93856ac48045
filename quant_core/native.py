"""Compiled column loops for GPTQ and its polish (``native.c``), built on first use with the
machine's C compiler and called through ``ctypes``; where none can be built, the torch code runs.

Why: a GPTQ or polish column is a handful of whole-row operations, and on the CPU their count, not
their arithmetic, is what a calibrated conversion's time was made of (docs/benchmarks.md). A C
loop takes a tile of outputs through a whole block of columns in registers instead. One plain C
file and no torch headers, so the build needs only a C compiler (about a second, once per
machine; no ninja, no Python headers) and the library is cached by a hash of its source, the
compiler and this CPU (it is built for the CPU it runs on).

Learned rounding's optimiser (``rounding._Workspace``) runs the element-wise part of each
iteration here too: one pass over a block instead of a dozen ATen passes (``learned_step``); so do
the held-out check's operand (weights and errors) and the layout of a weight's columns in GPTQ's order and back.
Every wrapper checks shapes before the C code indexes memory by them.

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
_FLAGS = ["-O3", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
# For this CPU's vector units, loops aligned to cache lines, where the compiler knows the options (the
# column loops' speed otherwise depended on where the compiler placed them: gptq_block took 2.5x as
# long after one more argument); else without the alignment; else for the architecture's baseline.
_TUNINGS = (["-march=native", "-falign-loops=64"], ["-march=native"], [])
# A build takes about a second; one that hangs (a broken compiler wrapper) must not stall a
# conversion for long: past this, the torch loops run.
_WAIT = 60
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
    for tuning in _TUNINGS:
        try:
            return _declare(ctypes.CDLL(str(_build(compiler, tuning))))
        except (OSError, subprocess.SubprocessError) as error:
            failure = error
    _log.warning("building the compiled GPTQ loops failed, they run in torch: %s", failure)
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, tuning: list[str]) -> Path:
    """The shared library for this source, compiler and CPU, compiled into the cache unless it is there.

    Compiled to a temporary name and renamed, so that a concurrent or interrupted build never
    leaves a half-written library under the final name.
    """
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=_WAIT).stdout
    identity = [SOURCE.read_text(), compiler, version, *_FLAGS, *tuning, _cpu()]
    key = hashlib.sha256("\0".join(identity).encode()).hexdigest()
    folder = _cache_folder()
    target = folder / f"native-{key[:24]}.so"
    if target.exists():
        return target
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".native-", suffix=".so")
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *_FLAGS, *tuning, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=_WAIT
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cache_folder() -> Path:
    """The user's cache folder; where that cannot be made (a read-only home), a private temporary
    folder of this process's own: a shared one could hold a library someone else put there."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "fp8-scaled-learned"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return Path(tempfile.mkdtemp(prefix="fp8-scaled-learned-"))


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
    whole = ctypes.c_int32
    lib.gptq_block.argtypes = [pointer, pointer, whole, size, size, pointer, pointer, pointer, pointer, whole, whole]
    lib.gptq_block.argtypes += [real, ctypes.c_uint32, whole, whole, whole]
    lib.gptq_block.restype = None
    flag = ctypes.c_int32
    lib.polish_sweep.argtypes = [pointer, size, size, pointer, flag, *[pointer] * 5, *[flag] * 4, *[pointer] * 3]
    lib.polish_sweep.argtypes += [size, size]
    lib.polish_sweep.restype = None
    lib.scaled_columns.argtypes = [pointer, whole, size, size, pointer, real, pointer]
    lib.scaled_columns.restype = None
    lib.unpermute_rows.argtypes = [pointer, size, size, pointer, pointer]
    lib.unpermute_rows.restype = None
    lib.learned_soften.argtypes = [size, *[pointer] * 5, ctypes.c_int32]
    lib.learned_soften.restype = None
    lib.learned_step.argtypes = [size, pointer, ctypes.c_int32, *[pointer] * 7, ctypes.c_int32, ctypes.c_int32]
    lib.learned_step.argtypes += [real] * 6
    lib.learned_step.restype = ctypes.c_double
    lib.polish_errors.argtypes = [pointer, pointer, size, flag, flag, flag]
    lib.polish_errors.restype = None
    lib.heldout_operand.argtypes = [pointer, flag, size, real, pointer, flag, pointer, flag, flag, flag, flag, real]
    lib.heldout_operand.argtypes += [ctypes.c_uint32, flag]
    lib.heldout_operand.restype = None
    lib.add_and_round.argtypes = [pointer, pointer, pointer, size]
    lib.add_and_round.restype = None
    return lib


_MAX_BLOCK = 1024  # columns of a block: the C loops keep a tile of them on the stack (256 bytes each)


def _require(condition: bool, what: str) -> None:
    """Shapes checked before C indexes memory by them: a wrong one would write out of bounds."""
    if not condition:
        raise ValueError(f"the compiled loops were called with {what}")


def _address(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    if tensor.dtype != dtype or not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError(f"the compiled loops take contiguous CPU {dtype} tensors, not {tensor.dtype} {tensor.shape}")
    return tensor.data_ptr()


def gptq_block(
    work: torch.Tensor,
    minus: torch.Tensor | None,
    spread: torch.Tensor,
    diagonal: torch.Tensor,
    codes: torch.Tensor,
    errors: torch.Tensor,
    grid: fp8.GridRounding,
    polish_start: bool = False,
) -> None:
    """``gptq._BlockRounding`` in C: the fp8 ``codes`` of ``work - minus`` (``minus`` float32,
    bfloat16 or None) and its ``errors`` divided by ``diagonal`` (float32 or bfloat16);
    ``spread[j, i]`` is what of column ``i``'s error reaches column ``j`` (``gptq._Triangle``).
    ``polish_start``: ``work`` becomes the codes' values minus it (as ``polish_errors`` makes it),
    else it is not changed."""
    rows, width = work.shape
    _require(rows <= _MAX_BLOCK and (minus is None or minus.shape == work.shape), "a block of another shape")
    _require(spread.shape == (rows, rows) and diagonal.shape == (rows,), "a factor of another size")
    _require(codes.shape == work.shape and errors.shape == work.shape, "outputs of another shape")
    f32 = torch.float32
    library().gptq_block(
        _address(work, f32),
        *_either(minus),
        rows,
        width,
        _address(spread, f32),
        _address(diagonal, f32),
        _address(codes.view(torch.uint8), torch.uint8),
        *_either(errors),
        polish_start,
        grid.limit,
        grid.shift,
        grid.lowest,
        grid.mantissa,
        grid.lowest_exponent,
    )


def polish_sweep(
    codes: torch.Tensor,
    base: torch.Tensor,
    residual: torch.Tensor | None,
    error: torch.Tensor,
    local: torch.Tensor,
    inverse: torch.Tensor,
    steps: torch.Tensor | None,
    onward: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> None:
    """``gptq._Descent.sweep`` in C: ``codes`` moved, ``error`` and ``steps`` (float32 or bfloat16;
    or none) written. ``base``: contiguous, or a float32 view of a matrix by outputs (strides
    ``(1, n)``: an exact layer's ``(H D)^T``, see ``gptq._Coupling``), without ``residual`` then.
    ``onward``: ``(factor, state, operand)`` (``gptq._Coupling.onward``): the steps are added to
    ``state += steps^T factor`` (float32, one row per output) and ``operand`` (its bfloat16 copy,
    or None) follows it."""
    rows, width = codes.shape
    blocks = (base, error) if steps is None else (base, error, steps)
    _require(rows <= _MAX_BLOCK and all(t.shape == codes.shape for t in blocks), "mismatched blocks")
    by_outputs = not base.is_contiguous() and base.dtype == torch.float32 and base.stride(0) == 1
    kind = base.stride(1) >= rows and residual is None and base.device.type == "cpu"
    _require(not by_outputs or kind, "a base by outputs of another kind")
    _require(local.shape == (rows, rows) and inverse.shape == (rows,), "a local H of another size")
    _require(residual is None or residual.numel() == rows, "a residual of another size")
    f32, bf16 = torch.float32, torch.bfloat16
    factor, state, operand = onward or (None, None, None)
    rank = 0 if factor is None else factor.shape[1]
    sizes = factor is None or (factor.shape == (rows, rank) and state.shape == (width, rank))
    _require(sizes, "a state of another size")
    _require(operand is None or (state is not None and operand.shape == state.shape), "an operand of another size")
    library().polish_sweep(
        _address(codes.view(torch.uint8), torch.uint8),
        rows,
        width,
        *((base.data_ptr(), False) if by_outputs else _either(base)),
        None if residual is None else _address(residual, f32),
        _address(error, f32),
        _address(local, f32),
        _address(inverse, f32),
        *_either(steps),
        *_grid(codes.dtype),
        None if factor is None else _address(factor, f32),
        None if state is None else _address(state, f32),
        None if operand is None else _address(operand, bf16),
        rank,
        base.stride(1) if by_outputs else 0,
    )


def scaled_columns(weight: torch.Tensor, order: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """``gptq._scaled_columns`` in C for a bfloat16 or float32 weight: ``out[r] = weight[:, order[r]] / scale``."""
    _require(weight.ndim == 2 and out.shape == (weight.shape[1], weight.shape[0]), "an output of another shape")
    position = _positions(order, weight.shape[1])  # held: the library reads it
    library().scaled_columns(
        _address(weight, weight.dtype if weight.dtype == torch.bfloat16 else torch.float32),
        weight.dtype == torch.bfloat16,
        weight.shape[0],
        weight.shape[1],
        _address(position, torch.int64),
        scale,
        _address(out, torch.float32),
    )


def unpermute_rows(rows: torch.Tensor, order: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:, order[r]] = rows[r]`` for fp8 ``rows``: GPTQ's rows back to the weight's layout."""
    _require(out.shape == (rows.shape[1], rows.shape[0]), "an output of another shape")
    position = _positions(order, rows.shape[0])  # held: the library reads it
    library().unpermute_rows(
        _address(rows.view(torch.uint8), torch.uint8),
        rows.shape[0],
        rows.shape[1],
        _address(position, torch.int64),
        _address(out.view(torch.uint8), torch.uint8),
    )


def _positions(order: torch.Tensor, count: int) -> torch.Tensor:
    """Where each index stands in ``order``, a permutation of ``count`` indices (checked: the C loops
    index memory by it)."""
    _require(order.shape == (count,) and order.dtype == torch.int64, "an order of another size")
    position = torch.full_like(order, -1)
    position[order] = torch.arange(count, dtype=order.dtype, device=order.device)
    _require(count == 0 or int(position.min()) >= 0, "an order that is no permutation")
    return position


def learned_soften(
    logits: torch.Tensor, step: torch.Tensor, middle: torch.Tensor, sigmoid: torch.Tensor, delta: torch.Tensor
) -> None:
    """``rounding._Workspace.soften`` in C: ``sigmoid(logits)`` and the delta ``middle - u step / 2`` it gives."""
    _require(all(t.numel() == logits.numel() for t in (step, middle, sigmoid, delta)), "blocks of other sizes")
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
    _require(all(t.numel() == product.numel() for t in (*state, delta)), "blocks of other sizes")
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


def _either(tensor: torch.Tensor | None) -> tuple[int | None, bool]:
    """The address of a bfloat16 or float32 tensor and whether it is bfloat16: the C loops take
    either (None: no tensor, NULL)."""
    if tensor is None:
        return None, False
    sixteen = tensor.dtype == torch.bfloat16
    return _address(tensor, torch.bfloat16 if sixteen else torch.float32), sixteen


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


def heldout_operand(
    weight: torch.Tensor,
    scale: float,
    candidates: list[torch.Tensor | None],
    out: torch.Tensor,
    dtype: torch.dtype,
    grid: fp8.GridRounding,
) -> None:
    """``gptq._Operand`` in C: ``out[0]`` = ``weight``, ``out[1 + c]`` = the ``dtype`` values (of the
    codes ``candidates[c]``, else of ``weight``'s round-to-nearest by ``grid``) times ``scale`` minus
    ``weight``; bfloat16 or float32 each."""
    if out.shape != (1 + len(candidates), *weight.shape):
        raise ValueError(f"an operand of shape {tuple(out.shape)} for {len(candidates)} candidates of {weight.shape}")
    if any(codes is not None and codes.shape != weight.shape for codes in candidates):
        raise ValueError(f"codes of another shape than the weight's {weight.shape}")
    codes = [None if codes is None else _address(codes.view(torch.uint8), torch.uint8) for codes in candidates]
    library().heldout_operand(
        *_either(weight),
        weight.numel(),
        scale,
        (ctypes.c_void_p * max(1, len(codes)))(*codes),
        len(codes),
        *_either(out),
        *_grid(dtype),
        grid.limit,
        grid.shift,
        grid.lowest,
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
