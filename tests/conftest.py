"""Shared fixtures: small synthetic checkpoints written into each test's tmp_path.

Every fixture returns the path of a freshly written ``.safetensors`` file. The models are tiny
(well under a megabyte) so that a whole conversion, learned rounding included, takes a fraction
of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from quant_core.example import flux_shapes, synthetic_tensor, write_synthetic  # noqa: E402
from quant_core.io import write_file  # noqa: E402

# The tests run on small CPU machines (2 cores, often shared). Tiny matrix multiplies gain nothing
# from a second intra-op thread and slow down badly when the cores are busy, so use one.
torch.set_num_threads(1)

FLUX_TINY = {"hidden": 64, "depth": 1, "depth_single": 1}
SOURCE_METADATA = {"modelspec.title": "tiny test model", "format": "pt"}
FULL_PREFIX = "model.diffusion_model."


def synthetic_state_dict(shapes: dict[str, tuple[int, ...]], dtype=torch.bfloat16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return {name: synthetic_tensor(name, shape, generator).to(dtype) for name, shape in shapes.items()}


def flux_state_dict(prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """A Flux-shaped diffusion model (hidden 64, one double and one single block), bf16."""
    tensors = synthetic_state_dict(flux_shapes(**FLUX_TINY), seed=seed)
    return {prefix + name: tensor for name, tensor in tensors.items()}


def t5_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """A two-block T5-encoder-shaped model (d_model 64, d_ff 128), bf16, with fp32 norms."""
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (256, 64)}
    for i in range(2):
        attn = f"encoder.block.{i}.layer.0.SelfAttention"
        for proj in "qkvo":
            shapes[f"{attn}.{proj}.weight"] = (64, 64)
        if i == 0:
            shapes[f"{attn}.relative_attention_bias.weight"] = (32, 4)
        shapes[f"encoder.block.{i}.layer.0.layer_norm.weight"] = (64,)
        ff = f"encoder.block.{i}.layer.1.DenseReluDense"
        shapes[f"{ff}.wi_0.weight"] = (128, 64)
        shapes[f"{ff}.wi_1.weight"] = (128, 64)
        shapes[f"{ff}.wo.weight"] = (64, 128)
        shapes[f"encoder.block.{i}.layer.1.layer_norm.weight"] = (64,)
    shapes["encoder.final_layer_norm.weight"] = (64,)
    tensors = synthetic_state_dict(shapes, seed=seed)
    for name in tensors:
        if "layer_norm" in name:
            tensors[name] = tensors[name].float()
    return tensors


def full_checkpoint_state_dict() -> dict[str, torch.Tensor]:
    """A full checkpoint: the diffusion model under ``model.diffusion_model.`` plus VAE and text
    encoder tensors of assorted dtypes, some of them 2-D and large enough to be quantized if the
    prefix rule did not keep them."""
    generator = torch.Generator().manual_seed(2)
    tensors = flux_state_dict(prefix=FULL_PREFIX)
    tensors.update(
        {
            "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=generator).bfloat16(),
            "first_stage_model.encoder.conv_in.bias": torch.randn(8, generator=generator).bfloat16(),
            "first_stage_model.decoder.mid.attn_1.proj_out.weight": torch.randn(64, 64, generator=generator),
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(
                64, 64, generator=generator
            ).half(),
            "text_encoders.clip_l.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
            "text_encoders.clip_l.logit_scale": torch.tensor(4.6052),
            "text_encoders.clip_l.attention_mask_flag": torch.tensor([True, False, True]),
        }
    )
    return tensors


@pytest.fixture
def flux_file(tmp_path: Path) -> Path:
    """A tiny Flux diffusion model (bf16) with header metadata."""
    path = tmp_path / "flux_tiny.safetensors"
    write_file(path, flux_state_dict(), metadata=SOURCE_METADATA)
    return path


@pytest.fixture
def flux_example_file(tmp_path: Path) -> Path:
    """The same tiny Flux model written by the built-in example generator."""
    return write_synthetic(tmp_path / "flux_example.safetensors", flux_shapes(**FLUX_TINY))


@pytest.fixture
def t5_file(tmp_path: Path) -> Path:
    """A tiny T5-encoder-like text encoder (bf16 weights, fp32 norms)."""
    path = tmp_path / "t5_tiny.safetensors"
    write_file(path, t5_state_dict(), metadata=SOURCE_METADATA)
    return path


@pytest.fixture
def checkpoint_file(tmp_path: Path) -> Path:
    """A tiny full checkpoint: ``model.diffusion_model.`` Flux plus VAE and text-encoder tensors."""
    path = tmp_path / "checkpoint_tiny.safetensors"
    write_file(path, full_checkpoint_state_dict(), metadata=SOURCE_METADATA)
    return path


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    """Two quantizable layers of 1024+ elements and their biases: the cheapest learned-rounding input."""
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "blocks.0.attn.q.weight": (torch.randn(32, 32, generator=generator) / 6).bfloat16(),
        "blocks.0.attn.q.bias": torch.zeros(32, dtype=torch.bfloat16),
        "blocks.0.mlp.fc.weight": (torch.randn(64, 32, generator=generator) / 6).bfloat16(),
        "blocks.0.mlp.fc.bias": torch.zeros(64, dtype=torch.bfloat16),
    }
    path = tmp_path / "small.safetensors"
    write_file(path, tensors, metadata=SOURCE_METADATA)
    return path
