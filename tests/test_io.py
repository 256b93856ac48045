"""Streaming safetensors I/O and the engine's file handling: round trips, alignment, atomic output,
refusals, bad input, and identical output from ``--parallel``."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant_core import io as quant_io
from quant_core.calibration import RandomCalibration
from quant_core.convert import ConvertOptions, convert, convert_file
from quant_core.io import (
    DTYPES,
    BufferPool,
    SafetensorsFormatError,
    SafetensorsReader,
    SafetensorsWriter,
    TensorInfo,
    dtype_nbytes,
    write_file,
)
from quant_core.options import LearnedOptions
from quant_core.rounding import PatternCounts

QUICK_LEARNED = LearnedOptions(num_iter=10, calib_samples=16, seed=7)
QUANTIZED_NAME = "double_blocks.0.img_attn.qkv.weight"  # quantized by the flux preset

# ---------------------------------------------------------------------------------------------- helpers


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random data of any safetensors dtype (values spread over the type's range)."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype == torch.float8_e8m0fnu:  # exponent-only: powers of two
        return torch.pow(2.0, torch.randint(-20, 20, shape, generator=generator).float()).to(dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 3).to(dtype)
    high = 2**7 if dtype in (torch.int8, torch.uint8) else 2**15
    return torch.randint(0, high, shape, generator=generator).to(dtype)


def many_tensors(dtypes) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for shape in [(3, 5), (), (0,), (2, 0, 3), (7,)]:
            tensors[f"{name}.{'x'.join(map(str, shape)) or 'scalar'}"] = sample(dtype, shape, generator)
    return tensors


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert raw(loaded[name]) == raw(tensor), name


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsReader(path) as reader:
        return {name: reader.read(name) for name in reader.tensors}, dict(reader.metadata)


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted write could leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


# ---------------------------------------------------------------------------------------------- round trips

SAFETENSORS_DTYPES = [d for d in DTYPES.values() if d != torch.float8_e8m0fnu]  # F8_E8M0: not in safetensors 0.8


def test_round_trip_every_dtype(tmp_path):
    tensors = many_tensors(DTYPES.values())
    path = tmp_path / "all.safetensors"
    write_file(path, tensors, metadata={"a": "1", "b": "two"})
    loaded, metadata = read_all(path)
    assert_same(loaded, tensors)
    assert metadata == {"a": "1", "b": "two"}


def test_files_we_write_load_with_safetensors(tmp_path):
    tensors = many_tensors(SAFETENSORS_DTYPES)
    path = tmp_path / "ours.safetensors"
    write_file(path, tensors, metadata={"origin": "quant_core"})
    assert_same(load_file(str(path)), tensors)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"origin": "quant_core"}


def test_files_safetensors_writes_load_with_ours(tmp_path):
    tensors = many_tensors(SAFETENSORS_DTYPES)
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, str(path), metadata={"origin": "safetensors"})
    loaded, metadata = read_all(path)
    assert_same(loaded, tensors)
    assert metadata == {"origin": "safetensors"}


def test_read_tensors_are_independent_of_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    write_file(path, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    with SafetensorsReader(path) as reader:
        tensor = reader.read("w")
    tensor += 1  # writable, and the file is closed: not a memory map of it
    assert torch.equal(load_file(str(path))["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_data_offsets_aligned_to_element_size(tmp_path):
    generator = torch.Generator().manual_seed(12)
    # small element types first, so that a naive layout would misalign the large ones
    tensors = {
        "a_u8": sample(torch.uint8, (3,), generator),
        "b_bool": sample(torch.bool, (5,), generator),
        "c_f32": sample(torch.float32, (3,), generator),
        "d_fp8": sample(torch.float8_e4m3fn, (7,), generator),
        "e_f64": sample(torch.float64, (2,), generator),
        "f_bf16": sample(torch.bfloat16, (3,), generator),
        "g_i64": sample(torch.int64, (1,), generator),
        "h_f16": sample(torch.float16, (5,), generator),
        "i_empty_f64": torch.empty(0, dtype=torch.float64),
        "j_scalar_f32": torch.tensor(1.5),
    }
    path = tmp_path / "aligned.safetensors"
    write_file(path, tensors, metadata={"x": "y" * 5})
    length, entries = header(path)
    entries.pop("__metadata__")
    data_start = 8 + length
    assert data_start % 8 == 0
    spans = []
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        size = tensors[name].element_size()
        assert (data_start + begin) % size == 0, name
        assert end - begin == tensors[name].numel() * size, name
        spans.append((begin, end))
    # contiguous and covering the whole data region, as the safetensors reference loader requires
    spans.sort()
    assert spans[0][0] == 0
    assert all(previous[1] == current[0] for previous, current in zip(spans, spans[1:], strict=False))
    assert data_start + spans[-1][1] == path.stat().st_size
    with SafetensorsReader(path) as reader:
        for info in reader.tensors.values():
            assert info.start % dtype_nbytes(info.dtype) == 0


def test_writer_accepts_any_order_and_checks_completeness(tmp_path):
    entries = [TensorInfo("a", torch.float32, (2,)), TensorInfo("b", torch.uint8, (3,))]
    buffer = open(tmp_path / "out.safetensors", "w+b")  # noqa: SIM115 - closed below
    writer = SafetensorsWriter(buffer, entries, {})
    writer.write("b", torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    with pytest.raises(ValueError):
        writer.write("a", torch.zeros(3))  # wrong shape
    with pytest.raises(ValueError):
        writer.write("b", torch.tensor([1, 2, 3], dtype=torch.uint8))  # twice
    writer.write("a", torch.tensor([1.0, 2.0]))
    writer.finish()
    buffer.close()
    assert (tmp_path / "out.safetensors").stat().st_size == writer.total_bytes


# ---------------------------------------------------------------------------------------------- atomic output


class Boom(RuntimeError):
    pass


class FailingCalibration:
    """Random calibration that fails on its ``fail_at``-th request."""

    def __init__(self, fail_at: int, exc: type[BaseException]):
        self.calls, self.fail_at, self.exc = 0, fail_at, exc
        self.random = RandomCalibration()

    def inputs(self, name, in_features, count, generator, device):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc("calibration failed")
        return self.random.inputs(name, in_features, count, generator, device)


@pytest.mark.parametrize("parallel", [False, True], ids=["default", "--parallel"])
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("hook", ["progress", "check_interrupt", "calibration"])
def test_failure_midway_leaves_no_output_and_no_temp_file(flux_file, tmp_path, hook, exc, parallel):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "converted.safetensors"
    calls = []

    def fail_on_fifth(*_):
        calls.append(1)
        if len(calls) == 5:
            raise exc("stop")

    kwargs = {}
    options = ConvertOptions(
        rounding="nearest" if hook != "calibration" else "learned", learned=QUICK_LEARNED, parallel=parallel
    )
    if hook == "progress":
        kwargs["progress"] = fail_on_fifth
    elif hook == "check_interrupt":
        kwargs["check_interrupt"] = fail_on_fifth
    else:
        kwargs["learned_inputs"] = FailingCalibration(fail_at=5, exc=exc)

    with pytest.raises(exc):
        convert_file(flux_file, output, options, **kwargs)
    # the hook raised on its fifth call (with --parallel, another thread may have made a sixth meanwhile)
    assert (kwargs["learned_inputs"].calls if hook == "calibration" else len(calls)) >= 5
    assert not output.exists()
    assert list(out_dir.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_failure_keeps_an_existing_output_intact(flux_file, tmp_path):
    output = tmp_path / "converted.safetensors"
    output.write_bytes(b"previous result")

    def interrupt(report):
        if report.index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_file(flux_file, output, ConvertOptions(rounding="nearest", overwrite=True), progress=interrupt)
    assert output.read_bytes() == b"previous result"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("spelling", ["same", "dot", "parent", "absolute", "symlink"])
def test_refuses_to_overwrite_the_input(flux_file, tmp_path, monkeypatch, spelling, overwrite):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    before = flux_file.read_bytes()
    if spelling == "symlink":
        (tmp_path / "link.safetensors").symlink_to(flux_file)
    output = {
        "same": flux_file.name,
        "dot": f"./{flux_file.name}",
        "parent": f"sub/../{flux_file.name}",
        "absolute": str(flux_file),
        "symlink": "link.safetensors",
    }[spelling]
    with pytest.raises(ValueError, match="input"):
        convert_file(flux_file.name, output, ConvertOptions(rounding="nearest", overwrite=overwrite))
    assert flux_file.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(flux_file, tmp_path):
    output = tmp_path / "converted.safetensors"
    output.write_bytes(b"previous result")
    with pytest.raises(FileExistsError):
        convert_file(flux_file, output, ConvertOptions(rounding="nearest"))
    assert output.read_bytes() == b"previous result"

    convert_file(flux_file, output, ConvertOptions(rounding="nearest", overwrite=True))
    converted = load_file(str(output))
    assert converted[QUANTIZED_NAME].dtype == torch.float8_e4m3fn
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("parallel", [False, True], ids=["default", "--parallel"])
def test_non_finite_weight_is_a_clear_error(flux_file, tmp_path, bad, parallel):
    tensors, metadata = read_all(flux_file)
    tensors[QUANTIZED_NAME] = tensors[QUANTIZED_NAME].clone()
    tensors[QUANTIZED_NAME][3, 5] = bad
    source = tmp_path / "broken.safetensors"
    write_file(source, tensors, metadata)
    output = tmp_path / "converted.safetensors"
    with pytest.raises(ValueError, match=re.escape(QUANTIZED_NAME)):
        convert_file(source, output, ConvertOptions(rounding="nearest", parallel=parallel))
    assert not output.exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- bad input


def damaged(good: bytes, how: str) -> bytes:
    (length,) = struct.unpack("<Q", good[:8])
    if how == "empty":
        return b""
    if how == "short":
        return good[:5]
    if how == "truncated_header":
        return good[: 8 + length // 2]
    if how == "truncated_data":
        return good[:-10]
    if how == "garbage":
        return bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(13)).tolist())
    if how == "header_not_json":
        return struct.pack("<Q", 16) + b"\xff\xfe not json!!!" + good[8 + length :]
    if how == "unknown_dtype":
        return good[:8] + good[8 : 8 + length].replace(b'"BF16"', b'"XF16"', 1) + good[8 + length :]
    if how == "header_length_too_big":
        return struct.pack("<Q", len(good)) + good[8:]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "empty",
        "short",
        "truncated_header",
        "truncated_data",
        "garbage",
        "header_not_json",
        "unknown_dtype",
        "header_length_too_big",
    ],
)
def test_unreadable_input_is_a_format_error(flux_file, tmp_path, how):
    source = tmp_path / "damaged.safetensors"
    source.write_bytes(damaged(flux_file.read_bytes(), how))
    with pytest.raises(SafetensorsFormatError):
        SafetensorsReader(source)
    output = tmp_path / "converted.safetensors"
    with pytest.raises(SafetensorsFormatError):
        convert_file(source, output, ConvertOptions(rounding="nearest"))
    assert not output.exists()
    assert leftovers(tmp_path) == []


def with_header(raw_header: bytes, data: bytes = b"\0" * 8) -> bytes:
    raw_header += b" " * (-len(raw_header) % 8)
    return struct.pack("<Q", len(raw_header)) + raw_header + data


@pytest.mark.parametrize(
    "raw_header",
    [
        b"[]",
        b"null",
        b'{"w": 5}',
        b'{"w": {"dtype": "F32", "shape": [1]}}',
        b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, -4]}}',
    ],
    ids=["list", "null", "entry_not_object", "entry_without_offsets", "negative_shape"],
)
def test_malformed_header_is_a_format_error(tmp_path, raw_header):
    source = tmp_path / "malformed.safetensors"
    source.write_bytes(with_header(raw_header))
    with pytest.raises(SafetensorsFormatError), SafetensorsReader(source) as reader:
        for name in reader.tensors:
            reader.read(name)


# ---------------------------------------------------------------------------------------------- --parallel


def convert_twice(source: Path, tmp_path: Path, method: str) -> tuple[Path, Path]:
    outputs = []
    for parallel in (False, True):
        output = tmp_path / f"parallel_{parallel}.safetensors"
        options = ConvertOptions(rounding=method, parallel=parallel, learned=QUICK_LEARNED)
        convert_file(source, output, options)
        outputs.append(output)
    return outputs[0], outputs[1]


@pytest.mark.parametrize("method", ["nearest", "learned"])
def test_parallel_output_is_byte_identical(flux_file, tmp_path, method):
    sequential, parallel = convert_twice(flux_file, tmp_path, method)
    assert sequential.read_bytes() == parallel.read_bytes()


def test_without_positional_io_the_output_is_byte_identical(flux_file, tmp_path, monkeypatch):
    """Windows has neither ``os.preadv`` nor ``os.pwrite``: the locked seek-and-read fallback must
    give the same file, with reading and writing on different threads."""
    positional = tmp_path / "positional.safetensors"
    convert_file(flux_file, positional, ConvertOptions(rounding="nearest"))
    monkeypatch.setattr(quant_io, "_POSITIONAL", False)
    monkeypatch.delattr(quant_io.os, "preadv")
    monkeypatch.delattr(quant_io.os, "pwrite")
    monkeypatch.delattr(quant_io.os, "posix_fadvise")
    fallback = tmp_path / "fallback.safetensors"
    convert_file(flux_file, fallback, ConvertOptions(rounding="nearest"))
    assert fallback.read_bytes() == positional.read_bytes()


@pytest.mark.parametrize("method", ["nearest", "learned"])
def test_same_input_and_options_same_file(flux_file, tmp_path, method):
    """Determinism on the CPU (the README says what may differ on a GPU); learned rounding is seeded."""
    outputs = []
    for attempt in range(2):
        output = tmp_path / f"run{attempt}.safetensors"
        convert_file(flux_file, output, ConvertOptions(rounding=method, learned=QUICK_LEARNED))
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]
    assert os.path.getsize(tmp_path / "run0.safetensors") > 0


def test_nothing_to_quantize_is_refused(tmp_path):
    """Converting an already converted file (or a model with no eligible weight) must not write a useless copy."""
    source = tmp_path / "norms_only.safetensors"
    write_file(source, {"norm.weight": torch.ones(64), "tiny.weight": torch.ones(4, 4)})
    with pytest.raises(ValueError, match="nothing to quantize"):
        convert_file(source, tmp_path / "out.safetensors", ConvertOptions(rounding="nearest"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norms_only.safetensors"]


# ---------------------------------------------------------------------------------------------- buffer pool


MIB = 1 << 20


def test_pool_reuses_a_buffer_once_nothing_views_it():
    pool = BufferPool()
    first = pool.empty(2 * MIB)
    address = first.data_ptr()
    del first
    again = pool.empty(2 * MIB)
    assert again.data_ptr() == address
    assert pool.nbytes == 2 * MIB


def test_pool_never_hands_out_memory_that_is_still_viewed():
    pool = BufferPool()
    first = pool.empty(2 * MIB).fill_(7)
    as_words = first.view(torch.int16)[:10]  # a view of a view keeps the buffer busy too
    del first
    second = pool.empty(2 * MIB).fill_(9)
    assert as_words.data_ptr() != second.data_ptr()
    assert bool((as_words == 0x0707).all())


def test_pool_keeps_no_more_than_its_slack_over_what_it_ever_used_at_once():
    pool = BufferPool()
    for size in (3 * MIB, 5 * MIB, 2 * MIB, 4 * MIB, 3 * MIB, 7 * MIB, 1 * MIB):
        tensor = pool.empty(size)
        assert tensor.numel() == size
        del tensor
        assert pool.nbytes <= BufferPool.SLACK * 7 * MIB
    held = [pool.empty(2 * MIB), pool.empty(2 * MIB)]
    assert held[0].data_ptr() != held[1].data_ptr()
    assert pool.nbytes <= BufferPool.SLACK * 7 * MIB + 2 * MIB


def test_pool_serves_a_request_from_the_smallest_free_buffer_at_most_twice_its_size():
    pool = BufferPool()
    large, small = pool.empty(8 * MIB), pool.empty(5 * MIB)
    addresses = large.data_ptr(), small.data_ptr()
    del large, small
    first = pool.empty(4 * MIB)
    assert first.data_ptr() == addresses[1] and first.numel() == 4 * MIB, "the smallest buffer that fits"
    second = pool.empty(4 * MIB)
    assert second.data_ptr() == addresses[0], "then the next one"
    assert pool.empty(3 * MIB).data_ptr() not in addresses, "both in use: a fresh one"
    del first, second
    assert pool.empty(2 * MIB).data_ptr() not in addresses, "more than twice its size: not used"


def test_pool_leaves_small_requests_to_the_allocator():
    pool = BufferPool()
    pool.empty(1000)
    assert pool.nbytes == 0


def test_reads_through_a_pool_are_correct_and_independent(tmp_path):
    path = tmp_path / "pooled.safetensors"
    tensors = {f"t{i}": torch.full((MIB,), float(i)) for i in range(4)}  # 4 MiB each, one shape
    save_file(tensors, str(path))
    with SafetensorsReader(path, BufferPool()) as reader:
        kept = reader.read("t0")
        for name, expected in tensors.items():
            assert torch.equal(reader.read(name), expected)
        assert torch.equal(kept, tensors["t0"]), "a tensor still held is never overwritten by later reads"


def test_conversion_without_a_pool_gives_the_same_file(flux_file, tmp_path):
    pooled, fresh = tmp_path / "pooled.safetensors", tmp_path / "fresh.safetensors"
    convert_file(flux_file, pooled, ConvertOptions(rounding="nearest"))
    with SafetensorsReader(flux_file) as reader:
        convert(reader, fresh, ConvertOptions(rounding="nearest"))
    assert pooled.read_bytes() == fresh.read_bytes()


def test_pool_hands_out_fresh_memory_where_torch_cannot_count_views(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    pool = BufferPool()
    for _ in range(3):
        assert pool.empty(2 * MIB).numel() == 2 * MIB
    assert pool.nbytes == 0, "nothing is kept that could never be known to be free"


def test_visited_pieces_are_the_tensor_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(quant_io, "VISIT_BYTES", 16)
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "bf16": torch.randn(3, 50, generator=generator).bfloat16(),
        "f32": torch.randn(7, generator=generator),
        "i64": torch.arange(5),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    path = tmp_path / "pieces.safetensors"
    write_file(path, tensors)
    with SafetensorsReader(path) as reader:
        for name, expected in tensors.items():
            pieces = []
            read = reader.read(name, pieces.append)
            assert torch.equal(read, expected)
            assert all(p.dtype == expected.dtype and p.ndim == 1 and p.nbytes <= 16 for p in pieces)
            assert len(pieces) == -(-expected.nbytes // 16)
            if pieces:
                assert torch.equal(torch.cat(pieces), expected.flatten())


class _PlainSource:
    """A tensor source that is not a file reader (as the nodes' loaded models are): nothing is counted."""

    def __init__(self, reader: SafetensorsReader) -> None:
        self.tensors, self.metadata, self.path = reader.tensors, reader.metadata, reader.path
        self._reader = reader

    def read(self, name: str) -> torch.Tensor:
        return self._reader.read(name)


@pytest.mark.parametrize("shared_scales", [True, False])
def test_weights_counted_while_read_give_the_same_file(flux_file, tmp_path, monkeypatch, shared_scales):
    monkeypatch.setattr(quant_io, "VISIT_BYTES", 4096)  # many pieces per weight
    options = ConvertOptions(rounding="nearest", shared_scales=shared_scales)
    counted, plain = tmp_path / "counted.safetensors", tmp_path / "plain.safetensors"
    pieces = []
    add = PatternCounts.add
    monkeypatch.setattr(PatternCounts, "add", lambda counts, piece: (pieces.append(piece.numel()), add(counts, piece)))
    summary = convert_file(flux_file, counted, options)
    quantized = [r for r in summary.reports if r.quantized]
    assert sum(pieces) == sum(r.nbytes for r in quantized) // 2 and len(pieces) > len(quantized), "counted as read"
    pieces.clear()
    with SafetensorsReader(flux_file) as reader:
        expected = convert(_PlainSource(reader), plain, options)
    assert not pieces, "a source that is not a file reader is not counted"
    assert counted.read_bytes() == plain.read_bytes()
    assert [r.error_after for r in summary.reports] == [r.error_after for r in expected.reports]


def _large_tensors() -> dict[str, torch.Tensor]:
    """Tensors of at least a MiB at offsets off the disk's blocks, one not of whole blocks, one after a
    2-byte tensor (so 4-byte data may start off its own alignment within a block), the file's end off a block."""
    generator = torch.Generator().manual_seed(11)
    return {
        "a_small": torch.randn(3, generator=generator).bfloat16(),
        "b_blocks": torch.randn(1024, 1024, generator=generator).bfloat16(),
        "c_odd": torch.randn(1000, 1001, generator=generator).bfloat16(),
        "d_float": torch.randn(512, 700, generator=generator),
        "e_bytes": torch.randint(0, 255, (1 << 20,), generator=generator, dtype=torch.uint8),
        "f_tail": torch.randn(1, 5, generator=generator).half(),
    }


@pytest.mark.parametrize("visit", [False, True])
def test_direct_reads_give_the_same_tensors(tmp_path, monkeypatch, visit):
    tensors = _large_tensors()
    path = tmp_path / "large.safetensors"
    save_file(tensors, str(path))  # the reference writer: offsets as safetensors lays them out
    monkeypatch.setattr(quant_io, "_uncacheable", lambda _: True)
    with SafetensorsReader(path, BufferPool()) as reader:
        if reader._direct is None:
            pytest.skip("this file system has no direct I/O")
        for name, expected in tensors.items():
            pieces = []
            read = reader.read(name, pieces.append if visit else None)
            assert torch.equal(read, expected), name
            if visit:
                assert torch.equal(torch.cat(pieces), expected.flatten())
        assert not reader._direct_refused


def test_direct_writes_give_the_same_file_contents(tmp_path, monkeypatch):
    tensors = _large_tensors()
    pool = BufferPool()
    for name in ("b_blocks", "e_bytes"):  # in page-aligned memory, as round-to-nearest's outputs are
        aligned = pool.empty(tensors[name].nbytes).view(tensors[name].dtype).view(tensors[name].shape)
        tensors[name] = aligned.copy_(tensors[name])
    direct = []
    write = quant_io._DirectWrites.write
    monkeypatch.setattr(quant_io._DirectWrites, "write", lambda self, *a: direct.append(write(self, *a)) or direct[-1])
    path = tmp_path / "written.safetensors"
    write_file(path, tensors)
    assert load_file(str(path)).keys() == tensors.keys()
    for name, loaded in load_file(str(path)).items():
        assert torch.equal(loaded, tensors[name]), name
    length, entries = header(path)
    starts = {name: 8 + length + entry["data_offsets"][0] for name, entry in entries.items() if name != "__metadata__"}
    assert starts["b_blocks"] % 4096 == 0 and starts["e_bytes"] % 4096 == 0, "whole-block tensors start on a block"
    descriptor = quant_io._open_direct(path)
    if descriptor is None:
        pytest.skip("this file system has no direct I/O")
    os.close(descriptor)
    assert sum(written for _, written in direct) == tensors["b_blocks"].nbytes + tensors["e_bytes"].nbytes
