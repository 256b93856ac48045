"""The uint8 scale codec: 256 log-uniform float32 levels from 1e-10 to 100, encoded by rounding up."""

from __future__ import annotations

import math

import pytest
import torch

from quant_core import codec, fp8

CODES = range(codec.LEVELS)


def float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def random_scales(count: int, seed: int) -> list[float]:
    """float32 scales spread log-uniformly over the codec's range."""
    generator = torch.Generator().manual_seed(seed)
    exponent = torch.empty(count, dtype=torch.float64).uniform_(-10, 2, generator=generator)
    scales = torch.pow(10.0, exponent).float()
    return [s for s in scales.tolist() if s <= codec.decode_scale(codec.LEVELS - 1)]


def test_end_points():
    assert codec.LEVELS == 256
    assert codec.decode_scale(0) == float32(1e-10)
    assert codec.decode_scale(0) == pytest.approx(1e-10, rel=1e-6)
    assert codec.decode_scale(255) == 100.0


def test_decoded_values_are_float32():
    for code in CODES:
        value = codec.decode_scale(code)
        assert value == float32(value)


def test_strictly_increasing_and_log_uniform():
    values = [codec.decode_scale(c) for c in CODES]
    assert len(set(values)) == 256
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    ratio = math.log(100 / 1e-10) / 255
    for a, b in zip(values, values[1:], strict=False):
        assert math.log(b) - math.log(a) == pytest.approx(ratio, abs=1e-6)
    # Every code sits on the log-uniform line itself, not just at a constant step from its neighbour.
    for code, value in enumerate(values):
        assert math.log(value) == pytest.approx(math.log(1e-10) + ratio * code, abs=1e-6)


@pytest.mark.parametrize("code", [-1, 256, 1000])
def test_decode_rejects_codes_outside_range(code):
    with pytest.raises(ValueError):
        codec.decode_scale(code)


def test_encode_decode_round_trip_for_every_code():
    for code in CODES:
        assert codec.encode_scale(codec.decode_scale(code)) == code


def test_encode_picks_smallest_code_not_below_the_scale():
    scales = random_scales(3000, seed=0)
    assert len(scales) > 2900
    for scale in scales:
        code = codec.encode_scale(scale)
        assert 0 <= code < 256
        assert codec.decode_scale(code) >= scale, scale
        if code > 0:
            assert codec.decode_scale(code - 1) < scale, scale


def test_encode_just_above_and_below_a_level():
    for code in (1, 17, 128, 254):
        level = torch.tensor(codec.decode_scale(code), dtype=torch.float32)
        up = float(torch.nextafter(level, torch.tensor(math.inf)))
        down = float(torch.nextafter(level, torch.tensor(0.0)))
        assert codec.encode_scale(up) == code + 1
        assert codec.encode_scale(down) == code


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_weights_divided_by_decoded_scale_never_exceed_fp8_max(dtype):
    limit = fp8.fp8_max(dtype)
    generator = torch.Generator().manual_seed(1)
    for scale in random_scales(500, seed=2):
        amax = float32(scale * limit)
        weight = torch.randn(64, generator=generator)
        weight = weight / weight.abs().max() * amax
        exact = fp8.scale_for(fp8.absmax(weight), dtype)
        if exact > codec.decode_scale(255):
            continue
        decoded = codec.decode_scale(codec.encode_scale(exact))
        assert float((weight / decoded).abs().max()) <= limit
        assert float((torch.tensor([fp8.absmax(weight)]) / decoded).abs().max()) <= limit


@pytest.mark.parametrize("scale", [1e-10 * 0.999, 1e-11, 1e-20, 5e-324, float32(1e-10)])
def test_scales_at_or_below_minimum_encode_to_zero(scale):
    assert codec.encode_scale(scale) == 0


def test_maximum_scale_encodes_to_last_code():
    assert codec.encode_scale(100.0) == 255
    assert codec.encode_scale(99.99) == 255


@pytest.mark.parametrize("scale", [float(torch.nextafter(torch.tensor(100.0), torch.tensor(math.inf))), 100.5, 1e4])
def test_scales_above_maximum_raise(scale):
    with pytest.raises(codec.ScaleOutOfRangeError):
        codec.encode_scale(scale)


def test_scale_out_of_range_is_a_value_error():
    assert issubclass(codec.ScaleOutOfRangeError, ValueError)


@pytest.mark.parametrize("scale", [0.0, -0.0, -1.0, -1e-12, math.nan, math.inf, -math.inf])
def test_non_positive_or_non_finite_scales_raise_value_error(scale):
    with pytest.raises(ValueError):
        codec.encode_scale(scale)
