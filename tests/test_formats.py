"""Every --format against the ComfyUI loader contract: keys, dtypes, shapes, markers and values.

Outputs are read back with both ``safetensors.torch.load_file`` and ``quant_core.io.SafetensorsReader``
(they must agree byte for byte), and the ``comfy`` layout is checked against comfy-kitchen's own
``QuantizedTensor``, which is what ComfyUI builds from these tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import quant_core
from quant_core import codec
from quant_core.convert import ConvertOptions, convert_file, default_output_path
from quant_core.io import SafetensorsReader, write_file

FORMATS = ("comfy", "legacy", "ultra8")
FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
MIN_NORMAL = {torch.float8_e4m3fn: 2.0**-6, torch.float8_e5m2: 2.0**-14}
SCALE_KEY = {"comfy": ".weight_scale", "legacy": ".scale_weight", "ultra8": ".weight_scale_u8"}
CODEC_STEP = (codec.SCALE_MAX / codec.SCALE_MIN) ** (1 / (codec.LEVELS - 1))  # ~1.1144 between codes
PREFIX = "model.diffusion_model."

# The tiny Flux model's Linear weights that the flux preset quantizes by default: every Linear of the
# blocks (attention, MLP, modulation). Embedders, img_in/txt_in and the final layer stay.
FLUX_QUANTIZED = {
    "double_blocks.0.img_mod.lin",
    "double_blocks.0.txt_mod.lin",
    "single_blocks.0.modulation.lin",
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.img_mlp.0",
    "double_blocks.0.img_mlp.2",
    "double_blocks.0.txt_attn.qkv",
    "double_blocks.0.txt_attn.proj",
    "double_blocks.0.txt_mlp.0",
    "double_blocks.0.txt_mlp.2",
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
}


# ---------------------------------------------------------------------------------------------- helpers


def raw(tensor: torch.Tensor) -> bytes:
    """A tensor's stored bytes (any dtype, any shape, 0-dim and empty included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_source(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.tensors}


def load_both(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load ``path`` with the reference safetensors loader and with ours; they must agree exactly."""
    reference = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        reference_metadata = handle.metadata() or {}
    with SafetensorsReader(path) as reader:
        ours = {name: reader.read(name) for name in reader.tensors}
        metadata = dict(reader.metadata)
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == reference[name].dtype, name
        assert tensor.shape == reference[name].shape, name
        assert raw(tensor) == raw(reference[name]), name
    assert metadata == reference_metadata
    return ours, metadata


def convert(source: Path, tmp_path: Path, name: str = "out.safetensors", **options) -> Path:
    output = tmp_path / name
    convert_file(source, output, ConvertOptions(**{"method": "nearest", **options}))
    return output


def layers_with(tensors: dict[str, torch.Tensor], suffix: str) -> set[str]:
    """Module paths that have a ``suffix`` tensor (the quantized layers of a layout)."""
    return {name.removesuffix(suffix) for name in tensors if name.endswith(suffix)}


def json_of(tensor: torch.Tensor) -> dict:
    assert tensor.dtype == torch.uint8 and tensor.dim() == 1
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


def assert_within_fp8_error(quantized: torch.Tensor, scale: float, original: torch.Tensor) -> None:
    """``quantized * scale`` is round-to-nearest of ``original`` on the scaled fp8 grid, nothing saturated.

    For a normal fp8 value the rounding error is at most half a spacing, i.e. ``|w| * 2**-(m+1)``;
    in the subnormal range it is at most half the subnormal spacing times the scale.
    """
    dtype = quantized.dtype
    weight = original.float()
    assert float(weight.abs().max()) <= FP8_MAX[dtype] * scale * (1 + 1e-6), "weights exceed the fp8 range"
    error = (quantized.float() * scale - weight).abs()
    half_step = 2.0 ** -(MANTISSA_BITS[dtype] + 1)
    bound = weight.abs() * half_step + scale * MIN_NORMAL[dtype] * half_step
    assert bool((error <= bound * (1 + 1e-5)).all()), f"max excess {float((error - bound).max())}"


# ---------------------------------------------------------------------------------------------- comfy


@pytest.mark.parametrize("fp8_format", sorted(FP8))
def test_comfy_layout_matches_contract(flux_file, tmp_path, fp8_format):
    original = read_source(flux_file)
    tensors, _ = load_both(convert(flux_file, tmp_path, format="comfy", fp8_format=fp8_format))
    dtype = FP8[fp8_format]

    layers = layers_with(tensors, ".weight_scale")
    assert layers == FLUX_QUANTIZED
    assert layers_with(tensors, ".comfy_quant") == layers
    for layer in layers:
        weight, scale, conf = (
            tensors[f"{layer}.weight"],
            tensors[f"{layer}.weight_scale"],
            tensors[f"{layer}.comfy_quant"],
        )
        assert weight.dtype == dtype
        assert weight.shape == original[f"{layer}.weight"].shape and weight.dim() == 2
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert math.isfinite(float(scale)) and float(scale) > 0
        assert conf.dtype == torch.uint8 and conf.dim() == 1
        # weight-only by default: ComfyUI dequantizes even on a GPU with fp8 compute
        expected = {"format": fp8_format, "full_precision_matrix_mult": True}
        assert json_of(conf) == expected
        # byte-for-byte what ComfyUI's own writer produces for this config
        assert bytes(conf.tolist()) == json.dumps(expected).encode()
        assert_within_fp8_error(weight, float(scale), original[f"{layer}.weight"])

    sidecars = {f"{layer}{suffix}" for layer in layers for suffix in (".weight_scale", ".comfy_quant")}
    assert set(tensors) == set(original) | sidecars
    assert not [k for k in tensors if k.endswith(("scale_weight", "weight_scale_u8", "scaled_fp8", "ultra8_codec"))]


def test_comfy_layout_round_trips_through_comfy_kitchen(flux_file, tmp_path):
    ck = pytest.importorskip("comfy_kitchen.tensor")
    original = read_source(flux_file)
    tensors, _ = load_both(convert(flux_file, tmp_path, format="comfy"))

    for layer in sorted(layers_with(tensors, ".weight_scale")):
        qdata, scale = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"]
        source = original[f"{layer}.weight"]

        # comfy-kitchen's serialisation of a TensorCoreFP8Layout weight has exactly our keys, dtypes and shapes
        kitchen = ck.QuantizedTensor.from_float(source, "TensorCoreFP8Layout", scale=scale)
        state = kitchen.state_dict(f"{layer}.weight")
        ours = {f"{layer}.weight": qdata, f"{layer}.weight_scale": scale}
        assert state.keys() == ours.keys()
        for key, tensor in state.items():
            assert tensor.dtype == ours[key].dtype, key
            assert tensor.shape == ours[key].shape, key
        assert torch.equal(state[f"{layer}.weight_scale"], scale)

        # comfy-kitchen dequantizes our stored tensors as the contract says, weight.to(dtype) * weight_scale;
        # in float32 that is exactly our own dequantization, in bf16 the same up to bf16 rounding
        ours_float = qdata.float() * scale
        for orig_dtype in (torch.bfloat16, torch.float32):
            params = ck.TensorCoreFP8Layout.Params(scale=scale, orig_dtype=orig_dtype, orig_shape=tuple(qdata.shape))
            dequantized = ck.QuantizedTensor(qdata, "TensorCoreFP8Layout", params).dequantize()
            assert dequantized.dtype == orig_dtype and dequantized.shape == source.shape
            assert torch.equal(dequantized, qdata.to(orig_dtype) * scale.to(orig_dtype))
            torch.testing.assert_close(dequantized.float(), ours_float, rtol=2.0**-7, atol=0.0)
        params = ck.TensorCoreFP8Layout.Params(scale=scale, orig_dtype=torch.float32, orig_shape=tuple(qdata.shape))
        assert torch.equal(ck.QuantizedTensor(qdata, "TensorCoreFP8Layout", params).dequantize(), ours_float)

        # our float32 round-to-nearest is at least as accurate as comfy-kitchen's quantizer at the same scale
        ours_error = float((qdata.float() * scale - source.float()).norm())
        kitchen_error = float((state[f"{layer}.weight"].float() * scale - source.float()).norm())
        assert ours_error <= kitchen_error * (1 + 1e-6), layer


# ---------------------------------------------------------------------------------------------- legacy


@pytest.mark.parametrize("fp8_format", sorted(FP8))
def test_legacy_layout_full_checkpoint(checkpoint_file, tmp_path, fp8_format):
    original = read_source(checkpoint_file)
    tensors, _ = load_both(convert(checkpoint_file, tmp_path, format="legacy", fp8_format=fp8_format))
    dtype = FP8[fp8_format]

    markers = [k for k in tensors if k.endswith("scaled_fp8")]
    assert markers == [PREFIX + "scaled_fp8"]
    marker = tensors[PREFIX + "scaled_fp8"]
    assert marker.dtype == dtype and marker.shape == (2,), "2 elements: every layer weight-only"

    layers = layers_with(tensors, ".scale_weight")
    assert layers == {PREFIX + layer for layer in FLUX_QUANTIZED}
    for layer in layers:
        weight, scale = tensors[f"{layer}.weight"], tensors[f"{layer}.scale_weight"]
        assert weight.dtype == dtype and weight.shape == original[f"{layer}.weight"].shape
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert_within_fp8_error(weight, float(scale), original[f"{layer}.weight"])

    # VAE and text-encoder weights (2-D and large enough) are not part of the diffusion model: untouched
    for name, tensor in original.items():
        if not name.startswith(PREFIX):
            assert tensors[name].dtype == tensor.dtype and raw(tensors[name]) == raw(tensor), name
    assert set(tensors) == set(original) | {f"{layer}.scale_weight" for layer in layers} | set(markers)
    assert not [k for k in tensors if k.endswith((".comfy_quant", ".weight_scale", ".weight_scale_u8"))]


def test_legacy_marker_of_a_bare_diffusion_model_has_no_prefix(flux_file, tmp_path):
    tensors, _ = load_both(convert(flux_file, tmp_path, format="legacy"))
    assert [k for k in tensors if k.endswith("scaled_fp8")] == ["scaled_fp8"]
    assert tensors["scaled_fp8"].dtype == torch.float8_e4m3fn and tensors["scaled_fp8"].shape == (2,)


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("flux_file", {"comfy": [], "legacy": ["scaled_fp8"], "ultra8": ["ultra8_codec"]}),
        (
            "checkpoint_file",
            {"comfy": [], "legacy": [PREFIX + "scaled_fp8"], "ultra8": [PREFIX + "ultra8_codec"]},
        ),
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_marker_tensors_carry_the_model_prefix(request, tmp_path, fixture, expected, fmt):
    source = request.getfixturevalue(fixture)
    tensors, _ = load_both(convert(source, tmp_path, format=fmt))
    assert sorted(k for k in tensors if k.endswith(("scaled_fp8", "ultra8_codec"))) == expected[fmt]


# ---------------------------------------------------------------------------------------------- ultra8


@pytest.mark.parametrize("shared", [True, False])
def test_ultra8_layout(flux_file, tmp_path, shared):
    original = read_source(flux_file)
    tensors, _ = load_both(convert(flux_file, tmp_path, format="ultra8", shared_scales=shared))

    layers = layers_with(tensors, ".weight_scale_u8")
    assert layers == FLUX_QUANTIZED
    for layer in layers:
        weight, code = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale_u8"]
        source = original[f"{layer}.weight"]
        assert weight.dtype == torch.float8_e4m3fn and weight.shape == source.shape
        assert code.dtype == torch.uint8 and code.shape == ()
        scale = codec.decode_scale(int(code))
        assert_within_fp8_error(weight, scale, source)
        conf = {"format": "ultra8", "weight_dtype": "float8_e4m3fn", "full_precision_matrix_mult": True}
        assert bytes(tensors[f"{layer}.comfy_quant"].tolist()) == json.dumps(conf).encode()
        exact = float(source.float().abs().max()) / FP8_MAX[torch.float8_e4m3fn]
        assert scale >= exact
        if not shared:  # its own scale: the smallest code that does not overflow
            assert int(code) == 0 or codec.decode_scale(int(code) - 1) < exact

    marker = json_of(tensors["ultra8_codec"])
    assert marker["format"] == "ultra8"
    assert marker["weight_dtype"] == "float8_e4m3fn"
    assert marker["scale_min"] == pytest.approx(1e-10, rel=0)
    assert marker["scale_max"] == pytest.approx(100.0, rel=0)
    assert marker["levels"] == 256
    assert marker["shared_scales"] is shared
    assert not [k for k in tensors if k.endswith((".weight_scale", ".scale_weight", "scaled_fp8"))]


# ---------------------------------------------------------------------------------------------- all formats


@pytest.mark.parametrize("fixture", ["checkpoint_file", "t5_file", "flux_example_file"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_pass_through_tensors_are_bit_identical(request, tmp_path, fixture, fmt):
    source = request.getfixturevalue(fixture)
    original = read_source(source)
    tensors, _ = load_both(convert(source, tmp_path, format=fmt))
    quantized = {f"{layer}.weight" for layer in layers_with(tensors, SCALE_KEY[fmt])}
    assert quantized, "nothing was quantized"
    kept = set(original) - quantized
    assert kept
    for name in kept:
        assert tensors[name].dtype == original[name].dtype, name
        assert tensors[name].shape == original[name].shape, name
        assert raw(tensors[name]) == raw(original[name]), name
    for name in quantized:
        assert tensors[name].dtype == torch.float8_e4m3fn, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_header_metadata_kept_and_described(flux_file, tmp_path, fmt):
    with SafetensorsReader(flux_file) as reader:
        source_metadata = dict(reader.metadata)
        source_count = len(reader.tensors)
    assert source_metadata, "the fixture must have metadata to keep"
    tensors, metadata = load_both(convert(flux_file, tmp_path, format=fmt))

    for key, value in source_metadata.items():
        assert metadata[key] == value
    described = json.loads(metadata["quant_core"])
    assert described["version"] == quant_core.__version__
    assert described["settings"]["format"] == fmt
    assert described["settings"]["fp8_format"] == "float8_e4m3fn"
    assert described["settings"]["method"] == "nearest"
    quantized = len(layers_with(tensors, SCALE_KEY[fmt]))
    assert described["quantized"] == quantized
    assert described["kept"] == source_count - quantized
    assert described["preset"] == "flux"


# Five weights in two modules with known absolute maxima.
GROUP_AMAX = {
    "blocks.0.attn.q.weight": 1.0,
    "blocks.0.attn.k.weight": 2.0,
    "blocks.0.attn.v.weight": 4.0,
    "blocks.0.mlp.fc1.weight": 0.5,
    "blocks.0.mlp.fc2.weight": 3.0,
}
GROUPS = {
    "blocks.0.attn": ["blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight"],
    "blocks.0.mlp": ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"],
}


def write_grouped(path: Path) -> Path:
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name, amax in GROUP_AMAX.items():
        weight = (torch.rand(48, 32, generator=generator) * 2 - 1) * (0.9 * amax)
        weight[0, 0] = -amax
        tensors[name] = weight.bfloat16()
        assert float(tensors[name].float().abs().max()) == amax
    write_file(path, tensors)
    return path


def stored_scales(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, float]:
    scales = {}
    for name in GROUP_AMAX:
        stored = tensors[name.removesuffix(".weight") + SCALE_KEY[fmt]]
        scales[name] = codec.decode_scale(int(stored)) if fmt == "ultra8" else float(stored)
    return scales


def assert_scale_for(scale: float, amax: float, fmt: str) -> None:
    exact = amax / FP8_MAX[torch.float8_e4m3fn]
    if fmt == "ultra8":
        assert exact <= scale < exact * CODEC_STEP * (1 + 1e-6)
    else:
        assert scale == pytest.approx(exact, rel=1e-6) and scale * 448 >= amax


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_scales_within_a_module(tmp_path, fmt):
    source = write_grouped(tmp_path / "grouped.safetensors")
    tensors, _ = load_both(convert(source, tmp_path, format=fmt, shared_scales=True, preset="none"))
    scales = stored_scales(tensors, fmt)
    group_scales = {}
    for group, members in GROUPS.items():
        values = {scales[m] for m in members}
        assert len(values) == 1, f"{group}: {values}"
        group_scales[group] = values.pop()
        assert_scale_for(group_scales[group], max(GROUP_AMAX[m] for m in members), fmt)
    assert group_scales["blocks.0.attn"] != group_scales["blocks.0.mlp"]
    original = read_source(source)
    for name in GROUP_AMAX:
        assert_within_fp8_error(tensors[name], scales[name], original[name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_distinct_scales_without_sharing(tmp_path, fmt):
    source = write_grouped(tmp_path / "grouped.safetensors")
    tensors, _ = load_both(convert(source, tmp_path, format=fmt, shared_scales=False, preset="none"))
    scales = stored_scales(tensors, fmt)
    assert len(set(scales.values())) == len(GROUP_AMAX)
    for name, amax in GROUP_AMAX.items():
        assert_scale_for(scales[name], amax, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_weight(tmp_path, fmt):
    source = tmp_path / "zeros.safetensors"
    write_file(source, {"blocks.0.attn.q.weight": torch.zeros(32, 32, dtype=torch.bfloat16)})
    tensors, _ = load_both(convert(source, tmp_path, format=fmt, preset="none"))
    stored = tensors["blocks.0.attn.q" + SCALE_KEY[fmt]]
    scale = codec.decode_scale(int(stored)) if fmt == "ultra8" else float(stored)
    assert math.isfinite(scale) and scale > 0
    assert tensors["blocks.0.attn.q.weight"].dtype == torch.float8_e4m3fn
    assert not bool(tensors["blocks.0.attn.q.weight"].float().any())


# ---------------------------------------------------------------------------------------------- output names


@pytest.mark.parametrize(
    ("fmt", "shared", "keep_distillation", "expected"),
    [
        ("ultra8", True, False, "model_float8_e4m3fn_scaled_ultra_8bit_shared.safetensors"),
        ("ultra8", False, False, "model_float8_e4m3fn_scaled_ultra_8bit.safetensors"),
        ("ultra8", True, True, "model_float8_e4m3fn_scaled_ultra_nodistill_8bit_shared.safetensors"),
        ("ultra8", False, True, "model_float8_e4m3fn_scaled_ultra_nodistill_8bit.safetensors"),
        ("comfy", True, False, "model_float8_e4m3fn_scaled.safetensors"),
        ("comfy", False, True, "model_float8_e4m3fn_scaled_nodistill.safetensors"),
        ("legacy", True, False, "model_float8_e4m3fn_scaled_legacy.safetensors"),
    ],
)
def test_default_output_path(tmp_path, fmt, shared, keep_distillation, expected):
    source = tmp_path / "models" / "model.safetensors"
    options = ConvertOptions(format=fmt, shared_scales=shared, keep_distillation=keep_distillation)
    assert default_output_path(source, options) == source.with_name(expected)


def test_default_output_paths_never_collide(tmp_path):
    source = tmp_path / "model.safetensors"
    names = {
        default_output_path(source, ConvertOptions(format=fmt, fp8_format=fp8, shared_scales=shared))
        for fmt in FORMATS
        for fp8 in FP8
        for shared in (True, False)
        if fmt == "ultra8" or shared
    }
    assert len(names) == 2 * 2 + 2 * 2  # comfy and legacy per fp8 type, ultra8 per fp8 type and sharing
    assert source not in names
