"""GPTQ on the FP8 grid: round columns one at a time, pushing each error onto the columns not yet rounded.

With the input second moments ``H = X^T X`` of a layer (from ``calibration.Recorder``), the
output error of a rounded weight is ``tr(D H D^T)`` with ``D = W_q - W``. GPTQ minimises it
greedily: after rounding column ``i`` (round-to-nearest against the fixed per-tensor scale), the
error is compensated on the remaining columns through the Cholesky factor of ``H^-1``. Columns
go in order of decreasing ``H_ii`` (act-order: the inputs with the most energy first), and a
small damping ``damp * mean(diag H)`` keeps ``H`` invertible when few rows were recorded. Exact
statistics are fitted on all recorded rows (``_fitting``). The result is checked on the held-out
half of the statistics and replaced by round-to-nearest when that is better there.

Narrow layers come with the exact ``H`` (``_gptq_dense``: ``O(in^3 + out in^2)``). Wide layers
come with ``H ~ F F^T + diag(d)`` of rank ``r`` (``_gptq_low_rank``), whose inverse is diagonal
plus rank ``r``; its Cholesky factor is then *semiseparable* — the part of row ``j`` beyond its
block is ``g_j^T V`` — so the error pushed onto all later columns is one ``out x r`` accumulator,
and a layer costs ``O(out in r)``, never an ``in x in`` matrix (a 15360-wide layer would need 900 MB).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import fp8, native
from .calibration import Gram, LayerStatistics, LowRankGram, Moments, RowSample
from .io import BufferPool
from .job import Step, no_step
from .pipeline import one_cpu_thread
from .rounding import RoundingResult, _cpu_has_bfloat16, _fp8_values, as_float, relative_error, round_nearest

BLOCK = 128
POLISH_PASSES = 2  # coordinate-descent passes after GPTQ (see _polish; docs/calibration.md)
EXACT_POLISH_PASSES = 4  # with exact statistics (narrow layers, where a pass costs least)
COUPLED_PASSES = 2  # then passes on the output-side metric, where a layer has one (_polish_coupled)
_GROUP = 16  # columns whose errors reach the rest of their block together (see _BlockRounding)
_ELIMINATED = 64  # columns of a sketched H eliminated at a time (see _eliminate)
_START_COLUMNS = 512  # columns of D per product where the polish's sketch state is made (see _Coupling)
_CHECK_ELEMENTS = 1 << 19  # weights per block of rows in the held-out check (3 MB stacked in bfloat16)


def round_gptq(
    weight: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    stats: LayerStatistics,
    damp: float = 0.01,
    passes: int | None = None,
    step: Step = no_step,
    metric: torch.Tensor | None = None,
    pool: BufferPool | None = None,
) -> RoundingResult:
    """GPTQ-rounded fp8 weight, polished by ``passes`` of coordinate descent (by default
    ``EXACT_POLISH_PASSES`` with exact statistics, else ``POLISH_PASSES``); never worse than RTN
    on the held-out statistics.

    ``metric``: an output-side metric ``G`` (``out x out``, from the layer that consumes this one's
    output: ``consumers.output_metric``); with exact statistics the polish then goes on for
    ``COUPLED_PASSES`` on ``tr(D H D^T G)`` (``_polish_coupled``).

    ``weight`` may stay in its source dtype: the only full-size float32 copy is GPTQ's working
    matrix: fresh full-size temporaries cost a page fault per 4 KB each, which the kernel's time
    for a calibrated conversion showed; ``pool`` (the conversion's ``io.BufferPool``) lends the
    full-size buffers, so that a layer of a repeated shape faults in no page. ``step`` counts the
    weight's columns, called per block of ``BLOCK`` (and per block of rows in the checks after).
    """
    # A long sequence of small steps, and products small enough that a second thread waits more
    # than it helps (on a busy machine a barrier waits for a descheduled thread); the pipeline's
    # reader and writer use the other core.
    with one_cpu_thread(weight.device):
        return _round_and_check(weight, scale, dtype, stats, damp, passes, step, metric, pool)


def _round_and_check(
    weight: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    stats: LayerStatistics,
    damp: float,
    passes: int | None,
    step: Step,
    metric: torch.Tensor | None = None,
    pool: BufferPool | None = None,
) -> RoundingResult:
    fitting = _fitting(stats)
    if passes is None:
        passes = EXACT_POLISH_PASSES if isinstance(fitting, Gram) else POLISH_PASSES
    order = torch.argsort(fitting.diagonal().to(weight.device), descending=True)
    fit = _permuted(fitting, order, pool)
    del fitting
    # One row per weight column, in act order and in units of the scale: every step below then
    # reads and writes contiguous rows, and rounding is a plain cast.
    columns = _scaled_columns(weight, order, scale, pool)
    rows = _buffer((weight.shape[1], weight.shape[0]), dtype, weight.device, pool)
    if isinstance(fit, Gram):
        _gptq_dense(columns, fit, rows, damp, _phase(step, 0, weight.shape[1], passes), pool)
        del columns  # compensated in place
        start = _errors(rows, _scaled_columns(weight, order, scale, pool)) if passes > 0 else None
    else:
        _gptq_low_rank(columns, fit, rows, damp, _phase(step, 0, weight.shape[1], passes), pool)
        start = columns  # GPTQ left D there
        del columns
    if passes > 0:
        _polish(start, rows, fit, passes, _phase(step, 1, weight.shape[1], passes), pool)
    del start
    if passes > 0 and metric is not None and isinstance(fit, Gram):
        _polish_coupled(_scaled_columns(weight, order, scale), rows, fit, metric.to(rows.device), COUPLED_PASSES)
    quantized = _unpermuted(rows, order, pool)
    del rows, fit
    finished = weight.shape[1] * (1 + passes)

    def checking(*_) -> None:
        step(finished, finished)

    heldout = stats.heldout
    if isinstance(heldout, RowSample):
        heldout = RowSample(heldout.rows.to(_product_dtype(weight.device)))
    elif isinstance(heldout, Gram):
        heldout = _ProductGram(heldout.matrix.to(weight.device, _product_dtype(weight.device)))
    error_rtn, error = _heldout_errors(weight, scale, dtype, (None, quantized), heldout, checking)
    if error > error_rtn:  # round-to-nearest is only made when it is kept
        return RoundingResult(round_nearest(weight, scale, dtype, pool).quantized, error_rtn, error_rtn, fell_back=True)
    return RoundingResult(quantized, error_rtn, error)


class _ProductGram:
    """An exact held-out ``H`` for the check, its product in ``_product_dtype``: ``tr(D H D^T)`` as
    ``sum((D H) * D)``. ``Gram.quadratic`` works in float64, which made the check of an exact layer
    cost more than its GPTQ and polish together (``O(out in^2)`` at a tenth of float32's rate)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def quadratics(self, stacked: torch.Tensor) -> list[float]:
        """``tr(D H D^T)`` of each of the ``stacked`` blocks ``D``, in one product."""
        flat = stacked.view(-1, stacked.shape[-1])
        product = (flat.to(self.matrix.dtype) @ self.matrix).float().mul_(flat)
        return product.view(len(stacked), -1).sum(1, dtype=torch.float64).tolist()


def _fitting(stats: LayerStatistics) -> Gram | LowRankGram:
    """What GPTQ fits: both halves when both are exact (``H`` of all recorded rows), else the fitting half.

    Too little calibration text is what limits GPTQ (it overfits the rows it fits), so the held-out
    half's rows are worth more in the fit than as an independent judge: the check against
    round-to-nearest then sees rows that were fitted too, which still catches a rounding that does
    worse than round-to-nearest on the held-out half (docs/calibration.md). A sketched layer keeps
    its split: its held-out half is a row sample, no second sketch to add.
    """
    if isinstance(stats.fit, Gram) and isinstance(stats.heldout, Gram):
        return Gram(stats.fit.matrix + stats.heldout.matrix.to(stats.fit.matrix))
    return stats.fit


def _product_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the sketch's large products (``O(out in r)``) and of the held-out check's:
    bfloat16 where the device multiplies it natively (CUDA; CPUs with AMX or AVX-512 BF16, several
    times float32's rate there), else float32. What they yield are compensations, gradients and
    error sums, whose relative error of ``2^-9`` is far below fp8's step of ``2^-4``."""
    native = device.type == "cuda" or (device.type == "cpu" and _cpu_has_bfloat16())
    return torch.bfloat16 if native else torch.float32


def _phase(step: Step, first: int, columns: int, passes: int) -> Step:
    """``step`` for one phase of a layer's rounding: GPTQ's pass over the columns is phase 0 and each
    polishing pass one more, so the progress shown runs once over ``columns * (1 + passes)``."""
    total = columns * (1 + passes)
    return lambda done, _total: step(first * columns + done, total)


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pool: BufferPool | None) -> torch.Tensor:
    """Uninitialised memory, from ``pool`` on the CPU: reused from a layer of the same shape, so that
    no page is faulted in again (a first write to fresh memory costs more than most passes over it)."""
    if pool is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return pool.tensor(shape, dtype)


def _scaled_columns(
    weight: torch.Tensor, order: torch.Tensor, scale: float, pool: BufferPool | None = None
) -> torch.Tensor:
    """The weight's columns as float32 rows, in ``order`` and in units of the scale."""
    if native.usable(weight) and weight.dtype in (torch.bfloat16, torch.float32) and weight.is_contiguous():
        columns = _buffer((weight.shape[1], weight.shape[0]), torch.float32, weight.device, pool)
        native.scaled_columns(weight, order, scale, columns)
        return columns
    return weight.T.contiguous().index_select(0, order).float().div_(scale)  # copies in the source dtype


def _unpermuted(rows: torch.Tensor, order: torch.Tensor, pool: BufferPool | None) -> torch.Tensor:
    """GPTQ's fp8 rows (one per weight column, in ``order``) as the weight: ``out x in``."""
    if not native.usable(rows):
        return rows[torch.argsort(order)].T.contiguous()
    quantized = _buffer((rows.shape[1], rows.shape[0]), rows.dtype, rows.device, pool)
    native.unpermute_rows(rows, order, quantized)
    return quantized


def _heldout_errors(
    weight: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    candidates: tuple[torch.Tensor | None, ...],
    heldout: Moments | _ProductGram,
    step: Step = no_step,
) -> list[float]:
    """Relative held-out output error of each fp8 candidate (``dtype`` codes; ``None`` stands for
    round-to-nearest) for ``weight``, summed over blocks of output rows (each output row only sees
    its own weight row), so nothing full-size is made."""
    rows_per_block = _check_rows(weight.shape[1])
    product = heldout.rows.dtype if isinstance(heldout, RowSample) else heldout.matrix.dtype
    operand = _Operand(dtype, product, rows_per_block * weight.shape[1], len(candidates), weight.device)
    sums = [0.0] * (1 + len(candidates))  # the reference, then each candidate's error
    for start in range(0, weight.shape[0], rows_per_block):
        step(start, weight.shape[0])
        rows = slice(start, start + rows_per_block)
        stacked = operand(weight[rows], scale, [None if codes is None else codes[rows] for codes in candidates])
        sums = [total + part for total, part in zip(sums, _squared_sums(heldout, stacked), strict=True)]
    return [relative_error(error, sums[0]) for error in sums[1:]]


def _check_rows(width: int) -> int:
    """Output rows per block of the held-out check: ``_CHECK_ELEMENTS`` weights, in a multiple of 16
    rows where more fit (oneDNN's bfloat16 product took a few % longer on other counts of rows)."""
    rows = max(1, _CHECK_ELEMENTS // max(1, width))
    return rows - rows % 16 if rows > 16 else rows


def _squared_sums(heldout: Moments | _ProductGram, stacked: torch.Tensor) -> list[float]:
    """``heldout.quadratic`` of each of the ``stacked`` blocks of rows, in one product for the check's
    own kinds: one small product per block, each with its own conversions and dispatch, took longer."""
    if isinstance(heldout, _ProductGram):
        return heldout.quadratics(stacked)
    if not isinstance(heldout, RowSample):
        return [heldout.quadratic(part) for part in stacked]
    outputs = stacked.view(-1, stacked.shape[-1]) @ heldout.rows.to(stacked.device).T
    # squares of bfloat16 or float32 outputs: exact (bfloat16) or nearly so in float32, summed in float64
    return outputs.float().square_().view(len(stacked), -1).sum(1, dtype=torch.float64).tolist()


class _Operand:
    """The held-out check's operand for a block of rows, in the dtype of the check's products, into
    memory allocated once per layer: the weight's rows, then each candidate's errors
    ``value * scale - weight``, where the values are its fp8 codes or (codes ``None``) the weight's
    round-to-nearest.

    Compiled, this is one pass over the block's weights and codes. In torch it was a table gather
    by int32 index, a multiplication, a subtraction and a conversion per candidate, and
    round-to-nearest a pass over the whole weight of its own, together as long as the products.
    """

    def __init__(
        self, dtype: torch.dtype, product: torch.dtype, size: int, candidates: int, device: torch.device
    ) -> None:
        self._dtype, self._size, self._device = dtype, size, device
        self._out = torch.empty((1 + candidates) * size, dtype=product, device=device)
        self._grid = fp8.GridRounding(dtype, 1)

    @functools.cached_property
    def _values(self) -> _Lookup:
        """The torch path's values by code, made only if it runs."""
        return _Lookup((_fp8_values(self._dtype, self._device),), self._size, self._device)

    def __call__(self, block: torch.Tensor, scale: float, candidates: list[torch.Tensor | None]) -> torch.Tensor:
        """``[block; errors of candidates[0]; ...]`` (``1 + len(candidates)`` blocks; valid until the next call)."""
        out = self._out[: (1 + len(candidates)) * block.numel()].view(1 + len(candidates), *block.shape)
        floats = (torch.bfloat16, torch.float32)
        if native.usable(block) and block.is_contiguous() and block.dtype in floats and out.dtype in floats:
            native.heldout_operand(block, scale, candidates, out, self._dtype, self._grid)
            return out
        out[0].copy_(block)
        nearest = None  # made once, however many candidates are round-to-nearest
        for errors, codes in zip(out[1:], candidates, strict=True):
            if codes is None and nearest is None:
                nearest = fp8.quantize_nearest(block, scale, self._dtype)
            errors.copy_(self._values(nearest if codes is None else codes)[0].mul_(scale).sub_(block))
        return out


def _permuted(moments: Gram | LowRankGram, order: torch.Tensor, pool: BufferPool | None = None) -> Gram | LowRankGram:
    """``moments`` with their inputs in ``order``; a sketch's factor into ``pool``'s memory (fresh,
    its several MB would be faulted in for every weight)."""
    if isinstance(moments, Gram):
        matrix = moments.matrix.to(order.device)
        return Gram(matrix[order][:, order])
    factor = moments.factor.to(order.device)
    permuted = torch.index_select(factor, 0, order, out=_buffer(factor.shape, factor.dtype, factor.device, pool))
    return LowRankGram(permuted, moments.exact_diagonal.to(order.device)[order])


def _damping(diagonal: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Inputs never seen (zero energy) cannot matter: give them unit weight; then the damping."""
    dead = diagonal == 0
    return dead, damp * float(torch.where(dead, 1.0, diagonal).mean())


def _gptq_dense(
    work: torch.Tensor, gram: Gram, quantized: torch.Tensor, damp: float, step: Step, pool: BufferPool | None = None
) -> None:
    """Rounds ``work`` (one row per weight column, changed in place) into ``quantized`` with the exact ``H``."""
    columns = work.shape[0]
    matrix = gram.matrix.double()
    dead, damping = _damping(torch.diagonal(matrix), damp)
    matrix[dead, dead] = 1.0
    matrix += damping * torch.eye(columns, dtype=matrix.dtype, device=matrix.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(matrix))
    upper = torch.linalg.cholesky(inverse, upper=True).float()  # rows: how column i's error spreads onwards
    rounding = _BlockRounding(work.shape[1], quantized.dtype, work.device, pool)
    for start in range(0, columns, BLOCK):
        step(start, columns)
        end = min(start + BLOCK, columns)
        errors = rounding(work[start:end], _Triangle.of(upper[start:end, start:end]), quantized[start:end])
        work[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1)  # in place: no full-size temporary


def _gptq_low_rank(
    work: torch.Tensor,
    gram: LowRankGram,
    quantized: torch.Tensor,
    damp: float,
    step: Step,
    pool: BufferPool | None = None,
) -> None:
    """GPTQ for ``H = F F^T + diag(d)`` into ``quantized``, block by block, with a Schur-complement state of ``r x r``.

    ``H^-1 = diag(1/d) + V S V^T`` (Woodbury, ``V = diag(1/d) F``). Eliminating a block ``J`` of
    columns from it leaves the same form with ``S -= P^T P``, ``P = C^-1 V_J S``, where ``C C^T``
    is the block's own ``diag(1/d_J) + V_J S V_J^T``; ``C^T`` is the within-block part of GPTQ's
    upper Cholesky factor, and the errors reach later columns ``k`` as ``V_k P^T errors``
    (``_SketchFactors``: all of this depends on ``H`` only). ``work`` (one row per weight column)
    becomes the rounding's ``D`` (each weight's value minus it; see ``_errors``), the polish's
    start: made as each block is rounded, it costs no pass of its own over the whole weight.
    """
    columns = work.shape[0]
    factors = _SketchFactors(gram, damp, _product_dtype(work.device), pool)
    rank = factors.pushed.shape[1]
    products = _Products(factors.pushed.dtype, max(BLOCK, rank), work.shape[1], work.device, pool)
    spread = _Sum((rank, work.shape[1]), products.dtype, work.device, pool)  # sum of P^T errors
    rounding = _BlockRounding(work.shape[1], quantized.dtype, work.device, pool, errors=products.dtype)
    for block, start in enumerate(range(0, columns, BLOCK)):
        step(start, columns)
        end = min(start + BLOCK, columns)
        compensation = products.mm(factors.pushed[start:end], spread.operand) if start > 0 else None
        triangle, codes = factors.triangles[block], quantized[start:end]
        errors = rounding(work[start:end], triangle, codes, minus=compensation, polish_start=True)
        if end < columns:  # the last block's errors reach no column
            spread.add(products.mm(factors.onwards[block], errors))


class _Triangle(NamedTuple):
    """A block's part of GPTQ's upper Cholesky factor of ``H^-1`` as the block's rounding reads it
    (``_BlockRounding``): ``spread[j, i]`` is what of column ``i``'s error reaches column ``j``
    (the factor's rows divided by its ``diagonal``, transposed: the compiled loop reads them by
    columns), both contiguous float32. A sketched layer makes them all before its rounding
    (``_SketchFactors``), so that its blocks do no small operations of their own."""

    spread: torch.Tensor
    diagonal: torch.Tensor

    @classmethod
    def of(cls, upper: torch.Tensor) -> _Triangle:
        """From the block's part of the upper factor (float32)."""
        diagonal = upper.diagonal().contiguous()
        return cls((upper.T / diagonal).contiguous(), diagonal)


class _SketchFactors:
    """For each block of columns of a sketched ``H`` (see ``_gptq_low_rank``): its part of GPTQ's
    upper Cholesky factor (``triangles``) and ``P^T`` (``onwards``, ``r x block``), with ``V``
    (``pushed``) in the sketch's product dtype.

    They depend on ``H`` only, so they are all made before the rounding: a block's small float64
    algebra is about as long as its products in a narrow layer, and between the products of a wide
    one it found the ``r x r`` state evicted from the cache. In float64: ``diag(1/d_J)`` can be
    orders of magnitude above the Schur complement it is cancelled down to (float32 factors were
    off by a tenth, or not positive definite, where a few inputs carry most of the energy), and
    ``S`` is downdated once per block.
    """

    def __init__(self, gram: LowRankGram, damp: float, dtype: torch.dtype, pool: BufferPool | None = None) -> None:
        float64, device = torch.float64, gram.factor.device
        factor = _buffer(gram.factor.shape, float64, device, pool).copy_(gram.factor)
        dead, damping = _damping(gram.exact_diagonal.double(), damp)
        residual = torch.where(dead, 1.0, gram.residual().double()) + damping
        pushed = torch.div(factor, residual[:, None], out=_buffer(factor.shape, float64, device, pool))  # V
        identity = torch.eye(factor.shape[1], dtype=float64, device=device)
        state = -torch.linalg.inv(identity + factor.T @ pushed)
        inverse = residual.reciprocal()
        columns = factor.shape[0]
        self.pushed = _buffer(pushed.shape, dtype, device, pool).copy_(pushed)
        self.triangles: list[_Triangle] = []
        self.onwards: list[torch.Tensor] = []
        lower = torch.zeros(BLOCK, BLOCK, dtype=float64, device=device)  # never written above its diagonal blocks
        onward = torch.empty(BLOCK, factor.shape[1], dtype=float64, device=device)
        for start in range(0, columns, BLOCK):
            end = min(start + BLOCK, columns)
            block = slice(0, end - start)
            _eliminate(pushed, state, inverse, start, end, lower[block, block], onward[block])
            self.triangles.append(_Triangle.of(lower[block, block].float().T))
            if end < columns:
                self.onwards.append(onward[block].T.to(dtype))


def _eliminate(
    pushed: torch.Tensor,
    state: torch.Tensor,
    inverse: torch.Tensor,
    start: int,
    end: int,
    lower: torch.Tensor,
    onward: torch.Tensor,
) -> None:
    """Eliminates the columns ``J = start:end`` from ``H^-1 = diag(inverse) + V S V^T`` (``pushed``
    is ``V``; ``state``, ``S``, downdated in place): writes their ``C`` (``lower``) and ``P``
    (``onward``, except where no column is left after ``J``).

    By ``_ELIMINATED`` columns at a time (``J = J1 J2``): ``C`` is then ``[[C1, 0], [V_J2 P1^T,
    C2]]`` and ``P`` is ``[P1; P2]``, and two Choleskys and solves of half the size, with their
    smaller products, cost less than one of the whole block (MKL's, at these sizes).
    """
    for first in range(start, end, _ELIMINATED):
        last = min(first + _ELIMINATED, end)
        here = slice(first - start, last - start)
        coupled = pushed[first:last] @ state  # V_J S
        inner = coupled @ pushed[first:last].T
        inner.diagonal().add_(inverse[first:last])
        lower[here, here] = torch.linalg.cholesky(inner)  # reads the lower triangle only: no need to symmetrise
        if first > start:
            lower[here, : here.start] = pushed[first:last] @ onward[: here.start].T
        if last < pushed.shape[0]:
            onward[here] = torch.linalg.solve_triangular(lower[here, here], coupled, upper=False)
            state.addmm_(onward[here].T, onward[here], alpha=-1)


class _Products:
    """Matrix products of the sketch in ``dtype`` (see ``_product_dtype``) into memory allocated once
    per layer: fresh block-sized results and conversions cost a page fault per 4 KB, which in a
    wide layer took longer than the products themselves. Products of up to ``rows x width``, of
    operands cast from up to ``cast_rows x width`` (``rows`` unless given)."""

    def __init__(
        self,
        dtype: torch.dtype,
        rows: int,
        width: int,
        device: torch.device,
        pool: BufferPool | None = None,
        cast_rows: int | None = None,
    ) -> None:
        self.dtype = dtype
        self._operand = _buffer(((cast_rows or rows) * width,), dtype, device, pool)
        self._result = _buffer((rows * width,), dtype, device, pool)

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in ``dtype``: itself, or a copy valid until the next call (of up to ``rows x width``)."""
        if tensor.dtype == self.dtype:
            return tensor
        return self._operand[: tensor.numel()].view(tensor.shape).copy_(tensor)

    def mm(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``left @ right`` in ``dtype``; the result is valid until the next call."""
        out = self._result[: left.shape[0] * right.shape[1]].view(left.shape[0], right.shape[1])
        return torch.mm(left.to(self.dtype), self.cast(right), out=out)


class _Sum:
    """A float32 sum of products (``add``), kept also in the products' dtype (``operand``) as the
    right operand of the next ``_Products.mm``: updated in the same pass over it as the sum, where
    converting it at each product was a pass of its own (per block, over ``r x out``)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, pool: BufferPool | None):
        self.state = _buffer(shape, torch.float32, device, pool).zero_()
        self.operand = self.state
        if dtype != torch.float32:
            self.operand = _buffer(shape, dtype, device, pool).zero_()

    def add(self, product: torch.Tensor) -> None:
        if self.operand is self.state:
            self.state += product
        elif native.usable(self.state):
            native.add_and_round(self.state, product, self.operand)
        else:
            self.state += product
            self.operand.copy_(self.state)


class _BlockRounding:
    """GPTQ's rounding of a block of weight columns (``__call__``), with its memory allocated once
    per layer: fresh block-sized temporaries cost a page fault per 4 KB. The torch loop's own
    scratch is made only if it runs (``_torch_scratch``): the compiled loop needs none.

    The errors it hands back are in ``errors``, the dtype of the product that takes them on: the
    compiled loop writes them so, where a cast of its own was one more pass over the block.
    """

    def __init__(
        self,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        pool: BufferPool | None = None,
        errors: torch.dtype = torch.float32,
    ) -> None:
        self.grid = fp8.GridRounding(dtype, width, device)
        self.width, self.device, self.pool = width, device, pool
        self.errors = _buffer((BLOCK, width), errors, device, pool)

    @functools.cached_property
    def _torch_scratch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The torch loop's rounded values, compensated columns and float32 errors (``errors``
        itself where it is float32)."""
        values, compensated = (_buffer((BLOCK, self.width), torch.float32, self.device, self.pool) for _ in range(2))
        if self.errors.dtype == torch.float32:
            return values, compensated, self.errors
        return values, compensated, _buffer((BLOCK, self.width), torch.float32, self.device, self.pool)

    def __call__(
        self,
        block: torch.Tensor,
        triangle: _Triangle,
        out: torch.Tensor,
        minus: torch.Tensor | None = None,
        polish_start: bool = False,
    ) -> torch.Tensor:
        """Round ``block - minus`` (one weight column per row, in units of the scale; ``block`` is
        not changed, unless ``polish_start``: then it becomes the values minus it, see ``_errors``)
        into ``out`` (fp8), each error compensated on the block's later columns through
        ``triangle`` (its part of the Cholesky factor of ``H^-1``); returns the errors divided by
        the factor's diagonal (valid until the next call), rounded once to their dtype.

        Compiled (``native.gptq_block``) where it can be, else the torch loop below.

        Column by column, but the errors reach the rows beyond a group of ``_GROUP`` in one product
        per group rather than one rank-1 update per column: each pass over the block's rows then
        does 16x the work. The factor's rows come divided by its diagonal, so that a column costs
        no division. A column is a handful of whole-row operations, and their count is what a
        narrow layer's time is made of: the rounding stays in float32 (``fp8.GridRounding``), and
        the block is cast to fp8 once at the end.
        """
        rows = block.shape[0]
        errors = self.errors[:rows]
        if native.usable(block):
            native.gptq_block(block, minus, triangle.spread, triangle.diagonal, out, errors, self.grid, polish_start)
            return errors
        relative, diagonal = triangle.spread.T.contiguous(), triangle.diagonal  # the torch loop reads rows
        values, compensated, within = (scratch[:rows] for scratch in self._torch_scratch)
        weights = block
        block = compensated.copy_(block) if minus is None else torch.sub(block, minus, out=compensated)
        columns, rounded, column_errors = block.unbind(0), values.unbind(0), within.unbind(0)
        for start in range(0, rows, _GROUP):
            end = min(start + _GROUP, rows)
            for i in range(start, end):
                self.grid(columns[i], rounded[i])  # saturates and rounds to nearest, as quantize_nearest does
                torch.sub(columns[i], rounded[i], out=column_errors[i])
                block[i + 1 : end].addr_(relative[i, i + 1 : end], column_errors[i], alpha=-1)
            block[end:].addmm_(relative[start:end, end:].T, within[start:end], alpha=-1)
        out.copy_(values)  # exact: the values are on the grid
        if polish_start:
            torch.sub(values, weights, out=weights)
        return torch.div(within, diagonal[:, None], out=errors)  # in float32, then rounded once


def _polish(
    error: torch.Tensor,
    quantized: torch.Tensor,
    moments: Gram | LowRankGram,
    passes: int,
    step: Step = no_step,
    pool: BufferPool | None = None,
) -> None:
    """Coordinate descent on ``tr(D H D^T)`` from GPTQ's rounding (``quantized``, changed in place),
    with the scale fixed, from its ``D`` (``error``: ``_errors``, kept up to date as weights move).

    GPTQ decides each column once, knowing only the columns before it; here every weight may then
    move to a grid neighbour (one fp8 step up or down) whenever that lowers its row's error,
    column by column, all rows at once (``_Descent``). Blocks of columns keep the products
    BLAS-3: ``g = (H D)_J`` is formed for a block, updated through the block's own ``H_JJ``, and
    the block's steps reach the rest afterwards (``_Coupling``).
    """
    columns, width = quantized.shape
    coupling = _Coupling(moments, error, pool)
    descent = _Descent(quantized.dtype, width, quantized.device, coupling.step_dtype, pool)
    for done in range(passes):
        for start in range(0, columns, BLOCK):
            step(done * columns + start, passes * columns)
            end = min(start + BLOCK, columns)
            local, base, residual = coupling.block(start, end)
            onward = coupling.onward(start, end)
            steps = descent.sweep(quantized[start:end], local, base, residual, error[start:end], onward)
            if onward is None:
                coupling.update(start, end, steps)


def _errors(codes: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """``scaled`` (float32) turned into the values of ``codes`` (fp8) minus it, in place."""
    if native.usable(codes):
        native.polish_errors(codes, scaled)
        return scaled
    values = _Lookup((_fp8_neighbour_steps(codes.dtype, codes.device)[0],), BLOCK * codes.shape[1], codes.device)
    for start in range(0, codes.shape[0], BLOCK):
        block = slice(start, start + BLOCK)
        torch.sub(values(codes[block])[0], scaled[block], out=scaled[block])
    return scaled


class _Lookup:
    """Values by fp8 code from 256-entry ``tables``, for up to ``size`` codes at a time, into memory
    allocated once (fresh block-sized results cost a page fault per 4 KB)."""

    def __init__(self, tables: tuple[torch.Tensor, ...], size: int, device: torch.device) -> None:
        self._tables = tables
        self._index = torch.empty(size, dtype=torch.int32, device=device)
        self._results = [torch.empty(size, device=device) for _ in tables]

    def __call__(self, codes: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
        """The first ``count`` tables' entries for ``codes``, shaped like them (valid until the next call)."""
        index = self._index[: codes.numel()].copy_(codes.view(torch.uint8).flatten())
        return [
            torch.index_select(table, 0, index, out=result[: codes.numel()]).view(codes.shape)
            for table, result in zip(self._tables[:count], self._results, strict=False)
        ]


class _Descent:
    """The polish's coordinate-descent sweeps over blocks of columns, with their memory allocated once
    per layer (fresh block-sized temporaries cost a page fault per 4 KB). Steps come out in
    ``step_dtype``: the dtype of the product that takes them on (``_Coupling``)."""

    def __init__(
        self,
        dtype: torch.dtype,
        width: int,
        device: torch.device,
        step_dtype: torch.dtype,
        pool: BufferPool | None = None,
    ) -> None:
        self.dtype, self.width, self.device, self.step_dtype, self.pool = dtype, width, device, step_dtype, pool

    @functools.cached_property
    def _out(self) -> torch.Tensor:
        """The steps handed back, made only if any are (a sweep with ``onward`` hands back none)."""
        return _buffer((BLOCK, self.width), self.step_dtype, self.device, self.pool)

    @functools.cached_property
    def _torch_scratch(self) -> tuple[_Lookup, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The torch sweep's memory, made only if it runs (the compiled sweep needs none): each
        code's value and steps to its grid neighbours above (>= 0) and below (<= 0), the steps,
        the gradient, a row's slope and where it passes its step."""
        lookup = _Lookup(_fp8_neighbour_steps(self.dtype, self.device), BLOCK * self.width, self.device)
        steps, gradient = (_buffer((BLOCK, self.width), torch.float32, self.device, self.pool) for _ in range(2))
        return lookup, steps, gradient, torch.empty(self.width, device=self.device), torch.empty_like(steps[0])

    def sweep(
        self,
        codes: torch.Tensor,
        local: _Local,
        base: torch.Tensor,
        residual: torch.Tensor | None,
        error: torch.Tensor,
        onward: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor | None:
        """One sweep over a block of columns (``codes``, fp8, changed in place) with ``H_JJ``
        (``local``) and the gradient ``(H D)_J = base + residual * error`` (``residual`` per
        column, or none); adds the steps to ``error`` (``D_J``) and returns them (in units of the
        scale; valid until the next call), or, given ``onward`` (``_Coupling.onward``: only where
        the compiled loops run), adds them to the sketch's state itself and returns None.

        A step ``d`` changes a row's error by ``d (2 g + d H_ii)``: a step up ``u > 0`` helps when
        the slope ``-2 g / H_ii > u``, a step down ``l < 0`` when the slope ``< l``, never both. So a
        column clamps its slope to its rows' neighbour steps and keeps those it had to clamp (no
        fp8 conversion and no comparison inside the loop: on the CPU a ``where`` on a boolean mask
        cost ten times a clamp). As in ``_BlockRounding``, a column's step reaches the rest of its
        group at once and the rest of the block in one product per group; the columns already
        passed need no update in this sweep.
        """
        rows = codes.shape[0]
        if native.usable(codes):
            residual = None if residual is None else residual.contiguous()
            steps = None if onward is not None else self._out[:rows]
            native.polish_sweep(codes, base, residual, error, local.matrix, local.inverse, steps, onward)
            return steps
        if onward is not None:
            raise ValueError("only the compiled sweep adds its steps to the state itself")
        local, inverse = local.matrix, local.inverse.tolist()
        lookup, steps, gradient, slope, beyond = self._torch_scratch
        steps, gradient = steps[:rows], gradient[:rows]
        if residual is None:
            gradient.copy_(base)
        else:
            torch.addcmul(base, residual[:, None], error, out=gradient)
        values, up, down = lookup(codes)
        for start in range(0, rows, _GROUP):
            end = min(start + _GROUP, rows)
            for i in range(start, end):
                torch.mul(gradient[i], inverse[i], out=slope)
                torch.clamp(slope, down[i], up[i], out=steps[i])
                torch.sub(slope, steps[i], out=beyond).sign_().abs_()  # 1 where the slope passes the step
                steps[i].mul_(beyond)
                gradient[i + 1 : end].addr_(local[i, i + 1 : end], steps[i])
            gradient[end:].addmm_(local[end:, start:end], steps[start:end])
        # grid values plus grid differences: exact, the cast changes nothing; + 0 turns a -0 into 0
        codes.copy_(values.add_(steps).add_(0.0))
        error += steps
        return self._out[:rows].copy_(steps)  # exact in bfloat16 too: steps are powers of two


class _Local(NamedTuple):
    """A block's ``H_JJ`` as the polish's sweeps read it (``_Descent.sweep``): the same at every pass,
    so made once per block (``_Coupling.block``). ``matrix``: contiguous float32 (symmetric: the
    compiled sweep reads its rows for its columns); ``inverse``: ``-2 / H_ii`` per column, float32."""

    matrix: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def of(cls, matrix: torch.Tensor) -> _Local:
        # a dead input (H_ii = 0) has g = 0: it stays
        inverse = [-2 / h if h > 0 else 0.0 for h in matrix.diagonal().tolist()]
        return cls(matrix.contiguous(), torch.tensor(inverse, dtype=torch.float32))


@functools.cache
def _fp8_neighbour_steps(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per fp8 code (256 entries): its value and the steps to the next finite values above and
    below (non-finite codes count as zero, as in the compiled sweep)."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = torch.unique(values[torch.isfinite(values)])  # sorted; +0 and -0 are one value
    ranks = torch.searchsorted(grid, values.nan_to_num(0.0, posinf=0.0, neginf=0.0)).clamp_(max=grid.numel() - 1)
    value, above, below = grid[ranks], grid[(ranks + 1).clamp_(max=grid.numel() - 1)], grid[(ranks - 1).clamp_(min=0)]
    return value.to(device), (above - value).to(device), (below - value).to(device)


class _Coupling:
    """``H D`` for the polish, one block of columns at a time.

    With an exact ``H`` the whole ``G = H D`` is kept (narrow layers: ``in x out`` floats) and a
    block's steps reach it through ``H[:, J]``; with ``H = F F^T + diag(r)`` only ``P = F^T D``
    (``r x out``) is kept, and a block's ``G`` is ``F_J P + r_J D_J``: ``O(out in r)`` a pass, that
    product in ``_product_dtype`` (``P`` is kept in float32 and as that dtype, its operand). Both
    are kept transposed, one row per output, which is where a moved weight's step lands (see
    ``onward``). Made from ``D`` once: the steps that update it are exact grid differences, so
    making it again at each pass would round no less than keeping it up to date. ``P`` is made
    ``_START_COLUMNS`` of ``D``'s columns per product: each product is rounded once to its dtype,
    as a block's is, and every product added is one more pass over the ``out x r`` state.
    A block's ``H_JJ`` is made at its first pass and kept (``locals``: 64 KB a block).
    """

    def __init__(self, moments: Gram | LowRankGram, error: torch.Tensor, pool: BufferPool | None = None):
        self.locals: dict[int, _Local] = {}
        if isinstance(moments, Gram):
            self.matrix, self.factor, self.residual = moments.matrix.to(error), None, None
            self.step_dtype = error.dtype
            self.state = self.operand = _buffer((error.shape[1], error.shape[0]), error.dtype, error.device, pool)
            torch.mm(error.T, self.matrix, out=self.state)  # (H D)^T, H being symmetric
            return
        self.matrix, self.factor, self.residual = None, moments.factor.to(error), moments.residual().to(error)
        rows, dtype = max(BLOCK, self.factor.shape[1]), _product_dtype(error.device)
        self.products = _Products(dtype, rows, error.shape[1], error.device, pool, cast_rows=_START_COLUMNS)
        self.factor_product = self.factor.to(self.products.dtype)
        self.step_dtype = self.products.dtype
        self.sum = _Sum((error.shape[1], self.factor.shape[1]), self.step_dtype, error.device, pool)
        self.state, self.operand = self.sum.state, self.sum.operand
        for start in range(0, error.shape[0], _START_COLUMNS):
            self.update(start, start + _START_COLUMNS, error[start : start + _START_COLUMNS])

    def block(self, start: int, end: int) -> tuple[_Local, torch.Tensor, torch.Tensor | None]:
        """For the columns ``J = start:end``: ``H_JJ``, and ``(H D)_J`` as a base and the residual
        that multiplies ``D_J`` on top of it (see ``_Descent.sweep``; valid until the next call)."""
        if start not in self.locals:
            self.locals[start] = _Local.of(self._local(start, end))
        if self.factor is None:
            return self.locals[start], self.state[:, start:end].T, None
        base = self.products.mm(self.factor_product[start:end], self.operand.T)
        return self.locals[start], base, self.residual[start:end]

    def _local(self, start: int, end: int) -> torch.Tensor:
        if self.factor is None:
            return self.matrix[start:end, start:end]
        factor = self.factor[start:end]
        return factor @ factor.T + torch.diag(self.residual[start:end])

    def onward(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """What the compiled sweep needs to add a block's steps to the state itself (see
        ``native.polish_sweep``), or None where there are no compiled loops. A sweep moves a tenth
        of the weights or fewer, so the update ``P += F_J^T steps`` (or ``G += H_J^T steps``) as a
        product costs as much as the block's gradient product (with an exact ``H``, most of the
        layer's time); the sweep adds each moved weight's step to its output's row instead."""
        if not native.usable(self.state):
            return None
        rows = self.matrix[start:end] if self.factor is None else self.factor[start:end]
        return rows.contiguous(), self.state, None if self.operand is self.state else self.operand

    def update(self, start: int, end: int, steps: torch.Tensor) -> None:
        if self.factor is None:
            self.state.addmm_(steps.T, self.matrix[start:end])
            return
        self.sum.add(self.products.mm(self.products.cast(steps).T, self.factor_product[start:end]))


def _polish_coupled(
    scaled: torch.Tensor, quantized: torch.Tensor, gram: Gram, metric: torch.Tensor, passes: int
) -> None:
    """Coordinate descent on ``tr(D H D^T G)`` (``quantized`` changed in place), ``G`` an output-side metric.

    ``_polish`` treats every output row as its own problem, which is right when the output error
    of each row costs the same downstream. The layer that consumes this one's output mixes its
    rows (``G = W_2^T W_2``, normalised, plus the identity), so some combinations of row errors
    cost less than others; a step ``d`` in weight ``(o, i)`` then changes the error by
    ``d (2 (H D G)_io + d H_ii G_oo)``. Rows are coupled, so each column is descended row by row
    (``_descend_coupled``), each step judged on the gradient left by the steps before it.
    """
    error = as_float(quantized).sub_(scaled)
    del scaled
    matrix = gram.matrix.to(error)
    metric = metric.to(error)
    values, up, down = _neighbour_steps(quantized)
    for _ in range(passes):
        coupled = error @ metric  # D G, one row per weight column
        for i in range(error.shape[0]):
            energy = float(matrix[i, i])
            if energy <= 0:  # a dead input: its weights cost nothing either way
                continue
            steps = _descend_coupled(matrix[i] @ coupled, metric, energy, up[i], down[i])
            moved = steps.nonzero().flatten()
            if moved.numel():
                error[i] += steps
                coupled[i] += steps[moved] @ metric[moved]
                values[i] += steps
                _, up[i], down[i] = _neighbour_steps(values[i].to(quantized.dtype))
    quantized.copy_(values)  # grid values plus grid differences: exact


def _neighbour_steps(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float values of fp8 ``codes`` and the steps to their next grid values above (``>= 0``)
    and below (``<= 0``; zero at either end of the grid), by table lookups."""
    index = codes.view(torch.uint8).flatten().int()
    tables = _fp8_neighbour_steps(codes.dtype, codes.device)
    return tuple(table.index_select(0, index).view(codes.shape) for table in tables)


def _descend_coupled(
    gradient: torch.Tensor, metric: torch.Tensor, energy: float, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Steps for one column's weights (one per output row) on ``tr(D H D^T G)``, from its gradient
    ``(H D G)_i`` (changed in place) and ``H_ii`` (``energy``).

    The rows that would step on the column's gradient as it comes are visited in order, each judged
    again on the gradient the steps before it left (a step changes it by ``H_ii d G_o``); rows that
    only become worth a step after others moved wait for the next pass. Every step taken lowers
    the objective.
    """
    curvature = metric.diagonal().tolist()
    slope = gradient * (-2 / energy) / metric.diagonal()
    candidates = ((slope > up) | (slope < down)).nonzero().flatten().tolist()
    ups, downs = up.tolist(), down.tolist()
    steps = torch.zeros_like(gradient)
    for o in candidates:
        target = -2 * gradient[o].item() / (energy * curvature[o])
        step = ups[o] if target > ups[o] else downs[o] if target < downs[o] else 0.0
        if step != 0.0:
            steps[o] = step
            gradient.add_(metric[o], alpha=energy * step)
    return steps
