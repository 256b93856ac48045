"""Activation settings load into real ComfyUI, and the CPU simulation matches ComfyUI's fp8 path."""

from __future__ import annotations

import pytest
import torch

from bench import comfy_fp8
from quant_core import formats
from quant_core.calibration import Recorder
from quant_core.convert import ConvertOptions, convert_file
from quant_core.io import SafetensorsReader

from .conftest import forward, relative_error

FULL_PRECISION = r"img_mlp\."


@pytest.fixture(scope="module")
def calibrated(comfy, tiny_flux, tmp_path_factory):
    """The tiny Flux converted with input scales from its own recorded inputs, img_mlp full precision."""
    path, model, inputs = tiny_flux
    folder = tmp_path_factory.mktemp("activation")
    calibration = folder / "calibration.safetensors"
    with Recorder(model) as recorder:
        forward(model, inputs)
    recorder.save(calibration)
    output = folder / "flux_input_scales.safetensors"
    options = ConvertOptions(
        rounding="nearest", calibration=str(calibration), input_scales=True, full_precision=[FULL_PRECISION]
    )
    convert_file(path, output, options)
    return output


def file_activation(path, weight: str) -> formats.Activation:
    with SafetensorsReader(path) as reader:
        return formats.layout("comfy").read_activation(weight, reader.read, set(reader.tensors))


def test_layers_get_their_input_scale_and_full_precision(comfy, tiny_flux, calibrated):
    _, model, inputs = tiny_flux
    patcher = comfy.sd.load_diffusion_model(str(calibrated))
    block = patcher.model.diffusion_model.double_blocks[0]
    written = file_activation(calibrated, "double_blocks.0.img_attn.qkv.weight")
    assert written.input_scale is not None and not written.full_precision
    assert float(block.img_attn.qkv.input_scale) == written.input_scale
    assert block.img_attn.qkv._full_precision_mm_config is False
    assert block.img_mlp[0]._full_precision_mm_config is True
    assert block.img_mlp[2]._full_precision_mm_config is True
    assert relative_error(forward(patcher.model.diffusion_model, inputs), forward(model, inputs)) < 0.08


@pytest.mark.parametrize("scaled", [True, False], ids=["input_scale", "no_input_scale"])
def test_simulation_matches_comfyui_fp8_matmul(comfy, calibrated, monkeypatch, scaled):
    """With fp8 compute forced on (``--supports-fp8-compute``; torch runs ``_scaled_mm`` on a CPU),
    ComfyUI's own Linear and ``comfy_fp8.fp8_linear`` give the same outputs."""
    monkeypatch.setattr(comfy.model_management, "SUPPORT_FP8_OPS", True)
    patcher = comfy.sd.load_diffusion_model(str(calibrated))
    layer = patcher.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert layer._full_precision_mm is False, "fp8 compute should be on"
    if not scaled:
        del layer.input_scale
    weight = layer.weight
    x = 150.0 * torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    assert float(x.abs().max()) > 448, "the unscaled path must clamp"
    with torch.no_grad():
        ours = comfy_fp8.fp8_linear(
            x,
            weight._qdata,
            float(weight._params.scale),
            layer.bias,
            float(layer.input_scale) if scaled else None,
            compute_dtype=x.dtype,
        )
        theirs = layer(x)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)
