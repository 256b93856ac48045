"""A built-in example: generate a Flux-shaped checkpoint (random weights) and convert it.

``flux_shapes`` follows the real Flux layout (``double_blocks``, ``single_blocks``, embedders,
modulation), so the preset detection and the keep rules are exercised as on the real model.
``write_synthetic`` streams the tensors to disk one at a time, so the benchmark can generate
multi-GB checkpoints without holding them in memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .io import TensorInfo, write_stream


def flux_shapes(
    hidden: int = 256,
    depth: int = 2,
    depth_single: int = 2,
    in_channels: int = 64,
    context: int = 512,
    vec: int = 128,
    mlp_ratio: int = 4,
    head_dim: int = 128,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Flux diffusion model with the given width and depth (Flux-dev: 3072, 19, 38)."""
    mlp = hidden * mlp_ratio
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)

    linear("img_in", hidden, in_channels)
    linear("txt_in", hidden, context)
    for embedder, width in (("time_in", 256), ("vector_in", vec), ("guidance_in", 256)):
        linear(f"{embedder}.in_layer", hidden, width)
        linear(f"{embedder}.out_layer", hidden, hidden)
    for i in range(depth):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            linear(f"{block}_mod.lin", 6 * hidden, hidden)
            linear(f"{block}_attn.qkv", 3 * hidden, hidden)
            shapes[f"{block}_attn.norm.query_norm.scale"] = (head_dim,)
            shapes[f"{block}_attn.norm.key_norm.scale"] = (head_dim,)
            linear(f"{block}_attn.proj", hidden, hidden)
            linear(f"{block}_mlp.0", mlp, hidden)
            linear(f"{block}_mlp.2", hidden, mlp)
    for i in range(depth_single):
        block = f"single_blocks.{i}"
        linear(f"{block}.linear1", 3 * hidden + mlp, hidden)
        linear(f"{block}.linear2", hidden, hidden + mlp)
        linear(f"{block}.modulation.lin", 3 * hidden, hidden)
        shapes[f"{block}.norm.query_norm.scale"] = (head_dim,)
        shapes[f"{block}.norm.key_norm.scale"] = (head_dim,)
    linear("final_layer.linear", in_channels, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return shapes


def synthetic_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Weights ~ N(0, 1/fan_in) with a few large outliers (as trained weights have); norms ~ 1."""
    if name.endswith(".scale"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    fan_in = shape[-1] if len(shape) > 1 else max(1, shape[0])
    tensor = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    outliers = torch.rand(shape, generator=generator) < 1e-4
    return torch.where(outliers, tensor * 8, tensor)


def write_synthetic(
    path: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    overwrite: bool = True,
) -> Path:
    """Write a checkpoint of synthetic tensors, one tensor in memory at a time."""
    generator = torch.Generator().manual_seed(seed)
    entries = [TensorInfo(name, dtype, shape) for name, shape in shapes.items()]
    tensors = ((name, synthetic_tensor(name, shape, generator).to(dtype)) for name, shape in shapes.items())
    write_stream(path, entries, tensors, {"generator": "quant_core.example"}, overwrite)
    return Path(path)
