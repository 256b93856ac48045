"""Activation scales and full-precision layers: the scale rule, the simulation of ComfyUI's fp8
activation path, and the tensors each layout gets for them."""

from __future__ import annotations

import pytest
import torch

from quant_core import activation, formats, fp8
from quant_core.calibration import Gram, Recorder
from quant_core.cli import convert_parser, options_from
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


def test_legacy_layer_input_scale_and_no_per_layer_full_precision():
    only_scale = formats.Activation(input_scale=0.25)
    tensors = formats.layer_tensors("legacy", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5, only_scale)
    assert set(tensors) == {WEIGHT, "blocks.0.attn.qkv.scale_weight", "blocks.0.attn.qkv.scale_input"}
    assert tensors["blocks.0.attn.qkv.scale_input"].dtype == torch.float32
    with pytest.raises(ValueError, match="legacy layout cannot mark one layer"):
        formats.layer_tensors("legacy", WEIGHT, torch.zeros(4, 4, dtype=E4M3), 0.5, ACTIVATION)


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
    assert unrecorded == formats.PLAIN, "no statistics: no input scale, ComfyUI's default applies"
    assert not inspect_file(str(output)).violations
    assert not verify_files(str(checkpoint), str(output)).violations


@pytest.mark.parametrize("threshold, flagged", [(0.0, {"up", "down"}), (1.0, set())])
def test_full_precision_where_fp8_inputs_are_predicted_to_hurt(recorded, tmp_path, threshold, flagged):
    checkpoint, calibration, _ = recorded
    output = tmp_path / "out.safetensors"
    convert_file(
        checkpoint,
        output,
        ConvertOptions(method="nearest", calibration=str(calibration), full_precision_above=threshold),
    )
    with SafetensorsReader(output) as reader:
        keys = set(reader.tensors)
        settings = {n: formats.read_activation("comfy", f"{n}.weight", reader.read, keys) for n in Blocks.NAMES}
        full = {name for name, layer in settings.items() if layer.full_precision}
        assert not any(k.endswith(".input_scale") for k in keys), "input scales only with --input_scales"
    assert full == flagged, "unrecorded layers have no prediction and stay fp8"


def test_input_scales_need_a_calibration_file(recorded, tmp_path):
    checkpoint, _, _ = recorded
    with pytest.raises(ValueError, match="need --calibration"):
        convert_file(checkpoint, tmp_path / "out.safetensors", ConvertOptions(method="nearest", input_scales=True))


def test_legacy_refuses_per_layer_full_precision(recorded, tmp_path):
    checkpoint, _, _ = recorded
    options = ConvertOptions(format="legacy", method="nearest", full_precision=["down"])
    with pytest.raises(ValueError, match="legacy layout cannot mark one layer"):
        convert_file(checkpoint, tmp_path / "out.safetensors", options)
    assert not (tmp_path / "out.safetensors").exists()


def test_legacy_writes_scale_input(recorded, tmp_path):
    checkpoint, calibration, _ = recorded
    output = tmp_path / "out.safetensors"
    convert_file(checkpoint, output, ConvertOptions(format="legacy", calibration=str(calibration), input_scales=True))
    with SafetensorsReader(output) as reader:
        assert {"up.scale_input", "down.scale_input"} <= set(reader.tensors)
        assert "unrecorded.scale_input" not in reader.tensors
    assert not verify_files(str(checkpoint), str(output)).violations


@pytest.mark.parametrize("target", ["comfy", "legacy"])
def test_decode_carries_input_scales_and_refuses_full_precision_for_legacy(recorded, tmp_path, target):
    checkpoint, calibration, _ = recorded
    ultra8 = tmp_path / "ultra8.safetensors"
    options = ConvertOptions(format="ultra8", method="nearest", calibration=str(calibration), input_scales=True)
    convert_file(checkpoint, ultra8, options)
    with SafetensorsReader(ultra8) as reader:
        written = formats.read_activation("ultra8", "up.weight", reader.read, set(reader.tensors))
    decoded = decode_file(ultra8, tmp_path / f"{target}.safetensors", target)
    with SafetensorsReader(decoded) as reader:
        assert formats.read_activation(target, "up.weight", reader.read, set(reader.tensors)) == written
    assert not inspect_file(str(decoded)).violations
    flagged = tmp_path / "flagged.safetensors"
    convert_file(checkpoint, flagged, ConvertOptions(format="ultra8", method="nearest", full_precision=["up"]))
    if target == "legacy":
        with pytest.raises(ValueError, match="legacy layout cannot mark one layer"):
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
    options = options_from(convert_parser().parse_args(argv))
    assert options.input_scales is True
    assert options.full_precision == ["img_mlp", "txt_mlp"]
    assert options.full_precision_above == 0.025


def test_cancel_is_checked_before_each_weight_the_planning_reads(recorded, tmp_path):
    """``--full_precision_above`` reads every recorded weight before the conversion starts."""
    checkpoint, calibration, _ = recorded
    reads = []

    class Cancelled(BaseException):
        pass

    def check_interrupt() -> None:
        if reads:
            raise Cancelled

    options = ConvertOptions(method="nearest", calibration=str(calibration), full_precision_above=0.0)
    with SafetensorsReader(checkpoint) as reader:
        read = reader.read
        reader.read = lambda name: reads.append(name) or read(name)
        with pytest.raises(Cancelled):
            convert(reader, tmp_path / "out.safetensors", options, check_interrupt=check_interrupt)
    assert len(reads) == 1 and not (tmp_path / "out.safetensors").exists()
