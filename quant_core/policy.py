"""Which tensors are quantized: eligibility, model-family presets, user regexes, scale groups.

A tensor is quantized only when it is the 2-D floating-point ``.weight`` of a Linear-like layer
with at least ``min_tensor_size`` elements, is not an embedding lookup table, and no rule keeps
it. Rules, in order: ``--include`` (forces an eligible weight in), then ``--exclude``, the
seed's ``--t5xxl`` / ``--keep_distillation`` substrings, and the family preset's list of small,
sensitive layers (input/output projections, time/guidance embedders, modulation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

FULL_CHECKPOINT_PREFIX = "model.diffusion_model."
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Embedding tables are 2-D weights, but ComfyUI loads them through nn.Embedding, not Linear.
_EMBEDDING_TABLE = re.compile(
    r"(^|\.)(embed_tokens|shared|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe"
    r"|token_embedding|position_embedding|relative_attention_bias|embedding)\.weight$"
)

# Seed flags: plain substrings, as the original script matched them.
T5XXL_EXCLUDES = ("norm", "bias", "embed_tokens", "shared")
DISTILLATION_EXCLUDES = ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")


@dataclass(frozen=True)
class Preset:
    """A model family: how to recognise its keys and which layers stay in high precision."""

    name: str
    description: str
    signature: tuple[str, ...]  # regexes that must all match some key for auto-detection
    keep: tuple[str, ...]  # regexes (re.search on the key) of layers kept in source precision


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "hunyuan_video",
            "HunyuanVideo (ComfyUI layout)",
            (r"double_blocks\.\d+\.img_mod\.linear\.", r"txt_in\.individual_token_refiner"),
            (
                r"(^|\.)(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\.",
                r"_mod\.linear\.",
                r"modulation\.linear\.",
            ),
        ),
        Preset(
            "flux",
            "Flux / Flux-derived (Chroma) diffusion transformers",
            (r"double_blocks\.\d+\.img_attn\.qkv\.", r"single_blocks\.\d+\.linear1\."),
            (
                r"(^|\.)(img_in|txt_in|time_in|vector_in|guidance_in|final_layer|distilled_guidance_layer)\.",
                r"_mod\.lin\.",
                r"modulation\.lin\.",
            ),
        ),
        Preset(
            "wan",
            "Wan 2.x video transformers",
            (r"blocks\.\d+\.self_attn\.q\.", r"(^|\.)time_projection\."),
            (r"(^|\.)(patch_embedding|text_embedding|time_embedding|time_projection|img_emb|head)\.",),
        ),
        Preset(
            "sd3",
            "Stable Diffusion 3 / 3.5 MMDiT",
            (r"joint_blocks\.\d+\.",),
            (r"(^|\.)(x_embedder|t_embedder|y_embedder|context_embedder|final_layer)\.", r"adaLN_modulation\."),
        ),
        Preset(
            "t5",
            "T5 / UMT5 text encoders (t5xxl, umt5-xxl)",
            (r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention|DenseReluDense)\.",),
            (r"(^|\.)(shared|embed_tokens|relative_attention_bias|lm_head)\.",),
        ),
        Preset(
            "generic",
            "any other model: keeps common input/output, embedder and modulation layers",
            (),
            (
                r"(^|\.)(img_in|txt_in|x_embedder|context_embedder|final_layer|lm_head)\.",
                r"^(proj_out|head)\.",
                r"(^|\.|_)(time|timestep|guidance|vector)_?(in|embed|embedder|embedding|proj|projection)s?\.",
                r"(^|[._])(adaLN_)?modulation\.",
                r"_mod\.lin(ear)?\.",
            ),
        ),
        Preset("none", "quantize every eligible weight", (), ()),
    )
}
AUTO = "auto"


def detect_preset(keys: Iterable[str]) -> Preset:
    """The first family whose signature regexes each match some key; ``generic`` otherwise."""
    keys = list(keys)
    for preset in PRESETS.values():
        if preset.signature and all(any(re.search(sig, k) for k in keys) for sig in preset.signature):
            return preset
    return PRESETS["generic"]


def checkpoint_prefix(keys: Iterable[str]) -> str:
    """``model.diffusion_model.`` for a full checkpoint (model + VAE + text encoders), else ''."""
    return FULL_CHECKPOINT_PREFIX if any(k.startswith(FULL_CHECKPOINT_PREFIX) for k in keys) else ""


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
