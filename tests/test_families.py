"""The layer policy on the real key layouts of ComfyUI's model classes (tests/fixtures/layouts).

docs/model-families.md holds, per fixture, the preset detected, the quantized share of parameters
(with that preset and with the structural ``generic`` default) and the Linear layers kept; these
tests recompute every row from the fixture and fail, printing the row, when code and table differ.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from quant_core import formats, policy
from quant_core.convert import ConvertOptions, plan_conversion
from quant_core.io import TensorInfo
from quant_core.policy import PRESETS, LayerPolicy
from tests.fixtures import layouts

TABLE = Path(__file__).resolve().parents[1] / "docs" / "model-families.md"
NAMES = layouts.names()
# Distractors from a full checkpoint's other components: never candidates.
CHECKPOINT_EXTRAS = (
    ("first_stage_model.decoder.mid.attn_1.q.weight", (512, 512)),
    ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", (4096, 4096)),
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", (3072, 768)),
)


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] in NAMES:
            rows[cells[0]] = cells
    return rows


def decide_all(tensors, preset: str, prefix: str = "") -> dict[str, bool]:
    keys = [t.name for t in tensors]
    p = LayerPolicy(PRESETS[preset], prefix=prefix, blocks=policy.block_prefixes(keys))
    return {t.name: p.decide(t.name, t.dtype, t.shape).quantize for t in tensors}


def share(tensors, decisions: dict[str, bool]) -> float:
    return sum(t.numel for t in tensors if decisions[t.name]) / sum(t.numel for t in tensors)


def kept_linears(tensors, decisions: dict[str, bool]) -> str:
    """The kept Linear weights in state-dict order, numbers folded into ``*`` where several match."""
    patterns: dict[str, list[str]] = {}
    for t in tensors:
        if t.kind == "linear" and t.name.endswith(".weight") and len(t.shape) == 2 and not decisions[t.name]:
            name = t.name.removesuffix(".weight")
            patterns.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), []).append(name)
    return ", ".join(f"`{p if len(names) > 1 else names[0]}`" for p, names in patterns.items()) or "-"


def row(name: str) -> list[str]:
    tensors = layouts.load(name).tensors
    preset = policy.detect_preset(t.name for t in tensors).name
    decisions = decide_all(tensors, preset)
    generic = share(tensors, decide_all(tensors, "generic"))
    return [name, preset, f"{share(tensors, decisions):.1%}", f"{generic:.1%}", kept_linears(tensors, decisions)]


def test_every_fixture_has_a_row_and_every_row_a_fixture():
    assert sorted(table_rows()) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_table_row_matches_the_policy(name):
    expected = row(name)
    assert table_rows()[name] == expected, "| " + " | ".join(expected) + " |"


@pytest.mark.parametrize("name", NAMES)
def test_detected_in_a_full_checkpoint_too(name):
    layout = layouts.load(name)
    if layout.role == "diffusion":
        keys = [t.name for t in layout.prefixed(policy.FULL_CHECKPOINT_PREFIX)]
    else:  # SD3.5-style all-in-one files hold text encoders under text_encoders.<name>.transformer.
        keys = [t.name for t in layout.prefixed("text_encoders.te.transformer.")]
    expected = policy.detect_preset(t.name for t in layout.tensors)
    assert policy.detect_preset(keys) == expected
    assert expected.text_encoder == (layout.role == "text_encoder")
    assert expected.name != "generic"


@pytest.mark.parametrize("name", [n for n in NAMES if layouts.load(n).role == "diffusion"])
def test_full_checkpoint_quantizes_the_same_layers(name):
    layout = layouts.load(name)
    prefix = policy.FULL_CHECKPOINT_PREFIX
    preset = policy.detect_preset(t.name for t in layout.tensors).name
    bare = decide_all(layout.tensors, preset)
    extras = tuple(layouts.Tensor(n, s, layout.tensors[0].dtype, "linear") for n, s in CHECKPOINT_EXTRAS)
    full = decide_all(layout.prefixed(prefix) + extras, preset, prefix)
    assert {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)} == bare
    assert not any(full[n] for n, _ in CHECKPOINT_EXTRAS)


@pytest.mark.parametrize("preset", ["auto", "generic", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_only_linear_weights_are_ever_quantized(name, preset):
    """Convs, norms, embeddings, raw parameters (Wan's modulation, LTX's scale_shift_table, HiDream's
    MoE gate) and buffers are never marked: ComfyUI would load them without their scale."""
    tensors = layouts.load(name).tensors
    if preset == "auto":
        preset = policy.detect_preset(t.name for t in tensors).name
    decisions = decide_all(tensors, preset)
    wrong = [t.name for t in tensors if decisions[t.name] and t.kind != "linear"]
    assert not wrong
    forced = LayerPolicy(PRESETS[preset], include=[".*"], blocks=policy.block_prefixes(decisions))
    assert not [t.name for t in tensors if t.kind != "linear" and forced.decide(t.name, t.dtype, t.shape).quantize]


@pytest.mark.parametrize("name", [n for n in NAMES if layouts.load(n).role == "diffusion"])
def test_large_transformers_quantize_nine_tenths(name):
    tensors = layouts.load(name).tensors
    if sum(t.numel for t in tensors) < 4e9 or name == "sdxl_unet":
        pytest.skip("small model or a UNet, whose convolutions cannot be quantized")
    preset = policy.detect_preset(t.name for t in tensors).name
    assert share(tensors, decide_all(tensors, preset)) >= 0.90


# ------------------------------------------------------------------------------------------ text encoders


class _Source:
    """Names, dtypes and shapes only: all ``plan_conversion`` reads."""

    def __init__(self, tensors):
        self.tensors = {t.name: TensorInfo(t.name, t.dtype, t.shape) for t in tensors}
        self.metadata: dict[str, str] = {}


def _extra(name: str, shape: tuple[int, ...]) -> layouts.Tensor:
    return layouts.Tensor(name, shape, torch.bfloat16, "linear")


@pytest.mark.parametrize("name", ["t5xxl", "umt5_xxl", "qwen25_vl_7b", "qwen3_4b", "mistral3_small_24b", "llama31_8b"])
def test_text_encoder_lm_head_and_tied_embeddings_are_kept(name):
    """Files written from HF checkpoints carry ``lm_head`` (tied to the embeddings or not) and T5's
    ``encoder.embed_tokens`` next to ``shared``: all stay, and nothing else changes."""
    tensors = layouts.load(name).tensors
    table = next(t for t in tensors if t.kind == "embedding" and t.numel > 1e8)
    head = "lm_head.weight" if name.startswith(("qwen", "mistral", "llama")) else "encoder.embed_tokens.weight"
    extended = tensors + (_extra(head, table.shape),)
    preset = policy.detect_preset(t.name for t in extended).name
    with_head = decide_all(extended, preset)
    assert not with_head[head]
    assert {k: v for k, v in with_head.items() if k != head} == decide_all(tensors, preset)


def test_text_encoders_stay_by_default_in_a_full_checkpoint():
    flux = layouts.load("flux1_dev").prefixed(policy.FULL_CHECKPOINT_PREFIX)
    t5 = layouts.load("t5xxl").prefixed("text_encoders.t5xxl.transformer.")
    clip = layouts.load("clip_l").prefixed("text_encoders.clip_l.transformer.")
    plan = plan_conversion(_Source(flux + t5 + clip), ConvertOptions())
    assert plan.preset.name == "flux"
    assert not any(plan.decisions[t.name][0] for t in t5 + clip)
    assert "outside the diffusion model" in plan.decisions[t5[1].name][1]


@pytest.mark.parametrize(("encoder", "prefix"), [("t5xxl", "t5xxl"), ("umt5_xxl", "umt5xxl"), ("qwen3_4b", "qwen3_4b")])
def test_text_encoders_option_converts_them_with_their_own_preset(encoder, prefix):
    model = layouts.load("flux1_dev").prefixed(policy.FULL_CHECKPOINT_PREFIX)
    te_prefix = f"text_encoders.{prefix}.transformer."
    te = layouts.load(encoder).prefixed(te_prefix)
    clip = layouts.load("clip_l").prefixed("text_encoders.clip_l.transformer.")
    for fmt in ("comfy", "legacy"):
        plan = plan_conversion(_Source(model + te + clip), ConvertOptions(text_encoders=True, format=fmt))
        alone = decide_all(layouts.load(encoder).tensors, policy.detect_preset(t.name for t in te).name)
        assert {t.name.removeprefix(te_prefix): plan.decisions[t.name][0] for t in te} == alone
        assert not any(plan.decisions[t.name][0] for t in clip)  # CLIP stays whole
        # weight-only, as ComfyUI runs text encoders anyway; in legacy the text encoder's own 2-element marker
        assert all(plan.activations[t.name] == formats.Activation(None, True) for t in te if plan.decisions[t.name][0])
        assert (te_prefix + formats.LEGACY_MARKER in plan.markers) == (fmt == "legacy")
        if fmt == "legacy":
            assert plan.markers[te_prefix + formats.LEGACY_MARKER].shape == (2,)


@pytest.mark.parametrize(
    ("tensors", "options", "message"),
    [
        (lambda: layouts.load("t5xxl").tensors, ConvertOptions(text_encoders=True), "full checkpoints"),
        (
            lambda: (
                layouts.load("sdxl_unet").prefixed(policy.FULL_CHECKPOINT_PREFIX)
                + layouts.load("clip_l").prefixed("conditioner.embedders.0.transformer.")
            ),
            ConvertOptions(text_encoders=True),
            "no T5 or LLM text encoder",
        ),
        (
            lambda: (
                layouts.load("flux1_dev").prefixed(policy.FULL_CHECKPOINT_PREFIX)
                + layouts.load("t5xxl").prefixed("text_encoders.t5xxl.transformer.")
            ),
            ConvertOptions(text_encoders=True, format="ultra8"),
            "comfy or legacy",
        ),
        (lambda: layouts.load("umt5_xxl").tensors, ConvertOptions(input_scales=True), "full precision"),
        (lambda: layouts.load("clip_l").tensors, ConvertOptions(), "nothing to quantize.*without fp8 scales"),
    ],
    ids=["not-a-checkpoint", "sdxl-clip-only", "ultra8", "te-input-scales", "clip"],
)
def test_text_encoder_refusals_say_why(tensors, options, message):
    with pytest.raises(ValueError, match=message):
        plan_conversion(_Source(tensors()), options)


def test_inspect_and_the_summary_name_the_family(flux_file, checkpoint_file, tmp_path):
    from quant_core.convert import convert_file
    from quant_core.inspection import inspect_file

    flux = PRESETS["flux"].family
    assert flux.startswith("Flux.1") and flux.endswith("(preset flux)")
    for source in (flux_file, checkpoint_file):  # a full checkpoint: the family of its diffusion model
        assert f"family    {flux}" in inspect_file(str(source)).text().splitlines()
    summary = convert_file(flux_file, tmp_path / "out.safetensors", ConvertOptions(method="nearest"))
    assert f"family    {flux}" in summary.text().splitlines()
    assert f"family    {flux}" in inspect_file(str(tmp_path / "out.safetensors")).text().splitlines()
