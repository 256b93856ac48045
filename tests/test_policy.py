"""Layer policy: eligibility, preset detection and keep lists, user regexes, scale groups."""

from __future__ import annotations

import pytest
import torch

from quant_core import policy
from quant_core.policy import PRESETS, LayerPolicy

BF16 = torch.bfloat16
BIG = (3072, 3072)

FLUX_KEYS = [
    "img_in.weight",
    "img_in.bias",
    "txt_in.weight",
    "time_in.in_layer.weight",
    "time_in.out_layer.weight",
    "guidance_in.in_layer.weight",
    "vector_in.in_layer.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_attn.proj.weight",
    "double_blocks.0.img_attn.norm.query_norm.scale",
    "double_blocks.0.img_mlp.0.weight",
    "double_blocks.0.img_mod.lin.weight",
    "double_blocks.0.txt_attn.qkv.weight",
    "double_blocks.0.txt_mod.lin.weight",
    "single_blocks.0.linear1.weight",
    "single_blocks.0.linear2.weight",
    "single_blocks.0.modulation.lin.weight",
    "final_layer.linear.weight",
    "final_layer.adaLN_modulation.1.weight",
]


def make(preset: str = "none", **kwargs) -> LayerPolicy:
    return LayerPolicy(PRESETS[preset], **kwargs)


def quantized(p: LayerPolicy, name: str, dtype: torch.dtype = BF16, shape: tuple[int, ...] = BIG) -> bool:
    return p.decide(name, dtype, shape).quantize


# ------------------------------------------------------------------------------------------------ eligibility


@pytest.mark.parametrize(
    ("name", "dtype", "shape"),
    [
        ("blocks.0.attn.q.bias", BF16, (3072,)),
        ("blocks.0.norm.weight", BF16, (3072,)),
        ("x_embedder.proj.weight", BF16, (1536, 16, 2, 2)),
        ("patch_embedding.weight", BF16, (5120, 16, 1, 2, 2)),
        ("blocks.0.modulation", BF16, (1, 6, 5120)),
        ("pos_embed", BF16, (1, 4096)),
        ("blocks.0.attn.q.weight", torch.int8, BIG),
        ("blocks.0.attn.q.weight", torch.int64, BIG),
        ("blocks.0.attn.q.weight", torch.float8_e4m3fn, BIG),
        ("blocks.0.attn.q.weight", torch.uint8, BIG),
    ],
)
def test_ineligible_tensors_are_kept(name, dtype, shape):
    assert not quantized(make("none"), name, dtype, shape)
    # --include cannot force them in either.
    assert not quantized(make("none", include=[".*"]), name, dtype, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_float_linear_weight_is_quantized(dtype):
    assert quantized(make("none"), "blocks.0.attn.q.weight", dtype, (64, 64))


def test_min_tensor_size_threshold():
    default = make("none")
    assert default.min_tensor_size == 1024
    assert quantized(default, "a.weight", shape=(32, 32))  # exactly 1024 elements
    assert not quantized(default, "a.weight", shape=(31, 32))
    assert not quantized(default, "a.weight", shape=(1, 1023))
    custom = make("none", min_tensor_size=4096)
    assert not quantized(custom, "a.weight", shape=(32, 64))
    assert quantized(custom, "a.weight", shape=(64, 64))
    assert quantized(make("none", min_tensor_size=0), "a.weight", shape=(2, 2))
    assert "min_tensor_size" in default.decide("a.weight", BF16, (4, 4)).reason


@pytest.mark.parametrize(
    "name",
    [
        "encoder.embed_tokens.weight",
        "shared.weight",
        "embeddings.word_embeddings.weight",
        "embed_tokens.weight",
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ],
)
def test_embedding_tables_are_kept(name):
    assert not quantized(make("none"), name, shape=(32128, 4096))
    assert not quantized(make("none", include=["embed", "shared", "wte", "bias"]), name, shape=(32128, 4096))


@pytest.mark.parametrize("name", ["text_embedding.0.weight", "time_embedding.2.weight", "patch_embedding_proj.weight"])
def test_layers_named_like_embeddings_are_not_tables(name):
    assert quantized(make("none"), name)


# ------------------------------------------------------------------------------------------ preset detection


def test_detect_preset_in_a_full_checkpoint():
    keys = [policy.FULL_CHECKPOINT_PREFIX + k for k in FLUX_KEYS]
    keys += ["first_stage_model.decoder.conv_in.weight", "cond_stage_model.transformer.wte.weight"]
    assert policy.detect_preset(keys).name == "flux"


def test_detect_preset_falls_back_to_generic():
    assert policy.detect_preset([]).name == "generic"
    assert policy.detect_preset(["fc1.weight", "fc2.weight"]).name == "generic"
    # One half of a signature is not enough.
    assert policy.detect_preset(["double_blocks.0.img_attn.qkv.weight"]).name == "generic"


def test_every_preset_is_documented():
    assert {"flux", "hunyuan_video", "wan", "sd3", "t5", "clip", "llm", "generic", "none"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.description


# ------------------------------------------------------------------------------- structure and generic
# Per-family choices are tested on ComfyUI's real layouts in test_families.py; here the rules themselves.

NEW_FAMILY = [  # a made-up family: what the structural default does with a model nobody has looked at
    "patch_in.weight",
    "t_mlp.0.weight",
    "t_mlp.2.weight",
    "stages.0.attn.q.weight",
    "stages.0.attn.out.weight",
    "stages.0.ffn.up.weight",
    "stages.0.ffn.gate_proj.weight",
    "stages.0.adaLN_modulation.1.weight",
    "stages.0.img_mod.weight",
    "stages.0.moe.router.weight",
    "stages.0.moe.experts.0.w1.weight",
    "stages.0.time_mlp.weight",
    "stages.0.guidance_proj.weight",
    "stages.0.q_norm.weight",
    "stages.1.attn.q.weight",
    "stages.1.ffn.up.weight",
    "out_head.weight",
    "final_proj.weight",
]
NEW_FAMILY_QUANTIZED = {
    "stages.0.attn.q.weight",
    "stages.0.attn.out.weight",
    "stages.0.ffn.up.weight",
    "stages.0.ffn.gate_proj.weight",
    "stages.0.moe.experts.0.w1.weight",
    "stages.1.attn.q.weight",
    "stages.1.ffn.up.weight",
}


def test_block_prefixes_are_numbered_modules_with_named_children():
    extra = ["label_emb.0.0.weight", "label_emb.0.2.weight", "a.b.1.0.x.weight", "a.b.1.0.y.weight"]
    blocks = policy.block_prefixes(NEW_FAMILY + extra)
    assert {"stages.0.", "stages.1.", "a.b.1.0."} <= blocks
    assert "t_mlp.0." not in blocks  # one weight: a Sequential's layer
    assert "label_emb.0." not in blocks  # numbered children only: a nested Sequential
    assert "a.b.1." not in blocks
    assert not policy.in_block("t_mlp.2.weight", blocks)
    assert policy.in_block("stages.0.moe.experts.0.w1.weight", blocks)
    assert policy.in_block("a.b.1.0.x.weight", blocks)


def test_generic_quantizes_block_linears_and_keeps_conditioning_paths():
    p = LayerPolicy(PRESETS["generic"], blocks=policy.block_prefixes(NEW_FAMILY))
    decisions = {name: p.decide(name, BF16, BIG) for name in NEW_FAMILY}
    assert {n for n, d in decisions.items() if d.quantize} == NEW_FAMILY_QUANTIZED
    assert "outside the repeated blocks" in decisions["patch_in.weight"].reason
    assert "outside" not in decisions["stages.0.img_mod.weight"].reason


def test_preset_none_ignores_structure():
    p = LayerPolicy(PRESETS["none"], blocks=policy.block_prefixes(NEW_FAMILY))
    assert all(quantized(p, name) for name in NEW_FAMILY if not name.endswith("router.weight"))


def test_without_blocks_every_layer_counts_as_inside():
    """A model with no numbered blocks (a toy, a single layer) is judged by the keep lists alone."""
    assert policy.block_prefixes(["fc1.weight", "fc2.weight"]) == frozenset()
    assert quantized(LayerPolicy(PRESETS["generic"], blocks=frozenset()), "fc1.weight")


@pytest.mark.parametrize(
    "name",
    [
        "double_stream_blocks.0.block.ff_i.gate.weight",
        "blocks.0.moe.router.weight",
        "motion_encoder.dec.direction.weight",
        "trainable_cond_mask.weight",
        "cond_type_embedding.weight",
    ],
)
def test_two_d_raw_parameters_and_tables_are_never_candidates(name):
    assert not quantized(make("none", include=[".*"]), name, shape=(4, 2560))


@pytest.mark.parametrize("name", ["proj_out.weight", "head.weight"])
def test_generic_keeps_top_level_output_projection_in_a_full_checkpoint(name):
    assert not quantized(make("generic"), name)
    prefixed = LayerPolicy(PRESETS["generic"], prefix=policy.FULL_CHECKPOINT_PREFIX)
    assert not quantized(prefixed, policy.FULL_CHECKPOINT_PREFIX + name)


# --------------------------------------------------------------------------------------------- seed flags


@pytest.mark.parametrize(
    "name",
    [
        "encoder.block.0.layer.0.layer_norm.weight",
        "encoder.final_layer_norm.weight",
        "encoder.block.0.layer.0.norm_proj.weight",
        "encoder.block.0.layer.0.SelfAttention.bias_proj.weight",
        "encoder.embed_tokens_proj.weight",
        "shared_proj.weight",
    ],
)
def test_t5xxl_flag_excludes_its_substrings(name):
    assert quantized(make("none"), name)
    decision = make("none", t5xxl=True).decide(name, BF16, BIG)
    assert not decision.quantize and "--t5xxl" in decision.reason


def test_t5xxl_flag_keeps_ordinary_linears():
    assert quantized(make("none", t5xxl=True), "encoder.block.0.layer.0.SelfAttention.q.weight")


@pytest.mark.parametrize(
    "name",
    [
        "distilled_guidance_layer.in_proj.weight",
        "distilled_guidance_layer.layers.0.in_layer.weight",
        "final_layer.linear.weight",
        "img_in.weight",
        "txt_in.weight",
    ],
)
def test_keep_distillation_excludes_its_substrings(name):
    assert quantized(make("none"), name)
    decision = make("none", keep_distillation=True).decide(name, BF16, BIG)
    assert not decision.quantize and "--keep_distillation" in decision.reason


def test_keep_distillation_keeps_ordinary_linears():
    assert quantized(make("none", keep_distillation=True), "double_blocks.0.img_attn.qkv.weight")


# ----------------------------------------------------------------------------------------- user regexes


def test_exclude_regex():
    p = make("flux", exclude=[r"^single_blocks\.(1[0-9]|[0-9])\.", r"txt_attn"])
    assert not quantized(p, "single_blocks.3.linear1.weight")
    assert not quantized(p, "single_blocks.12.linear2.weight")
    assert quantized(p, "single_blocks.20.linear1.weight")
    assert not quantized(p, "double_blocks.0.txt_attn.qkv.weight")
    assert quantized(p, "double_blocks.0.img_attn.qkv.weight")
    assert "--exclude" in p.decide("double_blocks.0.txt_attn.qkv.weight", BF16, BIG).reason


def test_include_overrides_preset_and_exclude():
    p = make("flux", include=[r"img_in", r"img_attn"], exclude=[r"double_blocks\.0\."])
    p.blocks = policy.block_prefixes(FLUX_KEYS)
    assert quantized(p, "img_in.weight")
    assert quantized(p, "double_blocks.0.img_attn.qkv.weight")
    assert not quantized(p, "double_blocks.0.txt_attn.qkv.weight")
    assert not quantized(p, "txt_in.weight")
    assert "--include" in p.decide("img_in.weight", BF16, BIG).reason


def test_include_overrides_seed_flags():
    p = make("none", include=["final_layer"], t5xxl=True, keep_distillation=True)
    assert quantized(p, "final_layer.linear.weight")
    assert not quantized(p, "img_in.weight")


def test_include_does_not_override_eligibility():
    p = make("flux", include=[r"img_in"])
    assert not quantized(p, "img_in.bias", shape=(3072,))
    assert not quantized(p, "img_in.weight", shape=(16, 16))
    assert not quantized(p, "img_in.weight", dtype=torch.int8)
    assert not quantized(p, "img_in.weight", shape=(3072, 64, 2, 2))


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_invalid_regex_is_a_value_error_naming_the_option(option):
    with pytest.raises(ValueError, match=f"invalid {option} regex"):
        make("none", **{option: ["blocks.(0"]})


# --------------------------------------------------------------------------------------- full checkpoints


def test_checkpoint_prefix():
    assert policy.checkpoint_prefix(FLUX_KEYS) == ""
    keys = ["model.diffusion_model.img_in.weight", "first_stage_model.encoder.conv_in.weight"]
    assert policy.checkpoint_prefix(keys) == "model.diffusion_model."


def test_full_checkpoint_only_quantizes_the_diffusion_model():
    keys = [policy.FULL_CHECKPOINT_PREFIX + k for k in FLUX_KEYS] + [
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
    ]
    prefix = policy.checkpoint_prefix(keys)
    p = LayerPolicy(policy.detect_preset(keys), prefix=prefix, blocks=policy.block_prefixes(keys))
    decisions = {k: quantized(p, k) for k in keys}
    assert all(not q for k, q in decisions.items() if not k.startswith(prefix))
    assert decisions["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert decisions["model.diffusion_model.single_blocks.0.linear1.weight"]
    assert not decisions["model.diffusion_model.img_in.weight"]
    assert decisions["model.diffusion_model.double_blocks.0.img_mod.lin.weight"]
    # Outside the prefix, not even --include brings a weight in.
    forced = LayerPolicy(PRESETS["none"], include=[".*"], prefix=prefix)
    assert not quantized(forced, "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight")


# ------------------------------------------------------------------------------------------- scale groups


@pytest.mark.parametrize(
    "siblings",
    [
        [f"blocks.0.self_attn.{x}.weight" for x in "qkvo"],
        [f"encoder.block.3.layer.0.SelfAttention.{x}.weight" for x in "qkvo"],
        ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight"],
        ["blocks.0.ffn.0.weight", "blocks.0.ffn.2.weight"],
        [f"model.diffusion_model.blocks.2.attn.{x}.weight" for x in "qkv"],
    ],
)
def test_scale_group_joins_siblings(siblings):
    assert len({policy.scale_group(n) for n in siblings}) == 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("blocks.0.self_attn.q.weight", "blocks.0.cross_attn.q.weight"),
        ("blocks.0.self_attn.q.weight", "blocks.1.self_attn.q.weight"),
        ("blocks.0.self_attn.q.weight", "blocks.10.self_attn.q.weight"),
        ("blocks.0.self_attn.o.weight", "blocks.0.ffn.0.weight"),
        ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight"),
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
        ("img_in.weight", "txt_in.weight"),
    ],
)
def test_scale_group_separates_different_modules(a, b):
    assert policy.scale_group(a) != policy.scale_group(b)


def test_scale_group_is_the_parent_module():
    assert policy.scale_group("blocks.0.self_attn.q.weight") == "blocks.0.self_attn"
    assert policy.scale_group("img_in.weight") == "img_in"
