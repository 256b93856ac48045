"""Activation scales for ComfyUI's fp8 matrix multiply: the static input scale, and when to skip fp8.

What ComfyUI v0.30 does with a layer of a ``comfy`` or ``legacy`` file (``legacy`` is rewritten to
``comfy_quant`` on load) when the GPU has fp8 compute (NVIDIA SM >= 8.9, or ``--supports-fp8-compute``)
and the layer has no ``full_precision_matrix_mult``: it quantizes the layer's input per call as
``fp8(clamp(x * bf16(1 / input_scale), ±fp8_max))``, with ``input_scale = 1`` when the file has
none, and multiplies with ``torch._scaled_mm(x_fp8, w_fp8ᵀ, input_scale, weight_scale)``. Without
fp8 compute, or with ``full_precision_matrix_mult``, the weight is dequantized to the compute dtype
and the input stays as it is (``bench/comfy_fp8.py`` reproduces both paths on a CPU, for the
benchmarks). ``input_scale_for`` is the static scale this project writes; ``predicted_input_error``
decides ``full_precision_above``.
"""

from __future__ import annotations

import math

import torch

from .calibration import Gram, LowRankGram
from .fp8 import fp8_max

# Reciprocals inside fp16's normal range are exact and finite in fp16 and bf16 alike.
_MIN_RECIPROCAL, _MAX_RECIPROCAL = 2.0**-14, 2.0**15


def input_scale_for(absmax: float, dtype: torch.dtype) -> float:
    """Static activation scale for inputs up to ``absmax``: ``absmax / fp8_max``, nudged so that
    its reciprocal is a bf16 value.

    ComfyUI multiplies the input by ``1 / input_scale`` rounded to the compute dtype (bf16 or fp16)
    but dequantizes with ``input_scale`` itself, so an arbitrary scale leaves a gain error of up to
    0.4 % on the layer's output. Here the reciprocal ``fp8_max / absmax`` is rounded down to a bf16
    value (so ``absmax`` still fits) and the scale is its inverse: nothing is lost in the cast, in
    either compute dtype. A power of two would do that too, but measured worse end to end on MiniLM
    (``bench/bench_activation.py``). ``absmax`` 0 (a layer that only saw zeros) keeps ComfyUI's 1.
    """
    if not absmax > 0.0:
        return 1.0
    wanted = torch.tensor(fp8_max(dtype) / absmax, dtype=torch.float32)
    truncated = (wanted.view(torch.int32) & ~0xFFFF).view(torch.float32)  # bf16, rounded towards zero
    reciprocal = min(max(float(truncated), _MIN_RECIPROCAL), _MAX_RECIPROCAL)
    return float(torch.tensor(1.0 / reciprocal, dtype=torch.float32))


def predicted_input_error(weight: torch.Tensor, moments: Gram | LowRankGram, dtype: torch.dtype) -> float:
    """Relative output error that rounding the inputs to fp8 adds, predicted from their second moments.

    Rounding an input to ``m`` mantissa bits leaves an error of mean square ``x² 2^(-2m) / (32 ln 2)``
    for a mantissa spread evenly in log scale; independent across inputs, these errors reach the
    output through the columns of ``weight``. Relative to the output power ``tr(W G Wᵀ)`` that is
    ``sqrt(c Σ_j G_jj ||W_:j||² / tr(W G Wᵀ))``: about 2.6 % for e4m3 when the inputs are
    uncorrelated, more where the layer's output cancels much of its inputs. Inputs that underflow
    or saturate the fp8 range are not modelled (a calibrated scale avoids saturation).
    """
    mantissa = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    relative_variance = 2.0 ** (-2 * mantissa) / (32 * math.log(2))
    w = weight.float()
    signal = moments.quadratic(w)
    noise = relative_variance * float((moments.diagonal().to(w.device) * w.pow(2).sum(0)).sum())
    return (noise / signal) ** 0.5 if signal > 0 else 0.0
