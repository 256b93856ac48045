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

import dataclasses
import functools
import math
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from . import fp8, native
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
# on a GPU: ~16 M weights (~1 GB of working copies), so that each of the step's ~15 kernels has work
# enough to hide its launch; 256 K-weight blocks would leave the device idle between launches
_LEARNED_BLOCK_ELEMENTS_CUDA = 1 << 24
_PATIENCE = 50  # iterations without a changed decision or a better loss before the optimiser stops
_CHECK_EVERY = 10  # iterations between looks at the losses and the decisions (a block-sized pass each)
_HELD_OUT_EVERY = 20  # iterations between looks at the held-out inputs (one product each)
_TINY = 1e-30  # floor of |2 soft - 1| under the regulariser's logarithm
_ONE_MINUS_TWO_GAMMA = torch.tensor(1 - 2 * _GAMMA)
# floor of the regulariser's exponent: exp() of less is float32-subnormal, which made the CPU's exp
# 3x slower at the anneal's start, for terms that change nothing
_LOWEST_EXPONENT = -80.0


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
    return pool.tensor(weight.shape, dtype)


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
    with one_cpu_thread(device):  # small passes: the thread pool's barriers would cost more than they save
        inputs = calibration.inputs(name, weight.shape[1], options.calib_samples, generator, device)
        held_out = calibration.inputs(name, weight.shape[1], options.calib_samples, generator, device)
        matmul = _matmul_dtype(options, device)
        fitted, checked = inputs.to(matmul), held_out.to(matmul)
        held_out_t = held_out.T.contiguous()  # the products below on row-major operands (_output_gradient)
        del inputs
        grid = _Grid(weight, scale, dtype)

    learned = torch.empty(weight.shape, dtype=dtype, device=device)
    blocks = _row_blocks(weight, _LEARNED_BLOCK_ELEMENTS_CUDA if device.type == "cuda" else _LEARNED_BLOCK_ELEMENTS)
    total = len(blocks) * options.num_iter
    progress = _Progress(step, total)

    def learn(rows: slice) -> tuple[int, int, float, float, float, bool]:
        """Optimises one block into ``learned``; its iterations, its work, its held-out sums
        (reference, RTN, learned) and whether it stopped early for losing to RTN there."""
        choices = grid.block(rows)
        decisions, used, lost = _optimise_block(choices, fitted, options, (progress, 0, total), checked)
        chosen = choices.up if decisions is None else decisions
        # where(chosen, high, low) as uint8 arithmetic, exact modulo 256: ATen's uint8 ``where`` was 30x slower
        torch.sub(choices.high, choices.low, out=learned.view(torch.uint8)[rows]).mul_(chosen).add_(choices.low)
        # the held-out sums in float32, from the deltas in fp8 units: |X (q scale - w)^T| = scale |X delta^T|
        reference = _squared_norm(weight[rows].float() @ held_out_t)
        error_rtn = _squared_norm(choices.delta(choices.up) @ held_out_t) * scale**2
        error = error_rtn if decisions is None else _squared_norm(choices.delta(decisions) @ held_out_t) * scale**2
        return used, used * choices.step.numel(), reference, error_rtn, error, lost

    outcomes = _map_blocks(learn, blocks, device)
    iterations = max(outcome[0] for outcome in outcomes)
    work, reference, error_rtn, error = (sum(outcome[i] for outcome in outcomes) for i in (1, 2, 3, 4))

    error_rtn, error = relative_error(error_rtn, reference), relative_error(error, reference)
    if all(outcome[5] for outcome in outcomes):  # every block stopped early and kept RTN
        return RoundingResult(learned, error_rtn, error_rtn, iterations, fell_back=True, work=work)
    if error > error_rtn:  # round again rather than keep a second full-size fp8 copy all along
        del learned
        with one_cpu_thread(device):
            rtn = round_nearest(weight, scale, dtype, step=lambda *_: step(total, total)).quantized
        return RoundingResult(rtn, error_rtn, error_rtn, iterations, fell_back=True, work=work)
    return RoundingResult(learned, error_rtn, error, iterations, work=work)


@dataclass
class _Choices:
    """Each weight's two fp8 neighbours, in fp8 units relative to the scaled weight ``w / scale``:
    ``offset`` (the nearer-to-zero one, ``base - w / scale``) and ``offset + step`` (the other; ``step`` is 0
    on the grid), the optimiser's starting logits (whose hard rounding is RTN), which of the two RTN
    picks (``up``: the farther one), and the two as fp8 bit patterns (``low``, ``high``)."""

    offset: torch.Tensor
    step: torch.Tensor
    logits: torch.Tensor
    up: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def delta(self, decisions: torch.Tensor) -> torch.Tensor:
        """The rounding error in fp8 units of the hard ``decisions`` (True: the farther neighbour)."""
        return torch.addcmul(self.offset, decisions, self.step)


def _choices(scaled: torch.Tensor, dtype: torch.dtype) -> _Choices:
    """The ``_Choices`` of float32 values already divided by the scale and clamped to the fp8 range."""
    base, step = fp8.grid_neighbours(scaled, dtype)
    offset = base - scaled
    fraction = torch.where(step != 0, -offset / step.where(step != 0, 1.0), 0.0)
    rtn = scaled.to(dtype).view(torch.uint8)
    low, high = base.to(dtype).view(torch.uint8), (base + step).to(dtype).view(torch.uint8)
    return _Choices(offset, step, _inverse_rectified_sigmoid(fraction), (rtn == high) & (step != 0), low, high)


class _Grid:
    """The ``_Choices`` of a weight, a block of rows at a time.

    A bf16/fp16 weight has at most 65536 distinct values, so their choices are computed once, on
    the table of all of them (``_sixteen_bit_values``), and a block only gathers its own by bit
    pattern: four gathers instead of the twenty-odd float passes that ``fp8.grid_neighbours`` and
    the conversions take, which were most of learned rounding's fixed cost per tensor.
    """

    def __init__(self, weight: torch.Tensor, scale: float, dtype: torch.dtype) -> None:
        self.weight, self.scale, self.dtype, self.table = weight, scale, dtype, None
        if weight.dtype in (torch.bfloat16, torch.float16):
            self.table = self._scaled(_sixteen_bit_values(weight.dtype, weight.device))

    def _scaled(self, values: torch.Tensor) -> _Choices:
        limit = fp8.fp8_max(self.dtype)
        return _choices((values.float() / self.scale).clamp_(-limit, limit), self.dtype)

    def block(self, rows: slice) -> _Choices:
        part = self.weight[rows].contiguous()  # the optimiser's passes and its compiled step take flat blocks
        if self.table is None:
            return self._scaled(part)
        index = part.view(torch.uint16).flatten().int()
        fields = (getattr(self.table, f.name) for f in dataclasses.fields(_Choices))
        return _Choices(*(column.index_select(0, index).view(part.shape) for column in fields))


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
    """``[function(rows) for rows in blocks]``; on a CPU, one block per thread of a pool of up to
    torch's thread count, each running torch's kernels on one thread with subnormals flushed to zero.

    A block's step is ~15 small kernels: with torch's thread pool each of them ends in a barrier,
    and on a busy machine a barrier waits for a descheduled thread's next time slice. Beside five
    other processes on 2 cores that made a block-iteration take 70-500 ms instead of 4-7 ms on one
    thread; blocks are independent (output rows are), so the cores share blocks instead.
    Late in the optimisation many gradients and their squares fall below float32's normal range,
    and arithmetic on subnormals is many times slower on x86 (the chain rule's kernels took 5x as
    long); flushing them changes nothing that matters. The setting is per thread, and the pool's
    threads are the optimiser's own, so the caller's is left alone.
    """
    if device.type != "cpu":
        return [function(rows) for rows in blocks]

    def run(rows: slice) -> T:
        torch.set_num_threads(1)  # this thread's own setting (OpenMP's is per thread)
        torch.set_flush_denormal(True)
        return function(rows)

    pool = ThreadPoolExecutor(min(torch.get_num_threads(), len(blocks)), thread_name_prefix="learned-rounding")
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
    choices: _Choices,
    inputs: torch.Tensor,
    options: LearnedOptions,
    steps: tuple[Step, int, int] = (no_step, 0, 0),
    held_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, int, bool]:
    """Optimise the rounding of a block of rows: returns its hard decisions (True: the neighbour
    farther from zero; None: keep RTN), the iterations used, and whether it stopped early because it
    lost to RTN on ``held_out`` (see below). ``inputs`` and ``held_out`` are in the matmul dtype.
    With ``steps = (step, first, total)``, ``step(first + i, total)`` is called before iteration ``i``.

    Every ``_CHECK_EVERY`` iterations after the warm-up the optimiser looks at where it stands
    (between looks it never waits for the device): it stops once no rounding decision has changed
    and the loss has not improved by ``early_stop_threshold`` for ``_PATIENCE`` iterations. With
    ``held_out`` inputs it also scores the hard decisions on them about every ``_HELD_OUT_EVERY``
    iterations: where they lose to RTN there at two looks in a row, the second no better, the
    block stops and returns RTN. The held-out guard would most
    likely reject it at the end, and the rest of the budget would be spent on overfitting (with
    isotropic random inputs, nearly always).

    The loss, the gradient through the rectified sigmoid and the Adam update are written out by
    hand, in place, rather than by autograd and ``torch.optim``: the matrix work per weight is
    only ``4 * calib_samples`` flops an iteration, so the element-wise passes around it set the
    speed. What is fixed across iterations is computed once per block, every per-iteration tensor
    lives in a buffer allocated once (``_Workspace``), and on the CPU everything between the
    products is one compiled pass over the block (``native.learned_step``); the torch fallback
    takes about ten: the soft choice enters only as ``u = 1 - 2 soft`` (the delta, the regulariser
    and the clamp's mask all read it), the regulariser's coefficient rides inside its power's
    ``exp``, and Adam is ATen's fused kernel.
    """
    report, first, total = steps
    batch = options.batch_size or inputs.shape[0]
    rtn_delta = choices.delta(choices.up).to(inputs.dtype)
    rtn_loss = float(_output_loss(inputs, rtn_delta, batch))
    if rtn_loss == 0.0 or options.num_iter <= 0:  # RTN is exact: nothing to learn
        return None, 0, False
    rtn_held_out = float(_output_loss(held_out, rtn_delta, batch)) if held_out is not None else 0.0
    del rtn_delta

    work = _Workspace(choices, inputs.dtype, options.num_iter)
    both = (inputs, inputs.T.contiguous())  # a copy per block: small beside its iterations
    adam = _Adam(choices.logits, options.lr, options.num_iter)
    # d(output loss)/d(logits) = 2 (X delta^T)^T X * step / rtn_loss * (zeta - gamma) * s (1 - s)
    coefficient = 2 * (_ZETA - _GAMMA) / rtn_loss
    warmup = int(_WARMUP * options.num_iter)
    best, quiet, decisions, last_held_out, looked = math.inf, 0, choices.logits >= 0, math.inf, 0
    iteration = 0
    for iteration in range(1, options.num_iter + 1):
        report(first + iteration - 1, total)
        loss = work.losses[iteration - 1]
        regulariser = None
        if iteration > warmup and options.reg_lambda > 0:
            progress = (iteration - warmup) / max(1, options.num_iter - warmup)
            beta = _BETA_END + 0.5 * (_BETA_START - _BETA_END) * (1 + math.cos(math.pi * progress))
            regulariser = _Regulariser(beta, options.reg_lambda, choices.step.numel())
        product = _output_product(both, work.delta, batch, 1 / rtn_loss, (work.product, work.gradient), loss)
        work.update(product, coefficient, adam, regulariser, loss)

        if iteration % _CHECK_EVERY or iteration <= warmup or iteration == options.num_iter:
            continue
        for value in work.losses[looked:iteration].tolist():  # one transfer per look
            improved = value < best - options.early_stop_threshold
            best, quiet = (value, 0) if improved else (best, quiet + 1)
        looked = iteration
        current = torch.ge(adam.param, 0, out=work.decisions)
        if not torch.equal(current, decisions):  # a decision changed since the last look
            work.decisions, decisions, quiet = decisions, current, 0
        if quiet >= _PATIENCE:
            break
        if held_out is not None and (iteration - warmup) % _HELD_OUT_EVERY < _CHECK_EVERY:
            held_out_loss = float(_output_loss(held_out, choices.delta(current).to(held_out.dtype), batch))
            if rtn_held_out <= last_held_out <= held_out_loss:  # lost twice in a row, and not recovering
                return None, iteration, True
            last_held_out = held_out_loss
    return adam.param >= 0, iteration, False


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
    writes them in place instead of allocating ~10 block-sized temporaries an iteration. The
    losses of every iteration stay on the device until the optimiser looks at them.

    ``compiled``: the element-wise part of each iteration is ``native.learned_step``'s one pass
    (a CPU with a C compiler), which keeps only ``sigmoid`` and derives ``u`` from it; else the
    ATen passes of ``update``, which keep ``u`` (``centred``) and the regulariser's ``power`` too.
    """

    def __init__(self, choices: _Choices, matmul_dtype: torch.dtype, iterations: int) -> None:
        logits = choices.logits
        self.compiled = native.usable(logits)
        self.step = choices.step  # a power of two (or 0): scaling by it is exact, so it needs no scaled copies
        self.middle = choices.offset + self.step * 0.5  # delta = offset + soft step = (offset + step / 2) - u step / 2
        self.sigmoid = torch.empty_like(logits)
        spare = (None, None) if self.compiled else (torch.empty_like(logits), torch.empty_like(logits))
        self.centred, self.power = spare
        self.delta = torch.empty_like(logits, dtype=matmul_dtype)
        self.gradient = torch.empty_like(logits)  # compiled: only a product summed over batches of inputs
        self.product = torch.empty_like(logits, dtype=matmul_dtype)
        self.soften(logits)
        self.decisions = torch.empty_like(logits, dtype=torch.bool)
        self.losses = torch.zeros(iterations, dtype=torch.float64, device=logits.device)

    def update(
        self,
        product: torch.Tensor,
        coefficient: float,
        adam: _Adam,
        regulariser: _Regulariser | None,
        loss: torch.Tensor,
    ) -> None:
        """Everything of an iteration after its products (``product`` from ``_output_product``): the
        gradient ``coefficient * step * product`` plus the regulariser's (adding its loss), through
        the rectified sigmoid, an Adam update of the logits, and their new sigmoid, ``u`` and delta."""
        if self.compiled:
            state = (self.step, self.middle, adam.param, adam.exp_avg, adam.exp_avg_sq, self.sigmoid)
            constants = None if regulariser is None else (math.log(regulariser.coefficient), regulariser.beta - 2)
            terms = native.learned_step(product, state, self.delta, coefficient, constants, adam.advance())
            if regulariser is not None:
                regulariser.add_loss(loss, terms)
            return
        initial = None if regulariser is None else _regulariser_gradient(self.centred, regulariser, self.power, loss)
        _scale_product(product, self.step, coefficient, initial, self.gradient)
        _chain_sigmoid(self.gradient, self.sigmoid, self.centred)
        adam.step(self.gradient)
        self.soften(adam.param)

    def soften(self, logits: torch.Tensor) -> None:
        """``sigmoid(logits)``, ``u = 1 - 2 rectified_sigmoid(logits)`` and the delta they give. A bf16
        delta is computed in float32 first (into ``gradient``, free until the next step): written to
        bf16 directly, ATen allocated a block-sized float32 temporary every iteration."""
        if self.compiled:
            native.learned_soften(logits, self.step, self.middle, self.sigmoid, self.delta)
            return
        _soften(logits, self.sigmoid, self.centred)
        exact = self.delta if self.delta.dtype == torch.float32 else self.gradient
        torch.addcmul(self.middle, self.centred, self.step, value=-0.5, out=exact)
        if exact is not self.delta:
            self.delta.copy_(exact)


class _Adam:
    """``torch.optim.Adam`` (default betas and eps, one tensor) with ``CosineAnnealingLR(T_max=num_iter)``,
    updating ``param`` in place from a gradient the caller computed, through ATen's fused kernel
    (one pass instead of six)."""

    def __init__(self, param: torch.Tensor, lr: float, num_iter: int) -> None:
        self.param, self.lr, self.num_iter = param, lr, num_iter
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = torch.zeros((), dtype=torch.float32, device=param.device)  # the kernel's step count
        self.done = 0

    def advance(self) -> tuple[float, float, float]:
        """Counts a step; its ``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)`` and eps, in double as
        ATen's fused kernel computes them, for ``native.learned_step``."""
        lr = self._lr()
        self.done += 1
        return lr / (1 - 0.9**self.done), math.sqrt(1 - 0.999**self.done), 1e-8

    def step(self, grad: torch.Tensor) -> None:
        lr = self._lr()
        self.done += 1
        self.steps += 1
        torch._fused_adam_(
            [self.param], [grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps],
            lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
        )  # fmt: skip

    def _lr(self) -> float:
        return self.lr * (1 + math.cos(math.pi * self.done / self.num_iter)) / 2


def _soften(logits: torch.Tensor, sigmoid: torch.Tensor | None = None, centred: torch.Tensor | None = None):
    """``(sigmoid(logits), 1 - 2 rectified_sigmoid(logits))``, into the given buffers when given.

    ``u = 1 - 2 soft = clamp(1 - 2 gamma - 2 (zeta - gamma) sigmoid, -1, 1)``: the step never needs
    ``soft`` itself, and ``u`` is the regulariser's ``-(2 soft - 1)``."""
    sigmoid = torch.sigmoid(logits, out=sigmoid)
    centred = torch.add(_ONE_MINUS_TWO_GAMMA, sigmoid, alpha=-2 * (_ZETA - _GAMMA), out=centred).clamp_(-1, 1)
    return sigmoid, centred


@dataclass(frozen=True)
class _Regulariser:
    """``reg_lambda * mean(1 - |2 soft - 1|^beta)`` over ``count`` weights at one ``beta`` of the anneal.

    With ``u = 1 - 2 soft`` its derivative in ``soft``, times ``zeta - gamma`` (the chain rule's
    constant, which ``_chain_sigmoid`` leaves out), is ``c u |u|^(beta - 2)``, ``c = 2 beta reg_lambda
    (zeta - gamma) / count``; ``beta >= 2`` throughout the anneal. Both paths compute the power and
    ``c`` as one ``exp(log c + (beta - 2) log |u|)`` with ``|u|`` kept above 0 (the factor ``u`` makes
    those elements 0 again) and the exponent above ``_LOWEST_EXPONENT``: on the CPU that is 3x faster
    than ``pow``, and ``c`` costs no pass of its own."""

    beta: float
    reg_lambda: float
    count: int

    @property
    def coefficient(self) -> float:
        return 2 * self.beta * self.reg_lambda * (_ZETA - _GAMMA) / self.count

    def add_loss(self, loss: torch.Tensor, terms: torch.Tensor | float) -> None:
        """Adds the term to ``loss`` from ``terms``, the sum of ``power * u`` (= ``c sum |u|^beta``)."""
        loss.add_(terms, alpha=-self.reg_lambda / (self.coefficient * self.count))
        loss.add_(self.reg_lambda)


def _regulariser_gradient(
    centred: torch.Tensor,
    regulariser: _Regulariser,
    out: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """The regulariser's gradient from ``u`` (``centred``), into ``out``; adds its term to ``loss``."""
    power = torch.abs(centred, out=out).clamp_(min=_TINY).log_()
    power = torch.add(torch.tensor(math.log(regulariser.coefficient)), power, alpha=regulariser.beta - 2, out=power)
    power = power.clamp_(min=_LOWEST_EXPONENT).exp_().mul_(centred)
    if loss is not None:
        regulariser.add_loss(loss, torch.dot(power.view(-1), centred.view(-1)))
    return power


def _chain_sigmoid(gradient: torch.Tensor, sigmoid: torch.Tensor, centred: torch.Tensor) -> None:
    """Turns d/d(soft) into d/d(logits) in place: 0 where the rectified sigmoid's clamp holds ``soft``
    at 0 or 1 (``u = 1 - 2 soft`` at -1 or 1), else times ``sigmoid (1 - sigmoid)`` (the factor
    ``zeta - gamma`` is the caller's). ATen's own backward kernels do each in one pass."""
    torch.ops.aten.hardtanh_backward.grad_input(gradient, centred, -1.0, 1.0, grad_input=gradient)
    torch.ops.aten.sigmoid_backward.grad_input(gradient, sigmoid, grad_input=gradient)


def _output_loss(inputs: torch.Tensor, delta: torch.Tensor, batch: int) -> torch.Tensor:
    """``||X delta^T||^2`` as a float64 tensor on the device, in batches of ``batch`` calibration rows."""
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    for start in range(0, inputs.shape[0], batch):
        total += (inputs[start : start + batch] @ delta.T).float().square().sum()
    return total


def _output_product(
    inputs: tuple[torch.Tensor, torch.Tensor],
    delta: torch.Tensor,
    batch: int,
    weight: float,
    buffers: tuple[torch.Tensor, torch.Tensor],
    loss: torch.Tensor,
) -> torch.Tensor:
    """``(X delta^T)^T X``, half the output loss's gradient in ``delta``; adds ``weight * ||X delta^T||^2``
    to ``loss``. With ``buffers = (product, gradient)``: ``product`` for one batch of inputs, else
    their products summed in float32 into ``gradient``.

    ``inputs = (X, X^T)``, the second contiguous: both products then multiply row-major matrices
    (``(X delta^T)^T = delta X^T``, then that times ``X``), the layout BLAS is fastest with
    (transposed operands made float32 products markedly slower; ``docs/benchmarks.md``).
    In batches of ``batch`` calibration rows, so that only one batch of outputs is alive at a time
    (``--batch_size`` bounds memory) and nothing is kept for a backward pass. ``X`` and
    ``delta`` share the matmul dtype (see ``_matmul_dtype``), as does ``product``, the block-sized
    buffer the second product is written to, so that no block-sized result is allocated every
    iteration.
    """
    product, gradient = buffers
    rows, columns = inputs
    total = product
    for start in range(0, rows.shape[0], batch):
        out = delta @ columns[:, start : start + batch]  # (X delta^T)^T
        loss.add_(out.float().square().sum(), alpha=weight)
        part = torch.mm(out, rows[start : start + batch], out=product)
        if rows.shape[0] > batch:
            total = gradient.add_(part) if start else gradient.copy_(part)
    return total


def _scale_product(
    product: torch.Tensor,
    step: torch.Tensor,
    coefficient: float,
    initial: torch.Tensor | None,
    gradient: torch.Tensor,
) -> None:
    """``initial + coefficient * step * product`` (no ``initial``: 0) into the float32 ``gradient``.
    ``step`` is a tensor of powers of two (or 0), so the result equals a product with a precomputed
    ``coefficient * step`` without reading one. A bf16 product is widened into ``gradient`` first:
    ATen's mixed-dtype ``addcmul`` is the slower path."""
    if product.dtype != gradient.dtype:
        product = gradient.copy_(product)
    if initial is None:
        torch.mul(product, step, out=gradient).mul_(coefficient)
    else:
        torch.addcmul(initial, product, step, value=coefficient, out=gradient)


def _inverse_rectified_sigmoid(fraction: torch.Tensor) -> torch.Tensor:
    return torch.logit((fraction - _GAMMA) / (_ZETA - _GAMMA))
