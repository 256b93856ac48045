"""Every family whose ComfyUI class runs on the CPU at a tiny size: built with ComfyUI's own class and
random weights, converted at the default settings, then loaded back with strict key checking into the
same class built with ComfyUI's mixed-precision ops, as ComfyUI loads a quantized file. Strict loading
fails on any quantized-weight key a module does not consume (a scale on a convolution or a raw
parameter); every quantized layer must dequantize to its source weight, every other tensor load
bit-identical."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from quant_core.convert import ConvertOptions, convert_file
from quant_core.io import SafetensorsReader, write_file

from .conftest import COMFYUI_PATH, FLUX_CONFIG

FLUX = "comfy.ldm.flux.model.Flux"
TINY = {  # family -> (ComfyUI class, constructor arguments shrunk from the released config)
    "flux": (FLUX, FLUX_CONFIG),
    "flux2": (
        FLUX,
        dict(
            image_model="flux2",
            in_channels=16,
            out_channels=16,
            vec_in_dim=None,
            context_in_dim=64,
            hidden_size=128,
            mlp_ratio=3.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=[16, 16, 16, 16],
            theta=2000,
            patch_size=1,
            qkv_bias=False,
            ops_bias=False,
            guidance_embed=True,
            global_modulation=True,
            mlp_silu_act=True,
            txt_ids_dims=[3],
        ),
    ),
    "chroma": (
        "comfy.ldm.chroma.model.Chroma",
        dict(
            in_channels=64,
            out_channels=64,
            context_in_dim=64,
            hidden_size=128,
            mlp_ratio=4.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=[16, 24, 24],
            theta=10000,
            qkv_bias=True,
            in_dim=64,
            out_dim=128,
            hidden_dim=64,
            n_layers=2,
            patch_size=2,
            vec_in_dim=None,
            txt_ids_dims=[],
        ),
    ),
    "qwen_image": (
        "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
        dict(
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=64,
            axes_dims_rope=(8, 12, 12),
        ),
    ),
    "lumina2": (
        "comfy.ldm.lumina.model.NextDiT",
        dict(
            in_channels=16,
            dim=64,
            n_layers=2,
            n_heads=2,
            n_kv_heads=2,
            multiple_of=16,
            ffn_dim_multiplier=8.0 / 3.0,
            qk_norm=True,
            cap_feat_dim=32,
            axes_dims=[8, 12, 12],
            axes_lens=[64, 64, 64],
            z_image_modulation=True,
            time_scale=1000.0,
            pad_tokens_multiple=32,
        ),
    ),
    "hidream": (
        "comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            caption_channels=[32, 32],
            text_emb_dim=32,
            axes_dims_rope=(16, 8, 8),
            llama_layers=[0, 1],
        ),
    ),
    "sd3": (
        "comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",
        dict(
            in_channels=16,
            out_channels=16,
            depth=2,
            patch_size=2,
            adm_in_channels=64,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
            pos_embed_max_size=16,
            num_patches=256,
            qk_norm="rms",
            x_block_self_attn_layers=[0],
        ),
    ),
    "wan": (
        "comfy.ldm.wan.model.WanModel",
        dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, in_dim=16, out_dim=16),
    ),
    "hunyuan_video": (
        "comfy.ldm.hunyuan_video.model.HunyuanVideo",
        dict(
            image_model="hunyuan_video",
            in_channels=16,
            out_channels=16,
            patch_size=[1, 1, 1],
            vec_in_dim=None,
            context_in_dim=32,
            hidden_size=64,
            mlp_ratio=4.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=1,
            axes_dim=[8, 12, 12],
            theta=256,
            qkv_bias=True,
            guidance_embed=False,
            byt5=True,
            use_cond_type_embedding=True,
            vision_in_dim=32,
            meanflow=False,
            meanflow_sum=True,
        ),
    ),
    "ltxv": (
        "comfy.ldm.lightricks.model.LTXVModel",
        dict(in_channels=16, cross_attention_dim=64, attention_head_dim=32, num_attention_heads=2, caption_channels=32)
        | {"num_layers": 2},
    ),
    "ltx2": (
        "comfy.ldm.lightricks.av_model.LTXAVModel",
        dict(
            in_channels=16,
            audio_in_channels=16,
            cross_attention_dim=64,
            audio_cross_attention_dim=32,
            attention_head_dim=32,
            audio_attention_head_dim=16,
            num_attention_heads=2,
            audio_num_attention_heads=2,
            caption_channels=32,
            num_layers=2,
        ),
    ),
    "unet": (
        "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",
        dict(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            num_res_blocks=[1, 1],
            channel_mult=[1, 2],
            transformer_depth=[1, 1],
            transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1],
            context_dim=32,
            num_head_channels=16,
            use_linear_in_transformer=True,
            use_spatial_transformer=True,
            legacy=False,
            num_classes="sequential",
            adm_in_channels=64,
        ),
    ),
    # Text encoders take (config, dtype, device, operations); the T5 config is completed from ComfyUI's json.
    "t5": ("comfy.text_encoders.t5.T5", dict(d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32)),
    "llm": (
        "comfy.text_encoders.llama.Qwen3_4B",
        dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1),
    ),
}


FAMILY = {"ltx2": "ltxv"}  # fixtures named by release; presets by family


def _build(cls_path: str, config: dict, operations, dtype):
    module_name, _, class_name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if module_name == "comfy.text_encoders.t5":
        base = json.loads((Path(COMFYUI_PATH) / "comfy" / "text_encoders" / "t5_config_xxl.json").read_text())
        return cls({**base, **config}, dtype, "cpu", operations)
    if module_name.startswith("comfy.text_encoders."):
        return cls(config, dtype, "cpu", operations)
    return cls(**config, operations=operations, dtype=dtype, device="cpu")


@pytest.mark.parametrize("family", list(TINY))
def test_converted_family_loads_into_comfyui_mixed_precision_ops(comfy, family, tmp_path):
    cls_path, config = TINY[family]
    source = _build(cls_path, config, comfy.ops.disable_weight_init, torch.float32)
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(t.shape, generator=generator) / (t.shape[-1] if t.ndim > 1 else 1) ** 0.5).to(torch.bfloat16)
        for name, t in source.state_dict().items()
        if t.is_floating_point()
    }
    write_file(tmp_path / "source.safetensors", state)
    summary = convert_file(
        tmp_path / "source.safetensors", tmp_path / "fp8.safetensors", ConvertOptions(rounding="nearest")
    )
    assert summary.preset == FAMILY.get(family, family)
    with SafetensorsReader(tmp_path / "fp8.safetensors") as reader:
        converted = {name: reader.read(name) for name in reader.tensors}
    quantized = {k.removesuffix(".comfy_quant") for k in converted if k.endswith(".comfy_quant")}
    assert quantized

    ops = comfy.ops.mixed_precision_ops({"mixed_ops": True}, torch.bfloat16, full_precision_mm=True)
    loaded = _build(cls_path, config, ops, torch.bfloat16)
    missing, unexpected = loaded.load_state_dict(converted, strict=False)
    assert not unexpected  # every scale and comfy_quant key was consumed by a Linear
    assert set(missing) <= {k for k in source.state_dict() if k not in state}  # non-float buffers only
    modules = dict(loaded.named_modules())
    for layer in quantized:
        weight = modules[layer].weight
        assert type(weight).__name__ == "QuantizedTensor" or type(weight.data).__name__ == "QuantizedTensor"
        original = state[f"{layer}.weight"].float()
        error = (weight.dequantize().float() - original).norm() / original.norm()
        assert error < 0.1, layer
    kept = {k: v for k, v in loaded.state_dict().items() if k in state and k.rsplit(".", 1)[0] not in quantized}
    assert kept and all(torch.equal(v.to(torch.bfloat16), state[k]) for k, v in kept.items())
