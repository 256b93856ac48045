"""The recording workflow queued on a real ComfyUI server: the executor runs Record -> KSampler -> Save ->
Convert in order through the custom and any-type links, and a re-queued run records anew."""

from __future__ import annotations

from pathlib import Path

from .conftest import NODE_OPTIONS
from .test_web import run_prompt, server  # noqa: F401 - the server fixture, started for this module

FLUX = "tiny_flux_bf16.safetensors"
CONVERT = dict(NODE_OPTIONS, rounding="auto")


def recording_prompt(seed: int, keep: bool = False) -> dict:
    """The shape of api_workflows/fp8_calibrate_on_your_prompts_api.json, on the tiny Flux."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX, "weight_dtype": "default"}},
        "2": {"class_type": "FP8TestConditioning", "inputs": {"seed": 1}},
        "3": {"class_type": "FP8TestConditioning", "inputs": {"seed": 2}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {
            "class_type": "FP8ScaledRecordCalibration",
            "inputs": {"model": ["1", 0], "max_memory_mib": 256, "layers": "quantized"},
        },
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["5", 0],
                "seed": seed,
                "steps": 3,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "7": {
            "class_type": "FP8ScaledSaveCalibration",
            "inputs": {"recording": ["5", 1], "after": ["6", 0], "filename_prefix": "server", "keep_recording": keep},
        },
        "8": {
            "class_type": "FP8ScaledConvertModel",
            "inputs": dict(CONVERT, model=["1", 0], filename_prefix="server_cal", calibration_path=["7", 0]),
        },
    }


def _executed(messages: list) -> dict[str, dict]:
    return {m["data"]["node"]: m["data"]["output"] for m in messages if m["type"] == "executed"}


def test_recording_workflow_on_the_server(server):  # noqa: F811 - the imported fixture
    url, base = server
    first = run_prompt(url, recording_prompt(seed=1))
    assert first[-1]["type"] == "execution_success", first[-1]
    shown = _executed(first)
    saved, converted = shown["7"]["text"][0], shown["8"]["text"][0]
    calibration = base / "models" / "fp8_calibration" / "server_00001_.safetensors"
    assert f"saved     {calibration}" in saved and "3 model calls" in saved and "freed now" in saved
    rounding = next(line for line in converted.splitlines() if line.startswith("rounding"))
    assert rounding.endswith(" gptq")  # every quantized weight from the recording
    output = Path(converted.splitlines()[0].split()[1])  # "output    <path> (comfy, preset flux)"
    assert output.name == "server_cal_00001_.safetensors" and output.is_file()

    again = run_prompt(url, recording_prompt(seed=1))  # all cached: nothing runs, nothing is saved
    assert again[-1]["type"] == "execution_success" and _executed(again)["7"]["text"][0] == saved  # replayed
    assert not calibration.with_name("server_00002_.safetensors").exists()

    reseeded = run_prompt(url, recording_prompt(seed=2))  # the cached Record node, a new sampling run
    assert reseeded[-1]["type"] == "execution_success", reseeded[-1]
    second = _executed(reseeded)["7"]["text"][0]
    assert "server_00002_.safetensors" in second and "3 model calls" in second  # recorded anew after the save
