"""GPTQ on the FP8 grid: round columns one at a time, pushing each error onto the columns not yet rounded.

With the input second moments ``H = X^T X`` of a layer (from ``calibration.Recorder``), the
output error of a rounded weight is ``tr(D H D^T)`` with ``D = W_q - W``. GPTQ minimises it
greedily: after rounding column ``i`` (round-to-nearest against the fixed per-tensor scale), the
error is compensated on the remaining columns through the Cholesky factor of ``H^-1``. Columns
go in order of decreasing ``H_ii`` (act-order: the inputs with the most energy first), and a
small damping ``damp * mean(diag H)`` keeps ``H`` invertible when few rows were recorded. The
result is checked on the held-out half of the statistics and replaced by round-to-nearest when
that is better there.
"""

from __future__ import annotations

import torch

from . import fp8
from .calibration import LayerStatistics
from .rounding import RoundingResult

BLOCK = 128


def round_gptq(
    weight: torch.Tensor, scale: float, dtype: torch.dtype, stats: LayerStatistics, damp: float = 0.01
) -> RoundingResult:
    """GPTQ-rounded fp8 weight; never worse than RTN on the held-out statistics."""
    weight = weight.float()
    device = weight.device
    gram = stats.gram.to(device=device, dtype=torch.float64)
    order = torch.argsort(torch.diagonal(gram), descending=True)
    quantized = _gptq(weight[:, order], gram[order][:, order], scale, dtype, damp)
    quantized = quantized[:, torch.argsort(order)]
    rtn = fp8.quantize_nearest(weight, scale, dtype)
    held_out = stats.gram_heldout.to(device=device, dtype=torch.float64)
    error_rtn = output_error(weight, rtn.float() * scale, held_out)
    error = output_error(weight, quantized.float() * scale, held_out)
    if error > error_rtn:
        return RoundingResult(rtn, error_rtn, error_rtn, fell_back=True)
    return RoundingResult(quantized, error_rtn, error)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(D H D^T) / tr(W H W^T))`` for inputs with second moments ``H``."""
    delta = (approx - weight).double()
    reference = float(torch.einsum("oi,ij,oj->", weight.double(), gram, weight.double()))
    error = float(torch.einsum("oi,ij,oj->", delta, gram, delta))
    return (max(error, 0.0) / reference) ** 0.5 if reference > 0 else 0.0


def _gptq(weight: torch.Tensor, gram: torch.Tensor, scale: float, dtype: torch.dtype, damp: float) -> torch.Tensor:
    columns = weight.shape[1]
    gram = gram.clone()
    dead = torch.diagonal(gram) == 0  # inputs never seen: their weights cannot matter
    gram[dead, dead] = 1.0
    gram += damp * float(torch.diagonal(gram).mean()) * torch.eye(columns, dtype=gram.dtype, device=gram.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    upper = torch.linalg.cholesky(inverse, upper=True).float()  # rows: how column i's error spreads onwards
    work = weight.clone()
    quantized = torch.empty_like(weight, dtype=dtype)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = work[:, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            column = fp8.quantize_nearest(block[:, i], scale, dtype)
            quantized[:, start + i] = column
            errors[:, i] = (block[:, i] - column.float() * scale) / upper[start + i, start + i]
            block[:, i:] -= errors[:, i : i + 1] * upper[start + i, start + i : end]
        work[:, end:] -= errors @ upper[start:end, end:]
    return quantized
