"""A loaded ComfyUI MODEL as a ``TensorSource``: one patched weight at a time.

LoRAs and other patches applied in the graph are baked in by ComfyUI's own patching
(``ModelPatcher.patch_weight_to_device``), key by key, so the patched model never exists in
memory at once — the pattern of ComfyUI's ``nodes_lora_extract.py``. Keys are those of a
diffusion-models file (the ``diffusion_model.`` prefix is dropped), so the output loads with
"Load Diffusion Model".
"""

from __future__ import annotations

import torch

from ..quant_core.io import TensorInfo

MODEL_PREFIX = "diffusion_model."


def _is_quantized(tensor: torch.Tensor) -> bool:
    """ComfyUI's (comfy-kitchen's) QuantizedTensor: fp8 data plus ``_params`` with the scale."""
    return getattr(tensor, "_params", None) is not None and hasattr(tensor, "dequantize")


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A model weight as a plain tensor: already-quantized weights are dequantized."""
    return tensor.dequantize() if _is_quantized(tensor) else tensor


def _stored_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the weight stands for (a QuantizedTensor's original dtype, not fp8)."""
    return tensor._params.orig_dtype if _is_quantized(tensor) else tensor.dtype


class ModelSource:
    """Reads the weights of a ModelPatcher's diffusion model, with its patches applied."""

    def __init__(self, model, device: torch.device, metadata: dict[str, str] | None = None):
        self.model = model
        self.device = device
        self.metadata = dict(metadata or {})
        self.tensors: dict[str, TensorInfo] = {}
        for key in model.model_state_dict(filter_prefix=MODEL_PREFIX):
            # Keys that are no module attribute (weight_scale, comfy_quant… of an fp8 layer) describe a
            # quantized weight, which is read dequantized instead.
            value = self._attribute(key)
            if value is None:
                continue
            dtype = _stored_dtype(value)
            name = key.removeprefix(MODEL_PREFIX)
            nbytes = value.numel() * torch.empty((), dtype=dtype).element_size()
            self.tensors[name] = TensorInfo(name, dtype, tuple(value.shape), nbytes=nbytes)
        if not self.tensors:
            raise ValueError("the MODEL has no diffusion_model weights to convert")

    def _attribute(self, key: str) -> torch.Tensor | None:
        module_path, _, attribute = key.rpartition(".")
        try:
            value = getattr(self.model.model.get_submodule(module_path), attribute, None)
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None

    def read(self, name: str) -> torch.Tensor:
        key = MODEL_PREFIX + name
        module = self.model.model.get_submodule(key.rpartition(".")[0])
        if key in self.model.patches and not getattr(module, "comfy_patched_weights", False):
            weight = self.model.patch_weight_to_device(key, self.device, return_weight=True)
        else:
            weight = self._attribute(key)
        return _plain(weight).detach().to(self.tensors[name].dtype)
