"""Converting in shards (``--shard K/N``, one machine each) and joining them (``join``): the joined
file is byte-identical to a single run, and shards of another conversion are refused."""

from __future__ import annotations

import pytest

from quant_core.cli import main
from quant_core.convert import ConvertOptions, convert_file
from quant_core.io import SafetensorsReader
from quant_core.options import LearnedOptions
from quant_core.shards import join_shards

QUICK_LEARNED = LearnedOptions(num_iter=5, calib_samples=16, seed=3)


def shards_of(source, tmp_path, options: ConvertOptions, count: int) -> list:
    paths = []
    for k in range(1, count + 1):
        path = tmp_path / f"part{k}.safetensors"
        options.shard = (k, count)
        convert_file(source, path, options)
        paths.append(path)
    options.shard = None
    return paths


@pytest.mark.parametrize("format_", ["comfy", "legacy", "ultra8"])
@pytest.mark.parametrize("count", [1, 3])
def test_joined_shards_equal_a_single_run(flux_file, tmp_path, format_, count):
    options = ConvertOptions(format=format_, rounding="nearest")
    single = tmp_path / "single.safetensors"
    convert_file(flux_file, single, options)
    joined = join_shards(
        flux_file, shards_of(flux_file, tmp_path, options, count), tmp_path / "joined.safetensors", options
    )
    assert joined.read_bytes() == single.read_bytes()


def test_learned_rounding_in_shards_gives_the_same_file(flux_file, tmp_path):
    options = ConvertOptions(rounding="learned", learned=QUICK_LEARNED)
    single = tmp_path / "single.safetensors"
    convert_file(flux_file, single, options)
    joined = join_shards(
        flux_file, shards_of(flux_file, tmp_path, options, 2), tmp_path / "joined.safetensors", options
    )
    assert joined.read_bytes() == single.read_bytes(), "the result of an item does not depend on who made it"


def test_shards_split_the_work(flux_file, tmp_path):
    options = ConvertOptions(rounding="nearest")
    parts = shards_of(flux_file, tmp_path, options, 3)
    names = []
    for part in parts:
        with SafetensorsReader(part) as reader:
            names += list(reader.tensors)
    assert len(names) == len(set(names)), "no tensor is converted twice"
    with SafetensorsReader(flux_file) as source:
        assert {n for n in names if n in source.tensors} == set(source.tensors) - {"scaled_fp8"}


def test_join_refuses_shards_made_with_other_options(flux_file, tmp_path):
    parts = shards_of(flux_file, tmp_path, ConvertOptions(rounding="nearest"), 2)
    with pytest.raises(ValueError, match="other options"):
        join_shards(
            flux_file, parts, tmp_path / "joined.safetensors", ConvertOptions(rounding="nearest", format="legacy")
        )
    assert not (tmp_path / "joined.safetensors").exists()


def test_join_names_what_is_missing(flux_file, tmp_path):
    parts = shards_of(flux_file, tmp_path, ConvertOptions(rounding="nearest"), 3)
    with pytest.raises(ValueError, match="in none of the shards"):
        join_shards(flux_file, parts[:2], tmp_path / "joined.safetensors", ConvertOptions(rounding="nearest"))
    assert not (tmp_path / "joined.safetensors").exists()


def test_join_refuses_a_file_that_is_no_shard(flux_file, tmp_path):
    converted = tmp_path / "whole.safetensors"
    convert_file(flux_file, converted, ConvertOptions(rounding="nearest"))
    with pytest.raises(ValueError, match="not a shard"):
        join_shards(flux_file, [converted], tmp_path / "joined.safetensors", ConvertOptions(rounding="nearest"))


def test_command_line_shards_and_join(flux_file, tmp_path, capsys):
    single = tmp_path / "single.safetensors"
    assert main(["--input", str(flux_file), "--output", str(single), "--simple", "--quiet"]) == 0
    for k in (1, 2):
        assert main(["--input", str(flux_file), "--simple", "--shard", f"{k}/2", "--quiet"]) == 0
    parts = sorted(tmp_path.glob("*.shard*of2.safetensors"))
    assert len(parts) == 2
    joined = tmp_path / "joined.safetensors"
    assert main(["join", "--input", str(flux_file), "--output", str(joined), "--simple", *map(str, parts)]) == 0
    assert joined.read_bytes() == single.read_bytes()


@pytest.mark.parametrize("bad", ["0/2", "3/2", "2", "a/b"])
def test_bad_shard_is_a_usage_error(flux_file, bad):
    with pytest.raises(SystemExit):
        main(["--input", str(flux_file), "--shard", bad])
