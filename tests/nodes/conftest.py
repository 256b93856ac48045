"""Fixtures for the node-layer unit tests: the pack imported the way ComfyUI imports it, the ComfyUI
doubles of ``comfy_doubles.py`` installed for one test, and tiny models.

No ``__init__.py`` here on purpose: with one, pytest would import this folder as a top-level
package named ``nodes`` (``tests/`` has no ``__init__.py``), which is exactly the name that must never
be taken (ComfyUI's own ``nodes.py``, and the pack's ``nodes`` package). Helpers are therefore handed
to the tests through fixtures, and ``comfy_doubles.py`` is loaded by path under a unique name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PACK_SUBMODULES = ("host", "options", "model_source", "conversion", "loading", "recording")
DOUBLED_MODULES = ("comfy", "comfy.utils", "comfy.model_management", "comfy.cli_args", "comfy.sd")
DOUBLED_MODULES += ("comfy.patcher_extension", "comfy.lora")
DOUBLED_MODULES += ("folder_paths", "server")


def _load_by_path(name: str, path: Path, package_dir: Path | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_pack(name: str) -> types.ModuleType:
    """Import the repository root as a package called ``name``, as ComfyUI's ``load_custom_node`` does."""
    return _load_by_path(name, ROOT / "__init__.py", package_dir=ROOT)


def unload(name: str) -> None:
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


doubles = _load_by_path(f"fp8_scaled_test_comfy_doubles_{uuid.uuid4().hex[:8]}", HERE / "comfy_doubles.py")


@pytest.fixture(scope="session")
def pack():
    """The pack under a unique module name, with its node modules and engine modules as attributes."""
    name = f"fp8_scaled_pack_under_test_{uuid.uuid4().hex[:8]}"
    root = load_pack(name)
    namespace = types.SimpleNamespace(name=name, root=root)
    for sub in PACK_SUBMODULES:
        setattr(namespace, sub, importlib.import_module(f"{name}.nodes.{sub}"))
    for sub in ("convert", "io", "formats", "codec", "fp8", "job"):
        setattr(namespace, sub, importlib.import_module(f"{name}.quant_core.{sub}"))
    yield namespace
    unload(name)


def install_doubles(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> types.SimpleNamespace:
    """Put a fresh set of doubles into ``sys.modules``; ``monkeypatch``'s undo removes them again (or
    puts back what was there, e.g. a real ComfyUI imported by the integration tests)."""
    env = doubles.build(models_dir)
    for name in DOUBLED_MODULES:
        monkeypatch.setitem(sys.modules, name, env.modules[name])
    env.ModelPatcher = doubles.ModelPatcher
    env.QuantizedTensor = doubles.QuantizedTensor
    env.QuantizedLinear = doubles.QuantizedLinear
    env.apply_model = doubles.apply_model
    env.models = models_dir
    return env


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """Fresh ComfyUI doubles in ``sys.modules`` for one test; model folders under ``tmp_path/models``."""
    return install_doubles(monkeypatch, tmp_path / "models")


@pytest.fixture
def doubles_installer():
    return install_doubles


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


class _Named(torch.nn.Module):
    def __init__(self, **children):
        super().__init__()
        for key, child in children.items():
            setattr(self, key, child)


def tiny_diffusion_model(blocks: int = 2, seed: int = 0, dtype=torch.bfloat16) -> torch.nn.Module:
    """A ComfyUI-``BaseModel``-shaped module: ``diffusion_model`` (per block an attention ``q`` of
    32x32 and an MLP ``fc`` of 64x32, with biases, plus a norm) and a ``model_sampling`` buffer
    outside it. Weights of 1024+ elements are quantized with the default ``min_tensor_size``."""
    generator = torch.Generator().manual_seed(seed)
    layers = torch.nn.ModuleList(
        _Named(
            attn=_Named(q=torch.nn.Linear(32, 32)),
            mlp=_Named(fc=torch.nn.Linear(32, 64)),
            norm=torch.nn.LayerNorm(32),
        )
        for _ in range(blocks)
    )
    diffusion_model = _Named(blocks=layers)
    with torch.no_grad():
        for parameter in diffusion_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / 6)
    model = _Named(diffusion_model=diffusion_model.to(dtype), model_sampling=torch.nn.Module())
    model.model_sampling.register_buffer("sigmas", torch.linspace(0.03, 14.6, 10))
    return model


@pytest.fixture
def tiny_model():
    """A factory of ``tiny_diffusion_model``s."""
    return tiny_diffusion_model


def tree(folder: Path) -> list[str]:
    """Every file (hidden ones included) below ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def files_below():
    return tree
