"""Learned rounding: grid-neighbour choices only, never worse than round-to-nearest on held-out inputs."""

from __future__ import annotations

import math

import pytest
import torch

from quant_core import fp8, native, rounding
from quant_core.calibration import RandomCalibration
from quant_core.options import LearnedOptions
from quant_core.rounding import round_nearest

E4M3 = torch.float8_e4m3fn
DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
DTYPE_IDS = ["e4m3fn", "e5m2"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def element_wise(request, monkeypatch):
    """Every test here runs with the optimiser's compiled element-wise step (``native``) and with
    its torch passes."""
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler here: the compiled step cannot be built")
    return request.param


class LowRankCalibration:
    """Anisotropic inputs ``randn(count, rank) @ M`` with a fixed ``M``: a CalibrationSource for tests.

    Their covariance is far from isotropic, so the output error depends on how rounding errors
    combine, and learned rounding has something real to exploit (unlike isotropic random inputs).
    """

    def __init__(self, in_features: int, rank: int = 16) -> None:
        self.mixing = torch.randn(rank, in_features, generator=torch.Generator().manual_seed(1234))

    def inputs(
        self, name: str, in_features: int, count: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        assert in_features == self.mixing.shape[1]
        return (torch.randn(count, self.mixing.shape[0], generator=generator) @ self.mixing).to(device)


def make_weight(rows: int, cols: int, seed: int = 0, std: float = 0.05) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std


def scale_of(weight: torch.Tensor, dtype: torch.dtype) -> float:
    return fp8.scale_for(fp8.absmax(weight), dtype)


def scaled_weight(weight: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    limit = fp8.fp8_max(dtype)
    return (weight.float() / scale).clamp(-limit, limit)


def as_bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def finite_grid(dtype: torch.dtype) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return torch.unique(values[torch.isfinite(values)])


def assert_grid_neighbour_choices(result, weight, scale, dtype):
    """Each output is base or base + step of fp8.grid_neighbours of the scaled weight."""
    scaled = scaled_weight(weight, scale, dtype)
    base, step = fp8.grid_neighbours(scaled, dtype)
    values = result.quantized.float()
    assert ((values == base) | (values == base + step)).all()


def assert_rtn_or_other_side(result, weight, scale, dtype):
    """Independent of grid_neighbours: each output is the RTN value, or the adjacent grid value on the
    other side of the scaled weight (found by enumerating every fp8 bit pattern)."""
    scaled = scaled_weight(weight, scale, dtype).flatten()
    rtn = scaled.to(dtype).float()
    values = result.quantized.float().flatten()
    grid = finite_grid(dtype)
    index = torch.searchsorted(grid, rtn)
    assert torch.equal(grid[index], rtn)
    above = grid[(index + 1).clamp(max=len(grid) - 1)]
    below = grid[(index - 1).clamp(min=0)]
    other = torch.where(rtn < scaled, above, torch.where(rtn > scaled, below, rtn))
    # The other side must really be across the scaled weight (or it is the RTN value itself).
    assert ((other - scaled) * (rtn - scaled) <= 0).all()
    ok = (values == rtn) | (values == other)
    assert ok.all(), f"{int((~ok).sum())} elements are neither RTN nor its neighbour across the weight"


def held_out_errors(name, weight, scale, dtype, calibration, options, quantized):
    """Recompute (error, error_rtn) on the held-out batch: the second draw of the tensor's generator."""
    generator = rounding.generator_for(name, options.seed, CPU)
    calibration.inputs(name, weight.shape[1], options.calib_samples, generator, CPU)
    held_out = calibration.inputs(name, weight.shape[1], options.calib_samples, generator, CPU).double()
    reference = weight.double()
    rtn = fp8.quantize_nearest(weight, scale, dtype)
    norm = (held_out @ reference.T).norm()

    def error(q):
        return float((held_out @ (q.double() * scale - reference).T).norm() / norm)

    return error(quantized), error(rtn)


@pytest.fixture(scope="module")
def low_rank_cases() -> dict:
    return {}


@pytest.fixture
def low_rank_case(element_wise, low_rank_cases):
    """The 64x128 anisotropic case, optimised once for several tests (once per element-wise path:
    the two paths' float rounding moves a few decisions over 300 iterations)."""
    if element_wise not in low_rank_cases:
        name = "blocks.0.attn.q.weight"
        weight = make_weight(64, 128)
        scale = scale_of(weight, E4M3)
        calibration = LowRankCalibration(128)
        options = LearnedOptions(num_iter=300, calib_samples=256)
        result = rounding.round_learned(name, weight, scale, E4M3, calibration, options)
        low_rank_cases[element_wise] = name, weight, scale, calibration, options, result
    return low_rank_cases[element_wise]


# --------------------------------------------------------------------------------------- grid neighbours


def test_low_rank_result_uses_grid_neighbours_only(low_rank_case):
    _, weight, scale, _, _, result = low_rank_case
    assert result.quantized.dtype == E4M3 and result.quantized.shape == weight.shape
    assert_grid_neighbour_choices(result, weight, scale, E4M3)
    assert_rtn_or_other_side(result, weight, scale, E4M3)
    rtn = fp8.quantize_nearest(weight, scale, E4M3)
    assert not torch.equal(as_bits(result.quantized), as_bits(rtn)), "learned rounding should change something"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_aggressive_optimiser_still_uses_grid_neighbours_only(dtype):
    """A large learning rate flips many decisions; every flip must still be to the other neighbour."""
    weight = make_weight(32, 64, seed=5) * torch.linspace(0.01, 3, 64)  # magnitudes across many binades
    scale = scale_of(weight, dtype)
    options = LearnedOptions(num_iter=150, calib_samples=128, lr=1.0)
    result = rounding.round_learned("mlp.fc1.weight", weight, scale, dtype, LowRankCalibration(64), options)
    changed = as_bits(result.quantized) != as_bits(fp8.quantize_nearest(weight, scale, dtype))
    assert changed.sum() > 10
    assert_grid_neighbour_choices(result, weight, scale, dtype)
    assert_rtn_or_other_side(result, weight, scale, dtype)


def test_zero_elements_stay_on_their_neighbours():
    weight = make_weight(32, 64)
    weight[:, ::2] = 0  # pruned / structurally zero weights
    scale = scale_of(weight, E4M3)
    options = LearnedOptions(num_iter=200, calib_samples=128, lr=1.0)
    result = rounding.round_learned("z.weight", weight, scale, E4M3, LowRankCalibration(64), options)
    assert_rtn_or_other_side(result, weight, scale, E4M3)


# ------------------------------------------------------------------------------------- never worse than RTN


def test_low_rank_inputs_make_learned_rounding_beat_rtn(low_rank_case):
    name, weight, scale, calibration, options, result = low_rank_case
    assert result.fell_back is False
    assert result.error < result.error_rtn
    error, error_rtn = held_out_errors(name, weight, scale, E4M3, calibration, options, result.quantized)
    assert error < error_rtn
    assert result.error == pytest.approx(error, rel=1e-4)
    assert result.error_rtn == pytest.approx(error_rtn, rel=1e-4)
    assert 0 < result.iterations <= options.num_iter


def test_held_out_error_never_worse_than_rtn_and_fallback_is_exact_rtn():
    """With few isotropic samples the optimiser overfits, so some seeds must fall back to RTN."""
    weight = make_weight(24, 48, seed=7)
    scale = scale_of(weight, E4M3)
    rtn = fp8.quantize_nearest(weight, scale, E4M3)
    calibration = RandomCalibration()
    outcomes = []
    for seed in range(6):
        options = LearnedOptions(num_iter=60, calib_samples=12, lr=0.3, seed=seed)
        result = rounding.round_learned("w.weight", weight, scale, E4M3, calibration, options)
        assert result.error <= result.error_rtn
        error, error_rtn = held_out_errors("w.weight", weight, scale, E4M3, calibration, options, result.quantized)
        assert error <= error_rtn * (1 + 1e-9)
        assert result.error == pytest.approx(error, rel=1e-4)
        assert result.error_rtn == pytest.approx(error_rtn, rel=1e-4)
        if result.fell_back:
            assert torch.equal(as_bits(result.quantized), as_bits(rtn))
            assert result.error == result.error_rtn
        assert_grid_neighbour_choices(result, weight, scale, E4M3)
        outcomes.append(result.fell_back)
    assert any(outcomes), "no seed fell back: the fallback path went untested"


# ----------------------------------------------------------------------------------------- repeatability


def test_same_seed_is_bit_identical_and_seed_changes_the_draws():
    weight = make_weight(16, 32, seed=3)
    scale = scale_of(weight, E4M3)
    calibration = LowRankCalibration(32, rank=4)

    def run(seed):
        options = LearnedOptions(num_iter=80, calib_samples=64, lr=0.3, seed=seed)
        return rounding.round_learned("a.weight", weight, scale, E4M3, calibration, options)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(as_bits(first.quantized), as_bits(again.quantized))
    assert (first.error, first.error_rtn, first.iterations) == (again.error, again.error_rtn, again.iterations)
    # Another seed draws other calibration and held-out inputs, so RTN's held-out error differs.
    assert other.error_rtn != first.error_rtn
    assert_grid_neighbour_choices(other, weight, scale, E4M3)


def test_generator_depends_on_name_and_seed_only():
    def draw(name, seed):
        return torch.randn(4, generator=rounding.generator_for(name, seed, CPU))

    assert torch.equal(draw("a.weight", 0), draw("a.weight", 0))
    assert not torch.equal(draw("a.weight", 0), draw("b.weight", 0))
    assert not torch.equal(draw("a.weight", 0), draw("a.weight", 1))


def test_batching_gives_the_same_decisions(low_rank_case):
    name, weight, scale, calibration, options, result = low_rank_case
    batched = LearnedOptions(num_iter=options.num_iter, calib_samples=options.calib_samples, batch_size=48)
    other = rounding.round_learned(name, weight, scale, E4M3, calibration, batched)
    same = (as_bits(other.quantized) == as_bits(result.quantized)).float().mean()
    assert same >= 0.995
    assert other.fell_back is result.fell_back
    assert other.error == pytest.approx(result.error, rel=1e-3)


# ------------------------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_zero_weight_is_exact(dtype):
    weight = torch.zeros(8, 32)
    scale = scale_of(weight, dtype)
    assert scale == 1.0
    result = rounding.round_learned("zero.weight", weight, scale, dtype, RandomCalibration(), LearnedOptions())
    assert torch.equal(result.quantized.float(), weight)
    assert result.error == 0.0 and result.error_rtn == 0.0
    assert result.fell_back is False


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_already_on_the_grid_is_exact(dtype):
    grid = finite_grid(dtype)
    picks = torch.randint(len(grid), (16, 32), generator=torch.Generator().manual_seed(9))
    q = grid[picks]
    q[0, 0] = fp8.fp8_max(dtype)
    scale = 2.0**-7  # a power of two keeps q * scale exact in float32
    weight = q * scale
    result = rounding.round_learned("grid.weight", weight, scale, dtype, LowRankCalibration(32), LearnedOptions())
    assert torch.equal(result.quantized.float(), q)
    assert torch.equal(fp8.dequantize(result.quantized, scale), weight)
    assert result.error == 0.0 and result.error_rtn == 0.0


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_grid_steps_are_powers_of_two_or_zero(dtype):
    """The optimiser scales by ``step`` instead of keeping scaled copies of it, which is exact only
    for powers of two (of either sign): every 16-bit value's step between its fp8 neighbours, at an arbitrary scale."""
    for source in (torch.bfloat16, torch.float16):
        weight = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(source)[None]
        weight = weight.nan_to_num(0.0, 0.0, 0.0)
        step = rounding._Grid(weight, 0.37, dtype).block(slice(0, 1)).step
        mantissa, _ = torch.frexp(step[step != 0].abs())  # signed: towards the farther neighbour
        assert (step != 0).sum() > 30000  # the rest: on the grid, or clamped to its ends
        assert torch.all(mantissa == 0.5)


def test_round_nearest_matches_quantize_nearest():
    weight = make_weight(8, 16, seed=2)
    scale = scale_of(weight, E4M3)
    result = rounding.round_nearest(weight, scale, E4M3)
    assert torch.equal(as_bits(result.quantized), as_bits(fp8.quantize_nearest(weight, scale, E4M3)))
    expected = float((result.quantized.float() * scale - weight).norm() / weight.norm())
    assert result.error == result.error_rtn == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------ inference mode


def test_works_under_inference_mode():
    """ComfyUI runs nodes under inference_mode: the optimiser computes its gradients by hand, so it
    needs no autograd and gives the same file there."""
    calibration = LowRankCalibration(32, rank=4)
    options = LearnedOptions(num_iter=40, calib_samples=64, lr=0.3)
    with torch.inference_mode():
        weight = make_weight(16, 32, seed=4)
        assert weight.is_inference()
        scale = scale_of(weight, E4M3)
        result = rounding.round_learned("inf.weight", weight.clone(), scale, E4M3, calibration, options)
    assert result.error <= result.error_rtn
    assert_grid_neighbour_choices(result, weight, scale, E4M3)
    reference = rounding.round_learned("inf.weight", weight.clone(), scale, E4M3, calibration, options)
    assert torch.equal(as_bits(result.quantized), as_bits(reference.quantized))


def test_a_transposed_weight_gives_the_file_of_its_contiguous_copy():
    """A non-contiguous float32 weight: each block is made contiguous before its passes (the
    regulariser's flat views and the compiled step need that)."""
    calibration = LowRankCalibration(32, rank=4)
    options = LearnedOptions(num_iter=30, calib_samples=64, lr=0.3)
    weight = make_weight(32, 16, seed=6).T
    assert not weight.is_contiguous()
    scale = scale_of(weight, E4M3)
    result = rounding.round_learned("t.weight", weight, scale, E4M3, calibration, options)
    reference = rounding.round_learned("t.weight", weight.contiguous(), scale, E4M3, calibration, options)
    assert torch.equal(as_bits(result.quantized), as_bits(reference.quantized))
    assert result.error == reference.error


# --------------------------------------------------------------------- the hand-written optimiser step


def test_hand_written_gradient_matches_autograd():
    """The chain rule written out in rounding.py equals autograd's on the seed's surrogate loss,
    clamped elements (soft held at 0 or 1) included."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 48, generator=generator) * 4
    output_gradient = torch.randn(64, 48, generator=generator)  # d(output loss)/d(soft)
    beta, reg_lambda = 7.5, 0.02
    zeta_gamma = rounding._ZETA - rounding._GAMMA

    leaf = logits.clone().requires_grad_(True)
    soft = (torch.sigmoid(leaf) * zeta_gamma + rounding._GAMMA).clamp(0, 1)  # the seed's rectified sigmoid
    reference = reg_lambda * (1 - (2 * soft - 1).abs().pow(beta)).mean()
    ((soft * output_gradient).sum() + reference).backward()

    sigmoid, centred = rounding._soften(logits)
    torch.testing.assert_close(centred, 1 - 2 * soft.detach())
    value = torch.zeros((), dtype=torch.float64)
    regulariser = rounding._Regulariser(beta, reg_lambda, centred.numel())
    gradient = rounding._regulariser_gradient(centred, regulariser, loss=value) + output_gradient * zeta_gamma
    rounding._chain_sigmoid(gradient, sigmoid, centred)
    assert ((soft == 0) | (soft == 1)).any()
    torch.testing.assert_close(gradient, leaf.grad, rtol=1e-5, atol=1e-8)
    assert float(value) == pytest.approx(float(reference.detach()), rel=1e-5)


@pytest.mark.parametrize(("matmul", "batch"), [(torch.float32, 40), (torch.float32, 15), (torch.bfloat16, 40)])
def test_output_gradient_matches_autograd(matmul, batch):
    """``_output_product`` and ``_scale_product`` (row-major products, the scaling by ``coefficient *
    step``, batches of calibration rows) equal autograd's gradient of ``coefficient / 2 * ||X (delta * step)^T||^2``
    plus ``initial``, and adds the loss: the same maths as the seed's product of two transposes."""
    generator = torch.Generator().manual_seed(8)
    inputs = torch.randn(40, 48, generator=generator).to(matmul)
    delta = torch.randn(24, 48, generator=generator).to(matmul)
    step = 2.0 ** torch.randint(-6, 3, (24, 48), generator=generator).float()  # powers of two, as on the grid
    step[0, :5] = 0.0
    initial = torch.randn(24, 48, generator=generator)
    coefficient, weight = 0.37, 1.5

    leaf = delta.float().clone().requires_grad_(True)
    loss_reference = (inputs.float() @ leaf.T).square().sum()
    (coefficient / 2 * loss_reference).backward()
    expected = initial + leaf.grad * step

    buffers = (torch.empty(24, 48, dtype=matmul), torch.empty(24, 48))
    loss = torch.zeros((), dtype=torch.float64)
    both = (inputs, inputs.T.contiguous())
    product = rounding._output_product(both, delta, batch, weight, buffers, loss)
    rounding._scale_product(product, step, coefficient, initial, buffers[1])
    relative = 1e-5 if matmul == torch.float32 else 1e-2  # bf16 products: 8 significant bits
    size = float((expected - initial).abs().max())
    torch.testing.assert_close(buffers[1], expected, rtol=relative, atol=relative * size)
    assert float(loss) == pytest.approx(weight * float(loss_reference.detach()), rel=relative)


def test_adam_matches_torch_optim_with_cosine_schedule():
    generator = torch.Generator().manual_seed(6)
    start = torch.randn(32, 16, generator=generator)
    gradients = [torch.randn(32, 16, generator=generator) for _ in range(25)]
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=3e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=25)
    ours = start.clone()
    adam = rounding._Adam(ours, 3e-2, 25)
    for gradient in gradients:
        reference.grad = gradient.clone()
        optimizer.step()
        schedule.step()
        adam.step(gradient.clone())
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-5, atol=1e-6)


def test_work_counts_weight_iterations():
    weight = make_weight(40, 64, seed=7)
    scale = scale_of(weight, E4M3)
    options = LearnedOptions(num_iter=12, calib_samples=32, early_stop_threshold=-1.0)  # never stale
    result = rounding.round_learned("w.weight", weight, scale, E4M3, LowRankCalibration(64), options)
    assert result.iterations == 12
    assert result.work == weight.numel() * 12


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_as_float_is_the_exact_conversion_for_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    values = rounding.as_float(codes[:, 3:])  # a non-contiguous view
    expected = codes[:, 3:].float()
    assert values.shape == expected.shape and values.dtype == torch.float32
    assert torch.equal(values.isnan(), expected.isnan())
    assert torch.equal(values.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_sixteen_bit_round_to_nearest_is_the_float_path(source, dtype):
    generator = torch.Generator().manual_seed(4)
    weight = (torch.randn(300, 70, generator=generator) * 0.05).to(source)
    weight[0, :4] = torch.tensor([0.0, -0.0, 1e-8, -1e-8])  # zeros and underflow
    scale = fp8.scale_for(fp8.absmax(weight), dtype)
    result = round_nearest(weight, scale, dtype)
    expected = fp8.quantize_nearest(weight.float(), scale, dtype)
    assert torch.equal(result.quantized.view(torch.uint8), expected.view(torch.uint8))
    error = float((expected.float() * scale - weight.float()).norm() / weight.float().norm())
    assert result.error == pytest.approx(error, rel=1e-5) and result.error_rtn == result.error


def test_block_losing_on_held_out_stops_early_and_keeps_rtn():
    """Overfitting to 12 isotropic samples loses to RTN on fresh ones: the block stops at an early
    look instead of using its whole budget, and returns RTN exactly."""
    weight = make_weight(24, 48, seed=7)
    scale = scale_of(weight, E4M3)
    scaled = scaled_weight(weight, scale, E4M3)
    options = LearnedOptions(num_iter=200, calib_samples=12, lr=0.3)
    lost = []
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        inputs, held_out = torch.randn(12, 48, generator=generator), torch.randn(12, 48, generator=generator)
        choices = rounding._choices(scaled, E4M3)
        decisions, used, stopped = rounding._optimise_block(choices, inputs, options, held_out=held_out)
        if stopped:
            assert used < options.num_iter
            assert decisions is None  # the caller keeps RTN
        lost.append(stopped)
    assert any(lost), "no block lost on held-out inputs: the early stop went untested"


def test_blocks_on_several_threads_give_one_threads_result(monkeypatch):
    weight = make_weight(40, 64, seed=8)
    scale = scale_of(weight, E4M3)
    monkeypatch.setattr(rounding, "_LEARNED_BLOCK_ELEMENTS", 8 * 64)  # five blocks of 8 rows
    options = LearnedOptions(num_iter=30, calib_samples=32, early_stop_threshold=-1.0)
    threads = torch.get_num_threads()
    results, steps = [], []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            seen = []
            calibration = LowRankCalibration(64)
            step = lambda done, total, seen=seen: seen.append((done, total))  # noqa: E731
            results.append(rounding.round_learned("w.weight", weight, scale, E4M3, calibration, options, step))
            steps.append(seen)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(as_bits(results[0].quantized), as_bits(results[1].quantized))
    assert (results[0].error, results[0].error_rtn, results[0].work) == (
        results[1].error,
        results[1].error_rtn,
        results[1].work,
    )
    assert steps[0] == steps[1] == [(done, 5 * 30) for done in range(5 * 30)]


@pytest.mark.parametrize("use_amp", [False, True], ids=["float32", "amp"])
def test_float32_and_amp_products_both_beat_rtn(use_amp):
    """``use_amp`` picks bf16 products only where the device has them natively; both paths learn."""
    weight = make_weight(64, 128)
    scale = scale_of(weight, E4M3)
    options = LearnedOptions(num_iter=300, calib_samples=256, use_amp=use_amp)
    expected = torch.bfloat16 if use_amp and rounding._cpu_has_bfloat16() else torch.float32
    assert rounding._matmul_dtype(options, CPU) == expected
    result = rounding.round_learned("amp.weight", weight, scale, E4M3, LowRankCalibration(128), options)
    assert result.error < result.error_rtn
    assert_grid_neighbour_choices(result, weight, scale, E4M3)


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [None, 0.0, float("nan"), float("inf"), -float("inf")])
def test_counted_bit_patterns_give_the_scale_and_the_same_rounding(source, special):
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(64, 48, generator=generator) * 0.05).to(source)
    weight[1, :3] = torch.tensor([-0.0, 1e-8, -0.2])
    if special is not None:
        weight[5, 7] = special
    counts = rounding.PatternCounts(source)
    for piece in weight.flatten().split(500):  # pieces as a reader hands them over
        counts.add(piece)
    expected = fp8.absmax(weight)
    assert counts.absmax() == expected or (math.isnan(expected) and math.isnan(counts.absmax()))
    if math.isfinite(expected):
        scale = fp8.scale_for(expected, E4M3)
        counted, plain = round_nearest(weight, scale, E4M3, counts=counts), round_nearest(weight, scale, E4M3)
        assert torch.equal(counted.quantized.view(torch.uint8), plain.quantized.view(torch.uint8))
        assert counted.error == plain.error


def test_counts_of_nothing_give_zero():
    assert rounding.PatternCounts(torch.bfloat16).absmax() == 0.0


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sixteen_bit_table_gives_the_float_paths_choices(source, dtype):
    """A 16-bit weight's choices are gathered from a table of all 65536 values: the same bits as
    computing them from the weight itself (zeros, subnormals and the largest values included)."""
    generator = torch.Generator().manual_seed(11)
    weight = (torch.randn(40, 96, generator=generator) * 0.05).to(source)
    weight[0, :4] = torch.tensor([0.0, -0.0, 1e-7, -1e-7])
    scale = scale_of(weight, dtype)
    gathered = rounding._Grid(weight, scale, dtype).block(slice(3, 29))
    direct = rounding._choices(scaled_weight(weight[3:29], scale, dtype), dtype)
    for field in ("offset", "step", "logits", "up", "low", "high"):
        assert torch.equal(getattr(gathered, field), getattr(direct, field)), field


def test_flushing_subnormals_stays_in_the_optimisers_threads():
    """The optimiser's threads flush float32 subnormals to zero (they made its kernels several times
    slower); the caller's thread keeps them, whatever the thread count."""
    tiny = torch.tensor([1e-39])  # a float32 subnormal
    weight = make_weight(40, 64, seed=12)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            options = LearnedOptions(num_iter=5, calib_samples=16)
            rounding.round_learned("w.weight", weight, scale_of(weight, E4M3), E4M3, LowRankCalibration(64), options)
            assert float(tiny * 2) > 0
    finally:
        torch.set_num_threads(threads)
