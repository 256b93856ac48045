"""Learned rounding (AdaRound on the FP8 grid) with a held-out guard against round-to-nearest.

Each weight element may take either of its two neighbouring fp8 grid values (``fp8.grid_neighbours``).
A soft choice ``h = rectified_sigmoid(V)`` in [0, 1] is optimised with Adam and a cosine learning
rate to minimise the layer-output error on calibration inputs ``X``::

    loss = ||X (W_soft - W)^T||^2 / ||X (W_rtn - W)^T||^2  +  reg_lambda * mean(1 - |2h - 1|^beta)

The first term is the output error relative to round-to-nearest (RTN), so ``reg_lambda`` means
the same for every layer; the second pulls ``h`` to hard 0/1 decisions as ``beta`` anneals
from 20 to 2 after a warm-up. ``h`` starts at each weight's fractional position between its
neighbours, whose hard rounding *is* RTN. Output rows are independent (row ``j`` of the output
only sees row ``j`` of the weight), so big weights are optimised in blocks of rows to bound
memory. At the end the hard decisions are scored on a held-out batch the optimiser never saw,
and RTN is returned instead whenever it is better.
"""

from __future__ import annotations

import functools
import math
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from . import fp8
from .calibration import CalibrationSource
from .io import BufferPool
from .job import Step, no_step
from .options import LearnedOptions
from .pipeline import one_cpu_thread

T = TypeVar("T")

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch
_WARMUP = 0.2  # fraction of iterations without the rounding regulariser
_BETA_START, _BETA_END = 20.0, 2.0
_BLOCK_ELEMENTS = 1 << 20  # rows rounded to nearest together: ~1 M weights
# rows optimised together: ~256 K weights, so that the ~20 float32 working copies (20 MB) stay in
# the CPU's caches (the fastest block size measured; docs/benchmarks.md)
_LEARNED_BLOCK_ELEMENTS = 1 << 18
_PATIENCE = 50
_HELD_OUT_EVERY = 25  # iterations between early looks at the held-out inputs (one product each)
_DECISION_EVERY = 10  # iterations between comparisons of the hard decisions (a block-sized pass each)
_TINY = 1e-30  # floor of |2 soft - 1| under the regulariser's logarithm
_GAMMA_TENSOR = torch.tensor(_GAMMA)
_MINUS_ONE = torch.tensor(-1.0)


@dataclass
class RoundingResult:
    quantized: torch.Tensor  # fp8, same shape as the weight
    error_rtn: float  # relative output (or weight) error of round-to-nearest
    error: float  # relative error of ``quantized``
    iterations: int = 0
    fell_back: bool = False  # learned rounding lost to RTN on held-out data
    work: int = 0  # weights x iterations summed over row blocks: the optimiser's matrix work is 4 x calib x work


def round_nearest(
    weight: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    pool: BufferPool | None = None,
    step: Step = no_step,
    counts: PatternCounts | None = None,
) -> RoundingResult:
    """RTN, reporting the relative weight error (no inputs are involved).

    Works through blocks of rows so that float32 copies never exceed one block, whatever the
    weight's size: the weight itself may stay in its source dtype. ``pool`` supplies the fp8
    output's memory on the CPU (see ``io.BufferPool``); ``step`` is called per block of rows.
    ``counts``: the weight's bit patterns, counted while it was read (16-bit weights only).
    """
    quantized = _empty_like(weight, dtype, pool)
    if weight.dtype in (torch.bfloat16, torch.float16) and weight.ndim == 2:
        return _round_sixteen_bit(weight, scale, quantized, step, counts)
    error = reference = 0.0
    for rows in _row_blocks(weight, _BLOCK_ELEMENTS):
        step(rows.start, weight.shape[0])
        block = weight[rows].float()
        quantized[rows] = fp8.quantize_nearest(block, scale, dtype)
        error += _squared_norm(as_float(quantized[rows]).mul_(scale).sub_(block))
        reference += _squared_norm(block)  # ``block`` may be a view of ``weight``: nothing in place
    relative = relative_error(error, reference)
    return RoundingResult(quantized, relative, relative)


def _empty_like(weight: torch.Tensor, dtype: torch.dtype, pool: BufferPool | None) -> torch.Tensor:
    """Uninitialised one-byte ``dtype`` memory of the weight's shape, from ``pool`` on the CPU."""
    if pool is None or weight.device.type != "cpu":
        return torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return pool.empty(weight.numel()).view(dtype).view(weight.shape)


def _round_sixteen_bit(
    weight: torch.Tensor, scale: float, quantized: torch.Tensor, step: Step, counted: PatternCounts | None
) -> RoundingResult:
    """RTN of a bf16/fp16 weight through its 65536 possible values, bit-identical to the float path.

    The fp8 code of every 16-bit value is computed once; the weight is then mapped through that
    table by its bit patterns, and the error comes from a histogram of the patterns (``counted``
    if the reader made it, else made here). That is three integer passes instead of four float
    conversions, which were RTN's main cost. Row blocks bound the index memory.
    """
    dtype = quantized.dtype
    values = _sixteen_bit_values(weight.dtype, weight.device)
    codes = fp8.quantize_nearest(values, scale, dtype).view(torch.uint8)
    out = quantized.view(torch.uint8)
    counts = counted.counts if counted else torch.zeros(values.numel(), dtype=torch.int64, device=weight.device)
    for rows in _row_blocks(weight, _BLOCK_ELEMENTS):
        step(rows.start, weight.shape[0])
        index = _patterns(weight[rows])
        torch.index_select(codes, 0, index, out=out[rows].view(-1))
        if counted is None:
            counts += torch.bincount(index, minlength=counts.numel())
    exact = values.double()
    finite = torch.isfinite(exact)
    squared = (as_float(codes.view(dtype)).double() * scale - exact).square()
    error = float((counts * squared)[finite].sum())
    reference = float((counts * exact.square())[finite].sum())
    relative = relative_error(error, reference)
    return RoundingResult(quantized, relative, relative)


class PatternCounts:
    """How often each of the 65536 bit patterns occurs in a bf16/fp16 weight.

    They give the weight's largest magnitude (its scale) and, once rounded, its exact error,
    without another look at the weight. The reader counts each piece of a weight right after
    reading it (``io.SafetensorsReader.read``'s ``visit``), while the piece is still in the CPU's
    cache and on the reading thread: that spares the rounding thread two passes over the whole
    weight in memory, its largest cost (``docs/benchmarks.md``).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.dtype = dtype
        self.counts = torch.zeros(65536, dtype=torch.int64, device=device)
        self._one = torch.ones((), dtype=torch.int64, device=device)

    def add(self, piece: torch.Tensor) -> None:
        """Count the patterns of ``piece`` (any shape, this dtype)."""
        index = _patterns(piece)
        self.counts.index_add_(0, index, self._one.expand(index.numel()))  # no temporary, unlike bincount

    def absmax(self) -> float:
        """``fp8.absmax`` of the counted weight: NaN if it has one, inf if it has an inf."""
        return fp8.absmax(_sixteen_bit_values(self.dtype, self.counts.device)[self.counts > 0])


def _patterns(weight: torch.Tensor) -> torch.Tensor:
    """The bit pattern of each element of a 16-bit weight, 0 to 65535, flat, as indices."""
    return weight.view(torch.uint16).flatten().int()


@functools.cache
def _sixteen_bit_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """float32 value of each of the 65536 bit patterns of a 16-bit float dtype, by pattern."""
    return torch.arange(65536, dtype=torch.int32, device=device).to(torch.int16).view(dtype).float()


def relative_error(squared_error: float, squared_reference: float) -> float:
    """``sqrt(error / reference)`` of summed squares; 0 for an all-zero reference."""
    return math.sqrt(max(squared_error, 0.0) / squared_reference) if squared_reference > 0 else 0.0


def as_float(quantized: torch.Tensor) -> torch.Tensor:
    """float32 values of fp8 data by a 256-entry table lookup: exact, and on the CPU faster than
    ``quantized.float()``, whose conversion was the most expensive pass of RTN."""
    table = _fp8_values(quantized.dtype, quantized.device)
    return table.index_select(0, quantized.view(torch.uint8).flatten().int()).view(quantized.shape)


@functools.cache
def _fp8_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8, device=device).view(dtype).float()


def release_tables() -> None:
    """Drop the cached value tables (on every device they were made for): a conversion ends by
    freeing every tensor it put on a GPU."""
    _sixteen_bit_values.cache_clear()
    _fp8_values.cache_clear()


def generator_for(name: str, seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded from the run seed and the tensor name: the same output in any order."""
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return generator


def round_learned(
    name: str,
    weight: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    calibration: CalibrationSource,
    options: LearnedOptions,
    step: Step = no_step,
) -> RoundingResult:
    """Learned rounding of a 2-D ``weight`` against ``scale``; never worse than RTN on held-out inputs.

    ``weight`` may be in any float dtype; each block of rows is widened to float32 only while it
    is optimised, and the held-out errors are summed block by block (output rows are independent).
    ``step`` counts optimiser iterations over all blocks (``num_iter`` per block at most).
    """
    device = weight.device
    generator = generator_for(name, options.seed, device)
    inputs = calibration.inputs(name, weight.shape[1], options.calib_samples, generator, device)
    held_out = calibration.inputs(name, weight.shape[1], options.calib_samples, generator, device)

    learned = torch.empty(weight.shape, dtype=dtype, device=device)
    blocks = _row_blocks(weight, _LEARNED_BLOCK_ELEMENTS)
    total = len(blocks) * options.num_iter
    progress = _Progress(step, total)

    def learn(rows: slice) -> tuple[int, int, float, float, float, bool]:
        """Optimises one block into ``learned``; its iterations, its work, its held-out sums
        (reference, RTN, learned) and whether it stopped early for losing to RTN there."""
        block = weight[rows].float()
        scaled = (block / scale).clamp_(-fp8.fp8_max(dtype), fp8.fp8_max(dtype))
        rtn = scaled.to(dtype)
        learned[rows], used, lost = _optimise_block(scaled, rtn, inputs, dtype, options, (progress, 0, total), held_out)
        del scaled
        reference = _squared_norm(held_out @ block.T)
        error_rtn = _squared_norm(held_out @ (rtn.float().mul_(scale).sub_(block)).T)
        error = _squared_norm(held_out @ (learned[rows].float().mul_(scale).sub_(block)).T)
        return used, used * block.numel(), reference, error_rtn, error, lost

    outcomes = _map_blocks(learn, blocks, device)
    iterations = max(outcome[0] for outcome in outcomes)
    work, reference, error_rtn, error = (sum(outcome[i] for outcome in outcomes) for i in (1, 2, 3, 4))

    error_rtn, error = relative_error(error_rtn, reference), relative_error(error, reference)
    if all(outcome[5] for outcome in outcomes):  # every block stopped early and kept RTN
        return RoundingResult(learned, error_rtn, error_rtn, iterations, fell_back=True, work=work)
    if error > error_rtn:  # round again rather than keep a second full-size fp8 copy all along
        del learned
        rtn = round_nearest(weight, scale, dtype, step=lambda *_: step(total, total)).quantized
        return RoundingResult(rtn, error_rtn, error_rtn, iterations, fell_back=True, work=work)
    return RoundingResult(learned, error_rtn, error, iterations, work=work)


class _Progress:
    """A ``Step`` for blocks optimised on several threads: counts iterations over all of them, so
    the caller's ``step`` sees one rising count (under a lock, from whichever thread)."""

    def __init__(self, step: Step, total: int) -> None:
        self.step, self.total, self.done, self.lock = step, total, 0, threading.Lock()

    def __call__(self, _position: int, _total: int) -> None:
        with self.lock:
            self.step(self.done, self.total)
            self.done += 1


def _map_blocks(function: Callable[[slice], T], blocks: list[slice], device: torch.device) -> list[T]:
    """``[function(rows) for rows in blocks]``; on a CPU with several torch threads, one block per
    thread, each running torch's kernels on one thread.

    A block's step is ~30 small kernels: with torch's thread pool each of them ends in a barrier,
    and on a busy machine a barrier waits for a descheduled thread's next time slice. Beside five
    other processes on 2 cores that made a block-iteration take 70-500 ms instead of 4-7 ms on one
    thread; blocks are independent (output rows are), so the cores share blocks instead.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(blocks) == 1:
        return [function(rows) for rows in blocks]

    def run(rows: slice) -> T:
        torch.set_num_threads(1)  # this thread's own setting (OpenMP's is per thread)
        return function(rows)

    pool = ThreadPoolExecutor(min(threads, len(blocks)), thread_name_prefix="learned-rounding")
    try:
        with one_cpu_thread(device):
            return list(pool.map(run, blocks))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error (e.g. a cancel), start no further block


def _row_blocks(weight: torch.Tensor, max_elements: int) -> list[slice]:
    """Slices of whole rows holding at most ``max_elements`` elements each (at least one row)."""
    rows = max(1, max_elements // max(1, weight.shape[1]))
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


def _squared_norm(tensor: torch.Tensor) -> float:
    """Summed in float64: the squares of float32 weights near 1e20 and above overflow float32."""
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2


def _optimise_block(
    scaled: torch.Tensor,
    rtn: torch.Tensor,
    inputs: torch.Tensor,
    dtype: torch.dtype,
    options: LearnedOptions,
    steps: tuple[Step, int, int] = (no_step, 0, 0),
    held_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, bool]:
    """Optimise the rounding of a block of rows; returns its fp8 values, the iterations used and
    whether it stopped early because it lost to RTN on ``held_out`` (see below).
    With ``steps = (step, first, total)``, ``step(first + i, total)`` is called before iteration ``i``.

    With ``held_out`` inputs, the hard decisions are scored on them every ``_HELD_OUT_EVERY``
    iterations after the warm-up; where they lose to RTN there, the block stops and returns RTN:
    the held-out guard would most likely reject it at the end, and the rest of the budget would
    be spent on overfitting (with isotropic random inputs, nearly always).

    The loss, the gradient through the rectified sigmoid and the Adam update are written out by
    hand, in place, rather than by autograd and ``torch.optim``: the matrix work per weight is
    only ``4 * calib_samples`` flops an iteration, so the element-wise passes around it set the
    speed, and autograd's graph, its saved copies and its second pass over them were most of
    the time. What is fixed across iterations (grid neighbours, the gradient's per-element
    factor) is computed once per block, and every per-iteration tensor lives in a buffer
    allocated once (see ``_Workspace``).
    """
    report, first, total = steps
    base, step = fp8.grid_neighbours(scaled, dtype)
    offset = base - scaled  # the error when rounding towards zero, in fp8 units
    fraction = torch.where(step != 0, -offset / step.where(step != 0, 1.0), 0.0)
    batch = options.batch_size or inputs.shape[0]
    inputs = inputs.to(_matmul_dtype(options, inputs.device))
    rtn_delta = (rtn.float() - scaled).to(inputs.dtype)
    rtn_loss = _output_loss_and_gradient(inputs, rtn_delta, batch)
    if rtn_loss == 0.0 or options.num_iter <= 0:  # RTN is exact: nothing to learn
        return rtn, 0, False

    if held_out is not None:
        held_out = held_out.to(inputs.dtype)
        rtn_held_out = _output_loss_and_gradient(held_out, rtn_delta, batch)
    del rtn_delta
    logits = _inverse_rectified_sigmoid(fraction)
    del fraction
    adam = _Adam(logits, options.lr, options.num_iter)
    # d(loss)/d(logits) = (dL/d(delta) * step / rtn_loss + d(reg)/d(soft)) * (zeta - gamma) * s (1 - s)
    factor = step * ((_ZETA - _GAMMA) / rtn_loss)
    warmup = int(_WARMUP * options.num_iter)
    work = _Workspace(logits, inputs.dtype)
    best, stale, decisions, last_held_out = math.inf, 0, logits >= 0, math.inf
    iteration = 0
    for iteration in range(1, options.num_iter + 1):
        report(first + iteration - 1, total)
        torch.addcmul(offset, work.soft, step, out=work.delta)
        loss = _output_loss_and_gradient(inputs, work.delta, batch, work.gradient, factor) / rtn_loss
        if iteration > warmup:
            progress = (iteration - warmup) / max(1, options.num_iter - warmup)
            beta = _BETA_END + 0.5 * (_BETA_START - _BETA_END) * (1 + math.cos(math.pi * progress))
            weight = options.reg_lambda * (_ZETA - _GAMMA)
            loss += _add_regulariser(work.soft, beta, weight, work.gradient, work.scratch) / (_ZETA - _GAMMA)
        _chain_sigmoid(work.gradient, work.sigmoid, work.soft)
        adam.step(work.gradient)
        _soften(logits, work.sigmoid, work.soft)

        improved = loss < best - options.early_stop_threshold
        stale = 0 if improved else stale + 1
        if iteration % _DECISION_EVERY == 0 or stale >= _PATIENCE:
            current = torch.ge(logits, 0, out=work.decisions)
            if not torch.equal(current, decisions):  # a decision changed since the last look
                work.decisions, decisions, stale = decisions, current, 0
        if improved or stale == 0:
            best = min(best, loss)
        if iteration > warmup and stale >= _PATIENCE:
            break
        if held_out is not None and iteration > warmup and (iteration - warmup) % _HELD_OUT_EVERY == 0:
            torch.addcmul(offset, logits >= 0, step, out=work.delta)
            held_out_loss = _output_loss_and_gradient(held_out, work.delta, batch)
            if held_out_loss >= rtn_held_out and held_out_loss >= last_held_out:  # losing, and not recovering
                return rtn, iteration, True
            last_held_out = held_out_loss
    values = torch.addcmul(base, logits >= 0, step).to(dtype)
    return values, iteration, False


def _matmul_dtype(options: LearnedOptions, device: torch.device) -> torch.dtype:
    """bfloat16 under ``use_amp`` where the device multiplies it natively (CUDA; CPUs with AMX or
    AVX-512 BF16, through oneDNN), else float32. The products accumulate in float32 either way."""
    if not options.use_amp:
        return torch.float32
    native = device.type == "cuda" or (device.type == "cpu" and _cpu_has_bfloat16())
    return torch.bfloat16 if native else torch.float32


@functools.cache
def _cpu_has_bfloat16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


class _Workspace:
    """The per-iteration tensors of one block, allocated once: the optimiser's step reads and
    writes them in place instead of allocating ~10 block-sized temporaries an iteration."""

    def __init__(self, logits: torch.Tensor, matmul_dtype: torch.dtype) -> None:
        self.sigmoid, self.soft = _soften(logits)
        self.delta = torch.empty_like(logits, dtype=matmul_dtype)
        self.gradient = torch.empty_like(logits)
        self.scratch = (torch.empty_like(logits), torch.empty_like(logits))
        self.decisions = torch.empty_like(logits, dtype=torch.bool)


class _Adam:
    """``torch.optim.Adam`` (default betas and eps, one tensor) with ``CosineAnnealingLR(T_max=num_iter)``
    in closed form, updating ``param`` in place from a gradient the caller computed."""

    def __init__(self, param: torch.Tensor, lr: float, num_iter: int) -> None:
        self.param, self.lr, self.num_iter = param, lr, num_iter
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = 0

    def step(self, grad: torch.Tensor, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        """One update; ``grad``'s memory is reused for the denominator."""
        lr = self.lr * (1 + math.cos(math.pi * self.steps / self.num_iter)) / 2
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # m / (sqrt(v) / c + eps) = c * m / (sqrt(v) + eps * c), with c = sqrt(1 - beta2^t): one pass fewer
        correction = math.sqrt(1 - beta2**self.steps)
        denominator = torch.sqrt(self.exp_avg_sq, out=grad).add_(eps * correction)
        self.param.addcdiv_(self.exp_avg, denominator, value=-lr * correction / (1 - beta1**self.steps))


def _soften(
    logits: torch.Tensor, sigmoid: torch.Tensor | None = None, soft: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmoid(logits), rectified_sigmoid(logits))``, into ``sigmoid`` and ``soft`` when given;
    the first is kept for the chain rule."""
    sigmoid = torch.sigmoid(logits, out=sigmoid)
    soft = torch.add(_GAMMA_TENSOR, sigmoid, alpha=_ZETA - _GAMMA, out=soft).clamp_(0, 1)
    return sigmoid, soft


def _add_regulariser(
    soft: torch.Tensor, beta: float, weight: float, gradient: torch.Tensor, scratch: tuple[torch.Tensor, ...] = ()
) -> float:
    """Adds d/d(soft) of ``weight * mean(1 - |2 soft - 1|^beta)`` to ``gradient``; returns that term.

    With ``t = 2 soft - 1`` the derivative is ``-2 beta weight / n * t |t|^(beta - 2)``; ``beta >= 2``
    throughout the anneal, so the power is finite at ``t = 0``. The power is ``exp((beta - 2) log |t|)``
    with ``|t|`` kept above 0 (the factor ``t`` makes those elements 0 again): on the CPU that is
    3x faster than ``pow``. ``scratch``, when given, is two block-sized buffers for ``t`` and the power.
    """
    centred_out, power_out = scratch or (None, None)
    centred = torch.add(_MINUS_ONE, soft, alpha=2, out=centred_out)
    power = torch.abs(centred, out=power_out).clamp_(min=_TINY).log_().mul_(beta - 2).exp_()
    signed_power = power.mul_(centred)  # t |t|^(beta - 2)
    count = soft.numel()
    total = float(torch.dot(signed_power.view(-1), centred.view(-1)))  # sum |t|^beta
    gradient.add_(signed_power, alpha=-2 * beta * weight / count)
    return weight * (1 - total / count)


def _chain_sigmoid(gradient: torch.Tensor, sigmoid: torch.Tensor, soft: torch.Tensor) -> None:
    """Turns d/d(soft) into d/d(logits) in place: 0 where the rectified sigmoid's clamp holds ``soft``
    at 0 or 1, else times ``sigmoid (1 - sigmoid)`` (the factor ``zeta - gamma`` is the caller's).
    ATen's own backward kernels do each in one pass; the masked version took five."""
    torch.ops.aten.hardtanh_backward.grad_input(gradient, soft, 0.0, 1.0, grad_input=gradient)
    torch.ops.aten.sigmoid_backward.grad_input(gradient, sigmoid, grad_input=gradient)


def _output_loss_and_gradient(
    inputs: torch.Tensor,
    delta: torch.Tensor,
    batch: int,
    gradient: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
) -> float:
    """``||X delta^T||^2``; with ``gradient``, writes ``factor * 2 (X delta^T)^T X`` into it.

    In batches of ``batch`` calibration rows, so that only one batch of outputs is alive at a time
    (``--batch_size`` bounds memory) and nothing is kept for a backward pass. ``inputs`` and
    ``delta`` share the matmul dtype (see ``_matmul_dtype``); the gradient is float32. The
    factor 2 goes on the small output batch, not the block-sized gradient.
    """
    total = 0.0
    for start in range(0, inputs.shape[0], batch):
        chunk = inputs[start : start + batch]
        out = chunk @ delta.T
        total += float(out.float().pow(2).sum())
        if gradient is not None:
            part = out.mul_(2).T @ chunk
            if start == 0:
                torch.mul(part, factor, out=gradient)
            else:
                gradient.addcmul_(part, factor)
    return total


def _inverse_rectified_sigmoid(fraction: torch.Tensor) -> torch.Tensor:
    return torch.logit((fraction - _GAMMA) / (_ZETA - _GAMMA))
