"""Which tensors are quantized: eligibility, the model's repeated blocks, family presets, user regexes.

A tensor is a candidate only when it is the 2-D floating-point ``.weight`` of a Linear-like layer
with at least ``min_tensor_size`` elements and is not an embedding lookup table: ComfyUI's
mixed-precision ops consume a quantized weight only in Linear layers (and Embedding / MoE expert
banks, which reference exports keep in full precision); convolutions are 3-D to 5-D, and raw
parameters such as Wan's ``blocks.N.modulation`` or LTX's ``scale_shift_table`` have no ``.weight``.

Rules, in order: ``--include`` (forces a candidate in), ``--exclude``, the seed's ``--t5xxl`` /
``--keep_distillation`` substrings, then the structural rule every preset but ``none`` shares (a
layer outside the model's repeated, numbered blocks -- input/output projections, embedders, time and
guidance paths, heads, final layers -- is kept), then the family preset's keep list for layers
inside the blocks. The ``generic`` preset, for families nobody has looked at, keeps every block
layer whose name says modulation, gate, router, time/guidance path, norm, embedding or adapter.
docs/model-families.md has each preset's choice, its reasons and its quantized share. A preset may
also name its side stream (the text stream of double-stream blocks), which the size budget keeps
in full precision last (``budget.py``, docs/budget.md).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

FULL_CHECKPOINT_PREFIX = "model.diffusion_model."
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Embedding tables are 2-D weights, but ComfyUI loads them through nn.Embedding, not Linear.
_EMBEDDING_TABLE = re.compile(
    r"(^|\.)(embed_tokens|shared|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe"
    r"|token_embedding|position_embedding|relative_attention_bias|embedding|\w+_embedding|\w*_mask)\.weight$"
)
# 2-D ``.weight`` parameters that no Linear owns in ComfyUI's classes (tests/fixtures/layouts): HiDream's
# MoE gate, Wan Animate's motion direction. Routers are kept by every reference export anyway.
_RAW_PARAMETER = re.compile(r"(^|\.)(gate|router|direction)\.weight$")
# Every numbered module path prefix of a key: "double_blocks.3.", "double_blocks.3.img_mlp.0.".
_NUMBERED_PREFIX = re.compile(r"(?<![^.])\d+\.")

# A text encoder inside a full checkpoint (SD3.5, Flux, Wan, Z-Image, Flux.2 all-in-one files): ComfyUI's
# checkpoint loader reads it quantized under this prefix (t5_xxl_detect / llama_detect in supported_models.py).
_TEXT_ENCODER_IN_CHECKPOINT = re.compile(r"^text_encoders\.[^.]+\.transformer\.")

# Seed flags: plain substrings, as the original script matched them.
T5XXL_EXCLUDES = ("norm", "bias", "embed_tokens", "shared")
DISTILLATION_EXCLUDES = ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")

# Layers inside blocks that condition, route, normalise or embed rather than transform the tokens:
# the generic preset keeps them (Comfy-Org's int8 tool keeps the same name segments).
SENSITIVE_IN_BLOCKS = (
    r"(^|[._])(adaLN|adaln|modulation|mod|scale_shift)([._]|$)",
    r"(^|\.)(gate|gate_logits|router|routing)\.",
    r"(^|[._])(time|timestep|temb|t_emb|guidance)",
    r"norm",
    r"(^|[._])(embed|embedder|embedding|pos_embed|rope|rotary|registers?)([._]|$)",
    r"(^|[._])(refiner|adapter|final|head|proj_out|out_layer)([._]|$)",
)

SIDE_TEXT_STREAM = (r"(^|\.)txt_(mod|attn|mlp)\.",)  # Flux-style double blocks (ComfyUI flux/layers.py)


@dataclass(frozen=True)
class Preset:
    """A model family: how to recognise its keys and which layers inside its blocks stay in high precision."""

    name: str
    description: str
    signature: tuple[str, ...]  # regexes that must all match some key for auto-detection
    keep: tuple[str, ...]  # regexes (re.search on the key) of block layers kept in source precision
    text_encoder: bool = False
    # Regexes of block layers on a side stream: the text stream of double-stream blocks, whose tokens the
    # model's output does not include, so their error reaches it only through attention (``side_stream``).
    side: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """How ``inspect`` and the conversion summary name the model."""
        return f"{self.description} (preset {self.name})"


def _presets(*presets: Preset) -> dict[str, Preset]:
    return {p.name: p for p in presets}


# Order matters: the first family whose signature matches wins (HunyuanVideo 1.5 has Flux's img_mod.lin).
PRESETS: dict[str, Preset] = _presets(
    Preset(
        "hunyuan_video",
        "HunyuanVideo 1.0 / 1.5",
        (r"double_blocks\.\d+\.img_mod\.lin", r"txt_in\.individual_token_refiner"),
        (r"individual_token_refiner\.",),
        side=SIDE_TEXT_STREAM,
    ),
    Preset(
        "flux2",
        "Flux.2",
        (r"double_stream_modulation_img\.lin\.", r"single_blocks\.\d+\.linear1\."),
        (),
        side=SIDE_TEXT_STREAM,
    ),
    Preset(
        "chroma",
        "Chroma / Chroma Radiance (Flux-derived)",
        (r"distilled_guidance_layer\.", r"double_blocks\.\d+\.img_attn\.qkv\."),
        (r"(^|\.)distilled_guidance_layer\.",),
        side=SIDE_TEXT_STREAM,
    ),
    Preset(
        "flux",
        "Flux.1 and Flux.1-derived diffusion transformers",
        (r"double_blocks\.\d+\.img_attn\.qkv\.", r"single_blocks\.\d+\.linear1\."),
        (),
        side=SIDE_TEXT_STREAM,
    ),
    Preset(
        "qwen_image",
        "Qwen-Image (and Edit)",
        (r"transformer_blocks\.\d+\.img_mod\.1\.", r"(^|\.)txt_norm\."),
        (r"(^|\.)transformer_blocks\.0\.img_mod\.",),
        side=(r"(^|\.)(txt_mod|txt_mlp)\.", r"\.attn\.(add_[qkv]_proj|to_add_out)\."),  # qwen_image/model.py
    ),
    Preset(
        "lumina2",
        "Z-Image / Lumina 2 (NextDiT)",
        (r"(^|\.)cap_embedder\.", r"(^|\.)noise_refiner\.\d+\."),
        (r"\.adaLN_modulation\.",),
    ),
    Preset(
        "hidream",
        "HiDream-I1",
        (r"double_stream_blocks\.\d+\.block\.", r"(^|\.)caption_projection\."),
        (r"\.ff_i\.gate\.",),
    ),
    Preset("sd3", "Stable Diffusion 3 / 3.5 MMDiT", (r"joint_blocks\.\d+\.",), (), side=(r"\.context_block\.",)),
    Preset(
        "unet",
        "SD 1.x / SDXL UNet",
        (r"(^|\.)input_blocks\.\d+\.", r"(^|\.)output_blocks\.\d+\."),
        (r"\.emb_layers\.",),
    ),
    Preset(
        "wan",
        "Wan 2.1 / 2.2 video transformers (incl. S2V, Animate, VACE)",
        (r"blocks\.\d+\.self_attn\.q\.", r"(^|\.)time_projection\."),
        (),
    ),
    Preset("ltxv", "LTX-Video / LTX-2", (r"(^|\.)adaln_single\.", r"transformer_blocks\.\d+\.scale_shift_table"), ()),
    Preset(
        "t5",
        "T5 / UMT5 text encoders (t5xxl, umt5-xxl)",
        (r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention|DenseReluDense)\.",),
        (),
        text_encoder=True,
    ),
    Preset(  # ComfyUI v0.30 builds CLIP with plain ops (sd1_clip.py): fp8 weights would load without scales
        "clip",
        "CLIP text encoders (CLIP-L, CLIP-G), kept whole: ComfyUI loads CLIP without fp8 scales",
        (r"text_model\.encoder\.layers\.\d+\.",),
        (r".",),
        text_encoder=True,
    ),
    Preset(
        "llm",
        "LLM text encoders (Qwen2.5-VL, Qwen3, Mistral, Gemma 3, Llama 3.1)",
        (r"(^|\.)layers\.\d+\.self_attn\.q_proj\.", r"(^|\.)layers\.\d+\.mlp\.down_proj\."),
        (),
        text_encoder=True,
    ),
    Preset(
        "generic",
        "any other model: quantizes the repeated blocks' Linear layers, keeps their conditioning paths",
        (),
        SENSITIVE_IN_BLOCKS,
    ),
    Preset("none", "quantize every eligible weight", (), ()),
)
AUTO = "auto"


def side_stream(preset: Preset, name: str) -> bool:
    """Whether the weight ``name`` (without a full checkpoint's prefix) lies on a side stream of the
    family: the text stream of double-stream blocks, which reaches the output only through attention."""
    return any(re.search(pattern, name) for pattern in preset.side)


def detect_preset(keys: Iterable[str]) -> Preset:
    """The first family whose signature regexes each match some key; ``generic`` otherwise."""
    keys = list(keys)
    for preset in PRESETS.values():
        if preset.signature and all(any(re.search(sig, k) for k in keys) for sig in preset.signature):
            return preset
    return PRESETS["generic"]


def detect_family(keys: Iterable[str]) -> Preset:
    """The family of a file's model: of its diffusion model when it is a full checkpoint."""
    keys = list(keys)
    prefix = checkpoint_prefix(keys)
    return detect_preset(k for k in keys if k.startswith(prefix))


def text_encoders_in_checkpoint(keys: Iterable[str]) -> dict[str, Preset]:
    """A full checkpoint's text encoders by prefix (``text_encoders.t5xxl.transformer.``), each with
    its family. Only T5 / UMT5 and LLM encoders count: ComfyUI loads CLIP without fp8 scales."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        match = _TEXT_ENCODER_IN_CHECKPOINT.match(key)
        if match:
            groups[match.group(0)].append(key[match.end() :])
    found = {prefix: detect_preset(names) for prefix, names in groups.items()}
    return {prefix: preset for prefix, preset in found.items() if preset.name in ("t5", "llm")}


def checkpoint_prefix(keys: Iterable[str]) -> str:
    """``model.diffusion_model.`` for a full checkpoint (model + VAE + text encoders), else ''."""
    return FULL_CHECKPOINT_PREFIX if any(k.startswith(FULL_CHECKPOINT_PREFIX) for k in keys) else ""


def block_prefixes(keys: Iterable[str]) -> frozenset[str]:
    """The module paths of the model's repeated blocks: numbered modules (``double_blocks.3.``,
    ``model.layers.7.``) holding two or more weights in named sub-modules. A numbered module with one
    weight is a layer of a ``Sequential`` (``time_in.mlp.0``, ``text_embedding.2``), and one whose
    children are numbered too is a nested ``Sequential`` (SDXL's ``label_emb.0.0`` / ``label_emb.0.2``),
    not a block. Read from names alone, so files and live models give the same answer."""
    weights: dict[str, int] = defaultdict(int)
    named: set[str] = set()
    for key in keys:
        if key.endswith(".weight"):
            for match in _NUMBERED_PREFIX.finditer(key):
                prefix = key[: match.end()]
                weights[prefix] += 1
                if not key[match.end() :].split(".", 1)[0].isdigit():
                    named.add(prefix)
    return frozenset(prefix for prefix, count in weights.items() if count >= 2 and prefix in named)


def in_block(name: str, blocks: frozenset[str]) -> bool:
    """Whether ``name`` lies inside one of ``blocks`` (see :func:`block_prefixes`)."""
    return any(name[: match.end()] in blocks for match in _NUMBERED_PREFIX.finditer(name))


@dataclass
class Decision:
    quantize: bool
    reason: str


@dataclass
class LayerPolicy:
    """Decides, from a tensor's name, dtype and shape alone, whether it is quantized."""

    preset: Preset
    min_tensor_size: int = 1024
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    t5xxl: bool = False
    keep_distillation: bool = False
    prefix: str = ""  # full checkpoints: only the diffusion model's weights are candidates
    blocks: frozenset[str] | None = None  # block_prefixes() of the model; None: every layer counts as inside

    def __post_init__(self) -> None:
        self._include = [compile_regex(p, "include") for p in self.include]
        self._exclude = [compile_regex(p, "exclude") for p in self.exclude]
        self._keep = [re.compile(p) for p in self.preset.keep]

    def decide(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Decision:
        reason = self._ineligible(name, dtype, shape)
        if reason:
            return Decision(False, reason)
        if any(p.search(name) for p in self._include):
            return Decision(True, "included by --include")
        if any(p.search(name) for p in self._exclude):
            return Decision(False, "excluded by --exclude")
        if self.t5xxl and any(s in name for s in T5XXL_EXCLUDES):
            return Decision(False, "excluded by --t5xxl")
        if self.keep_distillation and any(s in name for s in DISTILLATION_EXCLUDES):
            return Decision(False, "excluded by --keep_distillation")
        if self.blocks and self.preset.name != "none" and not in_block(name, self.blocks):
            return Decision(False, f"kept by preset {self.preset.name}: outside the repeated blocks")
        if any(p.search(name.removeprefix(self.prefix)) for p in self._keep):
            return Decision(False, f"kept by preset {self.preset.name}")
        return Decision(True, "quantized")

    def _ineligible(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> str:
        if not name.endswith(".weight") or len(shape) != 2:
            return "not a 2-D weight"
        if dtype not in _FLOAT_DTYPES:
            return f"dtype {dtype} is not a source float type"
        if self.prefix and not name.startswith(self.prefix):
            return "outside the diffusion model of a full checkpoint"
        if _EMBEDDING_TABLE.search(name):
            return "embedding table"
        if _RAW_PARAMETER.search(name):
            return "a raw parameter, not a Linear layer"
        if shape[0] * shape[1] < self.min_tensor_size:
            return "smaller than --min_tensor_size"
        return ""


def scale_group(name: str) -> str:
    """Shared-scale group of a weight: its parent module path.

    ``blocks.0.attn.q.weight``, ``blocks.0.attn.k.weight`` and ``blocks.0.attn.v.weight`` (and
    the attention's output projection beside them) share ``blocks.0.attn``; a block's MLP
    layers share theirs. Siblings are the tensors that see related inputs and have similar ranges.
    """
    module = name.rsplit(".", 1)[0]
    return module.rsplit(".", 1)[0] if "." in module else module


def compile_regex(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid {option} regex {pattern!r}: {exc}") from None
