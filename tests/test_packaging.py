"""What the declared dependencies promise: the engine needs torch alone, and no dtype newer than its floor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE = "import quant_core.cli, quant_core.convert, quant_core.decode, quant_core.inspection, quant_core.shards"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_engine_never_imports_safetensors():
    """So the package does not declare it (tests use it as the reference implementation)."""
    result = _python(f"import sys; {ENGINE}; print('safetensors' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_engine_imports_without_dtypes_newer_than_its_torch_floor():
    """torch.float8_e8m0fnu arrived in 2.7, after the declared floor (2.3): without it the engine
    still imports, and refuses such a tensor by its dtype name."""
    code = (
        "import torch; del torch.float8_e8m0fnu; "
        f"{ENGINE}; from quant_core.io import DTYPES; print('F8_E8M0' in DTYPES)"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_torch_floor_is_declared_once_per_file_and_agrees():
    pyproject = re.findall(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text())
    requirements = re.findall(r"^torch>=([\d.]+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert pyproject == requirements == ["2.3"]


def test_the_compiled_loops_build_wherever_there_is_a_compiler():
    """Here, not in test_native.py (skipped without a library): a native.c that no longer compiles
    would otherwise pass as "no compiler here", every compiled test skipped."""
    from quant_core import native

    if native._compiler() is None:
        pytest.skip("no C compiler here")
    if os.environ.get(native.SWITCH) == "0":
        pytest.skip(f"{native.SWITCH}=0: the compiled loops are switched off")
    assert native.library() is not None, "quant_core/native.c did not build; the quant_core log says why"
