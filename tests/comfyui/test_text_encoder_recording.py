"""Recording a text encoder in a real ComfyUI: a tiny T5 built by ComfyUI's own CLIP machinery (the
Mochi/Flux T5-XXL target with a small config), prompts encoded by ComfyUI's CLIPTextEncode through the
Record node's CLIP, the Save node writes the file, the convert node rounds the text_encoders/ file with
GPTQ from it, and ComfyUI loads the result with its mixed-precision text-encoder ops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quant_core import io
from quant_core.calibration import RecordedStatistics
from quant_core.io import SafetensorsReader

from .conftest import COMFYUI_PATH, NODE_OPTIONS, relative_error, run_node

TINY_T5 = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 2, "d_kv": 32}
SOURCE = "text_encoders/tiny_t5_bf16.safetensors"
PROMPTS = ("a photo of a cat on a red sofa", "an oil painting of a lighthouse in a storm, dramatic light")


def _clip(comfy, state_dict: dict, quantized: bool = False):
    """ComfyUI's CLIP around its T5-XXL text encoder class, shrunk through ``t5xxl_model_config``."""
    from comfy.text_encoders.genmo import MochiT5Tokenizer, mochi_te

    target = comfy.supported_models_base.ClipTarget(
        MochiT5Tokenizer, mochi_te(t5_quantization_metadata={"mixed_ops": True} if quantized else None)
    )
    return comfy.sd.CLIP(target, state_dict=[state_dict], model_options={"t5xxl_model_config": TINY_T5})


@pytest.fixture(scope="module")
def tiny_t5(comfy, pack):
    """Random bf16 weights for the tiny T5, saved as a text_encoders/ file (keys as ComfyUI's T5 names them)."""
    from comfy.text_encoders.t5 import T5

    config = json.loads((Path(COMFYUI_PATH) / "comfy" / "text_encoders" / "t5_config_xxl.json").read_text())
    model = T5({**config, **TINY_T5}, torch.float32, "cpu", comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(3)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("layer_norm.weight"):
            state[name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            fan_in = tensor.shape[-1] if tensor.ndim > 1 else 1
            state[name] = (torch.randn(tensor.shape, generator=generator) / fan_in**0.5).to(torch.bfloat16)
    io.write_file(pack[2] / SOURCE, state)
    return state


def _encode(clip, text: str) -> torch.Tensor:
    import nodes

    with torch.inference_mode():
        (conditioning,) = nodes.CLIPTextEncode().encode(clip, text)
    return conditioning[0][0].float()


def test_prompts_encoded_through_the_record_node_calibrate_the_text_encoder_file(comfy, pack, tiny_t5):
    classes, _, root = pack
    clip = _clip(comfy, tiny_t5)
    record = classes["FP8ScaledRecordTextEncoderCalibration"]
    recording_clip, recording = run_node(record, clip=clip, max_memory_mib=64, layers="quantized").args
    conditioning = [_encode(recording_clip, prompt) for prompt in PROMPTS]
    plain = _encode(clip, PROMPTS[0])  # the input CLIP is not recorded
    assert torch.equal(plain, conditioning[0])  # and recording changes nothing
    saved = run_node(
        classes["FP8ScaledSaveCalibration"],
        recording=recording,
        after=conditioning,
        filename_prefix="t5",
        keep_recording=False,
    )
    path = Path(saved.args[0])
    assert path == root / "fp8_calibration" / "t5_00001_.safetensors"
    assert "2 model calls" in saved.args[1]

    options = dict(NODE_OPTIONS, rounding="auto")
    converted = run_node(
        classes["FP8ScaledConvertFile"], source=SOURCE, filename_prefix="t5_fp8", calibration=path.name, **options
    )
    with RecordedStatistics(path) as statistics, SafetensorsReader(converted.args[0]) as reader:
        quantized = {k for k, info in reader.tensors.items() if info.dtype == torch.float8_e4m3fn}
        assert quantized and statistics.names == quantized  # named as the text_encoders/ file's keys
        assert not any(k.endswith(("input_scale", "scale_input")) for k in reader.tensors)
        fp8_state = {k: reader.read(k) for k in reader.tensors}
    assert f"rounding  {len(quantized)} gptq" in converted.args[1]
    assert "T5 / UMT5 text encoders" in converted.args[1]  # the summary names the family

    # ComfyUI's mixed-precision text-encoder ops (what t5_xxl_detect turns on for a quantized file) read
    # the scales: fp8 error on a 64-wide random T5 with two recorded prompts (measured 0.07 / 0.16 with
    # plain GPTQ, 0.20 on one prompt with its polishing passes, which two prompts' statistics cannot
    # judge; round-to-nearest gives 0.23 / 0.15). Plain ops (what CLIP-L/G get) would not: far off.
    loaded = _clip(comfy, fp8_state, quantized=True)
    unscaled = _clip(comfy, fp8_state, quantized=False)
    for prompt in PROMPTS:
        assert relative_error(_encode(loaded, prompt), _encode(clip, prompt)) < 0.3
        assert relative_error(_encode(unscaled, prompt), _encode(clip, prompt)) > 0.5
