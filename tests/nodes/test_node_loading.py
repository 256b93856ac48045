"""nodes/loading.py against a double of comfy.sd that records what it was given."""

from __future__ import annotations

import json

import pytest
import torch

Q = "blocks.0.attn.q"


@pytest.fixture
def source_file(tmp_path, pack, tiny_model):
    state = {k: v.contiguous() for k, v in tiny_model(blocks=1).diffusion_model.state_dict().items()}
    path = tmp_path / "tiny_bf16.safetensors"
    pack.io.write_file(path, state, metadata={"modelspec.title": "tiny"})
    return path


def _converted(pack, source_file, fmt):
    options = pack.options.convert_options(format=fmt, rounding="nearest")
    output = source_file.with_name(f"tiny_{fmt}.safetensors")
    pack.convert.convert_file(source_file, output, options)
    return output


def test_ultra8_file_becomes_a_comfy_state_dict(pack, comfy, source_file):
    path = _converted(pack, source_file, "ultra8")
    model = pack.loading.load_fp8_model(path)

    assert [name for name, _ in comfy.sd.calls] == ["load_diffusion_model_state_dict"]
    given = comfy.sd.calls[0][1]
    assert model.state_dict is given["sd"]
    state = given["sd"]
    with pack.io.SafetensorsReader(path) as reader:
        assert given["metadata"] == reader.metadata and "quant_core" in given["metadata"]
        ultra8 = {name: reader.read(name) for name in reader.tensors}
    layers = [k.removesuffix(".weight_scale_u8") for k in ultra8 if k.endswith(".weight_scale_u8")]
    assert sorted(layers) == ["blocks.0.attn.q", "blocks.0.mlp.fc"]
    assert not any(k.endswith((".weight_scale_u8", "ultra8_codec")) for k in state)
    for layer in layers:
        weight = state[layer + ".weight"]
        assert weight.dtype == torch.float8_e4m3fn
        assert torch.equal(weight.view(torch.uint8), ultra8[layer + ".weight"].view(torch.uint8))  # bit-identical
        scale = state[layer + ".weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == ()
        code = int(ultra8[layer + ".weight_scale_u8"])
        assert float(scale) == pack.codec.decode_scale(code)
        conf = json.loads(bytes(state[layer + ".comfy_quant"].tolist()))
        assert conf == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    kept = [k for k in ultra8 if not k.startswith(tuple(layers)) and not k.endswith("ultra8_codec")]
    kept += [layer + ".bias" for layer in layers]
    for name in kept:
        assert torch.equal(state[name], ultra8[name])
    expected = {k for k in ultra8 if not k.endswith((".weight_scale_u8", "ultra8_codec"))}
    assert set(state) == expected | {layer + ".weight_scale" for layer in layers}


def test_ultra8_scale_is_the_decoded_code(pack, comfy, source_file, tmp_path):
    """Whatever code the file holds becomes exactly the codec's float32 scale."""
    from safetensors.torch import load_file, save_file

    path = _converted(pack, source_file, "ultra8")
    tensors = load_file(path)
    tensors["blocks.0.attn.q.weight_scale_u8"] = torch.tensor(200, dtype=torch.uint8)
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, edited)
    pack.loading.load_fp8_model(edited)
    state = comfy.sd.calls[-1][1]["sd"]
    assert float(state[Q + ".weight_scale"]) == pack.codec.decode_scale(200)


@pytest.mark.parametrize("fmt", ["comfy", "legacy"])
def test_stock_layouts_go_to_load_diffusion_model(pack, comfy, source_file, fmt):
    path = _converted(pack, source_file, fmt)
    model = pack.loading.load_fp8_model(path)
    assert comfy.sd.calls[0] == ("load_diffusion_model", {"path": str(path)})
    assert model.kind == "ModelPatcher"
    assert any(k.endswith(".weight_scale" if fmt == "comfy" else ".scale_weight") for k in model.state_dict)


def test_a_plain_file_goes_to_load_diffusion_model(pack, comfy, source_file):
    pack.loading.load_fp8_model(source_file)
    assert comfy.sd.calls[0] == ("load_diffusion_model", {"path": str(source_file)})


def test_undetectable_ultra8_model_is_a_user_error(pack, comfy, source_file):
    path = _converted(pack, source_file, "ultra8")
    comfy.sd.detectable = False
    with pytest.raises(pack.host.UserError, match=f"could not detect the model type of {path.name}"):
        pack.loading.load_fp8_model(path)
