"""The uint8 scale codec of the seed script: 256 log-uniform levels from 1e-10 to 100.

Code ``c`` (0..255) decodes to ``SCALE_MIN * (SCALE_MAX / SCALE_MIN) ** (c / 255)``, a step
of about 11.4 % between neighbouring codes. Encoding rounds *up* to the first code whose
decoded float32 scale is at least the exact scale, so weights divided by the decoded scale
never exceed the fp8 range; the weights are then rounded against that decoded scale, so the
codec costs only the coarser scale, never a saturation error.
"""

from __future__ import annotations

import math

import torch

SCALE_MIN = 1e-10
SCALE_MAX = 100.0
LEVELS = 256
_LOG_MIN = math.log(SCALE_MIN)
_LOG_SPAN = math.log(SCALE_MAX) - _LOG_MIN


class ScaleOutOfRangeError(ValueError):
    """A scale above SCALE_MAX cannot be encoded without clipping the weights."""


def decode_scale(code: int) -> float:
    """The float32 scale a code stands for."""
    if not 0 <= code < LEVELS:
        raise ValueError(f"scale code {code} is outside 0..{LEVELS - 1}")
    exact = math.exp(_LOG_MIN + _LOG_SPAN * code / (LEVELS - 1))
    return float(torch.tensor(exact, dtype=torch.float32))


def encode_scale(scale: float) -> int:
    """Smallest code whose decoded scale is >= ``scale`` (scales below SCALE_MIN give 0)."""
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"cannot encode scale {scale!r}: it must be positive and finite")
    if scale > decode_scale(LEVELS - 1):
        raise ScaleOutOfRangeError(
            f"scale {scale:.4g} exceeds the 8-bit codec's maximum {SCALE_MAX:g} "
            "(weights above about 44800 in magnitude)"
        )
    code = max(0, math.ceil((math.log(scale) - _LOG_MIN) / _LOG_SPAN * (LEVELS - 1) - 1e-9))
    while decode_scale(code) < scale:
        code += 1
    while code > 0 and decode_scale(code - 1) >= scale:
        code -= 1
    return code
