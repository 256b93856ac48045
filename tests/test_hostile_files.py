"""Hostile and odd input files: refused with a format error, never converted into something wrong.

The reader must accept only what the safetensors library itself accepts (ComfyUI loads with it),
and a file it accepts must read back exactly as safetensors reads it. ``test_reader_agrees_with_safetensors``
fuzzes that property: a few seconds by default, longer with ``QUANT_CORE_FUZZ=long``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from quant_core.cli import main
from quant_core.convert import ConvertOptions, convert_file
from quant_core.fp8 import NonFiniteWeightError
from quant_core.inspection import verify_files
from quant_core.io import DTYPE_NAMES, DTYPES, SafetensorsFormatError, SafetensorsReader, dtype_nbytes, write_file

settings.register_profile("ci", max_examples=150, deadline=None, database=None, derandomize=True)
settings.register_profile(
    "long", max_examples=5_000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("QUANT_CORE_FUZZ", "ci"))

GROUP = ("blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight")  # one shared scale
OPTIONS = {"preset": "none", "min_tensor_size": 0, "rounding": "nearest"}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def group_file(path: Path, dtype=torch.bfloat16, magnitude: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    tensors = {name: (torch.randn(32, 32, generator=generator) * magnitude).to(dtype) for name in GROUP}
    write_file(path, tensors)
    return tensors


# ------------------------------------------------------------------------------------ 1: NaN/Inf in a group


@pytest.mark.parametrize("member", range(len(GROUP)))
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_anywhere_in_a_shared_scale_group_is_refused(tmp_path, member, bad):
    source = tmp_path / "bad.safetensors"
    tensors = group_file(source)
    tensors[GROUP[member]][7, 3] = bad
    write_file(source, tensors)
    output = tmp_path / "out.safetensors"
    with pytest.raises(NonFiniteWeightError, match=re.escape(GROUP[member])):
        convert_file(source, output, ConvertOptions(**OPTIONS))
    assert not output.exists()
    assert leftovers(tmp_path) == []


def test_verify_fails_on_non_finite_values(tmp_path, capsys):
    source = tmp_path / "good.safetensors"
    group_file(source)
    output = tmp_path / "out.safetensors"
    convert_file(source, output, ConvertOptions(**OPTIONS))
    assert verify_files(str(source), str(output)).violations == []
    with SafetensorsReader(output) as reader:
        tensors = {name: reader.read(name) for name in reader.tensors}
        metadata = dict(reader.metadata)
    tensors[GROUP[1]].view(torch.uint8)[0, 0] = 0x7F  # the e4m3fn NaN
    write_file(output, tensors, metadata)
    report = verify_files(str(source), str(output))
    assert any(GROUP[1] in v and "NaN" in v for v in report.violations)
    assert main(["verify", str(source), str(output)]) == 1
    assert "contract OK" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------ 3: huge weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_weights_report_a_finite_error(tmp_path, dtype):
    source = tmp_path / "huge.safetensors"
    group_file(source, dtype, magnitude=1e30)
    output = tmp_path / "out.safetensors"
    summary = convert_file(source, output, ConvertOptions(**OPTIONS))
    assert math.isfinite(summary.mean_error) and 0 < summary.worst_error < 0.1
    report = verify_files(str(source), str(output))
    assert report.violations == []
    assert all(math.isfinite(layer.error) and layer.error < 0.1 for layer in report.layers)


# ------------------------------------------------------------------------------------ 2: hostile headers


def file_bytes(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def f32(begin: int, end: int, shape=(1,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


ONE = struct.pack("<f", 1.5)
HOSTILE = {
    "overlap": file_bytes({"a": f32(0, 8, (2,)), "b": f32(4, 8)}, ONE * 2),
    "same_region_twice": file_bytes({"a": f32(0, 4), "b": f32(0, 4)}, ONE),
    "gap": file_bytes({"a": f32(0, 4), "b": f32(8, 12)}, ONE * 3),
    "trailing_bytes": file_bytes({"a": f32(0, 4)}, ONE * 2),
    "duplicate_name": file_bytes(
        b'{"a":' + json.dumps(f32(0, 4)).encode() + b',"a":' + json.dumps(f32(0, 4)).encode() + b"}", ONE
    ),
    "metadata_not_a_map": file_bytes({"__metadata__": ["x"], "a": f32(0, 4)}, ONE),
    "metadata_value_not_text": file_bytes({"__metadata__": {"x": 1}, "a": f32(0, 4)}, ONE),
    "shape_as_text": file_bytes({"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}, ONE),
    "shape_as_float": file_bytes({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, ONE),
    "offset_as_bool": file_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, ONE),
    "shape_overflows": file_bytes({"a": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}}, b""),
    "header_length_past_the_end": struct.pack("<Q", 2**40) + b"{}",
    "header_not_utf8": file_bytes(b'{"\xff": 1}', b""),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_is_refused_like_safetensors_refuses_it(tmp_path, name):
    source = tmp_path / f"{name}.safetensors"
    source.write_bytes(HOSTILE[name])
    if name != "duplicate_name":  # safetensors keeps the last of two identical entries; a name twice is refused here
        with pytest.raises(SafetensorError), safe_open(str(source), "pt") as loaded:
            [loaded.get_tensor(key) for key in loaded.keys()]  # noqa: SIM118 - safe_open is not a mapping
    with pytest.raises(SafetensorsFormatError):
        SafetensorsReader(source).close()
    output = tmp_path / "out.safetensors"
    with pytest.raises(SafetensorsFormatError):
        convert_file(source, output, ConvertOptions(**OPTIONS))
    assert not output.exists()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ fuzz

KNOWN = [name for dtype, name in DTYPE_NAMES.items() if dtype != torch.float8_e8m0fnu]  # E8M0: not in safetensors 0.8
small = st.integers(min_value=-2, max_value=12)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*KNOWN, "F4", "XF16", 3]),
        "shape": st.lists(small, max_size=3),
        "data_offsets": st.lists(st.integers(min_value=-4, max_value=80), min_size=2, max_size=2),
    }
)
headers = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), entries, max_size=3)


def contiguous(header: dict, data: bytes) -> tuple[dict, bytes]:
    """Lay the entries out one after another as a writer would, with data of the right length
    (most such files are valid; a negative dimension or an unknown dtype still makes them invalid)."""
    offset = 0
    for entry in header.values():
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        count = math.prod(entry["shape"]) if min(entry["shape"], default=0) >= 0 else 1
        nbytes = count * (dtype_nbytes(dtype) if dtype else 1)
        entry["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
    return header, (data * (offset // max(1, len(data)) + 1))[:offset] if data else bytes(offset)


def outcome_of_safetensors(path: Path) -> dict[str, bytes] | None:
    try:
        with safe_open(str(path), "pt") as loaded:
            return {key: _bytes(loaded.get_tensor(key)) for key in loaded.keys()}  # noqa: SIM118
    except (SafetensorError, ValueError, TypeError, RuntimeError):  # (0.8 raises some as plain errors)
        return None


def outcome_of_ours(path: Path) -> dict[str, bytes] | None:
    try:
        with SafetensorsReader(path) as reader:
            return {name: _bytes(reader.read(name)) for name in reader.tensors}
    except SafetensorsFormatError:
        return None


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


@given(header=headers, layout=st.booleans(), data=st.binary(max_size=96))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_reader_agrees_with_safetensors(tmp_path, header, layout, data):
    """Any header: we accept what safetensors accepts and read the same bytes; we refuse what it refuses
    (and, beyond it, dtypes we have no torch type for, such as F4)."""
    if layout:
        header, data = contiguous({k: v for k, v in header.items() if k != "__metadata__"}, data)
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(file_bytes(header, data))
    ours = outcome_of_ours(path)
    if ours is not None or all(entry["dtype"] in KNOWN for name, entry in header.items() if name != "__metadata__"):
        assert ours == outcome_of_safetensors(path)


@given(blob=st.binary(max_size=256))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_reader_reads_arbitrary_bytes_as_safetensors_does_or_refuses_them(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    ours = outcome_of_ours(path)  # a format error or nothing else
    if ours is not None:
        assert ours == outcome_of_safetensors(path)
