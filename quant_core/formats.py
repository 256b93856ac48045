"""Output layouts: the tensors each quantized layer becomes, and how to recognise a layout again.

``comfy``  (ComfyUI >= 0.4): ``L.weight`` fp8, ``L.weight_scale`` float32 0-dim, ``L.comfy_quant``
           uint8 UTF-8 JSON ``{"format": "float8_e4m3fn"}``.
``legacy`` (every ComfyUI since Oct 2024): ``L.weight`` fp8, ``L.scale_weight`` float32 0-dim, and
           one marker tensor ``<prefix>scaled_fp8`` whose dtype is the weights' fp8 dtype: 2 elements
           for a weight-only file, empty for one whose layers run fp8 compute.
``ultra8`` (this project's, from the seed script): ``L.weight`` fp8, ``L.weight_scale_u8`` uint8
           0-dim code of the log-uniform codec (``codec.py``), ``L.comfy_quant`` JSON
           ``{"format": "ultra8", ...}`` so stock ComfyUI refuses the file instead of loading
           unscaled weights, and a marker ``<prefix>ultra8_codec`` (uint8 JSON) with the codec's
           parameters. ``decode`` turns it into ``comfy`` or ``legacy``.

A layer also carries its activation settings for ComfyUI's fp8 matrix multiply (``Activation``): a
static ``input_scale`` (float32 0-dim ``L.input_scale``; ``L.scale_input`` in ``legacy``, which
ComfyUI renames on load) and ``"full_precision_matrix_mult": true`` in its ``comfy_quant`` for a
weight-only layer, which is what a conversion writes unless the layer has a calibrated input scale.
The ``legacy`` layout marks the whole file at once: ComfyUI's ``convert_old_quants`` gives every
layer ``full_precision_matrix_mult`` when the ``scaled_fp8`` marker has 2 elements and none when it
is empty, so ``legacy_full_precision`` refuses a file whose layers disagree. ``ultra8`` stores the
input scale as float32 too: it is a ComfyUI tensor, not a weight scale the codec was made for, and
``decode`` copies both settings into the target layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from . import codec
from .io import TensorInfo

FORMATS = ("comfy", "legacy", "ultra8")
LEGACY_MARKER = "scaled_fp8"
ULTRA8_MARKER = "ultra8_codec"
ULTRA8_FORMAT = "ultra8"
SCALE_SUFFIX = {"comfy": ".weight_scale", "legacy": ".scale_weight", "ultra8": ".weight_scale_u8"}
INPUT_SCALE_SUFFIX = {"comfy": ".input_scale", "legacy": ".scale_input", "ultra8": ".input_scale"}
WEIGHT_SUFFIX = ".weight"
FULL_PRECISION = "full_precision_matrix_mult"


@dataclass(frozen=True)
class Activation:
    """How ComfyUI's fp8 compute should treat a layer's input (see ``activation.py``).

    ``input_scale``: static fp8 scale of the input; ``None`` leaves ComfyUI's default of 1 (with
    the input clamped to the fp8 range). ``full_precision``: multiply in the compute dtype instead.
    """

    input_scale: float | None = None
    full_precision: bool = False


PLAIN = Activation()


def json_tensor(value: dict) -> torch.Tensor:
    """UTF-8 JSON as a uint8 tensor, encoded the way ComfyUI's own writer does."""
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def read_json_tensor(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode())


def layer_tensors(
    fmt: str, weight_key: str, quantized: torch.Tensor, scale: float, activation: Activation = PLAIN
) -> dict[str, torch.Tensor]:
    """Every tensor a quantized Linear weight becomes in ``fmt``, keyed by output name.

    ``scale`` must already be the stored scale (for ``ultra8`` a decoded codec value). In ``legacy``
    the full-precision flag is the file's marker (``marker_tensors``), not a per-layer tensor.
    Works with ``quantized`` on the meta device, which is how the output header is planned.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {FORMATS}")
    base = weight_key.removesuffix(WEIGHT_SUFFIX)
    dtype_name = str(quantized.dtype).removeprefix("torch.")
    tensors = {weight_key: quantized}
    if fmt == "ultra8":
        tensors[base + SCALE_SUFFIX[fmt]] = torch.tensor(codec.encode_scale(scale), dtype=torch.uint8)
        conf = {"format": ULTRA8_FORMAT, "weight_dtype": dtype_name}
    else:
        tensors[base + SCALE_SUFFIX[fmt]] = torch.tensor(scale, dtype=torch.float32)
        conf = {"format": dtype_name}
    if activation.input_scale is not None:
        tensors[base + INPUT_SCALE_SUFFIX[fmt]] = torch.tensor(activation.input_scale, dtype=torch.float32)
    if fmt != "legacy":
        if activation.full_precision:
            conf[FULL_PRECISION] = True
        tensors[base + ".comfy_quant"] = json_tensor(conf)
    return tensors


def layer_entries(
    fmt: str, weight_key: str, shape: tuple[int, ...], dtype: torch.dtype, activation: Activation = PLAIN
) -> list[TensorInfo]:
    """Names, dtypes and shapes of ``layer_tensors`` without any data: for planning the header.

    ``activation`` must be the one the layer will be written with: the ``comfy_quant`` length
    and the presence of an input scale depend on it.
    """
    meta = torch.empty(shape, dtype=dtype, device="meta")
    tensors = layer_tensors(fmt, weight_key, meta, 1.0, activation)
    return [TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


def legacy_full_precision(activations: dict[str, Activation]) -> bool:
    """Whether a ``legacy`` file's marker makes every layer weight-only (``full_precision_matrix_mult``).

    The marker switches the whole file, so its layers must agree; a mixed file needs ``comfy``.
    """
    weight_only = sorted(name for name, a in activations.items() if a.full_precision)
    fp8_compute = sorted(name for name, a in activations.items() if not a.full_precision)
    if weight_only and fp8_compute:
        raise ValueError(
            f"the legacy layout makes every layer either weight-only or fp8 compute, but {len(weight_only)} "
            f"layers would be weight-only (e.g. {weight_only[0]}) and {len(fp8_compute)} fp8 compute (e.g. "
            f"{fp8_compute[0]}): with input scales every quantized layer needs calibration statistics and no "
            "full precision layers; otherwise use format comfy"
        )
    return not fp8_compute


def marker_tensors(
    fmt: str, prefix: str, fp8_dtype: torch.dtype, shared_scales: bool, full_precision: bool = True
) -> dict[str, torch.Tensor]:
    """File-level marker tensors of a layout (none for ``comfy``). ``full_precision``: the ``legacy``
    marker makes every layer weight-only (2 elements) rather than fp8 compute (empty)."""
    if fmt == "legacy":
        return {prefix + LEGACY_MARKER: torch.zeros(2 if full_precision else 0, dtype=fp8_dtype)}
    if fmt == "ultra8":
        descriptor = {
            "format": ULTRA8_FORMAT,
            "version": 1,
            "weight_dtype": str(fp8_dtype).removeprefix("torch."),
            "scale_codec": "log_uniform_u8",
            "scale_min": codec.SCALE_MIN,
            "scale_max": codec.SCALE_MAX,
            "levels": codec.LEVELS,
            "shared_scales": shared_scales,
        }
        return {prefix + ULTRA8_MARKER: json_tensor(descriptor)}
    return {}


def stored_scale(fmt: str, scale: float) -> float:
    """The scale a layout can store for a wanted one: ultra8 rounds up to a codec level."""
    return codec.decode_scale(codec.encode_scale(scale)) if fmt == "ultra8" else scale


def detect_format(keys: list[str], metadata: dict[str, str]) -> str:
    """Which layout a file uses: comfy, legacy, ultra8, comfy-header, or none."""
    if any(k.endswith(SCALE_SUFFIX["ultra8"]) for k in keys):
        return "ultra8"
    if any(k.endswith(".comfy_quant") for k in keys):
        return "comfy"
    if any(k == LEGACY_MARKER or k.endswith("." + LEGACY_MARKER) for k in keys):
        return "legacy"
    if "_quantization_metadata" in metadata:
        return "comfy-header"
    return "none"


def sidecar_keys(fmt: str, weight_key: str) -> list[str]:
    """Names of the per-layer tensors that accompany a quantized weight in ``fmt``."""
    base = weight_key.removesuffix(WEIGHT_SUFFIX)
    names = [base + SCALE_SUFFIX[fmt], base + INPUT_SCALE_SUFFIX[fmt]]
    if fmt in ("comfy", "ultra8"):
        names.append(base + ".comfy_quant")
    return names


def read_activation(fmt: str, weight_key: str, read, keys: set[str]) -> Activation:
    """A stored layer's ``Activation``: ``read(name)`` returns a tensor of the file, ``keys`` its names.

    In ``legacy`` the flag is the file's marker (2 elements: weight-only), and an input scale of 1
    is none, as ComfyUI's ``convert_old_quants`` reads them.
    """
    base = weight_key.removesuffix(WEIGHT_SUFFIX)
    scale_key = base + INPUT_SCALE_SUFFIX[fmt]
    input_scale = float(read(scale_key).float().reshape(-1)[0]) if scale_key in keys else None
    if fmt == "legacy":
        markers = [k for k in keys if k == LEGACY_MARKER or k.endswith("." + LEGACY_MARKER)]
        owner = max((m for m in markers if weight_key.startswith(m.removesuffix(LEGACY_MARKER))), key=len, default=None)
        full = owner is not None and read(owner).numel() == 2
        return Activation(None if input_scale == 1.0 else input_scale, full)
    conf_key = base + ".comfy_quant"
    full = conf_key in keys and read_json_tensor(read(conf_key)).get(FULL_PRECISION) is True
    return Activation(input_scale, full)


def quantized_weights(fmt: str, keys: list[str]) -> list[str]:
    """The fp8 weight keys of a file in ``fmt`` (those that have a scale beside them)."""
    suffix = SCALE_SUFFIX[fmt]
    names = set(keys)
    return [
        k.removesuffix(suffix) + WEIGHT_SUFFIX
        for k in keys
        if k.endswith(suffix) and k.removesuffix(suffix) + WEIGHT_SUFFIX in names
    ]


def decode_stored_scale(fmt: str, tensor: torch.Tensor) -> float:
    """The float scale from a layer's stored scale tensor in any layout."""
    if fmt == "ultra8":
        return codec.decode_scale(int(tensor))
    return float(tensor.float().reshape(-1)[0])
