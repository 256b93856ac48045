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

ULTRA8 = formats.Ultra8Layout()


def targets() -> list[str]:
    """The layouts a file can be decoded into: those stock ComfyUI loads."""
    return [name for name, layout in formats.WRITABLE.items() if layout.loads_in_stock_comfyui]


@dataclass
class _Decoding:
    """What an ultra8 file holds and becomes: its quantized weights, the keys to drop, the target
    layout and its markers."""

    weights: set[str]
    dropped: set[str]
    target: formats.Layout
    markers: dict[str, torch.Tensor]


def _decoding(reader: SafetensorsReader, target: str) -> _Decoding:
    layout = formats.layout(target)
    if not layout.loads_in_stock_comfyui:
        raise ValueError(f"decode writes {' or '.join(targets())}, not {target!r}")
    keys = list(reader.tensors)
    if not isinstance(formats.detect(keys, reader.metadata), formats.Ultra8Layout):
        raise ValueError(f"{reader.path} is not an ultra8 file (no {ULTRA8.scale_suffix} tensors)")
    weights = ULTRA8.quantized_weights(keys)
    old_markers = [k for k in keys if ULTRA8.is_marker(k)]
    dropped = {k for w in weights for k in ULTRA8.sidecar_keys(w)} | set(old_markers)
    descriptor = formats.read_json_tensor(reader.read(old_markers[0])) if old_markers else {}
    prefix = old_markers[0].removesuffix(ULTRA8.marker) if old_markers else ""
    dtype = reader.tensors[weights[0]].dtype if weights else torch.float8_e4m3fn
    full = layout.marker_full_precision({w: _stored_activation(reader, w) for w in weights})
    markers = layout.markers(prefix, dtype, descriptor.get("shared_scales", False), full)
    return _Decoding(set(weights), dropped, layout, markers)


def _stored_activation(reader: SafetensorsReader, weight_key: str) -> formats.Activation:
    """The layer's input scale and full-precision flag, which decoding carries over unchanged."""
    return ULTRA8.read_activation(weight_key, reader.read, set(reader.tensors))


def decoded_entries(reader: SafetensorsReader, target: str = "comfy") -> list[TensorInfo]:
    """The decoded file's tensor names, dtypes and shapes (its header), without reading data."""
    decoding = _decoding(reader, target)
    entries = [TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in decoding.markers.items()]
    for key, info in reader.tensors.items():
        if key in decoding.weights:
            entries += decoding.target.layer_entries(key, info.shape, info.dtype, _stored_activation(reader, key))
        elif key not in decoding.dropped:
            entries.append(TensorInfo(key, info.dtype, info.shape))
    return entries


def decoded_tensors(reader: SafetensorsReader, target: str = "comfy") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the decoded layout, one at a time, in the order of ``decoded_entries``."""
    decoding = _decoding(reader, target)
    yield from decoding.markers.items()
    for key in reader.tensors:
        if key in decoding.weights:
            scale = ULTRA8.layer_scale(reader.read, key)
            activation = _stored_activation(reader, key)
            yield from decoding.target.layer_tensors(key, reader.read(key), scale, activation).items()
        elif key not in decoding.dropped:
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
