"""The compiled column loops (quant_core/native.c) against the torch loops they replace, and their build."""

from __future__ import annotations

import logging

import pytest
import torch

from quant_core import fp8, gptq, native
from tests.test_fp8 import DTYPE_IDS, DTYPES, grid_rounding_cases

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here: nothing is compiled")


def torch_loops(monkeypatch) -> None:
    monkeypatch.setattr(native, "library", lambda: None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compiled_rounding_gives_the_bits_of_the_fp8_cast(dtype):
    """A block of one column: no corrections, so the values are the grid rounding itself."""
    values = grid_rounding_cases(dtype)[None, :].contiguous()
    out, errors = torch.empty_like(values), torch.empty_like(values)
    one = torch.ones(1, 1)
    native.gptq_block(values, one, one[0], out, errors, fp8.GridRounding(dtype, values.shape[1]))
    cast = values.clamp(-fp8.fp8_max(dtype), fp8.fp8_max(dtype)).to(dtype)
    assert torch.equal(out.view(torch.int32), cast.float().view(torch.int32))  # -0.0 too
    assert torch.equal(errors, values - out)


def block_case(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight columns (in units of the scale) and an upper Cholesky factor of a random ``H^-1``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(3 * rows, rows, generator=generator) @ torch.randn(rows, rows, generator=generator)
    inverse = torch.linalg.inv((inputs.T @ inputs).double() + torch.eye(rows, dtype=torch.float64))
    upper = torch.linalg.cholesky(inverse, upper=True).float()
    return 60 * torch.randn(rows, width, generator=generator), upper


@pytest.mark.parametrize("width", [3, 64, 200])  # under, at and past a tile of outputs
def test_compiled_block_rounding_is_the_torch_loop(monkeypatch, width):
    block, upper = block_case(gptq.BLOCK, width, seed=width)
    results = {}
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        rounding = gptq._BlockRounding(width, torch.float8_e4m3fn, block.device)
        out = torch.empty(block.shape, dtype=torch.float8_e4m3fn)
        errors = rounding(block.clone(), upper, out).clone()
        results[loops] = out.view(torch.uint8), errors
    (codes, errors), (torch_codes, torch_errors) = results["compiled"], results["torch"]
    assert float((codes == torch_codes).double().mean()) > 0.999, "the same codes up to float32 ties"
    assert float((errors - torch_errors).norm() / torch_errors.norm()) < 1e-3


def sweep_case(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (with +-0 and +-max), a gradient's base, a block's ``H_JJ`` with a dead input, and errors."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(rows, rows, generator=generator)
    local = factor @ factor.T + torch.eye(rows)
    local[5, :], local[:, 5] = 0.0, 0.0  # a dead input: its weights stay
    codes = (30 * torch.randn(rows, width, generator=generator)).to(torch.float8_e4m3fn)
    codes[0, :2] = torch.tensor([-0.0, 0.0]).to(torch.float8_e4m3fn)
    codes[1, :2] = torch.tensor([448.0, -448.0]).to(torch.float8_e4m3fn)
    base, error = 40 * torch.randn(rows, width, generator=generator), torch.rand(rows, width, generator=generator)
    return codes, base, local, error - 0.5


def both_sweeps(monkeypatch, codes, local, base, residual, error, step_dtype) -> dict:
    """The compiled and the torch sweep from the same start: the codes, steps and errors after each."""
    results = {}
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        descent = gptq._Descent(codes.dtype, codes.shape[1], codes.device, step_dtype)
        moved, moved_error = codes.clone(), error.clone()
        steps = descent.sweep(moved, local, base, residual, moved_error).clone()
        assert steps.dtype == step_dtype
        results[loops] = moved.view(torch.uint8), steps.float(), moved_error
    return results


@pytest.mark.parametrize("width", [3, 64, 200])  # under, at and past a tile of outputs
@pytest.mark.parametrize("sketched", [False, True], ids=["exact", "sketched"])
def test_compiled_polish_sweep_is_the_torch_sweep(monkeypatch, width, sketched):
    """Exact statistics: a float32 gradient, float32 steps; a sketch's: a bfloat16 product plus
    residual times error, bfloat16 steps."""
    codes, base, local, error = sweep_case(gptq.BLOCK, width, seed=width)
    residual = torch.rand(gptq.BLOCK) if sketched else None
    base, step_dtype = (base.bfloat16(), torch.bfloat16) if sketched else (base, torch.float32)
    results = both_sweeps(monkeypatch, codes, local, base, residual, error, step_dtype)
    (codes_c, steps_c, error_c), (codes_t, steps_t, error_t) = results["compiled"], results["torch"]
    assert float((codes_c == codes_t).double().mean()) > 0.999, "the same codes up to float32 ties"
    assert float((steps_c == steps_t).double().mean()) > 0.999
    assert torch.equal(error_c, error + steps_c), "the steps are added to the error"
    assert torch.equal(error_t, error + steps_t)
    assert not (codes_c == 0x80).any(), "-0 becomes +0, as in the torch sweep"
    assert steps_c.abs().sum() > 0 and not steps_c[5].any(), "weights move, except those of the dead input"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compiled_polish_steps_every_code_as_the_tables_do(monkeypatch, dtype):
    """Every one of the 256 codes (NaN and inf included) pushed up and down by a steep gradient: the
    compiled sweep computes neighbours from the bits, the torch sweep looks them up."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(2).view(dtype)[None].contiguous()
    base = torch.cat([torch.full((256,), -1e9), torch.full((256,), 1e9)])[None]
    results = both_sweeps(monkeypatch, codes, torch.ones(1, 1), base, None, torch.zeros(1, 512), torch.float32)
    (codes_c, steps_c, _), (codes_t, steps_t, _) = results["compiled"], results["torch"]
    assert torch.equal(codes_c, codes_t) and torch.equal(steps_c, steps_t)
    assert (steps_c[0, :256] >= 0).all() and (steps_c[0, 256:] <= 0).all() and steps_c.abs().sum() > 0


def test_add_and_round_is_torch_add_then_cast():
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(5, 37, generator=generator) * torch.logspace(-20, 20, 37)  # past a vector, odd tail
    update = torch.randn(5, 37, generator=generator).bfloat16()
    rounded = torch.empty(5, 37, dtype=torch.bfloat16)
    expected = state + update
    native.add_and_round(state, update, rounded)
    assert torch.equal(state, expected)
    assert torch.equal(rounded.view(torch.int16), expected.bfloat16().view(torch.int16))


def test_the_switch_turns_the_compiled_loops_off(monkeypatch):
    monkeypatch.setenv(native.SWITCH, "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.usable(torch.zeros(1))
    finally:
        native.library.cache_clear()


def test_a_failing_build_falls_back_to_torch_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="quant_core"):
            assert native.library() is None
        assert "building the compiled GPTQ loops failed" in caplog.text
        assert not list(tmp_path.rglob("*.so")), "nothing half-built is left"
    finally:
        native.library.cache_clear()


def test_the_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "fp8-scaled-learned").iterdir())
        assert len(built) == 1 and built[0].name.startswith("native-") and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp, "the second load reuses the build"
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compiled_polish_errors_are_the_table_values_minus_the_weights(monkeypatch, dtype):
    """Every code (NaN, inf and -0 included), past a vector and with an odd tail."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(3)[:700].view(dtype).view(7, 100)
    scaled = torch.randn(7, 100, generator=torch.Generator().manual_seed(0))
    compiled, fallback = scaled.clone(), scaled.clone()
    gptq._errors(codes, compiled)
    torch_loops(monkeypatch)
    gptq._errors(codes, fallback)
    assert torch.equal(compiled, fallback)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("source", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("product", [torch.bfloat16, torch.float32])
def test_compiled_heldout_deltas_are_the_torch_ones(monkeypatch, dtype, source, product):
    """A candidate's codes and round-to-nearest (from the weight itself), past a vector and a chunk
    with an odd tail, weights beyond the format's range included (they saturate)."""
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(3, 1111, generator=generator) * torch.logspace(-6, 1, 1111)).to(source)
    scale = float(weight.float().abs().max()) / fp8.fp8_max(dtype) / 2  # the largest weights saturate
    codes = fp8.quantize_nearest(weight * 1.1, scale, dtype)
    results = {}
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        deltas = gptq._Deltas(dtype, product, weight.numel(), weight.device)
        results[loops] = [deltas(weight, scale, candidate).clone() for candidate in (None, codes)]
    # the same up to a float32 rounding of the weight's size (the C code fuses value * scale - weight
    # into one operation), and then the rounding of the difference to the product dtype
    rounding = 2**-7 if product == torch.bfloat16 else 0.0  # a unit in the last place
    for compiled, fallback in zip(results["compiled"], results["torch"], strict=True):
        assert compiled.dtype == product
        bound = rounding * fallback.float().abs() + 2**-22 * weight.float().abs()
        assert ((compiled.float() - fallback.float()).abs() <= bound).all()
    rtn = fp8.quantize_nearest(weight, scale, dtype)
    assert torch.equal(results["torch"][0], (rtn.float() * scale - weight.float()).to(product))


@pytest.mark.parametrize("shape", [(3, 5), (64, 64), (130, 200)])  # under, at and past a square
def test_compiled_unpermuting_is_the_torch_gather_and_transpose(monkeypatch, shape):
    rows = torch.randint(0, 256, shape, dtype=torch.uint8).view(torch.float8_e4m3fn)
    order = torch.randperm(shape[0])
    compiled = gptq._unpermuted(rows, order)
    torch_loops(monkeypatch)
    assert torch.equal(compiled.view(torch.uint8), gptq._unpermuted(rows, order).view(torch.uint8))
    assert torch.equal(compiled.view(torch.uint8), rows.view(torch.uint8)[torch.argsort(order)].T)
