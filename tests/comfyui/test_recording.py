"""Recording calibration in a real ComfyUI: ComfyUI's own KSampler samples the tiny Flux through the
Record node's MODEL, the Save node writes the file, and both convert nodes round with GPTQ from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quant_core import formats
from quant_core.calibration import RecordedStatistics
from quant_core.io import SafetensorsReader

from .conftest import NODE_OPTIONS, forward, relative_error, run_node

SOURCE = "diffusion_models/tiny_flux_bf16.safetensors"
CALIBRATED = dict(NODE_OPTIONS, rounding="auto")


def _conditioning(seed: int) -> list:
    """A "prompt" for the tiny Flux: T5-like tokens and a pooled CLIP-like vector, as CLIPTextEncode gives."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, 8, 128, generator=generator)
    return [[tokens, {"pooled_output": torch.randn(1, 64, generator=generator), "guidance": 3.5}]]


def _ksampler(model, seed: int, steps: int = 3) -> dict:
    """ComfyUI's KSampler node (cfg > 1: conditional and unconditional batches) on a 128x128 latent."""
    import nodes

    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    with torch.inference_mode():
        (out,) = nodes.KSampler().sample(
            model, seed, steps, 2.0, "euler", "simple", _conditioning(seed), _conditioning(seed + 100), latent
        )
    return out


@pytest.fixture
def model(comfy, pack):
    return comfy.sd.load_diffusion_model(str(pack[2] / SOURCE))


def _record(classes, model, memory: int = 256, layers: str = "quantized"):
    return run_node(classes["FP8ScaledRecordCalibration"], model=model, max_memory_mib=memory, layers=layers).args


def _save(classes, recording, after, prefix: str, keep: bool = False):
    node = classes["FP8ScaledSaveCalibration"]
    return run_node(node, recording=recording, after=after, filename_prefix=prefix, keep_recording=keep)


def _rounding(report: str) -> str:
    """The summary's line that counts quantized weights per rounding method."""
    return next(line for line in report.splitlines() if line.startswith("rounding"))


def test_sampling_records_what_both_convert_nodes_use(comfy, pack, model, tiny_flux):
    classes, _, root = pack
    _, reference, inputs = tiny_flux
    recording_model, recording = _record(classes, model)
    saved = _save(classes, recording, _ksampler(recording_model, seed=1), "flux")
    path = Path(saved.args[0])
    assert path == root / "fp8_calibration" / "flux_00001_.safetensors"
    assert "3 model calls" in saved.args[1] and "freed now" in saved.args[1]
    assert saved.ui.as_dict() == {"text": (saved.args[1],)}  # shown on the node

    convert_model = classes["FP8ScaledConvertModel"]
    by_path = run_node(convert_model, model=model, filename_prefix="cal", calibration_path=str(path), **CALIBRATED)
    with RecordedStatistics(path) as statistics, SafetensorsReader(by_path.args[0]) as converted:
        quantized = {k for k, info in converted.tensors.items() if info.dtype == torch.float8_e4m3fn}
        assert statistics.names == quantized  # named as the converter names the weights, no more
    assert f"{len(quantized)} recorded" in saved.args[1]
    assert _rounding(by_path.args[1]) == f"rounding  {len(quantized)} gptq"  # none learned
    loaded = comfy.sd.load_diffusion_model(by_path.args[0])
    assert relative_error(forward(loaded.model.diffusion_model, inputs), forward(reference, inputs)) < 0.08

    convert_file = classes["FP8ScaledConvertFile"]
    by_name = run_node(convert_file, source=SOURCE, filename_prefix="cal_file", calibration=path.name, **CALIBRATED)
    assert _rounding(by_name.args[1]) == _rounding(by_path.args[1])

    # fp8_compute 'calibrated': the recorded layers get their input scale and stay on fp8 compute
    options = dict(CALIBRATED, fp8_compute="calibrated")
    scaled = run_node(convert_file, source=SOURCE, filename_prefix="cal_fp8", calibration=path.name, **options)
    with SafetensorsReader(scaled.args[0]) as converted:
        layers = [k for k, info in converted.tensors.items() if info.dtype == torch.float8_e4m3fn]
        settings = [formats.read_activation("comfy", k, converted.read, set(converted.tensors)) for k in layers]
    assert settings and all(a.input_scale is not None and not a.full_precision for a in settings)


def test_the_input_model_is_not_recorded(comfy, pack, model):
    classes, _, root = pack
    alone_model, alone = _record(classes, model)
    alone_path = _save(classes, alone, _ksampler(alone_model, seed=1), "alone").args[0]

    mixed_model, mixed = _record(classes, model)
    _ksampler(model, seed=5)  # the input MODEL, sampled before and after the recording one
    latent = _ksampler(mixed_model, seed=1)
    _ksampler(model, seed=6)
    mixed_path = _save(classes, mixed, latent, "mixed").args[0]
    assert Path(mixed_path).read_bytes() == Path(alone_path).read_bytes()


def test_all_layers_memory_cap_and_errors(comfy, pack, model):
    classes, _, root = pack
    everything_model, everything = _record(classes, model, layers="all")
    # 3 steps: Recorder.save fails on a sketched (wide) layer that saw fewer rows than the sketch rank
    path = _save(classes, everything, _ksampler(everything_model, seed=2, steps=3), "all").args[0]
    with RecordedStatistics(path) as statistics, SafetensorsReader(root / SOURCE) as source:
        linear = {k for k, info in source.tensors.items() if k.endswith(".weight") and len(info.shape) == 2}
        assert statistics.names == linear  # modulation, embedders and final layer too

    recording_model, recording = _record(classes, model, memory=16, layers="all")
    report = _save(classes, recording, _ksampler(recording_model, seed=2, steps=3), "capped").args[1]
    assert "over the memory cap" in report
    with pytest.raises(ValueError, match="nothing was recorded"):
        _save(classes, recording, None, "again")
    with pytest.raises(ValueError, match="needs rounding .auto. or .learned."):
        run_node(
            classes["FP8ScaledConvertModel"],
            model=model,
            filename_prefix="x",
            calibration="capped_00001_.safetensors",
            **NODE_OPTIONS,
        )
