"""Recorded input statistics and the GPTQ rounding that uses them."""

from __future__ import annotations

import pytest
import torch

from bench.comfy_fp8 import output_error
from quant_core import fp8, gptq, io, native
from quant_core.calibration import (
    STATISTICS_METADATA,
    Gram,
    LayerStatistics,
    LowRankGram,
    RandomCalibration,
    RecordedStatistics,
    Recorder,
    RowSample,
    exact_layers,
    save_statistics,
    statistics_tensors,
)
from quant_core.convert import ConvertOptions, Rounder, compute_workers, convert_file, plan_conversion
from quant_core.gptq import _polish, round_gptq
from quant_core.io import SafetensorsReader

E4M3 = torch.float8_e4m3fn


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def column_loops(request, monkeypatch):
    """Every test here runs with GPTQ's compiled column loops (``native``) and with the torch loops."""
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler here: the compiled loops cannot be built")
    return request.param


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
    stats = recorder.statistics()["0.weight"]
    assert torch.allclose(stats.fit.matrix, rows[0::2].T @ rows[0::2], atol=1e-4)
    assert torch.allclose(stats.heldout.matrix, rows[1::2].T @ rows[1::2], atol=1e-4)
    assert (stats.count, stats.count_heldout) == (11, 10)
    assert stats.input_absmax == pytest.approx(float(rows.abs().max()))
    assert recorder.names == ["0.weight", "2.weight"], "embeddings are not Linear layers"
    assert recorder.nbytes == 2 * 4 * (32 * 32 + 64 * 64)


def test_recorder_removes_its_hooks():
    model = small_model()
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(4, 0))
    run(model, low_rank_inputs(4, 1))
    assert recorder.statistics()["0.weight"].count == 2, "no recording after the with-block"


def test_exact_statistics_go_to_the_narrowest_layers_that_fit_the_memory():
    widths = {"wide": 64, "narrow": 32, "widest": 128, "too wide": 4096}
    assert exact_layers(widths, 4096, 2 * 4 * (32 * 32 + 64 * 64)) == {"narrow", "wide"}
    assert exact_layers(widths, 48, 1 << 30) == {"narrow"}
    model = small_model()
    with Recorder(model, rank=8, exact_bytes=2 * 4 * 32 * 32) as recorder:
        run(model, low_rank_inputs(40, 0))
    statistics = recorder.statistics()
    assert isinstance(statistics["0.weight"].fit, Gram) and isinstance(statistics["2.weight"].fit, LowRankGram)
    assert recorder.nbytes < 2 * 4 * (32 * 32 + 64 * 64)


def test_wide_layers_keep_a_bounded_sketch_with_an_exact_diagonal():
    model = small_model()
    batches = [low_rank_inputs(9, seed) for seed in range(40)]
    with Recorder(model, rank=8, exact_limit=16) as recorder:
        for batch in batches[:4]:  # enough held-out rows to fill the sample
            run(model, batch)
        memory = recorder.nbytes
        for batch in batches[4:]:
            run(model, batch)
    assert recorder.nbytes == memory, "memory must not grow with the number of rows"
    assert memory < 2 * 4 * (32 * 32 + 64 * 64), "smaller than the exact statistics"
    rows = torch.cat(batches)
    fit_rows, held_rows = rows[0::2], rows[1::2]
    stats = recorder.statistics()["0.weight"]
    assert isinstance(stats.fit, LowRankGram) and isinstance(stats.heldout, RowSample)
    assert stats.fit.factor.shape == (32, 8) and stats.heldout.rows.shape == (8, 32)
    gram = fit_rows.T @ fit_rows
    assert torch.allclose(stats.fit.diagonal(), torch.diagonal(gram), rtol=1e-4)
    approx = stats.fit.factor @ stats.fit.factor.T + torch.diag(stats.fit.residual())
    assert float((approx - gram).norm() / gram.norm()) < 0.01, "rank 4 inputs plus noise: rank 8 captures them"
    distance = (stats.heldout.rows[:, None, :] - held_rows[None]).abs().amax(dim=2)
    assert float(distance.min(dim=1).values.max()) == 0, "the held-out sample holds real held-out rows"
    position = distance.argmin(dim=1)
    assert (position < len(held_rows) // 2).any() and (position >= len(held_rows) // 2).any(), "sampled throughout"


def test_sketch_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        Recorder(small_model(), rank=0)


def test_statistics_file_round_trip(tmp_path):
    model = small_model()
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(50, 0))
    recorder.save(tmp_path / "calibration.safetensors")
    loaded = RecordedStatistics(tmp_path / "calibration.safetensors")
    assert loaded.names == {"0.weight", "2.weight"}
    original, read = recorder.statistics()["2.weight"], loaded.get("2.weight")
    assert torch.equal(read.fit.matrix, original.fit.matrix)
    assert torch.equal(read.heldout.matrix, original.heldout.matrix)
    assert (read.count, read.count_heldout, read.input_absmax) == (
        original.count,
        original.count_heldout,
        pytest.approx(original.input_absmax),
    )
    assert loaded.get("missing.weight") is None
    loaded.close()


def test_sketched_statistics_file_round_trip(tmp_path):
    model = small_model()
    with Recorder(model, rank=8, exact_limit=16) as recorder:
        run(model, low_rank_inputs(50, 0))
    recorder.save(tmp_path / "calibration.safetensors")
    with RecordedStatistics(tmp_path / "calibration.safetensors") as loaded:
        read = loaded.get("2.weight")
    original = recorder.statistics()["2.weight"]
    assert torch.equal(read.fit.factor, original.fit.factor)
    assert torch.equal(read.fit.diagonal(), original.fit.diagonal())
    assert torch.equal(read.heldout.rows, original.heldout.rows)
    assert read.in_features == 64


def test_statistics_read_into_a_pool_reuse_its_memory_once_dropped(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs, rank = 4096, 128  # a factor of 2 MiB: the pool's size
    stats = LayerStatistics(
        LowRankGram(torch.randn(inputs, rank, generator=generator), torch.rand(inputs, generator=generator)),
        RowSample(torch.randn(rank, inputs, generator=generator)),
        100,
        50,
        3.0,
    )
    save_statistics(tmp_path / "calibration.safetensors", {"w": stats})
    pool = io.BufferPool()
    with RecordedStatistics(tmp_path / "calibration.safetensors") as loaded:
        first = loaded.get("w", inputs, pool)
        assert torch.equal(first.fit.factor, stats.fit.factor)
        assert torch.equal(first.heldout.rows, stats.heldout.rows)
        assert pool.nbytes >= 2 * inputs * rank * 4  # the factor and the held-out rows came from the pool
        second = loaded.get("w", inputs, pool)  # while the first is alive: memory of its own
        both = {t.data_ptr() for s in (first, second) for t in (s.fit.factor, s.heldout.rows)}
        assert len(both) == 4
        assert torch.equal(first.fit.factor, stats.fit.factor)
        held = pool.nbytes
        del first, second
        third = loaded.get("w", inputs, pool)
        assert {third.fit.factor.data_ptr(), third.heldout.rows.data_ptr()} <= both
        assert pool.nbytes == held
        assert torch.equal(third.fit.factor, stats.fit.factor)


def test_a_checkpoint_is_not_a_calibration_file(tmp_path):
    io.write_file(tmp_path / "model.safetensors", {"a.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not a calibration file"):
        RecordedStatistics(tmp_path / "model.safetensors")


def test_a_calibration_file_of_another_version_is_refused(tmp_path):
    """Version 1 files held other tensors: reading them as version 2 would fail obscurely or mislead."""
    model = small_model()
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(10, 0))
    tensors = {
        k: t for name, stats in recorder.statistics().items() for k, t in statistics_tensors(name, stats).items()
    }
    io.write_file(tmp_path / "old.safetensors", tensors, {**STATISTICS_METADATA, "version": "1"})
    with pytest.raises(ValueError, match="version 1.*reads version 2: record it again"):
        RecordedStatistics(tmp_path / "old.safetensors")


def recorded(model: torch.nn.Module, name: str, count: int = 400):
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(count, 1))
    return recorder.statistics()[name]


def test_gptq_beats_round_to_nearest_on_held_out_statistics_and_stays_on_the_grid():
    model = small_model()
    stats = recorded(model, "0.weight")
    weight = model[0].weight.detach()
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    result = round_gptq(weight, scale, E4M3, stats)
    rtn = fp8.quantize_nearest(weight, scale, E4M3)
    assert not result.fell_back
    assert result.error < 0.5 * result.error_rtn
    # the check's products are bfloat16 where the CPU has it natively (2^-9 per element, see _product_dtype)
    assert result.error_rtn == pytest.approx(output_error(weight, rtn.float() * scale, stats.heldout), rel=1e-3)
    assert result.quantized.dtype == E4M3 and result.quantized.shape == weight.shape
    assert torch.isfinite(result.quantized.float()).all()
    # error feedback moves values, but only to representable values within the saturating range
    assert result.quantized.float().abs().max() <= fp8.fp8_max(E4M3)


def test_gptq_falls_back_when_the_held_out_half_disagrees():
    model = small_model()
    stats = recorded(model, "0.weight")
    stats.heldout = Gram(torch.eye(32))  # held-out inputs unlike the fitting half: isotropic
    weight = model[0].weight.detach()
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    result = round_gptq(weight, scale, E4M3, stats)
    assert result.fell_back and torch.equal(
        result.quantized.view(torch.uint8), fp8.quantize_nearest(weight, scale, E4M3).view(torch.uint8)
    )
    assert result.error == result.error_rtn


@pytest.mark.parametrize("product", [torch.float32, torch.bfloat16])
def test_the_held_out_check_of_exact_statistics_agrees_with_the_float64_quadratic_form(product):
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(300, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    gram = inputs.T @ inputs
    delta = torch.randn(20, 64, generator=generator)
    exact = Gram(gram).quadratic(delta)
    checked = gptq._ProductGram(gram.to(product)).quadratics(delta[None])[0]
    assert checked == pytest.approx(exact, rel=1e-5 if product == torch.float32 else 1e-2)


def float64_errors(weight, scale, candidates, inputs) -> list[float]:
    """Each candidate's held-out error relative to the weight's, all in float64 (the reference)."""
    outputs = inputs.double() @ weight.double().T
    reference = float(outputs.square().sum())
    values = [fp8.quantize_nearest(weight, scale, E4M3) if c is None else c for c in candidates]
    return [
        float((inputs.double() @ (v.double() * scale - weight.double()).T).square().sum() / reference) ** 0.5
        for v in values
    ]


@pytest.mark.parametrize("shape", [(37, 100), (5, 33)])
@pytest.mark.parametrize("product", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("held", ["sample", "exact"])
def test_the_held_out_check_gives_each_candidates_float64_error(monkeypatch, shape, product, held):
    """Every candidate of a list with round-to-nearest twice, by blocks of rows with a ragged last one
    (16 and 5 rows), the weight in bfloat16 as in a conversion: the errors of the fused product are
    each candidate's own, and the same as the per-candidate quadratic forms."""
    monkeypatch.setattr(gptq, "_CHECK_ELEMENTS", 20 * shape[1])  # 20 rows: blocks of 16
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(shape, generator=generator).bfloat16()
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    inputs = (torch.randn(64, shape[1], generator=generator) * torch.linspace(0.1, 3, shape[1])).to(product)
    heldout = (
        RowSample(inputs) if held == "sample" else gptq._ProductGram((inputs.T.float() @ inputs.float()).to(product))
    )
    candidates = (
        None,
        fp8.quantize_nearest(weight * 1.05, scale, E4M3),
        None,
        fp8.quantize_nearest(weight, scale / 2, E4M3),
    )
    errors = gptq._heldout_errors(weight, scale, E4M3, candidates, heldout)
    assert errors[0] == errors[2]
    expected = float64_errors(weight, scale, candidates, inputs)
    assert errors == pytest.approx(expected, rel=1e-5 if product == torch.float32 else 2e-3)
    # the per-candidate computation (one quadratic form per candidate over the whole weight)
    values = [fp8.quantize_nearest(weight, scale, E4M3) if c is None else c for c in candidates]
    deltas = [(v.float() * scale - weight.float()).to(product) for v in values]
    quadratic = (lambda d: heldout.quadratics(d[None])[0]) if held == "exact" else heldout.quadratic
    reference = quadratic(weight.to(product))
    separate = [(quadratic(delta) / reference) ** 0.5 for delta in deltas]
    assert errors == pytest.approx(separate, rel=1e-5)


def test_gptq_falls_back_when_the_held_out_row_sample_disagrees():
    """A sketched layer's check (a row sample) keeps round-to-nearest where GPTQ does worse on it."""
    model = small_model()
    stats = recorded(model, "0.weight")
    stats.heldout = RowSample(torch.randn(400, 32, generator=torch.Generator().manual_seed(4)))  # isotropic
    weight = model[0].weight.detach()
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    result = round_gptq(weight, scale, E4M3, stats)
    rtn = fp8.quantize_nearest(weight, scale, E4M3)
    assert result.fell_back and torch.equal(result.quantized.view(torch.uint8), rtn.view(torch.uint8))
    assert result.error == result.error_rtn
    assert result.error_rtn == pytest.approx(float64_errors(weight, scale, (None,), stats.heldout.rows)[0], rel=2e-3)


def test_gptq_fits_exact_statistics_on_both_halves():
    """With few fitting rows, the held-out half's rows make the fit: GPTQ on exact halves does better on
    fresh inputs than on the fitting half alone (what a sketched layer, whose held-out half is a row
    sample, still fits)."""
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    few, many, fresh = low_rank_inputs(6, 5), low_rank_inputs(400, 6), low_rank_inputs(2000, 7)
    exact = LayerStatistics(Gram(few.T @ few), Gram(many.T @ many), 6, 400, 1.0)
    fit_half_only = LayerStatistics(Gram(few.T @ few), RowSample(many), 6, 400, 1.0)
    both, alone = round_gptq(weight, scale, E4M3, exact), round_gptq(weight, scale, E4M3, fit_half_only)
    assert not both.fell_back and not alone.fell_back
    truth = Gram(fresh.T @ fresh)
    error_both = output_error(weight, both.quantized.float() * scale, truth)
    assert error_both < 0.5 * output_error(weight, alone.quantized.float() * scale, truth)


def model_file(model: torch.nn.Module, path) -> None:
    io.write_file(path, {k: v.detach().contiguous() for k, v in model.state_dict().items()})


def test_convert_with_calibration_uses_gptq_where_statistics_exist(tmp_path):
    model = small_model()
    model_file(model, tmp_path / "model.safetensors")
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(400, 1))
    statistics = recorder.statistics()
    del statistics["2.weight"]
    save_statistics(tmp_path / "calibration.safetensors", statistics)
    options = ConvertOptions(
        preset="none", min_tensor_size=0, exclude=[r"^3\."], calibration=str(tmp_path / "calibration.safetensors")
    )
    options.learned.num_iter = 5
    for method, elsewhere in (("auto", "nearest"), ("learned", "learned")):
        options.rounding, options.overwrite = method, True
        summary = convert_file(tmp_path / "model.safetensors", tmp_path / "out.safetensors", options)
        methods = {r.name: r.method for r in summary.reports if r.quantized}
        assert methods == {"0.weight": "gptq", "2.weight": elsewhere}
        assert summary.methods == {"gptq": 1, elsewhere: 1}


def test_gptq_on_one_compute_thread_per_core_writes_the_same_file(tmp_path):
    """Calibrated rounding on the CPU runs one weight per core at once (``compute_workers``): the
    file and the summary's order are those of a single worker, whichever weight finishes first."""
    model = torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(6)))
    model_file(model, tmp_path / "model.safetensors")
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(400, 1))
    recorder.save(tmp_path / "calibration.safetensors")
    options = ConvertOptions(preset="none", min_tensor_size=0, calibration=str(tmp_path / "calibration.safetensors"))
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with SafetensorsReader(tmp_path / "model.safetensors") as reader, plan_conversion(reader, options) as plan:
                rounder = Rounder(plan, RandomCalibration(), io.BufferPool())
                assert len(compute_workers(plan, rounder, plan.items)) == count
            summary = convert_file(tmp_path / "model.safetensors", tmp_path / f"out{count}.safetensors", options)
            outputs.append(((tmp_path / f"out{count}.safetensors").read_bytes(), [r.name for r in summary.reports]))
    finally:
        torch.set_num_threads(threads)
    assert outputs[0] == outputs[1]
    assert outputs[0][1] == [name for item in plan.items for name in item]


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


def exact_and_factored_statistics() -> tuple[torch.Tensor, float, LayerStatistics, LayerStatistics]:
    """A weight, its scale, and the same inputs' statistics held exactly and as an exact factor
    (both judged on the exact held-out Gram)."""
    inputs = low_rank_inputs(600, 2)
    gram = (inputs.T @ inputs).double()
    factor = torch.linalg.cholesky(gram + 1e-6 * torch.eye(32, dtype=torch.float64)).float()
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    fitted = Gram(gram.float())
    dense = LayerStatistics(fitted, fitted, 300, 300, 1.0)
    low_rank = LayerStatistics(LowRankGram(factor, torch.diagonal(gram).float()), fitted, 300, 300, 1.0)
    return weight, scale, dense, low_rank


@pytest.mark.parametrize("product", [torch.float32, torch.bfloat16])
def test_low_rank_gptq_is_dense_gptq_when_the_factor_is_exact(monkeypatch, product):
    """The same algorithm up to rounding ties; bfloat16 products (taken where the device has them
    natively) move a few more ties, not the error."""
    monkeypatch.setattr(gptq, "_product_dtype", lambda device: product)
    weight, scale, dense, low_rank = exact_and_factored_statistics()
    passes = gptq.POLISH_PASSES  # the same passes (by default exact statistics get more)
    a, b = (
        round_gptq(weight, scale, E4M3, dense, passes=passes),
        round_gptq(weight, scale, E4M3, low_rank, passes=passes),
    )
    same = (a.quantized.view(torch.uint8) == b.quantized.view(torch.uint8)).float().mean()
    assert float(same) > (0.995 if product == torch.float32 else 0.98)
    assert b.error == pytest.approx(a.error, rel=1e-3 if product == torch.float32 else 1e-2)
    assert b.error < 0.5 * b.error_rtn


@pytest.mark.parametrize("product", [torch.float32, torch.bfloat16])
def test_sketched_polish_starts_from_the_errors_times_the_factor(monkeypatch, product):
    """The polish's sketch state ``D^T F``, made over several products and a partial last one, is
    the exact product of its operands in the product dtype up to rounding each product's sum to it
    (none in float32), and its operand is that state in the product dtype."""
    monkeypatch.setattr(gptq, "_product_dtype", lambda device: product)
    generator = torch.Generator().manual_seed(6)
    columns = 2 * gptq._START_COLUMNS + 3 * gptq.BLOCK + 5
    factor = torch.randn(columns, 24, generator=generator)
    error = torch.rand(columns, 50, generator=generator) - 0.5
    coupling = gptq._Coupling(LowRankGram(factor, factor.square().sum(1) + 1), error)
    exact = error.to(product).double().T @ factor.to(product).double()
    found = float((coupling.state.double() - exact).norm() / exact.norm())
    assert found < (2**-8 if product == torch.bfloat16 else 1e-6)  # 2^-9 per rounding
    assert torch.equal(coupling.operand, coupling.state.to(product))


@pytest.mark.parametrize("product", [torch.float32, torch.bfloat16])
def test_sketched_gptq_is_dense_gptq_over_several_blocks(monkeypatch, product):
    """Over whole blocks and a partial last one, with a dead input and a residual of mixed size, the
    sketched GPTQ rounds as GPTQ on the same ``H`` held exactly (up to ties; bfloat16 products
    move more of them, not the error), and the weight it rounds becomes the polish's start: each
    value minus the weight, as ``_errors`` makes it."""
    monkeypatch.setattr(gptq, "_product_dtype", lambda device: product)
    generator = torch.Generator().manual_seed(5)
    columns = 2 * gptq.BLOCK + 44
    factor = torch.randn(columns, 40, generator=generator) * torch.rand(columns, 1, generator=generator)
    residual = torch.rand(columns, generator=generator) ** 4  # some far below what the factor explains
    factor[7], residual[7] = 0.0, 0.0  # an input never seen
    sketch = LowRankGram(factor, factor.square().sum(1) + residual)
    exact = Gram(factor.double() @ factor.double().T + torch.diag(residual.double()))
    work = torch.randn(columns, 96, generator=generator) * 40
    dense, low_rank = (torch.empty(work.shape, dtype=E4M3) for _ in range(2))
    gptq._gptq_dense(work.clone(), exact, dense, 0.01, lambda *_: None)
    kept = work.clone()
    gptq._gptq_low_rank(work, sketch, low_rank, 0.01, lambda *_: None)
    assert torch.equal(work, gptq._errors(low_rank, kept.clone()))
    work = kept
    same = (dense.view(torch.uint8) == low_rank.view(torch.uint8)).float().mean()
    assert float(same) > (0.995 if product == torch.float32 else 0.9)

    def error(codes: torch.Tensor) -> float:
        delta = (codes.float() - work).double()
        return float(torch.einsum("io,ij,jo->", delta, exact.matrix, delta))

    assert error(low_rank) == pytest.approx(error(dense), rel=1e-3 if product == torch.float32 else 0.05)
    assert error(low_rank) < 0.2 * error(work.to(E4M3))


def test_polishing_never_raises_the_fitted_error_and_agrees_on_exact_and_factored_statistics():
    weight, scale, dense, low_rank = exact_and_factored_statistics()
    fitted = dense.fit
    errors = []
    for passes in (0, 1, 3):
        result = round_gptq(weight, scale, E4M3, dense, passes=passes)
        errors.append(output_error(weight, result.quantized.float() * scale, fitted))
        assert result.quantized.float().abs().max() <= fp8.fp8_max(E4M3)
    assert errors[2] <= errors[1] <= errors[0] and errors[2] < 0.97 * errors[0], errors
    polished = round_gptq(weight, scale, E4M3, low_rank, passes=3)
    assert output_error(weight, polished.quantized.float() * scale, fitted) == pytest.approx(errors[2], rel=0.02)


def test_exact_statistics_get_more_polishing_passes_by_default():
    weight, scale, dense, low_rank = exact_and_factored_statistics()
    codes = lambda result: result.quantized.view(torch.uint8)  # noqa: E731
    assert torch.equal(
        codes(round_gptq(weight, scale, E4M3, dense)),
        codes(round_gptq(weight, scale, E4M3, dense, passes=gptq.EXACT_POLISH_PASSES)),
    )
    assert torch.equal(
        codes(round_gptq(weight, scale, E4M3, low_rank)),
        codes(round_gptq(weight, scale, E4M3, low_rank, passes=gptq.POLISH_PASSES)),
    )


def test_polishing_moves_only_to_grid_neighbours_that_help():
    """From round-to-nearest with an identity H (weight error only) no step can help: nothing moves."""
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    rtn = fp8.quantize_nearest(weight, scale, E4M3)
    quantized = rtn.T.contiguous()
    _polish(gptq._errors(quantized, (weight / scale).T.contiguous()), quantized, Gram(torch.eye(32)), passes=2)
    assert torch.equal(quantized.T.view(torch.uint8), rtn.view(torch.uint8))


def neighbours_by_search(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next fp8 values below and above each code's value, found in the sorted list of all finite values."""
    every = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = torch.unique(every[torch.isfinite(every)])
    rank = torch.searchsorted(grid, codes.float())
    return grid[(rank - 1).clamp(min=0)], grid[(rank + 1).clamp(max=grid.numel() - 1)]


def test_a_polishing_pass_takes_the_best_neighbour_of_each_weight_in_turn():
    """One pass of ``_polish`` against a literal coordinate descent: column after column, every row
    tries its value one grid step down, unchanged and one step up, and keeps whichever gives its
    row the least ``d H d^T`` (evaluated in full, in float64). More columns than a block."""
    generator = torch.Generator().manual_seed(6)
    columns, rows = 160, 12
    inputs = torch.randn(400, columns, generator=generator) @ torch.randn(columns, columns, generator=generator)
    gram = (inputs.T @ inputs).double()
    scaled = 40 * torch.randn(columns, rows, generator=generator, dtype=torch.float64)  # one row per weight column
    codes = (scaled + 3 * torch.randn(columns, rows, generator=generator, dtype=torch.float64)).to(E4M3)
    polished = codes.clone()
    _polish(gptq._errors(polished, scaled.float()), polished, Gram(gram.float()), passes=1)

    values = codes.double()
    for column in range(columns):
        below, above = neighbours_by_search(codes[column])
        candidates = torch.stack([below.double(), values[column], above.double()])
        costs = []
        for candidate in candidates:
            values[column] = candidate
            error = values - scaled
            costs.append(torch.einsum("ir,ij,jr->r", error, gram, error))
        values[column] = candidates.gather(0, torch.stack(costs).argmin(0)[None])[0]
    same = polished.float().double() == values
    assert float(same.double().mean()) > 0.99, "the same choices up to float32 ties"
    cost = lambda v: float(torch.einsum("ir,ij,jr->", v - scaled, gram, v - scaled))  # noqa: E731
    assert cost(polished.float().double()) == pytest.approx(cost(values), rel=1e-4)
    assert cost(values) < 0.9 * cost(codes.double())


def test_gptq_on_a_sketch_beats_round_to_nearest_on_held_out_rows():
    model = small_model()
    with Recorder(model, rank=8, exact_limit=16) as recorder:
        for seed in range(20):
            run(model, low_rank_inputs(40, seed))
    stats = recorder.statistics()["0.weight"]
    weight = model[0].weight.detach()
    scale = fp8.scale_for(fp8.absmax(weight), E4M3)
    result = round_gptq(weight, scale, E4M3, stats)
    exact = low_rank_inputs(2000, 99)
    truth = Gram(exact.T @ exact)
    rtn = fp8.quantize_nearest(weight, scale, E4M3).float() * scale
    assert not result.fell_back
    assert output_error(weight, result.quantized.float() * scale, truth) < 0.5 * output_error(weight, rtn, truth)


def test_a_wide_layer_that_saw_fewer_rows_than_the_rank_gets_its_exact_statistics():
    layer = torch.nn.Linear(64, 8)
    rows = torch.randn(10, 64, generator=torch.Generator().manual_seed(5))
    with Recorder(layer, rank=16, exact_limit=32) as recorder, torch.no_grad():
        layer(rows)
    stats = recorder.statistics()["weight"]
    fit = rows[0::2]
    approx = stats.fit.factor @ stats.fit.factor.T + torch.diag(stats.fit.residual())
    assert torch.allclose(approx, fit.T @ fit, atol=1e-3 * float((fit.T @ fit).abs().max()))


def test_statistics_of_a_diffusion_model_apply_to_its_full_checkpoint(tmp_path):
    model = small_model()
    io.write_file(
        tmp_path / "full.safetensors",
        {f"model.diffusion_model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},
    )
    with Recorder(model) as recorder:
        run(model, low_rank_inputs(400, 1))
    recorder.save(tmp_path / "calibration.safetensors")
    options = ConvertOptions(preset="none", min_tensor_size=0, calibration=str(tmp_path / "calibration.safetensors"))
    options.exclude = [r"\.3\."]
    summary = convert_file(tmp_path / "full.safetensors", tmp_path / "out.safetensors", options)
    assert summary.methods == {"gptq": 2}


def test_a_sketch_permuted_into_a_pool_is_the_same_sketch():
    generator = torch.Generator().manual_seed(1)
    sketch = LowRankGram(torch.randn(4096, 128, generator=generator), torch.rand(4096, generator=generator))
    order = torch.randperm(4096, generator=generator)
    pool = io.BufferPool()
    permuted = gptq._permuted(sketch, order, pool)
    assert torch.equal(permuted.factor, sketch.factor[order])
    assert torch.equal(permuted.exact_diagonal, sketch.exact_diagonal[order])
    assert pool.nbytes == sketch.factor.numel() * 4  # the factor's memory is the pool's
