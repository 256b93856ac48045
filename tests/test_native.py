"""The compiled loops (quant_core/native.c) against the torch code they replace, and their build."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch

from quant_core import fp8, gptq, native, rounding
from quant_core.options import LearnedOptions
from tests.test_fp8 import DTYPE_IDS, DTYPES, grid_rounding_cases

E4M3 = torch.float8_e4m3fn

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
    """Weight columns (in units of the scale) and an upper Cholesky factor of a random ``H^-1`` of
    correlated inputs (conditioned as GPTQ's damping keeps it: an error that a float32 tie decides
    otherwise then stays local instead of moving every later column)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(rows) + torch.randn(rows, rows, generator=generator) / rows**0.5
    inputs = torch.randn(3 * rows, rows, generator=generator) @ mixing
    inverse = torch.linalg.inv((inputs.T @ inputs).double() + torch.eye(rows, dtype=torch.float64))
    upper = torch.linalg.cholesky(inverse, upper=True).float()
    return 60 * torch.randn(rows, width, generator=generator), upper


def gptq_by_the_book(work: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's block as its definition reads, in float64: column j, corrected by the errors of the
    columns before it through ``upper`` (rows divided by its diagonal), rounded to nearest; the
    codes and the errors divided by the diagonal."""
    diagonal = upper.diagonal().double()
    relative = upper.double() / diagonal[:, None]
    work, errors = work.double(), torch.zeros(work.shape, dtype=torch.float64)
    codes = torch.empty(work.shape, dtype=torch.float8_e4m3fn)
    for j in range(work.shape[0]):
        column = work[j] - (relative[:j, j, None] * errors[:j]).sum(0)
        codes[j] = column.float().clamp(-448, 448).to(torch.float8_e4m3fn)
        errors[j] = column - codes[j].double()
    return codes.view(torch.uint8), errors / diagonal[:, None]


@pytest.mark.parametrize("minus", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [3, 64, 200])  # under, at and past a tile of outputs
def test_compiled_block_rounding_is_gptq_and_the_torch_loop(monkeypatch, width, minus):
    """Both against GPTQ by the book: codes up to float32 ties (the torch loop sums its corrections
    in another order, so its ties fall otherwise more often), the compiled errors to float32's precision."""
    block, upper = block_case(gptq.BLOCK, width, seed=width)
    generator = torch.Generator().manual_seed(1)
    compensation = None if minus is None else (10 * torch.randn(block.shape, generator=generator)).to(minus)
    codes, errors = gptq_by_the_book(block - (0 if compensation is None else compensation.float()), upper)
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        rounding = gptq._BlockRounding(width, torch.float8_e4m3fn, block.device)
        out = torch.empty(block.shape, dtype=torch.float8_e4m3fn)
        found = rounding(block.clone(), gptq._Triangle.of(upper), out, minus=compensation).double()
        agreement = 0.999 if loops == "compiled" else 0.995
        assert float((out.view(torch.uint8) == codes).double().mean()) > agreement, loops
        if loops == "compiled":
            assert float((found - errors).norm() / errors.norm()) < 1e-4


@pytest.mark.parametrize("width", [3, 200])
def test_block_errors_in_bfloat16_are_the_float32_errors_rounded_once(monkeypatch, width):
    """Errors asked for in bfloat16 (a bfloat16 product takes them on) are the float32 errors of the
    same rounding, rounded once: inside the block they stay float32, so the codes do not change."""
    block, upper = block_case(gptq.BLOCK, width, seed=width)
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        found = {}
        for dtype in (torch.float32, torch.bfloat16):
            rounding = gptq._BlockRounding(width, E4M3, block.device, errors=dtype)
            out = torch.empty(block.shape, dtype=E4M3)
            errors = rounding(block, gptq._Triangle.of(upper), out)
            assert errors.dtype == dtype, loops
            found[dtype] = out.view(torch.uint8), errors.clone()
        (codes, errors), (codes_16, errors_16) = found[torch.float32], found[torch.bfloat16]
        assert torch.equal(codes, codes_16), loops
        assert errors.abs().max() > 0.1, loops  # errors worth rounding
        assert torch.equal(errors_16.view(torch.int16), errors.bfloat16().view(torch.int16)), loops


@pytest.mark.parametrize("width", [3, 200])
def test_a_block_rounded_as_the_polish_start_becomes_its_values_minus_it(monkeypatch, width):
    """With ``polish_start`` the block's weights become the rounded values minus them (what
    ``gptq._errors`` makes of them), with the same codes and errors as without; both loops."""
    block, upper = block_case(gptq.BLOCK, width, seed=width + 1)
    upper = gptq._Triangle.of(upper)
    minus = torch.randn(block.shape, generator=torch.Generator().manual_seed(width)).bfloat16()
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        rounding = gptq._BlockRounding(width, E4M3, block.device)
        plain, started = (torch.empty(block.shape, dtype=E4M3) for _ in range(2))
        errors = rounding(block, upper, plain, minus).clone()
        work = block.clone()
        assert torch.equal(rounding(work, upper, started, minus, polish_start=True), errors), loops
        assert torch.equal(started.view(torch.uint8), plain.view(torch.uint8)), loops
        assert torch.equal(work, gptq._errors(plain, block.clone())), loops
        assert work.abs().max() > 0.1, loops  # not the weights left as they were


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
        steps = descent.sweep(moved, gptq._Local.of(local), base, residual, moved_error).clone()
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


@pytest.mark.parametrize("rows", [gptq.BLOCK, 70, 30])  # a whole block, a word and a bit of columns, under a word
@pytest.mark.parametrize("rank", [128, 40, 200])  # whole vectors of the state's row, a tail, past one chunk
@pytest.mark.parametrize("width", [3, 64, 200])
def test_compiled_sweep_adds_its_steps_to_the_sketch_state(rows, rank, width):
    """The sweep that takes its steps into a sketch's state itself moves the same codes as the one
    that writes them, and leaves ``state + steps^T factor`` (float64 reference) and its bfloat16 copy."""
    codes, base, local, error = sweep_case(rows, width, seed=rank + width)
    generator = torch.Generator().manual_seed(rows)
    factor, state = torch.randn(rows, rank, generator=generator), torch.randn(width, rank, generator=generator)
    base, residual, inverse = base.bfloat16(), torch.rand(rows, generator=generator), -2 / local.diagonal()
    inverse[5] = 0.0  # the dead input
    written_codes, written_error, steps = codes.clone(), error.clone(), torch.empty(rows, width, dtype=torch.bfloat16)
    native.polish_sweep(written_codes, base, residual, written_error, local, inverse, steps)
    moved, moved_error, operand = codes.clone(), error.clone(), torch.empty(width, rank, dtype=torch.bfloat16)
    added = state.clone()
    native.polish_sweep(moved, base, residual, moved_error, local, inverse, None, (factor, added, operand))
    assert torch.equal(moved.view(torch.uint8), written_codes.view(torch.uint8))
    assert torch.equal(moved_error, written_error)
    assert 0 < int(steps.count_nonzero()) < steps.numel(), "some weights move, not all"
    expected = state.double() + steps.double().T @ factor.double()
    assert torch.allclose(added.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(operand, added.bfloat16())
    native.polish_sweep(codes.clone(), base, residual, error.clone(), local, inverse, None, (factor, state, None))
    assert torch.allclose(state.double(), expected, rtol=1e-5, atol=1e-4), "without an operand too"


@pytest.mark.parametrize("rows", [gptq.BLOCK, 70, 30])
@pytest.mark.parametrize("width", [3, 64, 200])
def test_compiled_sweep_reads_an_exact_base_by_outputs_and_adds_its_steps_to_it(rows, width):
    """An exact layer's state is ``(H D)^T``: the block's base is a view of its columns, and the
    steps come back into all of each output's row through the block's rows of ``H``."""
    codes, _, _, error = sweep_case(rows, width, seed=width)
    generator = torch.Generator().manual_seed(rows)
    inputs, first = rows + 30, 10
    factor = torch.randn(inputs, inputs, generator=generator)
    gram = factor @ factor.T / inputs + torch.eye(inputs)
    block = slice(first, first + rows)
    local, rows_of_h = gram[block, block].contiguous(), gram[block].contiguous()
    state = 40 * torch.randn(width, inputs, generator=generator)
    inverse = -2 / local.diagonal()
    written_codes, written_error, steps = codes.clone(), error.clone(), torch.empty(rows, width)
    native.polish_sweep(written_codes, state[:, block].T.contiguous(), None, written_error, local, inverse, steps)
    moved, moved_error, updated = codes.clone(), error.clone(), state.clone()
    native.polish_sweep(moved, updated[:, block].T, None, moved_error, local, inverse, None, (rows_of_h, updated, None))
    assert torch.equal(moved.view(torch.uint8), written_codes.view(torch.uint8))
    assert torch.equal(moved_error, written_error)
    assert 0 < int(steps.count_nonzero()) < steps.numel(), "some weights move, not all"
    expected = state.double() + steps.double().T @ rows_of_h.double()
    assert torch.allclose(updated.double(), expected, rtol=1e-5, atol=1e-4)


def learned_case(rows: int, width: int, seed: int) -> rounding._Choices:
    """A block's choices whose logits reach every part of the rectified sigmoid: soft held at 0 and
    1 (|logits| up to 100), ``u = 0`` exactly (logit 0), and ordinary values."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=generator).bfloat16()
    choices = rounding._Grid(weight, fp8.scale_for(fp8.absmax(weight), E4M3), E4M3).block(slice(0, rows))
    choices.logits[0, :6] = torch.tensor([0.0, 100.0, -100.0, 30.0, -30.0, 2.4])
    return choices


def learned_workspaces(monkeypatch, choices: rounding._Choices, matmul: torch.dtype, iterations: int):
    """The same block's workspace and Adam state with the compiled step and with the torch passes."""
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        work = rounding._Workspace(choices, matmul, iterations)
        assert work.compiled == (loops == "compiled")
        yield work, rounding._Adam(choices.logits.clone(), 0.3, iterations)


def test_compiled_soften_is_the_torch_soften(monkeypatch):
    choices = learned_case(12, 200, seed=1)
    for matmul in (torch.float32, torch.bfloat16):
        (compiled, _), (reference, _) = learned_workspaces(monkeypatch, choices, matmul, 1)
        monkeypatch.undo()
        torch.testing.assert_close(compiled.sigmoid, reference.sigmoid, rtol=2e-6, atol=1e-30)
        torch.testing.assert_close(compiled.delta.float(), reference.delta.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("matmul", "batch"), [(torch.float32, 40), (torch.bfloat16, 40), (torch.bfloat16, 15)])
def test_compiled_learned_step_is_the_torch_step(monkeypatch, matmul, batch):
    """Both paths in lockstep, each iteration from the same products (of the torch path's delta: a
    1-ulp change of a delta changes a product where the sum cancels, and Adam's first steps move by
    +-lr whatever the gradient's size), the regulariser off and then on through its anneal, bf16
    products summed over batches in float32 too: the same state and losses up to float rounding."""
    choices, iterations = learned_case(23, 101, seed=2), 6  # 2323 weights: 9 tiles of 256 and 19 more
    inputs = torch.randn(40, 101, generator=torch.Generator().manual_seed(3)).to(matmul)
    both = (inputs, inputs.T.contiguous())
    pair = list(learned_workspaces(monkeypatch, choices, matmul, iterations))
    monkeypatch.undo()  # the torch workspace keeps to its passes
    delta = pair[1][0].delta
    for iteration in range(iterations):
        regulariser = rounding._Regulariser(20.0 - 3 * iteration, 0.5, delta.numel()) if iteration > 1 else None
        buffers = [(work.product, work.gradient, work.losses[iteration]) for work, _ in pair]
        products = [rounding._output_product(both, delta, batch, 0.01, (a, b), loss) for a, b, loss in buffers]
        for (work, adam), product in zip(pair, products, strict=True):
            work.update(product, 0.05, adam, regulariser, work.losses[iteration])
    (compiled, adam), (reference, reference_adam) = pair
    for ours, theirs in [
        (adam.param, reference_adam.param),
        (adam.exp_avg, reference_adam.exp_avg),
        (adam.exp_avg_sq, reference_adam.exp_avg_sq),
        (compiled.sigmoid, reference.sigmoid),
        (compiled.delta.float(), reference.delta.float()),
        (compiled.losses, reference.losses),
    ]:
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-5
    assert torch.equal(adam.param >= 0, reference_adam.param >= 0), "the same decisions"
    assert float((adam.param - choices.logits).abs().max()) > 0.1, "the logits moved"


def test_compiled_optimiser_decides_as_the_torch_one(monkeypatch):
    """Whole blocks (the early stop included) on anisotropic inputs, where learned rounding moves
    decisions away from round-to-nearest: the same decisions up to float ties."""
    choices = learned_case(32, 64, seed=4)
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(48, 8, generator=generator) @ torch.randn(8, 64, generator=generator)
    options = LearnedOptions(num_iter=120, calib_samples=48, lr=0.1, use_amp=False)
    results = []
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        fresh = dataclasses.replace(choices, logits=choices.logits.clone())  # the optimiser moves its logits
        results.append(rounding._optimise_block(fresh, inputs, options))
    (decisions, used, _), (reference, reference_used, _) = results
    assert float((decisions == reference).double().mean()) > 0.995, "the same decisions up to float ties"
    assert int((decisions != choices.up).sum()) > 10, "learned rounding moved decisions away from RTN"
    assert abs(used - reference_used) <= rounding._CHECK_EVERY


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


def compiler_refusing(monkeypatch, tmp_path, option: str) -> None:
    """Builds by a compiler that refuses ``option`` (into a cache of their own)."""
    compiler = native._compiler()
    wrapper = tmp_path / "cc-refusing"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = "{option}" ] && {{ echo "unsupported option" >&2; exit 1; }}; done\n'
        f'exec "{compiler}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()


def without_march_native(monkeypatch, tmp_path) -> None:
    """The library built by a compiler that refuses ``-march=native``: for the baseline of this
    CPU's architecture, so the loops that have no AVX-512 version of their own run in plain C."""
    compiler_refusing(monkeypatch, tmp_path, "-march=native")


def test_a_compiler_without_loop_alignment_still_builds_for_this_cpu(monkeypatch, tmp_path):
    compiler_refusing(monkeypatch, tmp_path, "-falign-loops=64")
    try:
        assert native.library() is not None
        (built,) = (tmp_path / "fp8-scaled-learned").glob("native-*.so")
        assert native._build(os.environ["CC"], ["-march=native"]) == built  # the second choice
    finally:
        native.library.cache_clear()


def test_a_compiler_without_march_native_still_builds(monkeypatch, tmp_path):
    without_march_native(monkeypatch, tmp_path)
    try:
        assert native.library() is not None
    finally:
        native.library.cache_clear()


@pytest.fixture(scope="session")
def baseline_folder(tmp_path_factory) -> Path:
    """One folder for every test of the baseline build: its compiler wrapper and cache stay the same,
    so the library is built once (a build takes seconds, a test of the loops milliseconds)."""
    return tmp_path_factory.mktemp("baseline-build")


@pytest.fixture(params=["native", "baseline"])
def tuning(request, monkeypatch, baseline_folder):
    """The layout loops as built for this CPU (AVX-512 where it has it) and for its architecture's baseline."""
    library = native.library  # a test may put the torch loops in its place
    if request.param == "baseline":
        without_march_native(monkeypatch, baseline_folder)
    yield request.param
    library.cache_clear()


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


# Tiles are 16 x 16 values (64 x 64 codes), blocks 512 outputs (2048 codes of a row), whole aligned
# lines are written by streaming stores: shapes under, at and past each, single rows and columns.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (37, 1), (5, 7), (64, 3), (48, 40), (130, 67), (600, 70)])
def test_compiled_scaled_columns_are_the_torch_ones(monkeypatch, tuning, dtype, shape):
    generator = torch.Generator().manual_seed(shape[0])
    weight = torch.randn(shape, generator=generator).to(dtype)
    order = torch.randperm(shape[1], generator=generator)
    compiled = gptq._scaled_columns(weight, order, 0.013)
    torch_loops(monkeypatch)
    assert torch.equal(compiled, gptq._scaled_columns(weight, order, 0.013))


def test_compiled_scaled_columns_write_an_unaligned_output(tuning):
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    order = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    out = torch.empty(32 * 48 + 1)[1:].view(32, 48)  # 4 bytes past a cache line's start
    native.scaled_columns(weight, order, 0.5, out)
    assert torch.equal(out, weight.T[order].float() / 0.5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 65), (65, 1), (5, 7), (3, 64), (128, 100), (67, 130), (130, 2100)])
def test_compiled_unpermuting_is_the_torch_one(monkeypatch, tuning, shape):
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
    local, inverse, factor = torch.eye(8), torch.ones(8), torch.ones(8, 4)
    with pytest.raises(ValueError, match="state of another size"):
        native.polish_sweep(codes, block, None, errors, local, inverse, None, (factor, torch.empty(9, 4), None))
    with pytest.raises(ValueError, match="base by outputs of another kind"):
        native.polish_sweep(codes, torch.empty(10, 8).T, torch.ones(8), errors, local, inverse, None)
    with pytest.raises(ValueError, match="operand of another size"):
        operand = torch.empty(10, 3, dtype=torch.bfloat16)
        native.polish_sweep(codes, block, None, errors, local, inverse, None, (factor, torch.empty(10, 4), operand))


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
def test_compiled_heldout_operand_is_the_torch_one(monkeypatch, dtype, source, product):
    """The weight, then round-to-nearest (from the weight itself), a candidate's codes and
    round-to-nearest again, past a vector and a chunk with an odd tail, weights beyond the format's
    range included (they saturate)."""
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(3, 1111, generator=generator) * torch.logspace(-6, 1, 1111)).to(source)
    scale = float(weight.float().abs().max()) / fp8.fp8_max(dtype) / 2  # the largest weights saturate
    codes = fp8.quantize_nearest(weight * 1.1, scale, dtype)
    results = {}
    for loops in ("compiled", "torch"):
        if loops == "torch":
            torch_loops(monkeypatch)
        operand = gptq._Operand(dtype, product, weight.numel(), 3, weight.device)
        results[loops] = operand(weight, scale, [None, codes, None]).clone()
    compiled, fallback = results["compiled"], results["torch"]
    assert compiled.dtype == product and compiled.shape == (4, *weight.shape)
    assert torch.equal(compiled[0], weight.to(product)) and torch.equal(fallback[0], weight.to(product))
    # the same up to a float32 rounding of the weight's size (the C code fuses value * scale - weight
    # into one operation), and then the rounding of the difference to the product dtype
    rounding = 2**-7 if product == torch.bfloat16 else 0.0  # a unit in the last place
    bound = rounding * fallback[1:].float().abs() + 2**-22 * weight.float().abs()
    assert ((compiled[1:].float() - fallback[1:].float()).abs() <= bound).all()
    rtn = fp8.quantize_nearest(weight, scale, dtype)
    assert torch.equal(fallback[1], (rtn.float() * scale - weight.float()).to(product))
    assert torch.equal(fallback[2], (codes.float() * scale - weight.float()).to(product))
    assert torch.equal(compiled[3], compiled[1]) and torch.equal(fallback[3], fallback[1])


def test_the_compiled_heldout_operand_refuses_shapes_that_would_index_out_of_bounds():
    weight, grid = torch.zeros(4, 20), fp8.GridRounding(torch.float8_e4m3fn, 1)
    codes = torch.zeros(4, 20, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="operand of shape"):
        native.heldout_operand(weight, 1.0, [None, codes], torch.empty(2, 4, 20), torch.float8_e4m3fn, grid)
    with pytest.raises(ValueError, match="codes of another shape"):
        native.heldout_operand(weight, 1.0, [codes[:2]], torch.empty(2, 4, 20), torch.float8_e4m3fn, grid)
