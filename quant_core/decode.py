"""``decode``: rewrite an ``ultra8`` file (uint8 scale codes) as ``comfy`` or ``legacy`` for stock loaders.

The fp8 weights were rounded against the *decoded* scales, so decoding is exact: the weights are
copied bit for bit and each code becomes the float32 scale it stands for. Streams one layer at a
time and writes atomically, like ``convert``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import formats
from .io import SafetensorsReader, SafetensorsWriter, TensorInfo, atomic_output


def decode_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    target: str = "comfy",
    overwrite: bool = False,
) -> Path:
    """Decode ``input_path`` into ``target`` layout; returns the output path."""
    if target not in ("comfy", "legacy"):
        raise ValueError(f"decode writes comfy or legacy, not {target!r}")
    source = Path(input_path)
    output = Path(output_path) if output_path else source.with_name(f"{source.stem}_{target}.safetensors")
    with SafetensorsReader(source) as reader:
        keys = list(reader.tensors)
        if formats.detect_format(keys, reader.metadata) != "ultra8":
            raise ValueError(f"{source} is not an ultra8 file (no .weight_scale_u8 tensors)")
        weights = formats.quantized_weights("ultra8", keys)
        dropped = {k for w in weights for k in formats.sidecar_keys("ultra8", w)}
        markers = [k for k in keys if k.endswith(formats.ULTRA8_MARKER)]
        descriptor = formats.read_json_tensor(reader.read(markers[0])) if markers else {}
        prefix = markers[0].removesuffix(formats.ULTRA8_MARKER) if markers else ""
        dtype = reader.tensors[weights[0]].dtype if weights else torch.float8_e4m3fn
        new_markers = formats.marker_tensors(target, prefix, dtype, descriptor.get("shared_scales", False))

        entries: list[TensorInfo] = []
        for key, info in reader.tensors.items():
            if key in dropped or key in markers:
                continue
            if key in weights:
                entries += formats.layer_entries(target, key, info.shape, info.dtype)
            else:
                entries.append(TensorInfo(key, info.dtype, info.shape))
        entries += [TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in new_markers.items()]
        metadata = dict(reader.metadata)
        if "quant_core" in metadata:
            settings = json.loads(metadata["quant_core"])
            settings["decoded_to"] = target
            metadata["quant_core"] = json.dumps(settings)

        with atomic_output(output, overwrite=overwrite, protect=(source,)) as file:
            writer = SafetensorsWriter(file, entries, metadata)
            for key, tensor in new_markers.items():
                writer.write(key, tensor)
            for key in reader.tensors:
                if key in dropped or key in markers:
                    continue
                if key in weights:
                    base = key.removesuffix(formats.WEIGHT_SUFFIX)
                    scale = formats.decode_stored_scale("ultra8", reader.read(base + formats.SCALE_SUFFIX["ultra8"]))
                    layer = formats.layer_tensors(target, key, reader.read(key), scale)
                    for name, tensor in layer.items():
                        writer.write(name, tensor)
                else:
                    writer.write(key, reader.read(key))
            writer.finish()
    return output
