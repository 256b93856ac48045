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


def test_patched_keys_are_the_original_plus_the_patches(pack, comfy, tiny_model):
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
    stored = patcher.model.diffusion_model.blocks[0].attn.q.weight
    assert not torch.equal(stored, expected[Q])  # the model itself was not modified
    assert patcher.backup == {}


# Every load state of ComfyUI's ModelPatcher: (modules lowvram-offloaded, force_patch_weights, partially unloaded).
LOAD_STATES = {
    "not_loaded": None,
    "full": ((), False, ()),
    "lowvram": (("diffusion_model.blocks.0.attn.q",), False, ()),
    "lowvram_forced": (("diffusion_model.blocks.0.attn.q", "diffusion_model.blocks.1.mlp.fc"), True, ()),
    "partially_unloaded": ((), False, ("diffusion_model.blocks.0.attn.q",)),
}


@pytest.mark.parametrize("state", LOAD_STATES)
def test_every_load_state_reads_the_same_patched_weights(pack, comfy, tiny_model, state):
    """Patched once, never twice, whether the patch is applied in place (with or without the
    ``comfy_patched_weights`` mark), at forward time (lowvram) or not at all yet."""
    patcher, expected = _patched(comfy, tiny_model, strength=0.5, keys=(Q, FC))
    if LOAD_STATES[state] is not None:
        offloaded, forced, unloaded = LOAD_STATES[state]
        patcher.load(offloaded=offloaded, force_patch_weights=forced)
        patcher.partially_unload(names=unloaded)
    in_place = set(patcher.backup)
    assert bool(in_place) == (state != "not_loaded"), "the state really patched some weights in place"
    q = patcher.model.diffusion_model.blocks[0].attn.q
    if state == "lowvram_forced":  # patched in place, yet not marked: what read the live weight twice patched
        assert "diffusion_model." + Q in in_place and not getattr(q, "comfy_patched_weights", False)
    if state in ("lowvram", "partially_unloaded"):  # the patch waits for the forward pass
        assert "diffusion_model." + Q not in in_place
        (forward_patch,) = q.weight_function
        assert torch.equal(forward_patch(q.weight.float()).to(q.weight.dtype), expected[Q])
    source = pack.model_source.ModelSource(patcher, torch.device("cpu"))
    for name, weight in expected.items():
        assert torch.equal(source.read(name), weight), name
    assert set(patcher.backup) == in_place, "the model is left in its state"


def test_weight_wrappers_apply_after_the_patches(pack, comfy, tiny_model):
    """A training adapter (``add_weight_wrapper``) changes the weight at every forward: it is baked in."""
    patcher, expected = _patched(comfy, tiny_model)
    patcher.add_weight_wrapper("diffusion_model." + Q, lambda weight: weight * 2.0)
    patcher.add_weight_wrapper("diffusion_model." + FC, lambda weight: weight + 1.0)
    patcher.load()
    source = pack.model_source.ModelSource(patcher, torch.device("cpu"))
    assert torch.equal(source.read(Q), (expected[Q].float() * 2.0).to(torch.bfloat16))
    original = patcher.model.diffusion_model.blocks[1].mlp.fc.weight
    assert torch.equal(source.read(FC), (original.float() + 1.0).to(torch.bfloat16))


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
