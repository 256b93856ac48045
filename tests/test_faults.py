"""Faults and races around the output: nothing half-written, no input replaced, no other run's file lost.

Disk-full, permission and I/O errors are injected by monkeypatching the ``os`` calls the writer
makes (no root needed); signals are sent for real to child processes in ``test_signals.py``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from quant_core.calibration import Recorder
from quant_core.cli import main
from quant_core.convert import ConvertOptions, convert_file
from quant_core.io import SafetensorsReader, write_file

NEAREST = ConvertOptions(rounding="nearest")


def leftovers(folder: Path) -> list[str]:
    """Hidden files (temp files) anywhere below ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def rewrite_in_place(path: Path) -> None:
    """Change the last bytes of the file without changing its size (another program saving over it)."""
    with open(path, "r+b") as file:
        file.seek(-4, os.SEEK_END)
        last = file.read(4)
        file.seek(-4, os.SEEK_END)
        file.write(bytes(b ^ 0x55 for b in last))


# ------------------------------------------------------------------------------- 4: input changed meanwhile


@pytest.mark.parametrize("how", ["in_place", "replaced"])
def test_input_changed_during_the_conversion_is_refused(flux_file, tmp_path, how):
    output = tmp_path / "out.safetensors"
    changed = []

    def change_input(report):
        if not changed:
            changed.append(report.name)
            if how == "in_place":
                rewrite_in_place(flux_file)
            else:  # a new file under the same name, same size and the same modification time
                copy = flux_file.with_name("copy")
                copy.write_bytes(flux_file.read_bytes())
                os.utime(copy, ns=(flux_file.stat().st_atime_ns, flux_file.stat().st_mtime_ns))
                os.replace(copy, flux_file)

    with pytest.raises(RuntimeError, match="changed while"):
        convert_file(flux_file, output, NEAREST, progress=change_input)
    assert changed
    assert not output.exists()
    assert leftovers(tmp_path) == []


def test_input_changed_while_the_run_plans_is_refused(flux_file, tmp_path):
    """A size budget reads the weights before the output is opened: a change then counts too."""
    output = tmp_path / "out.safetensors"
    polls = []

    def change_input_while_planning():
        if not polls:
            rewrite_in_place(flux_file)
        polls.append(1)

    options = ConvertOptions(rounding="nearest", max_size="0.9")
    with pytest.raises(RuntimeError, match="changed while"):
        convert_file(flux_file, output, options, check_interrupt=change_input_while_planning)
    assert polls
    assert not output.exists()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- 5: calibration the run ignores


def recording(model: torch.nn.Module, path: Path) -> Path:
    with Recorder(model) as recorder:
        model(torch.randn(64, model[0].in_features))
    recorder.save(path)
    return path


def test_calibration_matching_no_weight_is_refused(small_file, tmp_path, capsys):
    calibration = recording(torch.nn.Sequential(torch.nn.Linear(32, 32)), tmp_path / "other.safetensors")
    output = tmp_path / "out.safetensors"
    options = ConvertOptions(preset="none", calibration=str(calibration))
    with pytest.raises(ValueError, match="none of the weights"):
        convert_file(small_file, output, options)
    code = main(["--input", str(small_file), "--output", str(output), "--calibration", str(calibration), "--quiet"])
    assert code == 1 and "recorded on another model" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("flag", [["--simple"], ["--rounding", "nearest"]])
def test_calibration_with_round_to_nearest_is_refused(small_file, tmp_path, capsys, flag):
    calibration = tmp_path / "not_even_read.safetensors"
    calibration.write_bytes(b"never opened before this rule")
    output = tmp_path / "out.safetensors"
    code = main(["--input", str(small_file), "--output", str(output), "--calibration", str(calibration), *flag])
    assert code == 1
    assert "rounding 'auto' or 'learned'" in capsys.readouterr().err
    assert not output.exists()


# ------------------------------------------------------------------------------- 6: every input protected


def test_output_naming_the_calibration_file_is_refused(flux_file, tmp_path):
    from quant_core.calibration import STATISTICS_FORMAT

    calibration = tmp_path / "calibration.safetensors"
    # a file that is a calibration file by its header; whether its statistics fit is checked later
    write_file(calibration, {"x.count": torch.tensor([1, 1])}, {"format": STATISTICS_FORMAT})
    before = calibration.read_bytes()
    options = ConvertOptions(calibration=str(calibration), overwrite=True)
    with pytest.raises(ValueError, match="input"):
        convert_file(flux_file, calibration, options)
    assert calibration.read_bytes() == before


def test_output_naming_a_shard_is_refused(flux_file, tmp_path, capsys):
    shards = []
    for k in (1, 2):
        shards.append(tmp_path / f"s{k}.safetensors")
        assert main(["--input", str(flux_file), "--output", str(shards[-1]), "--shard", f"{k}/2", "--quiet"]) == 0
    before = shards[0].read_bytes()
    code = main(["join", "--input", str(flux_file), "--output", str(shards[0]), "--overwrite", *map(str, shards)])
    assert code == 1 and "input" in capsys.readouterr().err
    assert shards[0].read_bytes() == before


def test_join_output_naming_the_calibration_file_is_refused(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    source = tmp_path / "model.safetensors"
    write_file(source, {k: v.detach().contiguous() for k, v in model.state_dict().items()})
    calibration = recording(model, tmp_path / "calibration.safetensors")
    common = ["--input", str(source), "--calibration", str(calibration), "--preset", "none", "--min_tensor_size", "0"]
    shards = [tmp_path / f"s{k}.safetensors" for k in (1, 2)]
    for k, shard in enumerate(shards, 1):
        assert main([*common, "--output", str(shard), "--shard", f"{k}/2", "--quiet"]) == 0
    before = calibration.read_bytes()
    assert main(["join", *common, "--output", str(calibration), "--overwrite", *map(str, shards)]) == 1
    assert "input" in capsys.readouterr().err
    assert calibration.read_bytes() == before


# ------------------------------------------------------------------------------- 10: folders a failed run made


def test_a_failed_run_removes_the_folders_it_created(flux_file, tmp_path):
    (tmp_path / "old").mkdir()
    output = tmp_path / "old" / "new" / "a" / "b" / "out.safetensors"

    def fail(report):
        if report.index == 3:
            raise OSError(errno.EIO, "simulated I/O error")

    with pytest.raises(OSError):
        convert_file(flux_file, output, NEAREST, progress=fail)
    assert list((tmp_path / "old").iterdir()) == []  # the folder that was there stays


# ------------------------------------------------------------------------------- 11: two runs, one output


def test_another_run_finishing_first_is_not_replaced(flux_file, tmp_path):
    output = tmp_path / "out.safetensors"

    def other_run_finishes(report):
        if report.index == 3:
            output.write_bytes(b"the other run's result")

    with pytest.raises(FileExistsError, match="meanwhile"):
        convert_file(flux_file, output, NEAREST, progress=other_run_finishes)
    assert output.read_bytes() == b"the other run's result"
    assert leftovers(tmp_path) == []


def test_with_overwrite_the_last_run_wins(flux_file, tmp_path):
    output = tmp_path / "out.safetensors"

    def other_run_finishes(report):
        if report.index == 3:
            output.write_bytes(b"the other run's result")

    convert_file(flux_file, output, ConvertOptions(rounding="nearest", overwrite=True), progress=other_run_finishes)
    with SafetensorsReader(output) as reader:
        assert reader.tensors
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- 12: output is a folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_naming_a_folder_is_refused_before_the_work(flux_file, tmp_path, overwrite):
    folder = tmp_path / "models"
    folder.mkdir()
    calls = []
    with pytest.raises(IsADirectoryError):
        convert_file(flux_file, folder, ConvertOptions(rounding="nearest", overwrite=overwrite), progress=calls.append)
    assert calls == []
    assert folder.is_dir() and list(folder.iterdir()) == []


# ------------------------------------------------------------------------------- 13: long names


@pytest.mark.parametrize("length", [252, 255])
def test_an_output_name_of_the_longest_valid_length_works(flux_file, tmp_path, length):
    output = tmp_path / ("x" * (length - len(".safetensors")) + ".safetensors")
    assert len(output.name.encode()) == length
    convert_file(flux_file, output, NEAREST)
    assert output.stat().st_size > 0
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- 14: the umask decides the mode


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_outputs_get_the_mode_a_normal_write_would(flux_file, tmp_path, umask):
    output = tmp_path / "out.safetensors"
    previous = os.umask(umask)
    try:
        convert_file(flux_file, output, NEAREST)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask


def test_a_replaced_output_keeps_its_mode(flux_file, tmp_path):
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old")
    output.chmod(0o640)
    convert_file(flux_file, output, ConvertOptions(rounding="nearest", overwrite=True))
    assert stat.S_IMODE(output.stat().st_mode) == 0o640


# ------------------------------------------------------------------------------- 8: the stale-file check's race


def test_a_temp_file_removed_before_its_owner_locked_it_is_made_again(flux_file, tmp_path, monkeypatch):
    """Another run's stale-file check can lock and remove a brand-new temp file in the instant
    before its owner locks it; the owner must notice (the file is unlinked) and write another."""
    from quant_core import atomic

    real_flock, removed = atomic.fcntl.flock, []

    def flock_after_another_runs_check(fd, operation):
        if not removed:  # the first new temp file: another run's check got there first
            removed.append(os.readlink(f"/proc/self/fd/{fd}"))
            os.unlink(removed[0])
        return real_flock(fd, operation)

    monkeypatch.setattr(atomic.fcntl, "flock", flock_after_another_runs_check)
    output = tmp_path / "out.safetensors"
    convert_file(flux_file, output, NEAREST)
    monkeypatch.undo()
    assert removed and not os.path.exists(removed[0])
    with SafetensorsReader(output) as reader:
        assert reader.tensors
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- injected OS errors


def failing(monkeypatch, name: str, code: int, after: int = 0, when=lambda *args: True) -> list:
    """Make ``os.<name>`` fail with ``code`` from its ``after``-th matching call on."""
    real = getattr(os, name)
    calls = []

    def fake(*args, **kwargs):
        if when(*args):
            calls.append(args)
            if len(calls) > after:
                raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fake)
    return calls


def in_folder(folder: Path):
    return lambda path, *rest: Path(os.fsdecode(path)).parent == folder


FAULTS = {
    "disk_full_while_writing": ("pwrite", errno.ENOSPC, 2, lambda *args: True),
    "io_error_on_fsync": ("fsync", errno.EIO, 0, lambda *args: True),
    "io_error_while_reading": ("preadv", errno.EIO, 3, lambda *args: True),
    "no_permission_to_create": ("open", errno.EACCES, 0, None),
    "disk_full_on_publishing": ("link", errno.ENOSPC, 0, lambda *args: True),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing_output"])
@pytest.mark.parametrize("fault", FAULTS)
def test_os_errors_leave_nothing_behind(flux_file, tmp_path, monkeypatch, capsys, fault, existing):
    name, code, after, when = FAULTS[fault]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "converted.safetensors"
    if existing:
        output.write_bytes(b"previous result")
    overwrite = ["--overwrite"] if existing else []
    if name == "link" and existing:
        name = "replace"  # with --overwrite the output is replaced, not linked
    calls = failing(monkeypatch, name, code, after, when or in_folder(out_dir))
    status = main(["--input", str(flux_file), "--output", str(output), "--rounding", "nearest", "--quiet", *overwrite])
    monkeypatch.undo()
    assert status == 1 and calls
    assert os.strerror(code) in capsys.readouterr().err
    assert (output.read_bytes() == b"previous result") if existing else not output.exists()
    assert leftovers(tmp_path) == []
