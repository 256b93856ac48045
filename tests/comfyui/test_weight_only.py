"""Default files are weight-only in real ComfyUI, also with fp8 compute forced on (as on an RTX 40xx+ or H100).

ComfyUI decides per layer at load time: with fp8 compute and no ``full_precision_matrix_mult`` it
quantizes the layer's input to fp8 (clamped at ±448, scale 1 without an ``input_scale``). A default
file must give exactly what the dequantizing path gives, and keep its error when the model's Linear
inputs leave the fp8 range (``bench/bench_activation.py --gain``: ``x -> G x``, ``W -> W / G``).
"""

from __future__ import annotations

import pytest
import torch

from quant_core import formats
from quant_core.calibration import Recorder
from quant_core.convert import ConvertOptions, convert_file
from quant_core.decode import decode_file
from quant_core.io import SafetensorsReader

from .conftest import forward, relative_error

GAIN = 64.0  # a power of two: the rescaling is exact in fp8 and bf16
LAYOUTS = ("comfy", "legacy", "ultra8")


@pytest.fixture(scope="module")
def converted(tiny_flux, tmp_path_factory):
    """The tiny Flux converted with the defaults in each layout (ultra8 decoded for stock ComfyUI),
    and in comfy with uncalibrated fp8 compute (the old default)."""
    path = tiny_flux[0]
    folder = tmp_path_factory.mktemp("weight_only")
    files = {}
    for fmt in LAYOUTS:
        files[fmt] = folder / f"{fmt}.safetensors"
        convert_file(path, files[fmt], ConvertOptions(format=fmt, method="nearest"))
    files["ultra8"] = decode_file(files["ultra8"], folder / "ultra8_comfy.safetensors", "comfy")
    files["uncalibrated"] = folder / "uncalibrated.safetensors"
    convert_file(path, files["uncalibrated"], ConvertOptions(method="nearest", uncalibrated_fp8_compute=True))
    return files


def _load(comfy, monkeypatch, path, fp8_compute: bool, gain: float = 1.0):
    """ComfyUI's diffusion model from ``path``; with ``gain``, every fp8 layer's weight scale is divided by
    it and its input multiplied by it (the same function, inputs ``gain`` times larger)."""
    monkeypatch.setattr(comfy.model_management, "SUPPORT_FP8_OPS", fp8_compute)
    with SafetensorsReader(path) as reader:
        state = {name: reader.read(name) for name in reader.tensors}
        metadata = dict(reader.metadata)
    for key in [k for k in state if k.endswith((".weight_scale", ".scale_weight"))]:
        state[key] = state[key] / gain
    model = comfy.sd.load_diffusion_model_state_dict(state, metadata=metadata).model.diffusion_model
    layers = [m for m in model.modules() if getattr(m, "quant_format", None) is not None]
    assert layers, "the file has fp8 layers"
    seen = []

    def scale_input(module, args):
        seen.append(float(args[0].abs().max()) * gain)
        return (args[0] * gain, *args[1:])

    for layer in layers:
        if gain != 1.0:
            layer.register_forward_pre_hook(scale_input)
    return model, layers, seen


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_default_file_is_weight_only_with_fp8_compute(comfy, tiny_flux, converted, monkeypatch, fmt):
    """Every layer full precision; outputs bit-identical to the dequantizing path's (fp8 compute off)."""
    _, _, inputs = tiny_flux
    emulated, _, _ = _load(comfy, monkeypatch, converted[fmt], fp8_compute=False)
    model, layers, _ = _load(comfy, monkeypatch, converted[fmt], fp8_compute=True)
    assert all(layer._full_precision_mm for layer in layers)
    assert torch.equal(forward(model, inputs), forward(emulated, inputs))
    uncalibrated, layers, _ = _load(comfy, monkeypatch, converted["uncalibrated"], fp8_compute=True)
    assert not any(layer._full_precision_mm for layer in layers), "the opt-in file multiplies in fp8"
    assert not torch.equal(forward(uncalibrated, inputs), forward(emulated, inputs))


def test_default_file_keeps_its_error_when_inputs_exceed_the_fp8_range(comfy, tiny_flux, converted, monkeypatch):
    """Linear inputs up to ``GAIN`` times larger than the tiny Flux's (beyond ±448): the default file's
    error against the float32 model stays what it is in range; the uncalibrated file's clipped inputs
    make it several times larger."""
    _, reference, inputs = tiny_flux
    expected = forward(reference, inputs)
    in_range, _, _ = _load(comfy, monkeypatch, converted["comfy"], fp8_compute=True)
    error_in_range = relative_error(forward(in_range, inputs), expected)
    scaled, _, seen = _load(comfy, monkeypatch, converted["comfy"], fp8_compute=True, gain=GAIN)
    error_scaled = relative_error(forward(scaled, inputs), expected)
    assert max(seen) > 448, "the construction must leave the fp8 range"
    assert error_scaled == pytest.approx(error_in_range, rel=0.02)
    clipped, _, _ = _load(comfy, monkeypatch, converted["uncalibrated"], fp8_compute=True, gain=GAIN)
    error_clipped = relative_error(forward(clipped, inputs), expected)
    assert error_clipped > 3 * error_in_range, (error_clipped, error_in_range)
    print(f"weight-only {error_in_range:.4f} in range, {error_scaled:.4f} x{GAIN:g}; uncalibrated {error_clipped:.4f}")


def test_legacy_marker_reaches_comfyui_as_full_precision(comfy, converted, monkeypatch):
    """The 2-element ``scaled_fp8`` becomes ``full_precision_matrix_mult`` on every layer (``convert_old_quants``)."""
    with SafetensorsReader(converted["legacy"]) as reader:
        assert reader.tensors[formats.LEGACY_MARKER].shape == (2,)
    _, layers, _ = _load(comfy, monkeypatch, converted["legacy"], fp8_compute=True)
    assert all(layer._full_precision_mm_config for layer in layers)


def test_calibrated_legacy_file_runs_fp8_compute_with_its_input_scales(comfy, tiny_flux, monkeypatch, tmp_path):
    """``--format legacy --input_scales`` with statistics for every quantized layer: the empty marker,
    so ComfyUI multiplies every layer in fp8, each at its own ``scale_input``."""
    path, model, inputs = tiny_flux
    calibration = tmp_path / "calibration.safetensors"
    with Recorder(model) as recorder:
        forward(model, inputs)
    recorder.save(calibration)
    output = tmp_path / "legacy_scaled.safetensors"
    options = ConvertOptions(format="legacy", method="nearest", calibration=str(calibration), input_scales=True)
    convert_file(path, output, options)
    with SafetensorsReader(output) as reader:
        assert reader.tensors[formats.LEGACY_MARKER].shape == (0,)
        scales = {
            k.removesuffix(".scale_input"): float(reader.read(k)) for k in reader.tensors if k.endswith(".scale_input")
        }
    _, layers, _ = _load(comfy, monkeypatch, output, fp8_compute=True)
    assert len(layers) == len(scales) and not any(layer._full_precision_mm for layer in layers)
    model_layers = dict(comfy.sd.load_diffusion_model(str(output)).model.diffusion_model.named_modules())
    for name, scale in scales.items():
        assert float(model_layers[name].input_scale) == scale, name
