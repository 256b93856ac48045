"""ComfyUI's fp8 Linear simulated in plain torch, and the output-error metric, for the benchmarks.

Not part of the engine: the converter never runs a layer. ``bench/bench_activation.py`` measures
the error of each way ComfyUI can run a converted layer with these, and the opt-in ComfyUI suite
(``tests/comfyui/test_activation.py``) checks that they give ComfyUI's own outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quant_core.calibration import Moments
from quant_core.fp8 import fp8_max
from quant_core.rounding import relative_error


def power_of_two_scale(absmax: float, dtype: torch.dtype) -> float:
    """The smallest power of two at or above ``absmax / fp8_max``: the alternative rule the
    benchmark compares against (fp8 values inside the range are then exactly those of scale 1)."""
    return 2.0 ** math.ceil(math.log2(absmax / fp8_max(dtype))) if absmax > 0.0 else 1.0


def quantize_input(
    x: torch.Tensor, input_scale: float | None, dtype: torch.dtype, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's activation quantization: fp8 data and the float32 scale it is read back with.

    ``comfy/quant_ops.py`` ``_TensorCoreFP8LayoutBase.quantize`` (scale ``None`` becomes 1, not
    the tensor's amax) and comfy_kitchen's eager ``quantize_per_tensor_fp8`` (the product is
    formed in the input's dtype, then clamped to the fp8 range and cast).
    """
    scale = torch.tensor(1.0 if input_scale is None else input_scale, dtype=torch.float32)
    limit = fp8_max(dtype)
    scaled = x.to(compute_dtype) * (1.0 / scale).to(compute_dtype)
    return scaled.clamp(-limit, limit).to(dtype), scale


def dynamic_scale(x: torch.Tensor, dtype: torch.dtype) -> float:
    """Per-call scale ``amax(|x|) / fp8_max``: comfy_kitchen's own layout default, which ComfyUI
    overrides with 1. Not a ComfyUI path; the benchmark shows it as the best a per-tensor scale
    can do without calibration."""
    amax = float(x.abs().max()) if x.numel() else 0.0
    return amax / fp8_max(dtype) if amax > 0 else 1.0


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: float,
    bias: torch.Tensor | None,
    input_scale: float | None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``linear`` as ComfyUI runs it with fp8 compute: fp8 input times fp8 weight, float32
    accumulation, both scales applied to the product, bias added, output in ``compute_dtype``."""
    q, scale = quantize_input(x, input_scale, weight.dtype, compute_dtype)
    shape = q.shape
    product = q.reshape(-1, shape[-1]).float() @ weight.float().T
    out = product * (scale * torch.tensor(weight_scale, dtype=torch.float32))
    if bias is not None:
        out = out + bias.to(compute_dtype).float()
    return out.to(compute_dtype).reshape(*shape[:-1], weight.shape[0])


def full_precision_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: float,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``linear`` with ``full_precision_matrix_mult`` (or without fp8 compute): the weight is
    dequantized to the compute dtype (comfy_kitchen ``dequantize_per_tensor_fp8``) and the input
    is not quantized."""
    dequantized = weight.to(compute_dtype) * torch.tensor(weight_scale).to(compute_dtype)
    return F.linear(x.to(compute_dtype), dequantized, None if bias is None else bias.to(compute_dtype))


def output_error(weight: torch.Tensor, approx: torch.Tensor, moments: Moments) -> float:
    """Relative output error ``sqrt(tr(D H D^T) / tr(W H W^T))`` for inputs with second moments ``H``."""
    return relative_error(moments.quadratic(approx - weight), moments.quadratic(weight))
