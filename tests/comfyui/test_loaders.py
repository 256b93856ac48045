"""Converted files load through ComfyUI's own loader and run like the original model."""

from __future__ import annotations

import pytest

from quant_core.convert import ConvertOptions, convert_file
from quant_core.decode import decode_file
from quant_core.options import LearnedOptions

from .conftest import forward, relative_error


def load_and_run(comfy, path, inputs):
    patcher = comfy.sd.load_diffusion_model(str(path))
    return patcher, forward(patcher.model.diffusion_model, inputs)


@pytest.mark.parametrize("layout", ["comfy", "legacy"])
@pytest.mark.parametrize("method", ["nearest", "learned"])
def test_converted_file_loads_and_matches_the_original(comfy, tiny_flux, tmp_path, layout, method):
    path, model, inputs = tiny_flux
    reference = forward(model, inputs)
    output = tmp_path / f"flux_{layout}.safetensors"
    options = ConvertOptions(format=layout, rounding=method, learned=LearnedOptions(num_iter=20, calib_samples=32))
    summary = convert_file(path, output, options)
    assert summary.quantized > 0
    patcher, result = load_and_run(comfy, output, inputs)
    weight = patcher.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    assert "QuantizedTensor" in type(weight).__name__, "ComfyUI loaded the fp8 weight without its scale"
    assert relative_error(result, reference) < 0.08


def test_unquantized_reference_path_is_exact(comfy, tiny_flux):
    """Guards the comparison itself: the bf16 file loads to the same outputs as the reference."""
    path, model, inputs = tiny_flux
    _, result = load_and_run(comfy, path, inputs)
    assert relative_error(result, forward(model, inputs)) < 1e-3


def test_ultra8_is_refused_by_stock_comfyui_and_decodes_to_a_loadable_file(comfy, tiny_flux, tmp_path):
    path, model, inputs = tiny_flux
    ultra8 = tmp_path / "flux_ultra8.safetensors"
    convert_file(path, ultra8, ConvertOptions(format="ultra8", rounding="nearest"))
    with pytest.raises(Exception):  # noqa: B017 - any loud failure beats silently unscaled weights
        load_and_run(comfy, ultra8, inputs)
    decoded = decode_file(ultra8, tmp_path / "flux_decoded.safetensors", "comfy")
    _, result = load_and_run(comfy, decoded, inputs)
    assert relative_error(result, forward(model, inputs)) < 0.08
