"""The MODEL node's source in every load state real ComfyUI reaches on a CPU.

``ModelPatcher.load`` with a memory budget offloads modules (lowvram: patches applied at forward
time), ``force_patch_weights`` patches offloaded modules in place without marking them, a full load
(``load_models_gpu``) patches and marks every module, ``partially_unload`` takes patches out again.
Whatever the state, the source must read the original weight plus its patches, once.
"""

from __future__ import annotations

import sys

import pytest
import torch

from .conftest import REPO

QKV = "double_blocks.0.img_attn.qkv.weight"
MLP = "single_blocks.1.linear2.weight"
PATCHED = (QKV, MLP)


def _model_source():
    """The pack's ``nodes/model_source.py`` as ComfyUI's loader imported it (the ``pack`` fixture)."""
    path = REPO / "nodes" / "model_source.py"
    (module,) = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(path)]
    return module


@pytest.fixture
def patched(comfy, pack, tiny_flux):
    """A freshly loaded tiny Flux with a diff patch on two weights; (patcher, expected bf16 weights)."""
    _, _, root = pack
    patcher = comfy.sd.load_diffusion_model(str(root / "diffusion_models" / "tiny_flux_bf16.safetensors"))
    generator = torch.Generator().manual_seed(3)
    expected = {}
    for name in PATCHED:
        key = "diffusion_model." + name
        original = patcher.model.state_dict()[key]
        diff = 0.01 * torch.randn(original.shape, generator=generator)
        assert patcher.add_patches({key: (diff,)}, 0.5) == [key]
        expected[name] = (original.float() + 0.5 * diff).to(original.dtype)
    yield patcher, expected
    comfy.model_management.unload_all_models()
    patcher.unpatch_model()


def _load(comfy, patcher, state: str) -> None:
    cpu = torch.device("cpu")
    half = patcher.model_size() // 2
    if state == "full":
        comfy.model_management.load_models_gpu([patcher])
    elif state == "lowvram":  # no room: every module offloaded
        patcher.load(cpu, lowvram_model_memory=1)
    elif state == "lowvram_half":  # the largest modules loaded (and patched in place), the rest offloaded
        patcher.load(cpu, lowvram_model_memory=half)
    elif state == "lowvram_forced":
        patcher.load(cpu, lowvram_model_memory=1, force_patch_weights=True)
    elif state == "partially_unloaded":
        patcher.load(cpu, full_load=True)
        patcher.partially_unload(cpu, memory_to_free=patcher.model_size())


def _pending(patcher) -> list[str]:
    """Modules whose patches wait for the forward pass (a ``LowVramPatch`` in ``weight_function``)."""
    return [n for n, m in patcher.model.named_modules() if getattr(m, "weight_function", None)]


def _offloaded(patcher) -> list[str]:
    """Modules left on the offload device, cast at each forward (lowvram)."""
    return [n for n, m in patcher.model.named_modules() if hasattr(m, "prev_comfy_cast_weights")]


@pytest.mark.parametrize(
    "state", ["not_loaded", "full", "lowvram", "lowvram_half", "lowvram_forced", "partially_unloaded"]
)
def test_patched_weights_in_every_load_state(comfy, patched, state):
    patcher, expected = patched
    _load(comfy, patcher, state)
    in_place = set(patcher.backup)
    if state == "full":
        assert {"diffusion_model." + n for n in PATCHED} <= in_place
    if state in ("lowvram", "partially_unloaded"):
        assert {n + ".weight" for n in _pending(patcher)} >= {"diffusion_model." + n for n in PATCHED}
    if state == "lowvram_half":
        assert _offloaded(patcher) and in_place, "a mixed state"
    if state == "lowvram_forced":  # in place without the comfy_patched_weights mark
        assert any(
            not getattr(patcher.model.get_submodule(k.rpartition(".")[0]), "comfy_patched_weights", False)
            for k in in_place
        )
    source = _model_source().ModelSource(patcher, torch.device("cpu"))
    for name, weight in expected.items():
        assert torch.equal(source.read(name), weight), name
    assert set(patcher.backup) == in_place, "reading leaves the load state alone"


def test_weight_wrapper_is_baked_in(comfy, patched):
    """``add_weight_wrapper`` (the training node's adapters) runs on the patched weight at every forward."""
    patcher, expected = patched
    patcher.add_weight_wrapper("diffusion_model." + QKV, lambda weight: weight * 2.0)
    _load(comfy, patcher, "full")
    source = _model_source().ModelSource(patcher, torch.device("cpu"))
    assert torch.equal(source.read(QKV), (expected[QKV].float() * 2.0).to(expected[QKV].dtype))


@pytest.mark.parametrize("state", ["not_loaded", "full", "lowvram"])
def test_fp8_model_with_a_patch_is_not_requantized(comfy, pack, state, tmp_path):
    """A MODEL loaded from an fp8 file (QuantizedTensor weights) with a patch: a full load requantizes
    the patched weight in place with a fresh scale and stochastic rounding; the source reads the
    dequantized original plus the patch instead, in every state."""
    from quant_core.convert import ConvertOptions, convert_file

    _, _, root = pack
    fp8_file = tmp_path / "fp8.safetensors"
    convert_file(root / "diffusion_models" / "tiny_flux_bf16.safetensors", fp8_file, ConvertOptions(method="nearest"))
    patcher = comfy.sd.load_diffusion_model(str(fp8_file))
    key = "diffusion_model." + QKV
    original = patcher.model.get_submodule(key.rpartition(".")[0]).weight
    assert hasattr(original, "dequantize"), "the fp8 file loads as QuantizedTensor weights"
    diff = 0.01 * torch.randn(original.shape, generator=torch.Generator().manual_seed(4))
    patcher.add_patches({key: (diff,)}, 1.0)
    expected = (original.dequantize().float() + diff).to(original._params.orig_dtype)
    try:
        _load(comfy, patcher, state)
        source = _model_source().ModelSource(patcher, torch.device("cpu"))
        assert torch.equal(source.read(QKV), expected)
    finally:
        comfy.model_management.unload_all_models()
        patcher.unpatch_model()
