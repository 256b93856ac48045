"""bench/gpu_check.py: its CPU-only self-test passes, and its comparison catches what it must."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from quant_core import formats
from quant_core.io import write_file

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_self_test_runs_every_path_and_passes(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--self-test", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for path in (
        "round-to-nearest",
        "learned, use_amp",
        "learned, no use_amp",
        "GPTQ, exact statistics",
        "GPTQ, sketched statistics",
        "Recorder, exact",
        "Recorder, sketched",
        "--parallel, GPTQ",
    ):
        assert any(line.startswith(path) and " ok " in line for line in out.splitlines()), path
    assert "8 of 8 paths match" in out
    assert list(tmp_path.iterdir()) == [], "temporary files are removed"


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_fp8_ordinal_counts_grid_steps(gpu_check, dtype):
    values = torch.arange(256, dtype=torch.uint8).view(dtype)
    finite = values[torch.isfinite(values.float())]
    ordered = finite[finite.float().argsort(stable=True)]
    ordinals = gpu_check.fp8_ordinal(ordered)
    steps = ordinals[1:] - ordinals[:-1]
    assert set(steps.tolist()) <= {0, 1}, "monotone, one step between neighbours"
    assert int((steps == 0).sum()) == 1, "only -0 and +0 share a position"


def _file(path: Path, codes: torch.Tensor, scale: float) -> Path:
    write_file(path, formats.layer_tensors("comfy", "blocks.0.attn.q.weight", codes, scale))
    return path


@pytest.fixture
def layer(tmp_path):
    """An original weight, its round-to-nearest fp8 codes and scale, as files."""
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    scale = float(weight.abs().max()) / 448
    codes = (weight / scale).to(E4M3)
    original = tmp_path / "original.safetensors"
    write_file(original, {"blocks.0.attn.q.weight": weight})
    return original, codes, scale, _file(tmp_path / "reference.safetensors", codes, scale)


def _nudged(codes: torch.Tensor, count: int, steps: int) -> torch.Tensor:
    """``codes`` with the first ``count`` positive values moved ``steps`` grid steps up."""
    bits = codes.view(torch.uint8).flatten().clone()
    positive = ((bits > 0) & (bits < 0x70)).nonzero().flatten()[:count]
    bits[positive] += steps
    return bits.view(E4M3).reshape(codes.shape)


def test_comparison_accepts_a_tie_and_catches_real_mismatches(gpu_check, layer, tmp_path):
    original, codes, scale, reference = layer
    compare = gpu_check.compare_files
    same = compare(reference, _file(tmp_path / "same.safetensors", codes, scale), original, gpu_check.NEAREST)
    assert same[1] == [] and "diff 0.0e+00" in same[0]
    one_tie = _file(tmp_path / "tie.safetensors", _nudged(codes, 1, 1), scale)  # 1 of 4096 values: over 1e-4
    assert compare(reference, one_tie, original, gpu_check.GPTQ)[1] == []
    assert any("of fp8 values differ" in p for p in compare(reference, one_tie, original, gpu_check.NEAREST)[1])
    two_steps = _file(tmp_path / "two.safetensors", _nudged(codes, 1, 2), scale)
    assert any("2 grid steps apart" in p for p in compare(reference, two_steps, original, gpu_check.LEARNED)[1])
    assert compare(reference, two_steps, original, gpu_check.GPTQ)[1] == [], "GPTQ's feedback moves values further"
    rescaled = _file(tmp_path / "scale.safetensors", codes, scale * (1 + 1e-5))
    assert any("scale" in p for p in compare(reference, rescaled, original, gpu_check.LEARNED)[1])
    worse = _file(tmp_path / "worse.safetensors", _nudged(codes, 2000, 1), scale)  # half the values one step off
    problems = compare(reference, worse, original, gpu_check.LEARNED)[1]
    assert any("output error" in p for p in problems), problems
