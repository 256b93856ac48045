"""Every tensor a conversion puts on its device is freed when it ends, whether it succeeds or fails.

Runs on CUDA when present (then also checking ``torch.cuda.memory_allocated``), else on the CPU:
there, every tensor the conversion created must be unreachable afterwards (found through the
garbage collector's list of live objects), with the failure's exception still held, as ComfyUI
holds it while it reports the error.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from quant_core.calibration import Recorder
from quant_core.convert import ConvertOptions, convert
from quant_core.io import SafetensorsReader, write_file
from quant_core.rounding import RoundingOptions

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
NAMES = [f"blocks.{i}.{layer}" for i in range(3) for layer in ("attn.qkv", "mlp.0")]


class DeviceSource:
    """A checkpoint whose tensors come on ``DEVICE``, as a MODEL loaded on a GPU gives them;
    ``fail_at`` makes that read raise (a stage failing while others hold device tensors)."""

    def __init__(self, reader: SafetensorsReader, fail_at: str | None = None):
        self.reader, self.fail_at = reader, fail_at
        self.tensors, self.metadata, self.device = reader.tensors, {}, DEVICE

    def read(self, name: str) -> torch.Tensor:
        if name == self.fail_at:
            raise RuntimeError(f"cannot read {name}")
        return self.reader.read(name).to(DEVICE, copy=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small model's checkpoint (bf16), its calibration file, and one copy with a NaN in a late weight."""
    folder = tmp_path_factory.mktemp("device_memory")
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({name.replace(".", "_"): torch.nn.Linear(64, 64) for name in NAMES})
    state = {
        f"{name}.{p}": getattr(model[name.replace(".", "_")], p).detach().to(torch.bfloat16)
        for name in NAMES
        for p in ("weight", "bias")
    }
    path = folder / "model.safetensors"
    write_file(path, state)
    broken = folder / "nan.safetensors"
    state[f"{NAMES[-2]}.weight"][3, 5] = float("nan")
    write_file(broken, state)

    class Named(torch.nn.Module):  # Linear layers named like the checkpoint's keys, for the Recorder
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                torch.nn.ModuleDict(
                    {
                        "attn": torch.nn.ModuleDict({"qkv": model[f"blocks_{i}_attn_qkv"]}),
                        "mlp": torch.nn.ModuleList([model[f"blocks_{i}_mlp_0"]]),
                    }
                )
                for i in range(3)
            )

    named = Named()
    calibration = folder / "calibration.safetensors"
    with Recorder(named) as recorder:
        for block in named.blocks:
            block["mlp"][0](block["attn"]["qkv"](torch.randn(32, 64)))
    recorder.save(calibration)
    return path, broken, calibration


def _device_tensors(collect: bool = True) -> list[torch.Tensor]:
    if collect:
        gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.device.type == DEVICE.type]


def _snapshot() -> dict[int, weakref.ref]:
    """The live device tensors, by identity (a WeakSet would compare tensors by value)."""
    return {id(t): weakref.ref(t) for t in _device_tensors(collect=False)}


def _new_device_tensors(before: dict[int, weakref.ref]) -> list[tuple[str, tuple]]:
    dead = lambda: None  # noqa: E731
    return [(str(t.dtype), tuple(t.shape)) for t in _device_tensors() if before.get(id(t), dead)() is not t]


def _allocated() -> int:
    """Bytes allocated on the CUDA device, cuBLAS's per-thread workspaces (torch's cache) cleared first."""
    if DEVICE.type != "cuda":
        return 0
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces:
        clear_workspaces()
    return torch.cuda.memory_allocated(DEVICE)


METHODS = {
    "nearest": dict(method="nearest"),
    "learned": dict(method="learned", rounding=RoundingOptions(num_iter=3, calib_samples=8)),
    "gptq": dict(method="auto"),
}


CASES = [(method, "success") for method in sorted(METHODS)]
CASES += [("gptq", "failed_read"), ("nearest", "failed_read"), ("learned", "non_finite_weight")]


@pytest.mark.parametrize("method, outcome", CASES)
def test_conversion_leaves_no_device_tensor(checkpoint, tmp_path, method, outcome):
    path, broken, calibration = checkpoint
    options = ConvertOptions(device=str(DEVICE), **METHODS[method])
    if method == "gptq":
        options.calibration = str(calibration)
    before = _snapshot()
    allocated = _allocated()
    source_file = broken if outcome == "non_finite_weight" else path
    with SafetensorsReader(source_file) as reader:
        source = DeviceSource(reader, fail_at=f"{NAMES[-1]}.weight" if outcome == "failed_read" else None)
        if outcome == "success":
            convert(source, tmp_path / "out.safetensors", options)
            held = None
        else:
            with pytest.raises((RuntimeError, ValueError)) as held:
                convert(source, tmp_path / "out.safetensors", options)
        del source
    assert (tmp_path / "out.safetensors").exists() == (outcome == "success")
    assert _new_device_tensors(before) == [], "tensors the conversion made are still reachable"
    assert _allocated() == allocated, "device memory is still allocated"
    del held
