"""Activation scales and full-precision layers: the scale rule, the simulation of ComfyUI's fp8
activation path, and the tensors each layout gets for them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from quant_core import activation, formats, fp8
from quant_core.calibration import Gram, Recorder
from quant_core.cli import convert_parser, main, options_from
from quant_core.convert import ConvertOptions, convert, convert_file
from quant_core.decode import decode_file
from quant_core.inspection import inspect_file, verify_files
from quant_core.io import SafetensorsReader, write_file

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("fraction", [1e-3, 0.3, 0.7, 1.0, 1.003, 7.0, 200.0])
def test_input_scale_fits_absmax_and_has_a_bf16_reciprocal(dtype, fraction):
    absmax = fraction * fp8.fp8_max(dtype)
    scale = activation.input_scale_for(absmax, dtype)
    reciprocal = (1.0 / torch.tensor(scale, dtype=torch.float32)).to(torch.bfloat16)  # what ComfyUI multiplies by
    assert float(reciprocal) * scale == pytest.approx(1.0, abs=1e-7), "no gain error in the bf16 cast"
    assert float(reciprocal.half()) == float(reciprocal), "nor in an fp16 cast"
    assert absmax * float(reciprocal) <= fp8.fp8_max(dtype)
    assert absmax * float(reciprocal) > fp8.fp8_max(dtype) * (1 - 2**-7), "the range is used to one bf16 step"


def test_input_scale_of_silent_or_extreme_layers():
    assert activation.input_scale_for(0.0, E4M3) == 1.0, "only zeros seen: ComfyUI's default"
    assert activation.input_scale_for(1e-12, E4M3) == 2.0**-15, "reciprocal stays finite in fp16"
    assert activation.input_scale_for(1e12, E4M3) == 2.0**14


def test_power_of_two_scale():
    assert activation.power_of_two_scale(1000.0, E4M3) == 4.0
    assert activation.power_of_two_scale(448.0, E4M3) == 1.0
    assert activation.power_of_two_scale(0.0, E4M3) == 1.0


def test_quantize_input_without_scale_clamps_to_the_fp8_range():
    x = torch.tensor([[1000.0, -600.0, 3.3, 0.001]])
    q, scale = activation.quantize_input(x, None, E4M3, torch.bfloat16)
    assert float(scale) == 1.0
    assert q.float().tolist() == [[448.0, -448.0, 3.25, 2.0**-9]]


def test_quantize_input_with_a_static_scale():
    x = torch.tensor([[1000.0, -600.0, 3.3]])
    scale = activation.input_scale_for(1000.0, E4M3)
    q, stored = activation.quantize_input(x, scale, E4M3, torch.bfloat16)
    assert float(stored) == scale
    assert q.float().tolist() == [[448.0, -256.0, 1.5]], "1000 fits; the rest keeps 3 mantissa bits"


def test_fp8_linear_is_the_product_of_the_dequantized_operands():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=generator)
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    q = fp8.quantize_nearest(weight, scale, E4M3)
    x, bias = torch.randn(5, 16, generator=generator), torch.randn(8, generator=generator)
    input_scale = activation.input_scale_for(fp8.absmax(x), E4M3)
    qx, _ = activation.quantize_input(x, input_scale, E4M3, torch.float32)
    expected = (qx.float() * input_scale) @ fp8.dequantize(q, scale).T + bias
    out = activation.fp8_linear(x, q, scale, bias, input_scale, torch.float32)
    assert torch.allclose(out, expected, atol=1e-5)
    full = activation.full_precision_linear(x, q, scale, bias, torch.float32)
    assert torch.allclose(full, x @ fp8.dequantize(q, scale).T + bias, atol=1e-5)


def test_predicted_input_error_matches_a_measurement():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator) * torch.logspace(0, -1, 64)  # correlated, uneven inputs
    x = torch.randn(4096, 64, generator=generator) @ mixing
    weight = torch.randn(32, 64, generator=generator)
    reference = x @ weight.T
    q, scale = activation.quantize_input(x, activation.input_scale_for(fp8.absmax(x), E4M3), E4M3, torch.float32)
    measured = float(((q.float() * scale) @ weight.T - reference).norm() / reference.norm())
    predicted = activation.predicted_input_error(weight, Gram(x.T @ x), E4M3)
    assert predicted == pytest.approx(measured, rel=0.15)


WEIGHT = "blocks.0.attn.qkv.weight"
ACTIVATION = formats.Activation(input_scale=0.25, full_precision=True)


def test_comfy_layer_with_input_scale_and_full_precision():
    tensors = formats.layer_tensors("comfy", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5, ACTIVATION)
    input_scale = tensors["blocks.0.attn.qkv.input_scale"]
    assert input_scale.dtype == torch.float32 and input_scale.shape == () and float(input_scale) == 0.25
    conf = formats.read_json_tensor(tensors["blocks.0.attn.qkv.comfy_quant"])
    assert conf == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}


def test_legacy_layer_has_its_input_scale_and_no_per_layer_flag():
    """The legacy flag is the file's marker: a layer's tensors are the same with and without it."""
    only_scale = formats.Activation(input_scale=0.25)
    tensors = formats.layer_tensors("legacy", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5, only_scale)
    assert set(tensors) == {WEIGHT, "blocks.0.attn.qkv.scale_weight", "blocks.0.attn.qkv.scale_input"}
    assert tensors["blocks.0.attn.qkv.scale_input"].dtype == torch.float32
    flagged = formats.layer_tensors("legacy", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5, ACTIVATION)
    assert set(flagged) == set(tensors)


@pytest.mark.parametrize("full, size", [(True, 2), (False, 0)])
def test_legacy_marker_says_weight_only_with_two_elements(full, size):
    """ComfyUI's ``convert_old_quants``: a 2-element ``scaled_fp8`` gives every layer full_precision_matrix_mult."""
    marker = formats.marker_tensors("legacy", "model.diffusion_model.", E4M3, True, full)
    assert list(marker) == ["model.diffusion_model.scaled_fp8"]
    assert marker["model.diffusion_model.scaled_fp8"].dtype == E4M3
    assert marker["model.diffusion_model.scaled_fp8"].shape == (size,)


def test_legacy_layers_must_agree():
    weight_only, scaled = formats.Activation(None, True), formats.Activation(0.5, False)
    assert formats.legacy_full_precision({"a": weight_only, "b": weight_only}) is True
    assert formats.legacy_full_precision({"a": scaled, "b": formats.Activation(None, False)}) is False
    with pytest.raises(ValueError, match="legacy layout makes every layer either weight-only or fp8 compute"):
        formats.legacy_full_precision({"a": weight_only, "b": scaled})


def test_ultra8_layer_keeps_a_float32_input_scale():
    tensors = formats.layer_tensors("ultra8", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5, ACTIVATION)
    assert tensors["blocks.0.attn.qkv.input_scale"].dtype == torch.float32
    conf = formats.read_json_tensor(tensors["blocks.0.attn.qkv.comfy_quant"])
    assert conf["format"] == "ultra8" and conf["full_precision_matrix_mult"] is True


@pytest.mark.parametrize("fmt", ["comfy", "ultra8"])
def test_read_activation_round_trip(fmt):
    tensors = formats.layer_tensors(fmt, WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5, ACTIVATION)
    assert formats.read_activation(fmt, WEIGHT, tensors.__getitem__, set(tensors)) == ACTIVATION
    plain = formats.layer_tensors(fmt, WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5)
    assert formats.read_activation(fmt, WEIGHT, plain.__getitem__, set(plain)) == formats.PLAIN


@pytest.mark.parametrize("full", [True, False])
def test_read_activation_of_legacy_follows_the_marker(full):
    """A legacy layer's flag is its marker's; an input scale of 1 is none, as ComfyUI drops it on load."""
    tensors = formats.layer_tensors("legacy", "model.diffusion_model." + WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5)
    tensors["model.diffusion_model.blocks.0.attn.qkv.scale_input"] = torch.tensor(1.0)
    tensors |= formats.marker_tensors("legacy", "model.diffusion_model.", E4M3, True, full)
    read = formats.read_activation("legacy", "model.diffusion_model." + WEIGHT, tensors.__getitem__, set(tensors))
    assert read == formats.Activation(None, full)


# A model whose Linear names are checkpoint keys, recorded on inputs far beyond the fp8 range.
class Blocks(torch.nn.Module):
    NAMES = ("up", "down", "unrecorded")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.unrecorded = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def recorded(tmp_path):
    """(checkpoint, calibration file, recorded statistics) of ``Blocks`` fed inputs up to ~1000."""
    model = Blocks()
    checkpoint = tmp_path / "model.safetensors"
    write_file(checkpoint, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    calibration = tmp_path / "calibration.safetensors"
    with Recorder(model) as recorder:
        model(300.0 * torch.randn(64, 32, generator=torch.Generator().manual_seed(1)))
    recorder.save(calibration)
    return checkpoint, calibration, recorder.statistics()


def test_convert_writes_calibrated_input_scales(recorded, tmp_path):
    checkpoint, calibration, stats = recorded
    output = tmp_path / "out.safetensors"
    options = ConvertOptions(method="nearest", calibration=str(calibration), input_scales=True, full_precision=["down"])
    convert_file(checkpoint, output, options)
    with SafetensorsReader(output) as reader:
        keys = set(reader.tensors)
        up = formats.read_activation("comfy", "up.weight", reader.read, keys)
        down = formats.read_activation("comfy", "down.weight", reader.read, keys)
        unrecorded = formats.read_activation("comfy", "unrecorded.weight", reader.read, keys)
    assert up == formats.Activation(activation.input_scale_for(stats["up.weight"].input_absmax, E4M3), False)
    assert up.input_scale > 1, "inputs beyond 448 need a scale above 1"
    assert down == formats.Activation(activation.input_scale_for(stats["down.weight"].input_absmax, E4M3), True)
    assert unrecorded == formats.Activation(None, True), "no statistics: no input scale, weight-only"
    assert not inspect_file(str(output)).violations
    assert not verify_files(str(checkpoint), str(output)).violations


def converted_settings(checkpoint, output, options: ConvertOptions) -> dict[str, formats.Activation]:
    """Convert, then read each ``Blocks`` layer's activation settings back from the file."""
    convert_file(checkpoint, output, options)
    with SafetensorsReader(output) as reader:
        keys = set(reader.tensors)
        return {n: formats.read_activation("comfy", f"{n}.weight", reader.read, keys) for n in Blocks.NAMES}


@pytest.mark.parametrize("threshold, flagged", [(0.0, {"up", "down"}), (1.0, set())])
def test_full_precision_where_fp8_inputs_are_predicted_to_hurt(recorded, tmp_path, threshold, flagged):
    """With uncalibrated fp8 compute asked for, only the threshold marks recorded layers weight-only."""
    checkpoint, calibration, _ = recorded
    options = ConvertOptions(
        method="nearest", calibration=str(calibration), full_precision_above=threshold, uncalibrated_fp8_compute=True
    )
    settings = converted_settings(checkpoint, tmp_path / "out.safetensors", options)
    assert all(layer.input_scale is None for layer in settings.values()), "input scales only with --input_scales"
    full = {name for name, layer in settings.items() if layer.full_precision}
    assert full == flagged, "unrecorded layers have no prediction and stay fp8"


@pytest.mark.parametrize("threshold, flagged", [(0.0, {"up", "down", "unrecorded"}), (1.0, {"unrecorded"})])
def test_calibrated_layers_stay_fp8_compute_below_the_threshold(recorded, tmp_path, threshold, flagged):
    checkpoint, calibration, _ = recorded
    options = ConvertOptions(
        method="nearest", calibration=str(calibration), input_scales=True, full_precision_above=threshold
    )
    settings = converted_settings(checkpoint, tmp_path / "out.safetensors", options)
    assert {name for name, layer in settings.items() if layer.full_precision} == flagged
    assert {name for name, layer in settings.items() if layer.input_scale is not None} == {"up", "down"}


def test_input_scales_need_a_calibration_file(recorded, tmp_path):
    checkpoint, _, _ = recorded
    with pytest.raises(ValueError, match="need --calibration"):
        convert_file(checkpoint, tmp_path / "out.safetensors", ConvertOptions(method="nearest", input_scales=True))


# Per layer of a calibrated conversion: (key suffix, dtype, shape) and the comfy_quant JSON.
CALIBRATED = {
    "comfy": ({".weight_scale", ".input_scale", ".comfy_quant"}, {"format": "float8_e4m3fn"}),
    "legacy": ({".scale_weight", ".scale_input"}, None),
    "ultra8": (
        {".weight_scale_u8", ".input_scale", ".comfy_quant"},
        {"format": "ultra8", "weight_dtype": "float8_e4m3fn"},
    ),
}
SUFFIX_DTYPE = {".weight_scale_u8": torch.uint8, ".comfy_quant": torch.uint8}


@pytest.mark.parametrize("fmt", sorted(CALIBRATED))
def test_calibrated_layers_exact_tensors_per_format(recorded, tmp_path, fmt):
    """--input_scales on every quantized layer: an input_scale each and no full precision flag, so
    ComfyUI multiplies them in fp8 on a GPU with fp8 compute; legacy says so with an empty marker."""
    checkpoint, calibration, stats = recorded
    output = tmp_path / "out.safetensors"
    options = ConvertOptions(
        format=fmt, method="nearest", calibration=str(calibration), input_scales=True, exclude=["unrecorded"]
    )
    convert_file(checkpoint, output, options)
    suffixes, conf = CALIBRATED[fmt]
    with SafetensorsReader(output) as reader:
        tensors = {name: reader.read(name) for name in reader.tensors}
    marker = {"comfy": set(), "legacy": {"scaled_fp8"}, "ultra8": {"ultra8_codec"}}[fmt]
    expected = {f"{layer}{suffix}" for layer in ("up", "down") for suffix in suffixes | {".weight", ".bias"}}
    assert set(tensors) == expected | {"unrecorded.weight", "unrecorded.bias"} | marker
    for layer in ("up", "down"):
        assert tensors[f"{layer}.weight"].dtype == E4M3
        for suffix in suffixes:
            tensor = tensors[layer + suffix]
            assert tensor.dtype == SUFFIX_DTYPE.get(suffix, torch.float32)
            assert tensor.dim() == (1 if suffix == ".comfy_quant" else 0)
        input_scale = tensors[layer + formats.INPUT_SCALE_SUFFIX[fmt]]
        assert float(input_scale) == activation.input_scale_for(stats[f"{layer}.weight"].input_absmax, E4M3)
        if conf is not None:
            assert bytes(tensors[f"{layer}.comfy_quant"].tolist()) == json.dumps(conf).encode()
    if fmt == "legacy":
        assert tensors["scaled_fp8"].dtype == E4M3 and tensors["scaled_fp8"].shape == (0,)


def test_legacy_refuses_layers_that_disagree(recorded, tmp_path):
    """Input scales for some layers but not others (or a full precision regex on top) would need
    per-layer flags, which the legacy marker cannot give."""
    checkpoint, calibration, _ = recorded
    partial = ConvertOptions(format="legacy", method="nearest", calibration=str(calibration), input_scales=True)
    regex = replace(partial, exclude=["unrecorded"], full_precision=["down"])
    for options in (partial, regex):
        with pytest.raises(ValueError, match="legacy layout makes every layer either weight-only or fp8 compute"):
            convert_file(checkpoint, tmp_path / "out.safetensors", options)
        assert not (tmp_path / "out.safetensors").exists()


def test_legacy_with_input_scales_on_every_layer_runs_fp8_compute(recorded, tmp_path):
    checkpoint, calibration, _ = recorded
    output = tmp_path / "out.safetensors"
    options = ConvertOptions(format="legacy", calibration=str(calibration), input_scales=True, exclude=["unrecorded"])
    convert_file(checkpoint, output, options)
    with SafetensorsReader(output) as reader:
        assert {"up.scale_input", "down.scale_input"} <= set(reader.tensors)
        assert reader.tensors["scaled_fp8"].shape == (0,), "the empty marker: fp8 compute"
    assert not verify_files(str(checkpoint), str(output)).violations


@pytest.mark.parametrize("target", ["comfy", "legacy"])
def test_decode_carries_input_scales_and_refuses_mixed_layers_for_legacy(recorded, tmp_path, target):
    checkpoint, calibration, _ = recorded
    ultra8 = tmp_path / "ultra8.safetensors"
    options = ConvertOptions(
        format="ultra8", method="nearest", calibration=str(calibration), input_scales=True, exclude=["unrecorded"]
    )
    convert_file(checkpoint, ultra8, options)
    with SafetensorsReader(ultra8) as reader:
        written = formats.read_activation("ultra8", "up.weight", reader.read, set(reader.tensors))
    decoded = decode_file(ultra8, tmp_path / f"{target}.safetensors", target)
    with SafetensorsReader(decoded) as reader:
        assert formats.read_activation(target, "up.weight", reader.read, set(reader.tensors)) == written
    assert not inspect_file(str(decoded)).violations
    flagged = tmp_path / "flagged.safetensors"
    uncalibrated = ConvertOptions(
        format="ultra8", method="nearest", full_precision=["up"], uncalibrated_fp8_compute=True
    )
    convert_file(checkpoint, flagged, uncalibrated)
    if target == "legacy":
        with pytest.raises(ValueError, match="legacy layout makes every layer either weight-only or fp8 compute"):
            decode_file(flagged, tmp_path / "flagged_legacy.safetensors", target)
    else:
        with SafetensorsReader(decode_file(flagged, tmp_path / "flagged_comfy.safetensors", target)) as reader:
            assert formats.read_activation(target, "up.weight", reader.read, set(reader.tensors)).full_precision


def test_inspect_flags_a_bad_input_scale(tmp_path):
    tensors = formats.layer_tensors("comfy", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5)
    tensors["blocks.0.attn.qkv.input_scale"] = torch.tensor([0.0, 1.0])
    path = tmp_path / "bad.safetensors"
    write_file(path, tensors)
    assert any("input_scale" in v for v in inspect_file(str(path)).violations)


@pytest.mark.parametrize("spelling", ["underscore", "dash"])
def test_cli_spellings(spelling):
    dash = spelling == "dash"
    argv = ["--input", "m.safetensors", "--calibration", "c.safetensors"]
    argv += ["--input-scales" if dash else "--input_scales"]
    argv += ["--full-precision" if dash else "--full_precision", "img_mlp", "--full_precision", "txt_mlp"]
    argv += ["--full-precision-above" if dash else "--full_precision_above", "0.025"]
    assert options_from(convert_parser().parse_args(argv)).uncalibrated_fp8_compute is False, "the safe default"
    argv += ["--uncalibrated-fp8-compute" if dash else "--uncalibrated_fp8_compute"]
    options = options_from(convert_parser().parse_args(argv))
    assert options.uncalibrated_fp8_compute is True
    assert options.input_scales is True
    assert options.full_precision == ["img_mlp", "txt_mlp"]
    assert options.full_precision_above == 0.025


def test_inspect_and_verify_say_what_runs_fp8_compute(recorded, tmp_path, capsys):
    """Default: every layer weight-only, no warning. Calibrated: the input scale per layer.
    Uncalibrated fp8 compute: a warning (not a violation) naming the layers, in inspect and verify."""
    checkpoint, calibration, stats = recorded
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("default", "calibrated", "uncalibrated")}
    convert_file(checkpoint, paths["default"], ConvertOptions(method="nearest"))
    calibrated = ConvertOptions(method="nearest", calibration=str(calibration), input_scales=True)
    convert_file(checkpoint, paths["calibrated"], calibrated)
    convert_file(checkpoint, paths["uncalibrated"], ConvertOptions(method="nearest", uncalibrated_fp8_compute=True))

    default = inspect_file(str(paths["default"]))
    assert {layer.on_fp8_gpu() for layer in default.layers} == {"weight-only"}
    assert not default.warnings() and "3 weight-only, 0 fp8 compute with an input scale" in default.text()

    report = inspect_file(str(paths["calibrated"]))
    on_gpu = {layer.name: layer.on_fp8_gpu() for layer in report.layers}
    up_scale = activation.input_scale_for(stats["up.weight"].input_absmax, E4M3)
    assert on_gpu["up.weight"] == f"fp8 @{up_scale:.4g}" and on_gpu["unrecorded.weight"] == "weight-only"
    assert not report.warnings() and "1 weight-only, 2 fp8 compute with an input scale" in report.text()
    assert f"fp8 @{up_scale:.4g}" in report.text(errors=True)

    unscaled = verify_files(str(checkpoint), str(paths["uncalibrated"]))
    assert unscaled.unscaled_fp8_layers() == ["up.weight", "down.weight", "unrecorded.weight"]
    assert not unscaled.violations and len(unscaled.warnings()) == 1
    assert main(["verify", str(checkpoint), str(paths["uncalibrated"])]) == 0, "a warning is no violation"
    out = capsys.readouterr().out
    assert "WARNING 3 layers would multiply in fp8 with no input scale" in out and "contract OK" in out


@pytest.mark.parametrize("flag", [True, False])
def test_inspect_reads_the_header_variant(tmp_path, flag):
    """ComfyUI >= 0.3.68's header layout: the flags live in ``_quantization_metadata``."""
    tensors = formats.layer_tensors("comfy", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5)
    del tensors["blocks.0.attn.qkv.comfy_quant"]
    conf = {"format": "float8_e4m3fn", **({"full_precision_matrix_mult": True} if flag else {})}
    header = json.dumps({"format_version": "1.0", "layers": {"blocks.0.attn.qkv": conf}})
    path = tmp_path / "header.safetensors"
    write_file(path, tensors, {"_quantization_metadata": header})
    report = inspect_file(str(path))
    assert report.format == "comfy-header"
    assert [layer.on_fp8_gpu() for layer in report.layers] == ["weight-only" if flag else "fp8 @1 (none)"]


def test_cancel_is_checked_before_each_weight_the_planning_reads(recorded, tmp_path):
    """``--full_precision_above`` reads every recorded weight before the conversion starts."""
    checkpoint, calibration, _ = recorded
    reads = []

    class Cancelled(BaseException):
        pass

    def check_interrupt() -> None:
        if reads:
            raise Cancelled

    options = ConvertOptions(
        method="nearest", calibration=str(calibration), input_scales=True, full_precision_above=0.0
    )
    with SafetensorsReader(checkpoint) as reader:
        read = reader.read
        reader.read = lambda name: reads.append(name) or read(name)
        with pytest.raises(Cancelled):
            convert(reader, tmp_path / "out.safetensors", options, check_interrupt=check_interrupt)
    assert len(reads) == 1 and not (tmp_path / "out.safetensors").exists()
