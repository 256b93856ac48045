"""Each output layout reads back what it writes: the registry's one class per layout."""

from __future__ import annotations

import pytest
import torch

from quant_core import formats

WEIGHT = "model.diffusion_model.blocks.0.attn.q.weight"
PREFIX = "model.diffusion_model."


@pytest.mark.parametrize("name", formats.FORMATS)
def test_a_layer_is_recognised_and_read_back_as_written(name):
    layout = formats.layout(name)
    scale = layout.stored_scale(float(torch.tensor(0.0123)))  # scales are float32 values
    activation = formats.Activation(0.25, full_precision=True)
    quantized = torch.randn(8, 16).to(torch.float8_e4m3fn)
    tensors = {**layout.layer_tensors(WEIGHT, quantized, scale, activation)}
    full = layout.marker_full_precision({WEIGHT: activation})
    tensors.update(layout.markers(PREFIX, torch.float8_e4m3fn, True, full))
    keys = list(tensors)

    assert type(formats.detect(keys, {})) is type(layout)
    assert layout.quantized_weights(keys) == [WEIGHT]
    assert layout.layer_scale(tensors.__getitem__, WEIGHT) == scale
    assert layout.read_activation(WEIGHT, tensors.__getitem__, set(keys)) == activation
    sidecars = set(keys) - {WEIGHT} - {k for k in keys if layout.is_marker(k)}
    assert sidecars <= set(layout.sidecar_keys(WEIGHT))
    assert all(formats.is_marker(k) for k in layout.markers(PREFIX, torch.float8_e4m3fn, True))
    assert layout.output_name("m", "float8_e4m3fn", "", True).startswith("m_float8_e4m3fn_scaled")


def test_only_the_ultra8_layout_needs_decoding_and_rounds_its_scale_up():
    ultra8 = formats.layout("ultra8")
    assert [n for n, layout in formats.WRITABLE.items() if not layout.loads_in_stock_comfyui] == ["ultra8"]
    assert ultra8.stored_scale(0.0123) >= 0.0123 and formats.layout("comfy").stored_scale(0.0123) == 0.0123


def test_the_legacy_marker_speaks_for_every_layer_under_it():
    legacy, weight_only, fp8_compute = formats.layout("legacy"), formats.Activation(None, True), formats.Activation(2.0)
    assert legacy.markers(PREFIX, torch.float8_e4m3fn, True, True)[PREFIX + "scaled_fp8"].shape == (2,)
    assert legacy.markers(PREFIX, torch.float8_e4m3fn, True, False)[PREFIX + "scaled_fp8"].shape == (0,)
    with pytest.raises(ValueError, match="use format comfy"):
        legacy.marker_full_precision({"a.weight": weight_only, "b.weight": fp8_compute})
    assert formats.layout("comfy").markers(PREFIX, torch.float8_e4m3fn, True, False) == {}


def test_an_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown output format 'ultra16'"):
        formats.layout("ultra16")
    assert formats.detect(["a.weight"], {}) is None
