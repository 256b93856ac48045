"""``inspect`` and ``verify``: read a converted file back and check it against the loader contract.

The contract is in ``docs/formats.md``, and each layout checks its own part
(``formats.Layout.check_layer``): a quantized weight is a 2-D fp8 tensor, its scale positive and
finite, its optional input scale one positive float32. Against the original, every tensor that
was not quantized must be bit-identical, and nothing else may be added.

Both also say what each layer does on a GPU with fp8 compute (``formats.Activation``): weight-only,
or an fp8 matrix multiply with its input scale. A layer that multiplies in fp8 without an input scale
is legal but clips its inputs at the fp8 range: a warning, not a violation.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import formats, fp8
from .formats import LayerCheck
from .io import SafetensorsReader
from .policy import detect_family


@dataclass
class FileReport:
    """What a file holds, and every contract violation found in it."""

    path: str
    format: str
    tensors: int
    bytes: int
    dtypes: Counter
    layers: list[LayerCheck] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    family: str = ""  # the detected model family, see policy.detect_family

    def unscaled_fp8_layers(self) -> list[str]:
        """Layers ComfyUI multiplies in fp8 with its input scale of 1 on a GPU with fp8 compute."""
        return [layer.name for layer in self.layers if layer.on_fp8_gpu() == "fp8 @1 (none)"]

    def warnings(self) -> list[str]:
        unscaled = self.unscaled_fp8_layers()
        if not unscaled:
            return []
        return [
            f"{len(unscaled)} layers would multiply in fp8 with no input scale on a GPU with fp8 compute (inputs "
            f"clipped at the fp8 range), e.g. {', '.join(unscaled[:3])}: reconvert without uncalibrated fp8 "
            "compute, or with calibrated input scales"
        ]

    def fp8_compute_line(self) -> str:
        """One line: how many layers run fp8 compute on such a GPU, with and without an input scale."""
        weight_only = sum(layer.activation.full_precision for layer in self.layers)
        unscaled = len(self.unscaled_fp8_layers())
        scaled = len(self.layers) - weight_only - unscaled
        when = " once decoded" if self.format == "ultra8" else ""
        return (
            f"fp8 GPU   {weight_only} weight-only, {scaled} fp8 compute with an input scale, {unscaled} fp8 compute "
            f"without one (on GPUs with fp8 compute{when}; elsewhere all are weight-only)"
        )

    def text(self, errors: bool = False) -> str:
        scales = [layer.scale for layer in self.layers]
        lines = [
            f"file      {self.path}",
            f"format    {self.format}",
            f"family    {self.family}",
            f"tensors   {self.tensors} ({len(self.layers)} quantized layers), {self.bytes / 2**20:.1f} MiB of data",
            "dtypes    " + ", ".join(f"{str(d).removeprefix('torch.')} x{n}" for d, n in self.dtypes.most_common()),
        ]
        if scales:
            lines.append(
                f"scales    min {min(scales):.4g}, median {statistics.median(scales):.4g}, max {max(scales):.4g}"
            )
        if self.layers:
            lines.append(self.fp8_compute_line())
        if "quant_core" in self.metadata:
            settings = json.loads(self.metadata["quant_core"])
            lines.append(f"converter quant_core {settings.get('version')} preset {settings.get('preset')}")
        if errors and self.layers:  # the per-layer list; its error column only where verify measured one
            measured = any(layer.error is not None for layer in self.layers)
            error_head = f" {'rel.err':>9}" if measured else ""
            lines.append(f"{'layer':60} {'shape':>14} {'scale':>10}{error_head} {'on an fp8 GPU':>14}")
            for layer in sorted(self.layers, key=lambda item: -(item.error or 0)):
                shape = "x".join(map(str, layer.shape))
                error = f" {layer.error or 0:9.4%}" if measured else ""
                lines.append(f"{layer.name[:60]:60} {shape:>14} {layer.scale:10.4g}{error} {layer.on_fp8_gpu():>14}")
        lines += [f"WARNING {w}" for w in self.warnings()]
        lines += [f"VIOLATION {v}" for v in self.violations]
        return "\n".join(lines)


def inspect_file(path: str) -> FileReport:
    """Describe a file and check each quantized layer against the layout's contract."""
    with SafetensorsReader(path) as reader:
        return _check(reader, original=None)


def verify_files(original: str, converted: str) -> FileReport:
    """``inspect`` plus a per-layer error against ``original`` and bit-identity of kept tensors."""
    with SafetensorsReader(original) as source, SafetensorsReader(converted) as reader:
        return _check(reader, original=source)


def _check(reader: SafetensorsReader, original: SafetensorsReader | None) -> FileReport:
    keys = list(reader.tensors)
    layout = formats.detect(keys, reader.metadata)
    report = FileReport(
        str(reader.path),
        layout.name if layout else "none",
        len(keys),
        sum(i.nbytes for i in reader.tensors.values()),
        Counter(i.dtype for i in reader.tensors.values()),
        metadata=reader.metadata,
        family=detect_family(keys).family,
    )
    quantized = layout.quantized_weights(keys) if layout else []
    sidecars = {k for w in quantized for k in layout.sidecar_keys(w) if k in reader.tensors} if layout else set()
    for weight_key in quantized:
        layer = layout.check_layer(reader, weight_key, report.violations)
        if layer:
            layer.activation = _activation(reader, layout, weight_key)
        if layer and original is not None:
            layer.error = _layer_error(reader, original, layer, report.violations)
        if layer:
            report.layers.append(layer)
    if layout:
        layout.check_file(reader, quantized, report.violations)
    if original is not None:
        _check_kept(reader, original, set(quantized) | sidecars, report.violations)
    return report


def _activation(reader: SafetensorsReader, layout: formats.Layout, weight_key: str) -> formats.Activation:
    """The layer's settings as ComfyUI reads them; the header variant keeps its flags in the metadata
    (``_check`` inspects it with the ``comfy`` rules)."""
    activation = layout.read_activation(weight_key, reader.read, set(reader.tensors))
    base = weight_key.removesuffix(formats.WEIGHT_SUFFIX)
    if "_quantization_metadata" not in reader.metadata or f"{base}{formats.COMFY_QUANT}" in reader.tensors:
        return activation
    try:
        conf = json.loads(reader.metadata["_quantization_metadata"])["layers"][base]
        full = conf.get(formats.FULL_PRECISION) is True
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        full = False  # ComfyUI's default
    return formats.Activation(activation.input_scale, full)


def _layer_error(reader, original, layer: LayerCheck, violations: list[str]) -> float | None:
    if layer.name not in original.tensors:
        violations.append(f"{layer.name}: not in the original file")
        return None
    if original.tensors[layer.name].shape != layer.shape:
        violations.append(
            f"{layer.name}: shape {list(layer.shape)} differs from the original's "
            f"{list(original.tensors[layer.name].shape)}"
        )
        return None
    approx = fp8.dequantize(reader.read(layer.name), layer.scale)
    bad = int((~torch.isfinite(approx)).sum())
    if bad:
        violations.append(f"{layer.name}: {bad} NaN/Inf values")
        return None
    reference = original.read(layer.name).float()
    norm = _norm(reference)
    return _norm(approx - reference) / norm if norm else _norm(approx - reference)


def _norm(tensor: torch.Tensor) -> float:
    """Summed in float64: the squares of weights near 1e20 and above overflow float32."""
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


def _check_kept(reader, original, converted_keys: set[str], violations: list[str]) -> None:
    """Every original tensor is either quantized or present bit-identically; nothing else is added."""
    for name, info in original.tensors.items():
        if name in converted_keys:
            continue
        if name not in reader.tensors:
            violations.append(f"{name}: missing from the converted file")
            continue
        other = reader.tensors[name]
        if other.dtype != info.dtype or other.shape != info.shape:
            violations.append(
                f"{name}: changed from {info.dtype} {list(info.shape)} to {other.dtype} {list(other.shape)}"
            )
        elif not torch.equal(_raw(original.read(name)), _raw(reader.read(name))):
            violations.append(f"{name}: kept tensor is not bit-identical to the original")
    extra = [
        k for k in reader.tensors if k not in original.tensors and k not in converted_keys and not formats.is_marker(k)
    ]
    violations += [f"{k}: unexpected tensor not in the original" for k in extra]


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.reshape(-1)
