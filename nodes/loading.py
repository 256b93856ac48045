"""The loader node's work: any of the three layouts as a MODEL, decoding ultra8 scales on the way."""

from __future__ import annotations

from pathlib import Path

from ..quant_core import formats
from ..quant_core.decode import decoded_tensors
from ..quant_core.io import SafetensorsReader
from . import host
from .host import UserError


def load_fp8_model(path: Path):
    """A ModelPatcher for ``path``; ultra8 codes become float32 ``weight_scale`` in memory."""
    with SafetensorsReader(path) as reader:
        layout = formats.detect(list(reader.tensors), reader.metadata)
        if layout is None or layout.loads_in_stock_comfyui:
            return host.load_diffusion_model(path)
        state = dict(decoded_tensors(reader, "comfy"))
        metadata = dict(reader.metadata)
    model = host.load_diffusion_state(state, metadata)
    if model is None:
        raise UserError(f"ComfyUI could not detect the model type of {path.name}")
    return model
