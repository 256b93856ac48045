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
import zlib
from dataclasses import dataclass

import torch

from . import fp8
from .calibration import CalibrationSource
from .io import BufferPool
from .job import Step, no_step
from .options import LearnedOptions

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch
_WARMUP = 0.2  # fraction of iterations without the rounding regulariser
_BETA_START, _BETA_END = 20.0, 2.0
_BLOCK_ELEMENTS = 1 << 20  # rows rounded to nearest together: ~1 M weights
# rows optimised together: ~256 K weights, so that the ~20 float32 working copies (20 MB) stay in
# the CPU's caches (the fastest block size measured; docs/benchmarks.md)
_LEARNED_BLOCK_ELEMENTS = 1 << 18
_PATIENCE = 50
_GAMMA_TENSOR = torch.tensor(_GAMMA)
_MINUS_ONE = torch.tensor(-1.0)
# |logit| beyond which the rectified sigmoid is clamped: sigmoid(x) = -gamma / (zeta - gamma) = 1 / 12
_CLAMP_LOGIT = math.log((_ZETA - _GAMMA) / -_GAMMA - 1)


@dataclass
class RoundingResult:
    quantized: torch.Tensor  # fp8, same shape as the weight
    error_rtn: float  # relative output (or weight) error of round-to-nearest
    error: float  # relative error of ``quantized``
    iterations: int = 0
    fell_back: bool = False  # learned rounding lost to RTN on held-out data
    work: int = 0  # weights x iterations summed over row blocks: the optimiser's matrix work is 4 x calib x work


def round_nearest(
    weight: torch.Tensor, scale: float, dtype: torch.dtype, pool: BufferPool | None = None, step: Step = no_step
) -> RoundingResult:
    """RTN, reporting the relative weight error (no inputs are involved).

    Works through blocks of rows so that float32 copies never exceed one block, whatever the
    weight's size: the weight itself may stay in its source dtype. ``pool`` supplies the fp8
    output's memory on the CPU (see ``io.BufferPool``); ``step`` is called per block of rows.
    """
    quantized = _empty_like(weight, dtype, pool)
    if weight.dtype in (torch.bfloat16, torch.float16) and weight.ndim == 2:
        return _round_sixteen_bit(weight, scale, quantized, step)
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


def _round_sixteen_bit(weight: torch.Tensor, scale: float, quantized: torch.Tensor, step: Step) -> RoundingResult:
    """RTN of a bf16/fp16 weight through its 65536 possible values, bit-identical to the float path.

    The fp8 code of every 16-bit value is computed once; the weight is then mapped through that
    table by its bit patterns, and the error comes from a histogram of the patterns. That is
    three integer passes instead of four float conversions, which were RTN's main cost. Row
    blocks bound the index memory.
    """
    dtype = quantized.dtype
    values = _sixteen_bit_values(weight.dtype, weight.device)
    codes = fp8.quantize_nearest(values, scale, dtype).view(torch.uint8)
    out = quantized.view(torch.uint8)
    counts = torch.zeros(values.numel(), dtype=torch.int64, device=weight.device)
    for rows in _row_blocks(weight, _BLOCK_ELEMENTS):
        step(rows.start, weight.shape[0])
        index = weight[rows].view(torch.uint16).flatten().int()  # the bit pattern, 0 to 65535
        torch.index_select(codes, 0, index, out=out[rows].view(-1))
        counts += torch.bincount(index, minlength=values.numel())
    exact = values.double()
    finite = torch.isfinite(exact)
    squared = (as_float(codes.view(dtype)).double() * scale - exact).square()
    error = float((counts * squared)[finite].sum())
    reference = float((counts * exact.square())[finite].sum())
    relative = relative_error(error, reference)
    return RoundingResult(quantized, relative, relative)


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

    limit = fp8.fp8_max(dtype)
    learned = torch.empty(weight.shape, dtype=dtype, device=device)
    iterations, work, error_rtn, error, reference = 0, 0, 0.0, 0.0, 0.0
    blocks = _row_blocks(weight, _LEARNED_BLOCK_ELEMENTS)
    total = len(blocks) * options.num_iter
    for index, rows in enumerate(blocks):
        block = weight[rows].float()
        scaled = (block / scale).clamp_(-limit, limit)
        rtn = scaled.to(dtype)
        steps = (step, index * options.num_iter, total)
        learned[rows], used = _optimise_block(scaled, rtn, inputs, dtype, options, steps)
        iterations = max(iterations, used)
        work += used * block.numel()
        del scaled
        reference += _squared_norm(held_out @ block.T)
        error_rtn += _squared_norm(held_out @ (rtn.float().mul_(scale).sub_(block)).T)
        error += _squared_norm(held_out @ (learned[rows].float().mul_(scale).sub_(block)).T)

    error_rtn, error = relative_error(error_rtn, reference), relative_error(error, reference)
    if error > error_rtn:  # round again rather than keep a second full-size fp8 copy all along
        del learned
        rtn = round_nearest(weight, scale, dtype, step=lambda *_: step(total, total)).quantized
        return RoundingResult(rtn, error_rtn, error_rtn, iterations, fell_back=True, work=work)
    return RoundingResult(learned, error_rtn, error, iterations, work=work)


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
) -> tuple[torch.Tensor, int]:
    """Optimise the rounding of a block of rows; returns its fp8 values and the iterations used.
    With ``steps = (step, first, total)``, ``step(first + i, total)`` is called before iteration ``i``.

    The loss, the gradient through the rectified sigmoid and the Adam update are written out by
    hand, in place, rather than by autograd and ``torch.optim``: the matrix work per weight is
    only ``4 * calib_samples`` flops an iteration, so the element-wise passes around it set the
    speed, and autograd's graph, its saved copies and its second pass over them were most of
    the time. What is fixed across iterations (grid neighbours, the gradient's per-element
    factor) is computed once per block.
    """
    report, first, total = steps
    base, step = fp8.grid_neighbours(scaled, dtype)
    offset = base - scaled  # the error when rounding towards zero, in fp8 units
    fraction = torch.where(step != 0, -offset / step.where(step != 0, 1.0), 0.0)
    rtn_loss, _ = _output_loss_and_gradient(inputs, rtn.float() - scaled, options, gradient=False)
    if rtn_loss == 0.0 or options.num_iter <= 0:  # RTN is exact: nothing to learn
        return rtn, 0

    logits = _inverse_rectified_sigmoid(fraction)
    adam = _Adam(logits, options.lr, options.num_iter)
    # d(loss)/d(logits) = (dL/d(delta) * step / rtn_loss + d(reg)/d(soft)) * (zeta - gamma) * s (1 - s)
    factor = step * ((_ZETA - _GAMMA) / rtn_loss)
    warmup = int(_WARMUP * options.num_iter)
    best, stale, decisions = math.inf, 0, fraction >= 0.5
    sigmoid, soft = _soften(logits)
    iteration = 0
    for iteration in range(1, options.num_iter + 1):
        report(first + iteration - 1, total)
        error, gradient = _output_loss_and_gradient(inputs, torch.addcmul(offset, soft, step), options)
        loss = error / rtn_loss
        gradient.mul_(factor)
        if iteration > warmup:
            progress = (iteration - warmup) / max(1, options.num_iter - warmup)
            beta = _BETA_END + 0.5 * (_BETA_START - _BETA_END) * (1 + math.cos(math.pi * progress))
            loss += _add_regulariser(soft, beta, options.reg_lambda * (_ZETA - _GAMMA), gradient) / (_ZETA - _GAMMA)
        _chain_sigmoid(gradient, sigmoid, logits)
        adam.step(gradient)
        del gradient
        sigmoid, soft = _soften(logits)

        current = soft >= 0.5
        changed = not torch.equal(current, decisions)
        decisions = current
        if loss < best - options.early_stop_threshold or changed:
            best, stale = min(best, loss), 0
        else:
            stale += 1
        if iteration > warmup and stale >= _PATIENCE:
            break
    values = (base + decisions * step).to(dtype)
    return values, iteration


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


def _soften(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmoid(logits), rectified_sigmoid(logits))``; the first is kept for the chain rule."""
    sigmoid = torch.sigmoid(logits)
    soft = torch.add(_GAMMA_TENSOR, sigmoid, alpha=_ZETA - _GAMMA).clamp_(0, 1)
    return sigmoid, soft


def _add_regulariser(soft: torch.Tensor, beta: float, weight: float, gradient: torch.Tensor) -> float:
    """Adds d/d(soft) of ``weight * mean(1 - |2 soft - 1|^beta)`` to ``gradient``; returns that term.

    With ``t = 2 soft - 1`` the derivative is ``-2 beta weight / n * t |t|^(beta - 2)``; ``beta >= 2``
    throughout the anneal, so the power is finite at ``t = 0``.
    """
    centred = torch.add(_MINUS_ONE, soft, alpha=2)
    signed_power = centred.abs().pow_(beta - 2).mul_(centred)  # t |t|^(beta - 2)
    count = soft.numel()
    total = float(torch.dot(signed_power.view(-1), centred.view(-1)))  # sum |t|^beta
    gradient.add_(signed_power, alpha=-2 * beta * weight / count)
    return weight * (1 - total / count)


def _chain_sigmoid(gradient: torch.Tensor, sigmoid: torch.Tensor, logits: torch.Tensor) -> None:
    """Multiplies ``gradient`` in place by ``sigmoid (1 - sigmoid)``, and by 0 where the rectified
    sigmoid's clamp is active: ``(zeta - gamma) sigmoid(x) + gamma`` leaves [0, 1] exactly where
    ``|x| > ln((zeta - gamma) / -gamma - 1)`` (= ln 11)."""
    slope = torch.addcmul(sigmoid, sigmoid, sigmoid, value=-1)
    gradient.mul_(slope.masked_fill_(logits.abs() > _CLAMP_LOGIT, 0.0))


def _output_loss_and_gradient(
    inputs: torch.Tensor, delta: torch.Tensor, options: LearnedOptions, gradient: bool = True
) -> tuple[float, torch.Tensor | None]:
    """``||X delta^T||^2`` and its gradient ``2 (X delta^T)^T X``, in batches of calibration rows.

    Computed by hand rather than by autograd so that only one batch of outputs is alive at a
    time (``--batch_size`` bounds memory) and nothing is kept for a backward pass. The factor 2
    goes on the small output batch, not the block-sized gradient.
    """
    batch = options.batch_size or inputs.shape[0]
    amp = options.use_amp and inputs.is_cuda
    total = 0.0
    grad = None
    for start in range(0, inputs.shape[0], batch):
        chunk = inputs[start : start + batch]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = chunk @ delta.T
            if gradient:
                part = ((2 * out).T @ chunk).float()
                grad = part if grad is None else grad.add_(part)
        total += float(out.float().pow(2).sum())
    return total, grad


def _inverse_rectified_sigmoid(fraction: torch.Tensor) -> torch.Tensor:
    return torch.logit((fraction - _GAMMA) / (_ZETA - _GAMMA))
