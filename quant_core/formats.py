"""Output layouts, one class each: the tensors a quantized layer becomes, and how to read them back.

Like comfy-kitchen's layout classes, each ``Layout`` knows everything about its own file layout:
``layer_tensors`` (what a quantized Linear weight is written as), ``markers`` (file-level tensors),
``recognises`` (which files use it), ``quantized_weights`` / ``read_scale`` / ``read_activation``
(reading a layer back), ``check_layer`` / ``check_file`` (the loader contract, for ``verify``)
and ``loads_in_stock_comfyui`` (whether a file must be decoded first). The byte-level spec of
each layout is in ``docs/formats.md``. Code elsewhere asks the layout object, never compares a
format name: the registry (``layout``, ``detect``) is the only place that maps names to classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import codec
from .io import SafetensorsReader, TensorInfo

WEIGHT_SUFFIX = ".weight"
COMFY_QUANT = ".comfy_quant"
FULL_PRECISION = "full_precision_matrix_mult"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class LayerCheck:
    """One quantized layer read back: its scale and, against an original, its relative error."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale: float
    activation: Activation = PLAIN
    error: float | None = None

    def on_fp8_gpu(self) -> str:
        """What ComfyUI does with the layer on a GPU with fp8 compute."""
        if self.activation.full_precision:
            return "weight-only"
        if self.activation.input_scale is None:
            return "fp8 @1 (none)"
        return f"fp8 @{self.activation.input_scale:.4g}"


class Layout:
    """The ``comfy`` layout (ComfyUI >= 0.4), which the others vary: ``L.weight`` fp8,
    ``L.weight_scale`` float32 0-dim, ``L.comfy_quant`` uint8 JSON ``{"format": <fp8 dtype>}``."""

    name: ClassVar[str] = "comfy"
    scale_suffix: ClassVar[str] = ".weight_scale"
    input_scale_suffix: ClassVar[str] = ".input_scale"
    scale_dtype: ClassVar[torch.dtype] = torch.float32
    marker: ClassVar[str] = ""  # the name of its file-level marker tensor, if it has one
    loads_in_stock_comfyui: ClassVar[bool] = True

    # writing

    def stored_scale(self, scale: float) -> float:
        """The scale this layout can store for a wanted one (the weights are rounded against it)."""
        return scale

    def layer_tensors(
        self, weight_key: str, quantized: torch.Tensor, scale: float, activation: Activation = PLAIN
    ) -> dict[str, torch.Tensor]:
        """Every tensor a quantized Linear weight becomes, keyed by output name.

        ``scale`` must already be a stored scale (``stored_scale``). Works with ``quantized`` on the
        meta device, which is how the output header is planned.
        """
        base = weight_key.removesuffix(WEIGHT_SUFFIX)
        tensors = {weight_key: quantized, base + self.scale_suffix: self._scale_tensor(scale)}
        if activation.input_scale is not None:
            tensors[base + self.input_scale_suffix] = torch.tensor(activation.input_scale, dtype=torch.float32)
        conf = self._comfy_quant(weight_key, quantized.dtype, activation)
        if conf is not None:
            tensors[base + COMFY_QUANT] = json_tensor(conf)
        return tensors

    def _scale_tensor(self, scale: float) -> torch.Tensor:
        return torch.tensor(scale, dtype=torch.float32)

    def _comfy_quant(self, weight_key: str, dtype: torch.dtype, activation: Activation) -> dict | None:
        conf: dict = {"format": dtype_name(dtype)}
        if activation.full_precision:
            conf[FULL_PRECISION] = True
        return conf

    def layer_entries(
        self, weight_key: str, shape: tuple[int, ...], dtype: torch.dtype, activation: Activation = PLAIN
    ) -> list[TensorInfo]:
        """Names, dtypes and shapes of ``layer_tensors`` without any data: for planning the header.

        ``activation`` must be the one the layer will be written with: the ``comfy_quant`` length
        and the presence of an input scale depend on it.
        """
        meta = torch.empty(shape, dtype=dtype, device="meta")
        return [
            TensorInfo(k, t.dtype, tuple(t.shape))
            for k, t in self.layer_tensors(weight_key, meta, 1.0, activation).items()
        ]

    def markers(
        self, prefix: str, fp8_dtype: torch.dtype, shared_scales: bool, full_precision: bool = True
    ) -> dict[str, torch.Tensor]:
        """File-level marker tensors, written once per model prefix. ``full_precision``: see
        ``marker_full_precision``."""
        return {}

    def marker_full_precision(self, activations: dict[str, Activation]) -> bool:
        """What a file-level marker says about the layers under it; only ``legacy`` has such a flag."""
        return True

    def output_name(self, stem: str, fp8_format: str, distill: str, shared_scales: bool) -> str:
        """The default output file name (without extension) for an input named ``stem``."""
        return f"{stem}_{fp8_format}_scaled{distill}"

    # reading

    @classmethod
    def recognises(cls, keys: list[str], metadata: dict[str, str]) -> bool:
        return any(k.endswith(COMFY_QUANT) for k in keys)

    def quantized_weights(self, keys: list[str]) -> list[str]:
        """The fp8 weight keys of a file in this layout (those that have a scale beside them)."""
        names = set(keys)
        bases = (k.removesuffix(self.scale_suffix) for k in keys if k.endswith(self.scale_suffix))
        return [base + WEIGHT_SUFFIX for base in bases if base + WEIGHT_SUFFIX in names]

    def sidecar_keys(self, weight_key: str) -> list[str]:
        """Names of the per-layer tensors that may accompany a quantized weight."""
        base = weight_key.removesuffix(WEIGHT_SUFFIX)
        return [base + self.scale_suffix, base + self.input_scale_suffix, base + COMFY_QUANT]

    def is_marker(self, key: str) -> bool:
        return bool(self.marker) and (key == self.marker or key.endswith("." + self.marker))

    def read_scale(self, tensor: torch.Tensor) -> float:
        """The float scale from a layer's stored scale tensor."""
        return float(tensor.float().reshape(-1)[0])

    def layer_scale(self, read: Callable[[str], torch.Tensor], weight_key: str) -> float:
        return self.read_scale(read(weight_key.removesuffix(WEIGHT_SUFFIX) + self.scale_suffix))

    def read_activation(self, weight_key: str, read: Callable[[str], torch.Tensor], keys: set[str]) -> Activation:
        """A stored layer's ``Activation``: ``read(name)`` returns a tensor of the file, ``keys`` its names."""
        base = weight_key.removesuffix(WEIGHT_SUFFIX)
        scale_key = base + self.input_scale_suffix
        input_scale = float(read(scale_key).float().reshape(-1)[0]) if scale_key in keys else None
        conf_key = base + COMFY_QUANT
        full = conf_key in keys and read_json_tensor(read(conf_key)).get(FULL_PRECISION) is True
        return Activation(input_scale, full)

    # verifying

    def check_layer(self, reader: SafetensorsReader, weight_key: str, violations: list[str]) -> LayerCheck | None:
        """Check one quantized layer against the loader contract; its scale, or None if unreadable."""
        info = reader.tensors[weight_key]
        base = weight_key.removesuffix(WEIGHT_SUFFIX)
        if info.dtype not in _FP8 or len(info.shape) != 2:
            violations.append(f"{weight_key}: expected a 2-D fp8 weight, found {info.dtype} {list(info.shape)}")
            return None
        scale_key = base + self.scale_suffix
        scale_info = reader.tensors[scale_key]
        if scale_info.dtype != self.scale_dtype or scale_info.shape not in ((), (1,)):
            violations.append(
                f"{scale_key}: expected {self.scale_dtype} of shape [] or [1], found {scale_info.dtype} "
                f"{list(scale_info.shape)} (ComfyUI needs one scale per tensor)"
            )
            return None
        scale = self.read_scale(reader.read(scale_key))
        if not (scale > 0 and scale < float("inf")):
            violations.append(f"{scale_key}: scale {scale} is not positive and finite")
        self._check_comfy_quant(reader, base, info.dtype, violations)
        _check_input_scale(reader, base + self.input_scale_suffix, violations)
        return LayerCheck(weight_key, info.dtype, info.shape, scale)

    def _expected_format(self, dtype: torch.dtype) -> str:
        return dtype_name(dtype)

    def _check_comfy_quant(
        self, reader: SafetensorsReader, base: str, dtype: torch.dtype, violations: list[str]
    ) -> None:
        key = base + COMFY_QUANT
        if key not in reader.tensors:
            violations.append(f"{key}: missing")
            return
        if reader.tensors[key].dtype != torch.uint8 or len(reader.tensors[key].shape) != 1:
            violations.append(f"{key}: must be a 1-D uint8 tensor of UTF-8 JSON")
            return
        try:
            conf = read_json_tensor(reader.read(key))
        except (UnicodeDecodeError, json.JSONDecodeError):
            violations.append(f"{key}: not valid UTF-8 JSON")
            return
        expected = self._expected_format(dtype)
        if conf.get("format") != expected:
            violations.append(f"{key}: format {conf.get('format')!r}, expected {expected!r} for a {dtype} weight")
        if not isinstance(conf.get(FULL_PRECISION, False), bool):
            violations.append(f"{key}: {FULL_PRECISION} must be true or false")

    def check_file(self, reader: SafetensorsReader, quantized: list[str], violations: list[str]) -> None:
        """File-level checks (markers); the comfy layout has none."""


class ComfyHeaderLayout(Layout):
    """ComfyUI's header variant: per-layer settings in the ``_quantization_metadata`` metadata
    instead of ``comfy_quant`` tensors. Read-only here."""

    name = "comfy-header"

    @classmethod
    def recognises(cls, keys: list[str], metadata: dict[str, str]) -> bool:
        return "_quantization_metadata" in metadata


class LegacyLayout(Layout):
    """``scaled_fp8`` (every ComfyUI since Oct 2024): ``L.weight`` fp8, ``L.scale_weight`` float32
    0-dim, an optional ``L.scale_input``, and one marker tensor ``<prefix>scaled_fp8`` whose dtype
    is the weights' fp8 dtype. No ``comfy_quant``: ComfyUI's ``convert_old_quants`` gives every
    layer ``full_precision_matrix_mult`` when the marker has 2 elements and none when it is empty,
    so the layers under a marker must agree (``legacy_full_precision``)."""

    name = "legacy"
    scale_suffix = ".scale_weight"
    input_scale_suffix = ".scale_input"
    marker = "scaled_fp8"

    def _comfy_quant(self, weight_key: str, dtype: torch.dtype, activation: Activation) -> dict | None:
        return None  # the full-precision flag is the file's marker

    def markers(
        self, prefix: str, fp8_dtype: torch.dtype, shared_scales: bool, full_precision: bool = True
    ) -> dict[str, torch.Tensor]:
        return {prefix + self.marker: torch.zeros(2 if full_precision else 0, dtype=fp8_dtype)}

    def marker_full_precision(self, activations: dict[str, Activation]) -> bool:
        return legacy_full_precision(activations)

    def output_name(self, stem: str, fp8_format: str, distill: str, shared_scales: bool) -> str:
        return f"{stem}_{fp8_format}_scaled_legacy{distill}"

    @classmethod
    def recognises(cls, keys: list[str], metadata: dict[str, str]) -> bool:
        return any(cls().is_marker(k) for k in keys)

    def sidecar_keys(self, weight_key: str) -> list[str]:
        base = weight_key.removesuffix(WEIGHT_SUFFIX)
        return [base + self.scale_suffix, base + self.input_scale_suffix]

    def read_activation(self, weight_key: str, read: Callable[[str], torch.Tensor], keys: set[str]) -> Activation:
        """The flag is the marker of the layer's model (2 elements: weight-only), and an input scale
        of 1 is none, as ComfyUI's ``convert_old_quants`` reads them."""
        input_scale = super().read_activation(weight_key, read, keys).input_scale
        owners = [m for m in keys if self.is_marker(m) and weight_key.startswith(m.removesuffix(self.marker))]
        owner = max(owners, key=len, default=None)
        full = owner is not None and read(owner).numel() == 2
        return Activation(None if input_scale == 1.0 else input_scale, full)

    def _check_comfy_quant(
        self, reader: SafetensorsReader, base: str, dtype: torch.dtype, violations: list[str]
    ) -> None:
        """No per-layer JSON in this layout."""

    def check_file(self, reader: SafetensorsReader, quantized: list[str], violations: list[str]) -> None:
        dtypes = {reader.tensors[w].dtype for w in quantized}
        for marker in (k for k in reader.tensors if self.is_marker(k)):
            info = reader.tensors[marker]
            if info.dtype not in dtypes or info.numel > 2:
                violations.append(
                    f"{marker}: must be an empty tensor of the weights' fp8 dtype {sorted(map(str, dtypes))}"
                )
            prefix = marker.removesuffix(self.marker)
            if any(not w.startswith(prefix) for w in quantized):
                violations.append(f"{marker}: some quantized weights lie outside its prefix {prefix!r}")


class Ultra8Layout(Layout):
    """This project's (from the original script): ``L.weight`` fp8, ``L.weight_scale_u8`` uint8
    0-dim code of the log-uniform codec (``codec.py``), ``L.comfy_quant`` JSON ``{"format":
    "ultra8", ...}`` so stock ComfyUI refuses the file instead of loading unscaled weights, and a
    marker ``<prefix>ultra8_codec`` (uint8 JSON) with the codec's parameters. The input scale
    stays float32: it is a ComfyUI tensor, not a weight scale the codec was made for.
    ``decode`` turns a file into ``comfy`` or ``legacy``."""

    name = "ultra8"
    scale_suffix = ".weight_scale_u8"
    scale_dtype = torch.uint8
    marker = "ultra8_codec"
    loads_in_stock_comfyui = False

    def stored_scale(self, scale: float) -> float:
        """Rounded up to a codec level, so the weights divided by it stay within the fp8 range."""
        return codec.decode_scale(codec.encode_scale(scale))

    def _scale_tensor(self, scale: float) -> torch.Tensor:
        return torch.tensor(codec.encode_scale(scale), dtype=torch.uint8)

    def _comfy_quant(self, weight_key: str, dtype: torch.dtype, activation: Activation) -> dict | None:
        conf: dict = {"format": self.name, "weight_dtype": dtype_name(dtype)}
        if activation.full_precision:
            conf[FULL_PRECISION] = True
        return conf

    def markers(
        self, prefix: str, fp8_dtype: torch.dtype, shared_scales: bool, full_precision: bool = True
    ) -> dict[str, torch.Tensor]:
        descriptor = {
            "format": self.name,
            "version": 1,
            "weight_dtype": dtype_name(fp8_dtype),
            "scale_codec": "log_uniform_u8",
            "scale_min": codec.SCALE_MIN,
            "scale_max": codec.SCALE_MAX,
            "levels": codec.LEVELS,
            "shared_scales": shared_scales,
        }
        return {prefix + self.marker: json_tensor(descriptor)}

    def output_name(self, stem: str, fp8_format: str, distill: str, shared_scales: bool) -> str:
        """The original script's rule."""
        return f"{stem}_{fp8_format}_scaled_ultra{distill}{'_8bit_shared' if shared_scales else '_8bit'}"

    @classmethod
    def recognises(cls, keys: list[str], metadata: dict[str, str]) -> bool:
        return any(k.endswith(cls.scale_suffix) for k in keys)

    def read_scale(self, tensor: torch.Tensor) -> float:
        return codec.decode_scale(int(tensor))

    def _expected_format(self, dtype: torch.dtype) -> str:
        return self.name


WRITABLE: dict[str, Layout] = {cls.name: cls() for cls in (Layout, LegacyLayout, Ultra8Layout)}
FORMATS = tuple(WRITABLE)
_DETECTION_ORDER = (Ultra8Layout, Layout, LegacyLayout, ComfyHeaderLayout)  # most specific first


def legacy_full_precision(activations: dict[str, Activation]) -> bool:
    """Whether a ``legacy`` marker makes every layer under it weight-only (``full_precision_matrix_mult``).

    The marker switches the whole model, so its layers must agree; a mixed file needs ``comfy``.
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


def layout(name: str) -> Layout:
    """The writable layout called ``name``."""
    try:
        return WRITABLE[name]
    except KeyError:
        raise ValueError(f"unknown output format {name!r}; choose one of {list(FORMATS)}") from None


def detect(keys: list[str], metadata: dict[str, str]) -> Layout | None:
    """The layout a file uses, or None for a file with no quantized layers."""
    return next((cls() for cls in _DETECTION_ORDER if cls.recognises(keys, metadata)), None)


def is_marker(key: str) -> bool:
    """Whether ``key`` is any layout's file-level marker tensor."""
    return any(layout.is_marker(key) for layout in WRITABLE.values())


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
