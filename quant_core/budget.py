"""The size budget (``max_size``): which quantized layers stay in their source dtype so the file fits.

Users pick fp8 to fit a GPU, so they may say how large the file may be. The converter then
spends the bytes between the smallest file (every eligible layer quantized) and the budget on the
layers whose quantization costs the output most per byte it saves: those stay in their source
dtype. A layer's predicted cost to the output is the power of round-to-nearest's relative error
on it, times its number of weights, times the share of its error that reaches the output:

- the relative error: with recorded statistics for the layer, its relative output error
  ``tr(D H Dᵀ) / tr(W H Wᵀ)`` (``D`` the rounding error, ``H`` its recorded inputs' second
  moments), the measure GPTQ minimises; without, the weight-only proxy ``||D||² / ||W||²``;
- times the number of weights: each weight's rounding error adds to the output independently, so a
  layer with four times the weights at the same relative error costs the output about four times
  as much (measured on a DiT and a BERT, ``docs/budget.md``); per byte saved the cost is then the
  error power itself, not the error power over the layer's size;
- times the share: 1, or ``SIDE_STREAM`` for a layer on a side stream of its family
  (``policy.side_stream``: the text stream of double-stream blocks, whose tokens the output does
  not include, so its error reaches the output only through attention);
- when GPTQ rounds with the statistics, times ``FITTED`` for a layer recorded on at least as many
  rows as it has inputs: GPTQ removes more of such a layer's error than of one whose few rows leave
  its inputs undetermined (adaLN modulation and time layers see one row per sample, not per token).

Ranking reads every quantized weight once (and its statistics) before the conversion starts:
one tensor at a time, the cost of one round-to-nearest pass without writing. Layers are then
kept greedily, the highest cost per byte saved first, skipping any that would no longer fit;
every step checks the exact size the output would have (``convert.plan_conversion``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import fp8
from .calibration import LayerStatistics

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?\s*(%|[kmgt]i?b|b)?\s*$", re.IGNORECASE)
HELP = (
    "largest file to write: bytes (12GB, 11.5GiB, 12e9) or a share of the source's tensors (0.55 or 55%); "
    "the layers whose fp8 error costs the output most per byte stay in full precision, as many as fit "
    "(ranked by the calibration file's statistics when given); empty: no limit"
)


@dataclass(frozen=True)
class Budget:
    """A parsed ``max_size``: a number of bytes, or a share of the source's tensor bytes."""

    text: str
    nbytes: int | None = None
    share: float | None = None

    def limit(self, source_bytes: int) -> int:
        """The largest output, in bytes, for a source whose tensors take ``source_bytes``."""
        return self.nbytes if self.nbytes is not None else math.floor(self.share * source_bytes)


def parse_budget(text: str | None) -> Budget | None:
    """``max_size`` as typed: None for blank; a ``ValueError`` naming the setting otherwise.

    A bare number up to 1 is a share of the source (``0.55``), a larger one bytes (``12e9``);
    units are decimal (``GB``) or binary (``GiB``), in any case.
    """
    if text is None or not text.strip():
        return None
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(
            f"max_size {text!r}: give bytes (12GB, 11.5GiB, 12e9, 12000000000) or a share of the source (0.55 or 55%)"
        )
    value = float(match.group(1) + (match.group(2) or ""))
    unit = (match.group(3) or "").lower()
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"max_size {text!r} must be more than 0")
    if unit == "%":
        return Budget(text, share=value / 100)
    if not unit and value <= 1:
        return Budget(text, share=value)
    return Budget(text, nbytes=math.floor(value * _UNITS[unit]))


# The share of a side-stream layer's error power that reaches the output: the text tokens' share of
# a joint attention's tokens, which an image token attends to under uniform attention (Flux: 512 of
# 4608; the bench DiT: 24 of 280). The DiT measures 0.001-0.02 per byte (docs/budget.md): this errs high.
SIDE_STREAM = 0.1
# The error power GPTQ leaves on a layer whose recorded rows determine its inputs, relative to one
# recorded on fewer rows than it has inputs: on the bench DiT GPTQ leaves 0.16 (median) of
# round-to-nearest's end-to-end error power on token layers, 0.33-0.34 on modulation layers.
FITTED = 0.5


@dataclass
class KeptLayer:
    """A weight the budget keeps in its source dtype, and why: what its fp8 version would have
    cost (``error``, round-to-nearest's, relative, of ``measure``, on ``numel`` weights, ``share``
    of it reaching the output, ``left`` of it after the rounding) and saved (``saved`` bytes)."""

    name: str
    saved: int
    error: float
    measure: str  # "output" (recorded statistics) or "weight" (the weight-only proxy)
    numel: int
    share: float = 1.0  # SIDE_STREAM for a layer on a side stream
    left: float = 1.0  # FITTED for a layer GPTQ rounds on statistics that determine its inputs

    @property
    def power(self) -> float:
        """The error power fp8 would add to the output, in units of one weight's relative error power."""
        return self.error**2 * self.numel * self.share * self.left

    @property
    def cost(self) -> float:
        """Error power added per byte saved: the ranking key, highest kept first."""
        return self.power / max(self.saved, 1)

    def reason(self) -> str:
        measure = "relative output error" if self.measure == "output" else "relative weight error"
        side = ", on a side stream" if self.share < 1 else ""
        return f"kept for max_size: fp8 would add {self.error:.3%} {measure}{side} to save {self.saved / 2**20:.2f} MiB"

    def line(self) -> str:
        side = "  (side stream)" if self.share < 1 else ""
        return f"{self.saved:>15,} bytes  {self.error:.3%} {self.measure:6}  {self.name}{side}"


def predicted_error(weight: torch.Tensor, stats: LayerStatistics | None, dtype: torch.dtype) -> tuple[float, str]:
    """Round-to-nearest's relative error on ``weight`` at its own per-tensor scale, and its measure:
    on the recorded outputs with ``stats``, on the weight itself without."""
    w = weight.float()
    scale = fp8.scale_for(fp8.absmax(w), dtype)
    delta = fp8.dequantize(fp8.quantize_nearest(w, scale, dtype), scale).sub_(w)
    if stats is not None:
        error, reference, measure = stats.fit.quadratic(delta), stats.fit.quadratic(w), "output"
    else:
        error, reference, measure = float(delta.norm()) ** 2, float(w.norm()) ** 2, "weight"
    return (error / reference) ** 0.5 if reference > 0 else 0.0, measure


def choose(candidates: list[KeptLayer], limit: int, size_with: Callable[[list[KeptLayer]], int]) -> list[KeptLayer]:
    """The layers to keep: highest cost per byte first, each while the file ``size_with(kept)``
    still fits in ``limit`` bytes (one that no longer fits is skipped, a smaller one may)."""
    kept: list[KeptLayer] = []
    size = size_with(kept)
    for layer in sorted(candidates, key=lambda c: (-c.cost, c.name)):
        if size + layer.saved > limit + _HEADER_SLACK:
            continue
        trial = size_with([*kept, layer])
        if trial <= limit:
            kept.append(layer)
            size = trial
    return kept


# The header may shrink a little when a layer is kept (its scale and description go): a layer whose
# data alone overshoots by less than this is still tried against the exact size.
_HEADER_SLACK = 4096
