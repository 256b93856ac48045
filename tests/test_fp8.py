"""FP8 math: per-tensor scales, saturating round-to-nearest, NaN/Inf refusal, grid neighbours."""

from __future__ import annotations

import math

import pytest
import torch

from quant_core import fp8

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
DTYPE_IDS = ["e4m3fn", "e5m2"]


def finite_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of ``dtype``, sorted, from its 256 bit patterns (no arithmetic on exponents)."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return torch.unique(values[torch.isfinite(values)])  # sorted; -0.0 and 0.0 collapse


def smallest_subnormal(dtype: torch.dtype) -> float:
    grid = finite_grid(dtype)
    return float(grid[grid > 0].min())


def random_values(dtype: torch.dtype, count: int, seed: int = 0) -> torch.Tensor:
    """Values of both signs from below the smallest subnormal up to the format's maximum."""
    generator = torch.Generator().manual_seed(seed)
    low = math.log2(smallest_subnormal(dtype)) - 4
    high = math.log2(fp8.fp8_max(dtype))
    exponent = low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)
    magnitude = torch.pow(2.0, exponent).float().clamp(max=fp8.fp8_max(dtype))
    sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    return sign * magnitude


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fp8_dtype_by_name(dtype):
    assert fp8.fp8_dtype(str(dtype).removeprefix("torch.")) is dtype
    assert fp8.FP8_DTYPES[str(dtype).removeprefix("torch.")] is dtype


def test_fp8_dtype_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.fp8_dtype("float8_e3m4")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fp8_max_is_largest_finite_grid_value(dtype):
    assert fp8.fp8_max(dtype) == float(finite_grid(dtype).max())


# ---------------------------------------------------------------------------------------------- scale_for


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scale_for_is_amax_over_fp8_max(dtype):
    for amax in (1e-6, 0.0123, 0.5, 1.0, 3.75, 448.0, 1234.5):
        scale = fp8.scale_for(amax, dtype)
        assert scale == pytest.approx(amax / fp8.fp8_max(dtype), rel=2e-7)
        assert scale == float(torch.tensor(scale, dtype=torch.float32)), "scale must be a float32 value"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scale_for_all_zero_tensor_is_one(dtype):
    assert fp8.scale_for(fp8.absmax(torch.zeros(4, 4)), dtype) == 1.0
    assert fp8.scale_for(0.0, dtype) == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scale_for_never_overflows_after_float32_rounding(dtype):
    """amax / scale, computed in float32 as the quantizer does it, stays within the fp8 range."""
    limit = fp8.fp8_max(dtype)
    generator = torch.Generator().manual_seed(1)
    exponents = torch.empty(4000).uniform_(-12, 5, generator=generator)
    amaxes = (torch.rand(4000, generator=generator) + 0.5) * torch.pow(10.0, exponents)  # float32 values
    rounded_up = 0
    for amax in amaxes.tolist():
        scale = fp8.scale_for(amax, dtype)
        quotient = torch.tensor([amax], dtype=torch.float32) / scale
        assert float(quotient) <= limit, (amax, scale)
        # The scale is the float32 nearest amax / max, or the next one up: never more than one ulp off.
        nearest = torch.tensor(amax / limit, dtype=torch.float32)
        assert scale in (float(nearest), float(torch.nextafter(nearest, torch.tensor(math.inf))))
        rounded_up += scale > amax / limit
    assert rounded_up > 0, "the sample should include amaxes whose nearest float32 scale rounds down"


def test_absmax():
    assert fp8.absmax(torch.tensor([[1.0, -3.5], [2.0, 0.0]])) == 3.5
    assert fp8.absmax(torch.zeros(0, 3)) == 0.0


# ---------------------------------------------------------------------------------------- quantize_nearest


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_nearest_saturates(dtype):
    limit = fp8.fp8_max(dtype)
    weight = torch.tensor([0.0, 1.0, -1.0, limit * 1.01, -limit * 1.01, 1e9, -1e9, 3e38, -3e38])
    q = fp8.quantize_nearest(weight, 1.0, dtype)
    assert q.dtype == dtype and q.shape == weight.shape
    values = q.float()
    assert torch.isfinite(values).all()
    assert values[3:].tolist() == [limit, -limit] * 3
    assert values[:3].tolist() == [0.0, 1.0, -1.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_nearest_divides_by_scale_and_picks_a_nearest_grid_value(dtype):
    scale = 0.037
    scaled = random_values(dtype, 2000, seed=2)
    weight = scaled * scale
    q = fp8.quantize_nearest(weight, scale, dtype).float()
    exact = weight / scale
    grid = finite_grid(dtype)
    best = (grid[None, :] - exact[:, None]).abs().min(dim=1).values
    assert torch.equal((q - exact).abs(), best)


def grid_rounding_cases(dtype: torch.dtype) -> torch.Tensor:
    """Random values, every grid value, every midpoint between neighbours (ties) and a float32 step
    either side of each, zeros of both signs, float32 subnormals, and values beyond the range."""
    grid = finite_grid(dtype)
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact in float32: fp8 has few mantissa bits
    near = torch.cat([torch.nextafter(midpoints, torch.tensor(math.inf)), torch.nextafter(midpoints, grid[:-1])])
    limit = fp8.fp8_max(dtype)
    edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, limit, -limit, limit * 1.01, -limit * 1.01, 3e38])
    values = torch.cat([random_values(dtype, 20000, seed=5), grid, midpoints, near, edges])
    return torch.cat([values, -values])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grid_rounding_gives_the_bits_of_the_fp8_cast(dtype):
    values = grid_rounding_cases(dtype)
    rounded = fp8.GridRounding(dtype, values.numel())(values, torch.empty_like(values))
    cast = values.clamp(-fp8.fp8_max(dtype), fp8.fp8_max(dtype)).to(dtype)
    assert torch.equal(rounded.view(torch.int32), cast.float().view(torch.int32))  # -0.0 too
    assert torch.equal(rounded.to(dtype).view(torch.uint8), cast.view(torch.uint8))  # the later cast is exact


def test_dequantize_multiplies_by_scale():
    q = torch.tensor([1.0, -2.0, 0.5]).to(torch.float8_e4m3fn)
    assert fp8.dequantize(q, 0.25).tolist() == [0.25, -0.5, 0.125]
    assert fp8.dequantize(q, torch.tensor(2.0)).dtype == torch.float32


# --------------------------------------------------------------------------------------------- check_finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_tensor(bad):
    weight = torch.ones(3, 4)
    weight[1, 2] = bad
    with pytest.raises(fp8.NonFiniteWeightError, match=r"blocks\.3\.attn\.q\.weight"):
        fp8.check_finite("blocks.3.attn.q.weight", weight)


def test_check_finite_error_is_a_value_error_and_finite_passes():
    assert issubclass(fp8.NonFiniteWeightError, ValueError)
    fp8.check_finite("ok.weight", torch.randn(5, 5))
    fp8.check_finite("zero.weight", torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------ grid_neighbours


def check_neighbours(values: torch.Tensor, dtype: torch.dtype) -> None:
    base, step = fp8.grid_neighbours(values, dtype)
    top = base + step
    assert base.shape == values.shape and step.shape == values.shape
    # Both choices are representable fp8 values.
    assert torch.equal(base.to(dtype).float(), base)
    assert torch.equal(top.to(dtype).float(), top)
    # They bracket the value: |base| <= |x| <= |base + step|, on the value's side of zero.
    assert (base.abs() <= values.abs()).all()
    assert (values.abs() <= top.abs()).all()
    assert (base * values >= 0).all()
    assert (torch.sign(top) == torch.sign(values)).all()
    # Nothing representable lies strictly between them (checked against the enumerated grid).
    grid = finite_grid(dtype)
    low, high = torch.minimum(base, top), torch.maximum(base, top)
    between = (grid[None, :] > low[:, None]) & (grid[None, :] < high[:, None])
    offenders = between.any(dim=1)
    assert not offenders.any(), list(zip(values[offenders][:5].tolist(), base[offenders][:5].tolist(), strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grid_neighbours_of_random_values(dtype):
    check_neighbours(random_values(dtype, 5000, seed=3), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grid_neighbours_of_values_in_the_subnormal_range(dtype):
    tiny = smallest_subnormal(dtype)
    generator = torch.Generator().manual_seed(4)
    values = torch.rand(2000, generator=generator) * tiny * 8 + tiny / 1024  # all below the smallest normal
    check_neighbours(torch.cat([values, -values]), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grid_neighbours_of_values_on_the_grid(dtype):
    grid = finite_grid(dtype)
    on_grid = grid[grid != 0]
    check_neighbours(on_grid, dtype)
    base, step = fp8.grid_neighbours(on_grid, dtype)
    assert torch.equal(base, on_grid), "a representable value is its own base (round-to-nearest keeps it)"
    assert torch.equal(step, torch.zeros_like(step)), "a representable value has no rounding choice"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grid_neighbours_at_the_maximum_have_no_step(dtype):
    limit = fp8.fp8_max(dtype)
    base, step = fp8.grid_neighbours(torch.tensor([limit, -limit]), dtype)
    assert base.tolist() == [limit, -limit]
    assert step.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grid_neighbours_just_below_the_maximum(dtype):
    limit = fp8.fp8_max(dtype)
    grid = finite_grid(dtype)
    below = float(grid[-2])
    values = torch.tensor([(below + limit) / 2, float(torch.nextafter(torch.tensor(limit), torch.tensor(0.0)))])
    check_neighbours(torch.cat([values, -values]), dtype)
    base, step = fp8.grid_neighbours(values, dtype)
    assert base.tolist() == [below, below]
    assert (base + step).tolist() == [limit, limit]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grid_neighbours_of_zero(dtype):
    zeros = torch.tensor([0.0, -0.0])
    base, step = fp8.grid_neighbours(zeros, dtype)
    assert base.abs().tolist() == [0.0, 0.0]
    assert step.abs().tolist() == [0.0, 0.0], "zero is on the grid: learned rounding must leave it at zero"
