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
    codes, errors = torch.empty(values.shape, dtype=dtype), torch.empty_like(values)
    one = torch.ones(1, 1)
    native.gptq_block(values, None, one, one[0], codes, errors, fp8.GridRounding(dtype, values.shape[1]))
    cast = values.clamp(-fp8.fp8_max(dtype), fp8.fp8_max(dtype)).to(dtype)
    assert torch.equal(codes.view(torch.uint8), cast.view(torch.uint8))  # -0.0 too
    assert torch.equal(errors, values - cast.float())


def block_case(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight columns (in units of the scale) and an upper Cholesky factor of a random ``H^-1``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(3 * rows, rows, generator=generator) @ torch.randn(rows, rows, generator=generator)
    inverse = torch.linalg.inv((inputs.T @ inputs).double() + torch.eye(rows, dtype=torch.float64))
    upper = torch.linalg.cholesky(inverse, upper=True).float()
    return 60 * torch.randn(rows, width, generator=generator), upper


@pytest.mark.parametrize("minus", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [3, 64, 200])  # under, at and past a tile of outputs
def test_compiled_block_rounding_is_the_torch_loop(monkeypatch, width, minus):
    block, upper = block_case(gptq.BLOCK, width, seed=width)
    generator = torch.Generator().manual_seed(1)
    compensation = None if minus is None else (10 * torch.randn(block.shape, generator=generator)).to(minus)
    results = {}
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        rounding = gptq._BlockRounding(width, torch.float8_e4m3fn, block.device)
        out = torch.empty(block.shape, dtype=torch.float8_e4m3fn)
        errors = rounding(block.clone(), upper, out, minus=compensation).clone()
        results[loops] = out.view(torch.uint8), errors
    (codes, errors), (torch_codes, torch_errors) = results["compiled"], results["torch"]
    assert float((codes == torch_codes).double().mean()) > 0.999, "the same codes up to float32 ties"
    assert float((errors - torch_errors).norm() / torch_errors.norm()) < 1e-2  # a tie decided otherwise moves the rest


def sweep_case(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(rows, rows, generator=generator)
    local = factor @ factor.T + torch.eye(rows)
    local[5, :], local[:, 5] = 0.0, 0.0  # a dead input: its weights stay
    codes = (30 * torch.randn(rows, width, generator=generator)).to(torch.float8_e4m3fn)
    codes[0, :2] = torch.tensor([-0.0, 0.0]).to(torch.float8_e4m3fn)
    codes[1, :2] = torch.tensor([448.0, -448.0]).to(torch.float8_e4m3fn)
    return codes, 40 * torch.randn(rows, width, generator=generator), local


@pytest.mark.parametrize("width", [3, 64, 200])
def test_compiled_polish_sweep_is_the_torch_sweep(monkeypatch, width):
    codes, gradient, local = sweep_case(gptq.BLOCK, width, seed=width)
    results = {}
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        descent = gptq._Descent(torch.float8_e4m3fn, width, codes.device)
        moved = codes.clone()
        steps = descent.sweep(moved, gradient.clone(), local).clone()
        results[loops] = moved.view(torch.uint8), steps
    (codes_c, steps_c), (codes_t, steps_t) = results["compiled"], results["torch"]
    assert float((codes_c == codes_t).double().mean()) > 0.999, "the same steps up to float32 ties"
    assert float((steps_c == steps_t).double().mean()) > 0.999
    assert not (codes_c == 0x80).any(), "-0 becomes +0, as in the torch sweep"
    assert steps_c.abs().sum() > 0 and not steps_c[5].any(), "weights move, except those of the dead input"


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


def test_a_compiler_without_march_native_still_builds(monkeypatch, tmp_path):
    compiler = native._compiler()
    wrapper = tmp_path / "cc-without-native"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = "-march=native" ] && { echo "unsupported option" >&2; exit 1; }; done\n'
        f'exec "{compiler}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(5, 7), (64, 3), (130, 67)])  # under, at and past a tile of outputs
def test_compiled_scaled_columns_are_the_torch_ones(monkeypatch, dtype, shape):
    generator = torch.Generator().manual_seed(shape[0])
    weight = torch.randn(shape, generator=generator).to(dtype)
    order = torch.randperm(shape[1], generator=generator)
    compiled = gptq._scaled_columns(weight, order, 0.013)
    torch_loops(monkeypatch)
    assert torch.equal(compiled, gptq._scaled_columns(weight, order, 0.013))


@pytest.mark.parametrize("shape", [(5, 7), (3, 64), (67, 130)])
def test_compiled_unpermuting_is_the_torch_one(monkeypatch, shape):
    generator = torch.Generator().manual_seed(shape[1])
    rows = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).view(torch.float8_e4m3fn)
    order = torch.randperm(shape[0], generator=generator)
    compiled = gptq._unpermuted(rows, order, None)
    torch_loops(monkeypatch)
    assert torch.equal(compiled.view(torch.uint8), gptq._unpermuted(rows, order, None).view(torch.uint8))


def test_the_compiled_loops_refuse_shapes_that_would_index_out_of_bounds():
    block, upper = block_case(8, 10, seed=0)
    codes, errors = torch.empty(block.shape, dtype=torch.float8_e4m3fn), torch.empty_like(block)
    grid = fp8.GridRounding(torch.float8_e4m3fn, 10)
    with pytest.raises(ValueError, match="factor of another size"):
        native.gptq_block(block, None, upper[:4, :4].contiguous(), upper.diagonal().contiguous(), codes, errors, grid)
    with pytest.raises(ValueError, match="no permutation"):
        native.scaled_columns(block, torch.tensor([0, 1, 1, 3, 4, 5, 6, 7, 8, 9]), 1.0, torch.empty(10, 8))
    with pytest.raises(ValueError, match="output of another shape"):
        native.unpermute_rows(codes, torch.arange(8), torch.empty(8, 10, dtype=torch.float8_e4m3fn))
