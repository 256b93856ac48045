"""A loaded ComfyUI MODEL as a ``TensorSource``: one patched weight at a time.

LoRAs and other patches applied in the graph are baked in by ComfyUI's own patch arithmetic
(``comfy.lora.calculate_weight``), key by key, so the patched model never exists in memory at
once. Keys are those of a diffusion-models file (the ``diffusion_model.`` prefix is dropped), so
the output loads with "Load Diffusion Model".

ComfyUI may hold the model in any load state (``comfy/model_patcher.py``): not loaded; fully loaded,
each module's weights patched in place (stochastically rounded to the weight's dtype, an fp8
``QuantizedTensor`` requantized with a fresh scale) with the original in ``ModelPatcher.backup``;
partly offloaded (lowvram), where offloaded modules keep the original weight and apply the patches
at every forward (``LowVramPatch`` in ``weight_function``); lowvram with ``force_patch_weights``
or dynamic VRAM (``ModelPatcherDynamic``), which patch some modules in place without marking them.
Reading the live attribute, or asking ``patch_weight_to_device`` (which starts from it), would give
a different or doubly patched weight depending on that state. So every read starts from the
original weight as ``ModelPatcher.get_key_patches`` defines it (the backup of an in-place patch,
else the attribute), dequantizes it, applies ``ModelPatcher.patches`` in float32 on the compute
device and then the weight wrappers (``weight_wrapper_patches``, which ComfyUI applies at forward
time in every state). The result is the same in every load state, never rounded twice, and the
model is not modified. No ``load_models_gpu`` is needed (loading would spend VRAM on the whole
model that the conversion's working set needs, for the same result).
"""

from __future__ import annotations

import torch

from ..quant_core.io import TensorInfo
from . import host

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
            value = self._original(key)
            if value is None:
                continue
            dtype = _stored_dtype(value)
            name = key.removeprefix(MODEL_PREFIX)
            nbytes = value.numel() * torch.empty((), dtype=dtype).element_size()
            self.tensors[name] = TensorInfo(name, dtype, tuple(value.shape), nbytes=nbytes)
        if not self.tensors:
            raise ValueError("the MODEL has no diffusion_model weights to convert")

    def _original(self, key: str) -> torch.Tensor | None:
        """The unpatched weight, wherever the load state put it (``ModelPatcher.get_key_patches``'s rule)."""
        module_path, _, attribute = key.rpartition(".")
        try:
            value = getattr(self.model.model.get_submodule(module_path), attribute, None)
        except AttributeError:
            return None
        if key in self.model.backup:
            value = self.model.backup[key].weight
        if key in self.model.hook_backup:
            value = self.model.hook_backup[key][0]
        return value if isinstance(value, torch.Tensor) else None

    def read(self, name: str) -> torch.Tensor:
        key = MODEL_PREFIX + name
        info = self.tensors[name]
        weight = _plain(self._original(key)).detach()
        patches = self.model.patches.get(key)
        wrappers = self.model.weight_wrapper_patches.get(key, [])
        if patches or wrappers:
            weight = weight.to(self.device, torch.float32, copy=True)
            if patches:
                weight = host.calculate_weight(patches, weight, key)
            for wrapper in wrappers:
                weight = wrapper(weight)
        if tuple(weight.shape) != info.shape:
            raise ValueError(f"{name}: a patch changes its shape {list(info.shape)} to {list(weight.shape)}")
        return weight.detach().to(info.dtype)
