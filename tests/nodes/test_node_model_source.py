"""nodes/model_source.py: a ModelPatcher (double) read one patched weight at a time."""

from __future__ import annotations

import pytest
import torch

Q = "blocks.0.attn.q.weight"
FC = "blocks.1.mlp.fc.weight"


def _patched(comfy, tiny_model, strength=1.0, keys=(Q,)):
    """A ModelPatcher with a 'diff' patch on ``keys``; returns (patcher, {key: expected patched weight})."""
    patcher = comfy.ModelPatcher(tiny_model())
    generator = torch.Generator().manual_seed(5)
    expected = {}
    for key in keys:
        original = patcher.model.state_dict()["diffusion_model." + key]
        diff = torch.randn(original.shape, generator=generator) * 0.1
        assert patcher.add_patches({"diffusion_model." + key: (diff,)}, strength) == ["diffusion_model." + key]
        expected[key] = (original.float() + strength * diff).to(original.dtype)
    return patcher, expected


def test_tensors_are_listed_without_the_prefix(pack, comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=2))
    source = pack.model_source.ModelSource(patcher, torch.device("cpu"), {"prompt": "{}"})
    state = patcher.model.diffusion_model.state_dict()
    assert list(source.tensors) == list(state)  # model_sampling.* is not part of the diffusion model
    for name, info in source.tensors.items():
        assert info.name == name
        assert (info.dtype, info.shape) == (state[name].dtype, tuple(state[name].shape))
        assert info.nbytes == state[name].numel() * state[name].element_size()
    assert source.metadata == {"prompt": "{}"}


def test_a_model_without_diffusion_weights_is_refused(pack, comfy):
    empty = torch.nn.Module()
    empty.other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no diffusion_model weights"):
        pack.model_source.ModelSource(comfy.ModelPatcher(empty), torch.device("cpu"))


def test_patched_keys_come_through_patch_weight_to_device(pack, comfy, tiny_model):
    patcher, expected = _patched(comfy, tiny_model, strength=0.5, keys=(Q, FC))
    source = pack.model_source.ModelSource(patcher, torch.device("cpu"))
    for name in source.tensors:
        tensor = source.read(name)
        if name in expected:
            assert torch.equal(tensor, expected[name])  # weight + strength * diff, back in bf16
        else:
            assert torch.equal(tensor, patcher.model.diffusion_model.state_dict()[name])  # unpatched: as stored
        assert tensor.dtype == source.tensors[name].dtype and tuple(tensor.shape) == source.tensors[name].shape
        assert not tensor.requires_grad
    assert patcher.calls == ["diffusion_model." + Q, "diffusion_model." + FC]  # the others are read directly
    stored = patcher.model.diffusion_model.blocks[0].attn.q.weight
    assert not torch.equal(stored, expected[Q])  # the model itself was not modified


def test_modules_with_patched_weights_are_read_directly(pack, comfy, tiny_model):
    patcher, expected = _patched(comfy, tiny_model)
    patcher.load()  # ComfyUI's full load patches the weights in place and marks each module
    assert patcher.model.diffusion_model.blocks[0].attn.q.comfy_patched_weights is True
    patcher.calls.clear()
    source = pack.model_source.ModelSource(patcher, torch.device("cpu"))
    assert torch.equal(source.read(Q), expected[Q])  # patched once, not twice
    assert patcher.calls == []


def _quantize_layer(comfy, model, make_tensor):
    """Swap ``blocks.0.attn.q`` for ComfyUI's fp8 mixed-precision Linear (double); returns the original weight."""
    block = model.diffusion_model.blocks[0].attn
    original = block.q.weight.detach().clone()
    block.q = comfy.QuantizedLinear(make_tensor(original), block.q.bias.detach().clone())
    return original


SIDECARS = ("blocks.0.attn.q.weight_scale", "blocks.0.attn.q.comfy_quant")


def test_quantized_weights_report_their_original_dtype_and_are_dequantized(pack, comfy, tiny_model):
    model = tiny_model()
    original = _quantize_layer(comfy, model, comfy.QuantizedTensor.from_float)
    patcher = comfy.ModelPatcher(model)
    state = patcher.model_state_dict(filter_prefix="diffusion_model.")
    assert state["diffusion_model." + Q].dtype == torch.float8_e4m3fn  # the file layout, as in ComfyUI
    assert all("diffusion_model." + key in state for key in SIDECARS)

    source = pack.model_source.ModelSource(patcher, torch.device("cpu"))
    assert not any(key in source.tensors for key in SIDECARS)  # the scale and JSON describe the weight
    assert len(source.tensors) == len(state) - len(SIDECARS)
    info = source.tensors[Q]
    assert info.dtype == torch.bfloat16 and info.nbytes == original.numel() * 2
    tensor = source.read(Q)
    assert type(tensor) is torch.Tensor and tensor.dtype == torch.bfloat16
    assert torch.equal(tensor, model.diffusion_model.blocks[0].attn.q.weight.dequantize())
    assert float((tensor.float() - original.float()).norm() / original.float().norm()) < 0.05
    assert torch.equal(source.read("blocks.0.attn.q.bias"), model.diffusion_model.blocks[0].attn.q.bias)


def test_comfy_kitchen_quantized_tensor(pack, comfy, tiny_model):
    """The same with the real QuantizedTensor of comfy-kitchen (ComfyUI's kernel library), if installed."""
    kitchen = pytest.importorskip("comfy_kitchen.tensor")

    def make(weight):
        scale = weight.float().abs().max() / 448.0
        return kitchen.QuantizedTensor.from_float(weight, "TensorCoreFP8Layout", scale=scale)

    model = tiny_model()
    original = _quantize_layer(comfy, model, make)
    source = pack.model_source.ModelSource(comfy.ModelPatcher(model), torch.device("cpu"))
    assert not any(key in source.tensors for key in SIDECARS)
    assert source.tensors[Q].dtype == torch.bfloat16
    tensor = source.read(Q)
    assert type(tensor) is torch.Tensor and tensor.dtype == torch.bfloat16
    assert float((tensor.float() - original.float()).norm() / original.float().norm()) < 0.05
