"""FP8 number formats: per-tensor scales, round-to-nearest, and the grid neighbours of a value.

Everything here works on float32 tensors on any device. A weight ``w`` is stored as
``q = fp8(w / scale)`` and read back as ``q.float() * scale`` (ComfyUI's dequantisation).
"""

from __future__ import annotations

import torch

FP8_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}

# Mantissa bits and smallest normal exponent of each format: they fix the grid spacing.
_MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
_MIN_NORMAL_EXP = {torch.float8_e4m3fn: -6, torch.float8_e5m2: -14}


class NonFiniteWeightError(ValueError):
    """A tensor holds NaN or Inf: there is no meaningful scale for it."""


def fp8_dtype(name: str) -> torch.dtype:
    """The torch dtype for a format name, with an error listing the valid names."""
    try:
        return FP8_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown fp8 format {name!r}; choose one of {sorted(FP8_DTYPES)}") from None


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Refuse NaN/Inf weights by name, since any scale derived from them is garbage."""
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise NonFiniteWeightError(f"tensor {name!r} contains {bad} NaN/Inf values; fix or exclude it")


def absmax(weight: torch.Tensor) -> float:
    """Largest absolute value, as a Python float; NaN if the weight has one, inf if it has an inf.

    ``aminmax`` reads the weight once and allocates nothing, where ``abs().max()`` first writes a
    full-size absolute copy.
    """
    if not weight.numel():
        return 0.0
    low, high = torch.aminmax(weight)
    return float(torch.maximum(-low, high))  # maximum propagates NaN


def scale_for(amax: float, dtype: torch.dtype) -> float:
    """Per-tensor scale ``amax / fp8_max``, as float32; 1.0 for an all-zero tensor.

    The result is rounded *up* to the next float32 if needed so that ``amax / scale``
    never exceeds the fp8 range by a rounding hair.
    """
    if amax == 0.0:
        return 1.0
    scale = torch.tensor(amax / fp8_max(dtype), dtype=torch.float32)
    if float(scale) * fp8_max(dtype) < amax:
        scale = torch.nextafter(scale, torch.tensor(float("inf")))
    return float(scale)


def quantize_nearest(weight: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest(-even) fp8 of ``weight / scale``, saturating at the format's maximum."""
    limit = fp8_max(dtype)
    return (weight.float() / scale).clamp_(-limit, limit).to(dtype)


class GridRounding:
    """Round-to-nearest-even onto an fp8 grid in float32 arithmetic, row by row, into float32.

    The same values as ``clamp(x, -max, max).to(dtype).float()`` (signed zeros included), without
    the conversion and its read-back, which cost more than the rest of a GPTQ column on the CPU:
    a value ``v`` with ``2^e <= |v| < 2^(e+1)`` lies on a grid of spacing ``s = 2^(e - mantissa)``
    (at least the subnormals' spacing), and ``(v + m) - m`` with ``m = 1.5 * 2^23 * s`` rounds it
    to that grid, ties to even, in two exact float32 additions. ``m``'s bits come from ``v``'s
    exponent bits by integer operations. The result is on the grid, so one cast of a whole block
    to ``dtype`` afterwards is exact. Scratch memory for one row of ``length`` is allocated once.
    """

    def __init__(self, dtype: torch.dtype, length: int, device: torch.device | str = "cpu") -> None:
        mantissa, lowest = _MANTISSA_BITS[dtype], _MIN_NORMAL_EXP[dtype]
        half = 1 << 22  # the mantissa of 1.5
        self.limit = fp8_max(dtype)
        self.mantissa, self.lowest_exponent = mantissa, lowest
        as_int = {"dtype": torch.int32, "device": device}
        self._exponent_bits = torch.tensor(0x7F800000, **as_int)
        self.shift = (23 - mantissa) << 23 | half  # added to v's exponent bits: m's bits
        self.lowest = (lowest - mantissa + 23 + 127) << 23 | half  # m's bits at the subnormals' spacing
        self._shift = torch.tensor(self.shift, **as_int)
        self._lowest = torch.tensor(self.lowest, **as_int)
        self._magic = torch.empty(length, **as_int)

    def __call__(self, row: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Writes the grid value nearest to each element of ``row`` (saturated) into ``out``; returns it."""
        torch.clamp(row, -self.limit, self.limit, out=out)
        magic = torch.bitwise_and(out.view(torch.int32), self._exponent_bits, out=self._magic)
        torch.maximum(magic.add_(self._shift), self._lowest, out=magic)
        value = magic.view(torch.float32)
        return out.add_(value).sub_(value).copysign_(row)  # a value that rounds to zero keeps its sign


def dequantize(q: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """float32 value of fp8 data times its scale, as ComfyUI computes it."""
    return q.float() * scale


def grid_neighbours(scaled: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fp8 grid values around each element of ``scaled`` (already divided by the scale).

    Returns ``(base, step)`` with ``base`` the grid value nearer to zero and ``base + step``
    the one farther from zero (same sign), so that every choice ``base + h * step`` with
    ``h`` in {0, 1} is a representable fp8 value. ``step`` is 0 where the value is already on
    the grid (zero, or the largest magnitude). Values must already lie within the fp8 range.
    """
    limit = fp8_max(dtype)
    magnitude = scaled.abs().clamp(max=limit)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent, m in [0.5, 1)
    # Zero and subnormals share the smallest normal exponent's spacing (frexp(0) says 0, not -inf).
    exponent = torch.where(magnitude > 0, exponent - 1, _MIN_NORMAL_EXP[dtype]).clamp(min=_MIN_NORMAL_EXP[dtype])
    spacing = torch.pow(2.0, (exponent - _MANTISSA_BITS[dtype]).float())
    low = torch.floor(magnitude / spacing) * spacing
    # A value already on the grid (zero included) has no choice to make: its step is 0.
    high = torch.where((low == magnitude) | (low + spacing > limit), low, low + spacing)
    sign = torch.where(scaled < 0, -1.0, 1.0)
    return sign * low, sign * (high - low)
