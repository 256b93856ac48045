"""The pack inside a real ComfyUI: registration, each node end to end, cancel leaves nothing behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from quant_core import options as table
from quant_core.io import SafetensorsReader

from .conftest import NODE_OPTIONS as OPTIONS
from .conftest import forward, relative_error, run_node

QUICK = dict(num_iter=10, calib_samples=16)
# snake_case words a ComfyUI user meets by name: model folders, the status box's own widget
USERS_WORDS = {"diffusion_models", "text_encoders", "fp8_calibration", "fp8_status"}


def test_pack_registers_its_nodes(pack):
    classes, names, _ = pack
    assert names["FP8ScaledConvertModel"] == "Convert to FP8 Scaled"
    assert names["FP8ScaledRecordCalibration"] == "Record FP8 Calibration"
    assert names["FP8ScaledSaveCalibration"] == "Save FP8 Calibration"
    for node_id in (
        "FP8ScaledConvertModel",
        "FP8ScaledConvertFile",
        "FP8ScaledLoad",
        "FP8ScaledInspect",
        "FP8ScaledRecordCalibration",
        "FP8ScaledSaveCalibration",
    ):
        assert classes[node_id].GET_SCHEMA().category == "quantization/fp8"


def test_convert_widgets_are_the_engines_option_table(pack):
    """Names, order, defaults, ranges, choices and tooltips of the widgets come from ``options.OPTIONS``."""
    classes, _, _ = pack
    rows = [o for o in table.OPTIONS if table.NODE in o.fronts and o.name != "calibration"]
    for node_id in ("FP8ScaledConvertModel", "FP8ScaledConvertFile"):
        inputs = classes[node_id].GET_SCHEMA().inputs
        widgets = {i.id: i for i in inputs}
        names = [i.id for i in inputs if i.id in {o.name for o in rows}]
        assert names == [o.name for o in rows]
        for option in rows:
            widget = widgets[option.name]
            assert widget.tooltip == option.help + (" (one per line)" if option.kind == table.PATTERNS else "")
            assert widget.default == ("" if option.kind == table.PATTERNS else option.default)
            assert bool(widget.advanced) == (option.group == "advanced")
            if option.choices:
                assert list(widget.options) == list(option.choices)
            if option.minimum is not None:
                assert (widget.min, widget.max) == (option.minimum, option.maximum)
        assert table.OPTION["calibration"].help in widgets["calibration"].tooltip


def test_convert_model_bakes_patches_in_and_loads_back(comfy, pack, tiny_flux):
    classes, _, root = pack
    path, model, inputs = tiny_flux
    patcher = comfy.sd.load_diffusion_model(str(root / "diffusion_models" / "tiny_flux_bf16.safetensors"))
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    delta = 0.05 * torch.randn(patcher.model.state_dict()[key].shape)
    patched = patcher.clone()
    patched.add_patches({key: (delta,)}, 1.0)
    options = dict(OPTIONS, rounding="learned", **QUICK)
    result = run_node(classes["FP8ScaledConvertModel"], model=patched, filename_prefix="fp8/flux", **options)
    output = Path(result.args[0])
    assert output.parent == root / "diffusion_models" / "fp8" and output.name == "flux_00001_.safetensors"
    with SafetensorsReader(output) as reader:
        assert json.loads(reader.metadata["workflow"]) == {"nodes": []}
        assert "prompt" in reader.metadata
    reference_model = model
    with torch.no_grad():
        reference_model.double_blocks[0].img_attn.qkv.weight += delta.to(torch.bfloat16).float()
    try:
        loaded = comfy.sd.load_diffusion_model(str(output))
        error = relative_error(forward(loaded.model.diffusion_model, inputs), forward(reference_model, inputs))
    finally:
        with torch.no_grad():
            reference_model.double_blocks[0].img_attn.qkv.weight -= delta.to(torch.bfloat16).float()
    assert error < 0.08, "the LoRA-style patch must be baked into the converted weights"
    assert "quantized" in result.args[1]


@pytest.mark.parametrize("layout", ["comfy", "legacy", "ultra8"])
def test_convert_file_then_load_with_the_pack_loader(comfy, pack, tiny_flux, layout):
    classes, _, root = pack
    _, model, inputs = tiny_flux
    result = run_node(
        classes["FP8ScaledConvertFile"],
        source="diffusion_models/tiny_flux_bf16.safetensors",
        filename_prefix=f"file_{layout}",
        **dict(OPTIONS, format=layout),
    )
    output = Path(result.args[0])
    assert output.parent == root / "diffusion_models"
    loaded = run_node(classes["FP8ScaledLoad"], unet_name=output.name).args[0]
    assert relative_error(forward(loaded.model.diffusion_model, inputs), forward(model, inputs)) < 0.08


def test_inspect_node_reports_the_format(pack):
    """Inspects the converted file through the path output of the convert node."""
    classes, _, _ = pack
    source = "diffusion_models/tiny_flux_bf16.safetensors"
    converted = run_node(classes["FP8ScaledConvertFile"], source=source, filename_prefix="for_inspect", **OPTIONS)
    by_name = run_node(classes["FP8ScaledInspect"], source="diffusion_models/for_inspect_00001_.safetensors")
    by_path = run_node(classes["FP8ScaledInspect"], source=source, path=converted.args[0])
    assert by_name.args[0] == by_path.args[0]
    assert "format    comfy" in by_path.args[0] and "VIOLATION" not in by_path.args[0]
    with pytest.raises(ValueError, match="not a file inside"):
        run_node(classes["FP8ScaledInspect"], source=source, path=__file__)
    assert run_node(classes["FP8ScaledInspect"], source="none", path=converted.args[0]).args[0] == by_path.args[0]
    with pytest.raises(ValueError, match="pick a file in 'source' or connect"):
        run_node(classes["FP8ScaledInspect"], source="none")


def test_cancel_stops_and_leaves_no_file(comfy, pack, monkeypatch):
    import comfy.model_management
    import comfy.utils

    classes, _, root = pack
    original = comfy.utils.ProgressBar.update_absolute

    def press_cancel_at_five(self, value, total=None, preview=None):
        if value >= 5:  # the share of the work, out of the tensor count: a fraction
            comfy.model_management.interrupt_current_processing(True)
        return original(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", press_cancel_at_five)
    before = sorted(p.name for p in (root / "diffusion_models").rglob("*"))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(
            classes["FP8ScaledConvertFile"],
            source="diffusion_models/tiny_flux_bf16.safetensors",
            filename_prefix="cancelled",
            **OPTIONS,
        )
    assert sorted(p.name for p in (root / "diffusion_models").rglob("*")) == before


def test_bad_prefix_is_a_clear_error(pack):
    classes, _, _ = pack
    with pytest.raises(ValueError, match="filename_prefix"):
        run_node(
            classes["FP8ScaledConvertFile"],
            source="diffusion_models/tiny_flux_bf16.safetensors",
            filename_prefix="../../escape",
            **OPTIONS,
        )


def test_convert_model_that_is_already_fp8(comfy, pack, tiny_flux):
    """A MODEL loaded from an FP8-scaled file (QuantizedTensor weights) converts again without error."""
    classes, _, root = pack
    _, model, inputs = tiny_flux
    first = run_node(
        classes["FP8ScaledConvertFile"],
        source="diffusion_models/tiny_flux_bf16.safetensors",
        filename_prefix="fp8_once",
        **OPTIONS,
    )
    loaded = comfy.sd.load_diffusion_model(first.args[0])
    again = run_node(classes["FP8ScaledConvertModel"], model=loaded, filename_prefix="fp8_twice", **OPTIONS)
    reloaded = comfy.sd.load_diffusion_model(again.args[0])
    assert relative_error(forward(reloaded.model.diffusion_model, inputs), forward(model, inputs)) < 0.08


def test_every_input_of_every_node_has_a_tooltip_in_the_users_words(pack):
    """Hovering any input says what it is; no command-line flags, no tensor or code names (snake_case
    words other than the node's own input and output names)."""
    classes, _, _ = pack
    ours = {node_id: cls for node_id, cls in classes.items() if node_id.startswith("FP8Scaled")}
    assert len(ours) >= 7
    for node_id, cls in ours.items():
        schema = cls.GET_SCHEMA()
        names = {i.id for i in schema.inputs} | {o.display_name or o.io_type.lower() for o in schema.outputs}
        for widget in schema.inputs:
            where = f"{node_id}.{widget.id}"
            assert widget.tooltip and widget.tooltip.strip(), f"{where} has no tooltip"
            assert "--" not in widget.tooltip, f"{where}: a command-line flag in {widget.tooltip!r}"
            code = set(re.findall(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b", widget.tooltip)) - names - USERS_WORDS
            assert not code, f"{where}: {sorted(code)} in {widget.tooltip!r}"
