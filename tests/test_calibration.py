"""Recorded input statistics and the GPTQ rounding that uses them."""

from __future__ import annotations

import pytest
import torch

from quant_core import fp8, io
from quant_core.calibration import RecordedStatistics, Recorder
from quant_core.convert import ConvertOptions, convert_file
from quant_core.gptq import output_error, round_gptq

E4M3 = torch.float8_e4m3fn


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16), torch.nn.Embedding(10, 16)
    )


def low_rank_inputs(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(4, 32, generator=torch.Generator().manual_seed(99))
    return torch.randn(count, 4, generator=generator) @ mixing + 0.05 * torch.randn(count, 32, generator=generator)


def run(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    model[2](model[1](model[0](inputs)))


def test_recorder_sums_second_moments_of_alternating_rows():
    model = small_model()
    batches = [low_rank_inputs(7, seed) for seed in range(3)]  # odd sizes: the alternation spans calls
    with Recorder(model) as recorder:
        for batch in batches:
            run(model, batch)
    rows = torch.cat(batches)
    stats = recorder.stats["0.weight"]
    assert torch.allclose(stats.gram, rows[0::2].T @ rows[0::2], atol=1e-4)
    assert torch.allclose(stats.gram_heldout, rows[1::2].T @ rows[1::2], atol=1e-4)
    assert (stats.count, stats.count_heldout) == (11, 10)
    assert stats.input_absmax == pytest.approx(float(rows.abs().max()))
    assert set(recorder.stats) == {"0.weight", "2.weight"}, "embeddings are not Linear layers"
    assert recorder.nbytes == 2 * 4 * (32 * 32 + 64 * 64)


def test_recorder_removes_its_hooks_and_skips_wide_layers():
    model = small_model()
    with Recorder(model, max_features=32) as recorder:
        run(model, low_rank_inputs(4, 0))
    assert recorder.skipped == ["2.weight"]
    run(model, low_rank_inputs(4, 1))
    assert recorder.stats["0.weight"].count == 2, "no recording after the with-block"


def test_statistics_file_round_trip(tmp_path):
    model = small_model()
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(50, 0))
    recorder.save(tmp_path / "calibration.safetensors")
    loaded = RecordedStatistics(tmp_path / "calibration.safetensors")
    assert loaded.names == {"0.weight", "2.weight"}
    original, read = recorder.stats["2.weight"], loaded.get("2.weight")
    assert torch.equal(read.gram, original.gram) and torch.equal(read.gram_heldout, original.gram_heldout)
    assert (read.count, read.count_heldout, read.input_absmax) == (
        original.count,
        original.count_heldout,
        pytest.approx(original.input_absmax),
    )
    assert loaded.get("missing.weight") is None
    loaded.close()


def test_a_checkpoint_is_not_a_calibration_file(tmp_path):
    io.write_file(tmp_path / "model.safetensors", {"a.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not a calibration file"):
        RecordedStatistics(tmp_path / "model.safetensors")


def recorded(model: torch.nn.Module, name: str, count: int = 400):
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(count, 1))
    return recorder.stats[name]


def test_gptq_beats_round_to_nearest_on_held_out_statistics_and_stays_on_the_grid():
    model = small_model()
    stats = recorded(model, "0.weight")
    weight = model[0].weight.detach()
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    result = round_gptq(weight, scale, E4M3, stats)
    rtn = fp8.quantize_nearest(weight, scale, E4M3)
    assert not result.fell_back
    assert result.error < 0.5 * result.error_rtn
    assert result.error_rtn == pytest.approx(output_error(weight, rtn.float() * scale, stats.gram_heldout.double()))
    assert result.quantized.dtype == E4M3 and result.quantized.shape == weight.shape
    assert torch.isfinite(result.quantized.float()).all()
    # error feedback moves values, but only to representable values within the saturating range
    assert result.quantized.float().abs().max() <= fp8.fp8_max(E4M3)


def test_gptq_falls_back_when_the_held_out_half_disagrees():
    model = small_model()
    stats = recorded(model, "0.weight")
    stats.gram_heldout = torch.eye(32)  # held-out inputs unlike the fitting half: isotropic
    weight = model[0].weight.detach()
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    result = round_gptq(weight, scale, E4M3, stats)
    assert result.fell_back and torch.equal(
        result.quantized.view(torch.uint8), fp8.quantize_nearest(weight, scale, E4M3).view(torch.uint8)
    )
    assert result.error == result.error_rtn


def model_file(model: torch.nn.Module, path) -> None:
    io.write_file(path, {k: v.detach().contiguous() for k, v in model.state_dict().items()})


def test_convert_with_calibration_uses_gptq_where_statistics_exist(tmp_path):
    model = small_model()
    model_file(model, tmp_path / "model.safetensors")
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(400, 1))
    del recorder.stats["2.weight"]
    recorder.save(tmp_path / "calibration.safetensors")
    options = ConvertOptions(
        preset="none", min_tensor_size=0, exclude=[r"^3\."], calibration=str(tmp_path / "calibration.safetensors")
    )
    options.rounding.num_iter = 5
    summary = convert_file(tmp_path / "model.safetensors", tmp_path / "out.safetensors", options)
    methods = {r.name: r.method for r in summary.reports if r.quantized}
    assert methods == {"0.weight": "gptq", "2.weight": "learned"}
    assert summary.methods == {"gptq": 1, "learned": 1}


def test_statistics_of_another_model_are_refused(tmp_path):
    model = small_model()
    model_file(model, tmp_path / "model.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(8, 64))
    with Recorder(other) as recorder:
        other(torch.randn(10, 8))
    recorder.save(tmp_path / "calibration.safetensors")
    options = ConvertOptions(preset="none", min_tensor_size=0, calibration=str(tmp_path / "calibration.safetensors"))
    with pytest.raises(ValueError, match="another model"):
        convert_file(tmp_path / "model.safetensors", tmp_path / "out.safetensors", options)
    assert not (tmp_path / "out.safetensors").exists()
