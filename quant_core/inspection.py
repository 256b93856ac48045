"""``inspect`` and ``verify``: read a converted file back and check it against the loader contract.

The contract (see the README's "Formats"): a quantized weight is a 2-D fp8 tensor; its scale is
float32 with shape ``[]`` or ``[1]`` (uint8 ``[]`` code for ``ultra8``), positive and finite;
``comfy`` and ``ultra8`` layers carry a ``comfy_quant`` JSON whose ``format`` names the layout;
``legacy`` files carry the ``scaled_fp8`` marker with the weights' fp8 dtype. An optional input
scale (``input_scale``, ``scale_input`` in ``legacy``) is float32 ``[]`` or ``[1]``, positive and
finite, and ``full_precision_matrix_mult`` in a ``comfy_quant`` is a JSON boolean. Against the
original, every tensor that was not quantized must be bit-identical.

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
from .io import SafetensorsReader
from .policy import detect_family

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class LayerCheck:
    """One quantized layer: its scale and, with an original, its relative error."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale: float
    activation: formats.Activation = formats.PLAIN
    error: float | None = None

    def on_fp8_gpu(self) -> str:
        """What ComfyUI does with the layer on a GPU with fp8 compute."""
        if self.activation.full_precision:
            return "weight-only"
        if self.activation.input_scale is None:
            return "fp8 @1 (none)"
        return f"fp8 @{self.activation.input_scale:.4g}"


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
        if errors and self.layers:
            lines.append(f"{'layer':60} {'shape':>14} {'scale':>10} {'rel.err':>9} {'on an fp8 GPU':>14}")
            for layer in sorted(self.layers, key=lambda item: -(item.error or 0)):
                shape = "x".join(map(str, layer.shape))
                lines.append(
                    f"{layer.name[:60]:60} {shape:>14} {layer.scale:10.4g} {layer.error or 0:9.4%} "
                    f"{layer.on_fp8_gpu():>14}"
                )
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
    fmt = formats.detect_format(keys, reader.metadata)
    report = FileReport(
        str(reader.path),
        fmt,
        len(keys),
        sum(i.nbytes for i in reader.tensors.values()),
        Counter(i.dtype for i in reader.tensors.values()),
        metadata=reader.metadata,
        family=detect_family(keys).family,
    )
    layer_fmt = "comfy" if fmt == "comfy-header" else fmt
    quantized = formats.quantized_weights(layer_fmt, keys) if fmt != "none" else []
    sidecars = {k for w in quantized for k in formats.sidecar_keys(layer_fmt, w) if k in reader.tensors}
    for weight_key in quantized:
        layer = _check_layer(reader, layer_fmt, weight_key, report.violations)
        if layer and original is not None:
            layer.error = _layer_error(reader, original, layer, report.violations)
        if layer:
            report.layers.append(layer)
    if fmt == "legacy":
        _check_legacy_marker(reader, quantized, report.violations)
    if original is not None:
        _check_kept(reader, original, set(quantized) | sidecars, report.violations)
    return report


def _check_layer(reader: SafetensorsReader, fmt: str, weight_key: str, violations: list[str]) -> LayerCheck | None:
    info = reader.tensors[weight_key]
    base = weight_key.removesuffix(formats.WEIGHT_SUFFIX)
    if info.dtype not in _FP8 or len(info.shape) != 2:
        violations.append(f"{weight_key}: expected a 2-D fp8 weight, found {info.dtype} {list(info.shape)}")
        return None
    scale_key = base + formats.SCALE_SUFFIX[fmt]
    scale_info = reader.tensors[scale_key]
    want = torch.uint8 if fmt == "ultra8" else torch.float32
    if scale_info.dtype != want or scale_info.shape not in ((), (1,)):
        violations.append(
            f"{scale_key}: expected {want} of shape [] or [1], found {scale_info.dtype} "
            f"{list(scale_info.shape)} (ComfyUI needs one scale per tensor)"
        )
        return None
    scale = formats.decode_stored_scale(fmt, reader.read(scale_key))
    if not (scale > 0 and scale < float("inf")):
        violations.append(f"{scale_key}: scale {scale} is not positive and finite")
    if fmt in ("comfy", "ultra8"):
        _check_comfy_quant(reader, fmt, base, info.dtype, violations)
    _check_input_scale(reader, base + formats.INPUT_SCALE_SUFFIX[fmt], violations)
    return LayerCheck(weight_key, info.dtype, info.shape, scale, _activation(reader, fmt, weight_key))


def _activation(reader: SafetensorsReader, fmt: str, weight_key: str) -> formats.Activation:
    """The layer's settings as ComfyUI reads them; the header variant keeps its flags in the metadata
    (``_check`` inspects it with the ``comfy`` rules)."""
    activation = formats.read_activation(fmt, weight_key, reader.read, set(reader.tensors))
    base = weight_key.removesuffix(formats.WEIGHT_SUFFIX)
    if "_quantization_metadata" not in reader.metadata or f"{base}.comfy_quant" in reader.tensors:
        return activation
    try:
        conf = json.loads(reader.metadata["_quantization_metadata"])["layers"][base]
        full = conf.get(formats.FULL_PRECISION) is True
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        full = False  # ComfyUI's default
    return formats.Activation(activation.input_scale, full)


def _check_input_scale(reader: SafetensorsReader, key: str, violations: list[str]) -> None:
    """ComfyUI casts the input scale to a device tensor and divides by it: one positive float32."""
    if key not in reader.tensors:
        return
    info = reader.tensors[key]
    if info.dtype != torch.float32 or info.shape not in ((), (1,)):
        violations.append(f"{key}: expected float32 of shape [] or [1], found {info.dtype} {list(info.shape)}")
        return
    value = float(reader.read(key).reshape(-1)[0])
    if not (value > 0 and value < float("inf")):
        violations.append(f"{key}: input scale {value} is not positive and finite")


def _check_comfy_quant(reader, fmt: str, base: str, dtype: torch.dtype, violations: list[str]) -> None:
    key = base + ".comfy_quant"
    if key not in reader.tensors:
        violations.append(f"{key}: missing")
        return
    if reader.tensors[key].dtype != torch.uint8 or len(reader.tensors[key].shape) != 1:
        violations.append(f"{key}: must be a 1-D uint8 tensor of UTF-8 JSON")
        return
    try:
        conf = formats.read_json_tensor(reader.read(key))
    except (UnicodeDecodeError, json.JSONDecodeError):
        violations.append(f"{key}: not valid UTF-8 JSON")
        return
    expected = formats.ULTRA8_FORMAT if fmt == "ultra8" else str(dtype).removeprefix("torch.")
    if conf.get("format") != expected:
        violations.append(f"{key}: format {conf.get('format')!r}, expected {expected!r} for a {dtype} weight")
    if not isinstance(conf.get(formats.FULL_PRECISION, False), bool):
        violations.append(f"{key}: {formats.FULL_PRECISION} must be true or false")


def _check_legacy_marker(reader: SafetensorsReader, quantized: list[str], violations: list[str]) -> None:
    markers = [k for k in reader.tensors if k == formats.LEGACY_MARKER or k.endswith("." + formats.LEGACY_MARKER)]
    dtypes = {reader.tensors[w].dtype for w in quantized}
    for marker in markers:
        info = reader.tensors[marker]
        if info.dtype not in dtypes or info.numel > 2:
            violations.append(f"{marker}: must be an empty tensor of the weights' fp8 dtype {sorted(map(str, dtypes))}")
        prefix = marker.removesuffix(formats.LEGACY_MARKER)
        if any(not w.startswith(prefix) for w in quantized):
            violations.append(f"{marker}: some quantized weights lie outside its prefix {prefix!r}")


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
    markers = (formats.LEGACY_MARKER, formats.ULTRA8_MARKER)
    extra = [
        k for k in reader.tensors if k not in original.tensors and k not in converted_keys and not k.endswith(markers)
    ]
    violations += [f"{k}: unexpected tensor not in the original" for k in extra]


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.reshape(-1)
