"""``decode``: rewrite an ``ultra8`` file (uint8 scale codes) as ``comfy`` or ``legacy`` for stock loaders.

The fp8 weights were rounded against the *decoded* scales, so decoding is exact: the weights are
copied bit for bit, each code becomes the float32 scale it stands for, and a layer's input scale
and ``full_precision_matrix_mult`` flag are carried over (into ``legacy``'s file-wide marker when the
layers agree; a file whose layers differ can only become ``comfy``). ``decoded_tensors``
yields the new layout one tensor at a time; ``decode_file`` streams it to disk atomically, and
the ComfyUI loader node builds a state dict from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import formats
from .io import SafetensorsReader, TensorInfo, write_stream

TARGETS = ("comfy", "legacy")


@dataclass
class _Layout:
    """What an ultra8 file holds: its quantized weights, the keys to drop, the new markers."""

    weights: set[str]
    dropped: set[str]
    markers: dict[str, torch.Tensor]


def _layout(reader: SafetensorsReader, target: str) -> _Layout:
    if target not in TARGETS:
        raise ValueError(f"decode writes {' or '.join(TARGETS)}, not {target!r}")
    keys = list(reader.tensors)
    if formats.detect_format(keys, reader.metadata) != "ultra8":
        raise ValueError(f"{reader.path} is not an ultra8 file (no .weight_scale_u8 tensors)")
    weights = formats.quantized_weights("ultra8", keys)
    old_markers = [k for k in keys if k.endswith(formats.ULTRA8_MARKER)]
    dropped = {k for w in weights for k in formats.sidecar_keys("ultra8", w)} | set(old_markers)
    descriptor = formats.read_json_tensor(reader.read(old_markers[0])) if old_markers else {}
    prefix = old_markers[0].removesuffix(formats.ULTRA8_MARKER) if old_markers else ""
    dtype = reader.tensors[weights[0]].dtype if weights else torch.float8_e4m3fn
    full = True
    if target == "legacy":
        full = formats.legacy_full_precision({w: _activation(reader, w) for w in weights})
    markers = formats.marker_tensors(target, prefix, dtype, descriptor.get("shared_scales", False), full)
    return _Layout(set(weights), dropped, markers)


def _activation(reader: SafetensorsReader, weight_key: str) -> formats.Activation:
    """The layer's input scale and full-precision flag, which decoding carries over unchanged."""
    return formats.read_activation("ultra8", weight_key, reader.read, set(reader.tensors))


def decoded_entries(reader: SafetensorsReader, target: str = "comfy") -> list[TensorInfo]:
    """The decoded file's tensor names, dtypes and shapes (its header), without reading data."""
    layout = _layout(reader, target)
    entries = [TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in layout.markers.items()]
    for key, info in reader.tensors.items():
        if key in layout.weights:
            entries += formats.layer_entries(target, key, info.shape, info.dtype, _activation(reader, key))
        elif key not in layout.dropped:
            entries.append(TensorInfo(key, info.dtype, info.shape))
    return entries


def decoded_tensors(reader: SafetensorsReader, target: str = "comfy") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the decoded layout, one at a time, in the order of ``decoded_entries``."""
    layout = _layout(reader, target)
    yield from layout.markers.items()
    for key in reader.tensors:
        if key in layout.weights:
            base = key.removesuffix(formats.WEIGHT_SUFFIX)
            scale = formats.decode_stored_scale("ultra8", reader.read(base + formats.SCALE_SUFFIX["ultra8"]))
            yield from formats.layer_tensors(target, key, reader.read(key), scale, _activation(reader, key)).items()
        elif key not in layout.dropped:
            yield key, reader.read(key)


def decode_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    target: str = "comfy",
    overwrite: bool = False,
) -> Path:
    """Decode ``input_path`` into the ``target`` layout; returns the output path."""
    source = Path(input_path)
    output = Path(output_path) if output_path else source.with_name(f"{source.stem}_{target}.safetensors")
    with SafetensorsReader(source) as reader:
        entries = decoded_entries(reader, target)
        metadata = dict(reader.metadata)
        if "quant_core" in metadata:
            settings = json.loads(metadata["quant_core"])
            settings["decoded_to"] = target
            metadata["quant_core"] = json.dumps(settings)
        write_stream(output, entries, decoded_tensors(reader, target), metadata, overwrite, protect=(source,))
    return output
