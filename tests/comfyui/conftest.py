"""Opt-in integration tests against a real ComfyUI checkout.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI source tree (never inside this repo) and the
running Python can import it (ComfyUI needs torchvision and its own requirements). Run with e.g.
``COMFYUI_PATH=~/ComfyUI ~/comfy-venv/bin/python -m pytest tests/comfyui``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[2]


def _import_comfy():
    if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy" / "sd.py").is_file():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the integration tests")
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    try:
        from comfy.cli_args import args

        args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.ops
        import comfy.sd
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {COMFYUI_PATH} does not import in this Python: {exc}")
    return comfy


@pytest.fixture(scope="session")
def comfy():
    return _import_comfy()


# Every widget of the convert nodes, at its default, for prompts and direct execute() calls.
NODE_OPTIONS = dict(
    format="comfy",
    rounding="nearest",
    preset="auto",
    shared_scales=True,
    fp8_format="float8_e4m3fn",
    num_iter=200,
    calib_samples=96,
    lr=3e-2,
    reg_lambda=0.015,
    min_tensor_size=1024,
    keep_distillation=False,
    text_encoders=False,
    exclude="",
    include="",
    seed=0,
    fp8_compute="weight-only",
)

FLUX_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    vec_in_dim=64,
    context_in_dim=128,
    hidden_size=256,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
    txt_ids_dims=[],
)


@pytest.fixture(scope="session")
def tiny_flux(comfy, tmp_path_factory):
    """A tiny real ComfyUI Flux with random weights, saved as bf16; returns (path, model, inputs)."""
    from comfy.ldm.flux.model import Flux

    from quant_core import io

    torch.manual_seed(0)
    model = Flux(operations=comfy.ops.disable_weight_init, **FLUX_CONFIG)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            fan_in = parameter.shape[-1] if parameter.ndim > 1 else 1
            if name.endswith(("scale", "norm.weight")):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 1.0 / fan_in**0.5)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("flux") / "tiny_flux_bf16.safetensors"
    io.write_file(path, state)
    model = model.to(torch.bfloat16).float()  # the reference sees exactly the saved weights
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        x=torch.randn(1, 16, 16, 16, generator=generator),
        timestep=torch.tensor([0.5]),
        context=torch.randn(1, 8, 128, generator=generator),
        y=torch.randn(1, 64, generator=generator),
        guidance=torch.tensor([3.5]),
    )
    return path, model, inputs


def forward(diffusion_model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return diffusion_model(**inputs).float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="session")
def pack(comfy, tiny_flux, tmp_path_factory):
    """ComfyUI's own loader imports the pack; model folders (the pack's calibration folder included)
    point at a temporary tree."""
    import folder_paths

    nodes = importlib.import_module("nodes")  # ComfyUI's nodes.py (COMFYUI_PATH is first on sys.path), not ours
    root = tmp_path_factory.mktemp("models")
    for folder in ("diffusion_models", "checkpoints", "text_encoders", "fp8_calibration"):
        (root / folder).mkdir()
        folder_paths.folder_names_and_paths[folder] = ([str(root / folder)], {".safetensors"})
    source = root / "diffusion_models" / "tiny_flux_bf16.safetensors"
    source.write_bytes(tiny_flux[0].read_bytes())
    assert asyncio.run(nodes.load_custom_node(str(REPO)))
    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS, root


def run_node(node_cls, **inputs):
    """Execute like ComfyUI does: a class clone with hidden inputs, inside inference mode."""
    hidden = {"PROMPT": {"1": {"class_type": "test"}}, "EXTRA_PNGINFO": {"workflow": {"nodes": []}}, "UNIQUE_ID": "7"}
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    with torch.inference_mode():
        return clone.execute(**inputs)
