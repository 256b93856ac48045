"""Writing an output file so that no run loses data, whatever happens to it or around it.

The output is written to a hidden temp file beside it (``.NAME.RANDOM.quant_core.tmp``) and
published under its name only when complete, after checking that no input changed meanwhile;
on any exception the temp file and any folders the run created are removed. Publishing does not
replace a file that appeared meanwhile (another run's) unless ``overwrite`` is given: the temp
file is hard-linked under the final name, which fails if the name exists, where ``rename``
would silently replace it.

A run killed outright (SIGKILL, a power cut, ComfyUI stopped by SIGTERM) cannot clean up, so
each run looks for temp files of this tool in its output folder. Every live run holds an
exclusive ``flock`` on its own temp file for as long as it lives (the kernel drops it when the
process dies), so a temp file that can be locked belongs to no live run and is removed; one that
cannot be locked is another conversion's work in progress and is left alone. Where there is no
``flock`` (Windows) stale temp files are only reported.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

TEMP_SUFFIX = ".quant_core.tmp"
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # FAT, exFAT, some network shares
_log = logging.getLogger("quant_core")
_in_flight: set[Path] = set()  # this process's temp files, removed at exit if their run never finished


class InputChangedError(RuntimeError):
    """An input file changed while it was being converted: the output would mix old and new data."""


def input_identities(paths: Iterable[str | os.PathLike]) -> dict[Path, tuple[int, ...]]:
    """What each existing input is now (device, inode, size, modification and status-change times):
    taken when a run starts reading, so that a change during its planning is caught too."""
    return {Path(p): _identity(os.stat(p)) for p in paths if os.path.exists(p)}


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    since: dict[Path, tuple[int, ...]] | None = None,
) -> Iterator[BinaryIO]:
    """A file opened for writing that appears under ``path`` only if the block succeeds.

    ``protect`` lists the run's input files: the output may not be one of them, and the output
    is not published if any of them changed (size, modification or status-change time, identity)
    since ``since`` (``input_identities`` taken when the run started; by default, when the block
    starts). On any exception, KeyboardInterrupt and signals included, ``path`` is left as it was.
    """
    protect = tuple(protect)
    target = check_output_path(path, overwrite, protect)
    inputs = input_identities(protect) if since is None else since
    created = _make_folders(target.parent)
    temp = lock = None
    try:
        clear_stale_temp_files(target.parent)
        fd, temp = _create_temp(target, overwrite)
        _in_flight.add(temp)
        lock = os.dup(fd) if fcntl else None  # keeps the lock after the file is closed, until published
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        _check_unchanged(inputs)
        _publish(temp, target, overwrite)
    except BaseException:
        if temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        _remove_folders(created)
        raise
    finally:
        _in_flight.discard(temp)
        if lock is not None:
            os.close(lock)


def check_output_path(path: str | os.PathLike, overwrite: bool, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """The output's absolute path; refused before any work when it is one of the inputs (by any
    name: a symbolic or hard link, another spelling), a folder, or an existing file without ``overwrite``."""
    target = Path(path).resolve()
    for source in protect:
        if _same_file(target, Path(source)):
            raise ValueError(f"refusing to overwrite the input file {source}")
    if target.is_dir():
        raise IsADirectoryError(f"the output {target} is a folder; give the name of a file to write")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    return target


def clear_stale_temp_files(folder: Path) -> None:
    """Remove the temp files that killed runs left in ``folder`` (no live run holds their lock), and say so."""
    stale = [(path, _remove_if_abandoned(path)) for path in folder.glob(".*" + TEMP_SUFFIX)]
    removed = [size for _, size in stale if size is not None]
    if removed:
        _log.warning(
            "removed %d temp file(s) (%.1f MiB) that interrupted conversions left in %s",
            len(removed),
            sum(removed) / 2**20,
            folder,
        )
    if fcntl is None and stale:
        _log.warning(
            "%s holds temp files of interrupted or running conversions: %s; delete them when none is running",
            folder,
            ", ".join(path.name for path, _ in stale),
        )


def _remove_if_abandoned(path: Path) -> int | None:
    """Remove ``path`` if no live process holds its lock; its size in bytes if removed, else None."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = os.fstat(fd)
        now = os.stat(path)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):  # replaced since it was opened
            return None
        os.unlink(path)
        return held.st_size
    except OSError:  # locked by a live run, or gone
        return None
    finally:
        os.close(fd)


def _create_temp(target: Path, overwrite: bool) -> tuple[int, Path]:
    """A new, locked temp file beside ``target``, with the mode a plain write would give the output.

    Another run's stale-file check may lock and remove a new temp file in the instant before its
    owner locks it; the owner then finds it unlinked and makes another.
    """
    while True:
        temp = target.with_name(_temp_name(target))
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        if overwrite and target.exists() and hasattr(os, "fchmod"):
            with contextlib.suppress(OSError):  # a file system without modes (FAT) keeps its own
                os.fchmod(fd, stat.S_IMODE(target.stat().st_mode))  # a replaced file keeps its mode
        if fcntl is None:
            return fd, temp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while another run's check holds it
        except OSError:  # no locks on this file system: other runs' checks cannot lock it either
            return fd, temp
        if os.fstat(fd).st_nlink:
            return fd, temp
        os.close(fd)


def _temp_name(target: Path) -> str:
    """``.NAME.RANDOM.quant_core.tmp``, with NAME shortened so the whole fits the folder's name limit."""
    token = secrets.token_hex(4)
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
        limit = 255
    room = limit - len(f"..{token}{TEMP_SUFFIX}")
    name = target.name.encode()[: max(room, 0)].decode(errors="ignore")
    return f".{name}.{token}{TEMP_SUFFIX}"


def _publish(temp: Path, target: Path, overwrite: bool) -> None:
    """Give the complete temp file the output's name: replacing a file only with ``overwrite``."""
    if overwrite:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)
    except FileExistsError:
        raise FileExistsError(
            f"{target} was created meanwhile (by another run?) and is left as it is; pass --overwrite to replace it"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(target):  # no hard links here: check, then rename (a narrow race remains)
            raise FileExistsError(f"{target} was created meanwhile (by another run?) and is left as it is") from None
        os.replace(temp, target)
        return
    os.unlink(temp)


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _check_unchanged(inputs: dict[Path, tuple[int, ...]]) -> None:
    for path, before in inputs.items():
        try:
            now = _identity(os.stat(path))
        except FileNotFoundError:
            now = None
        if now != before:
            raise InputChangedError(
                f"{path} changed while it was being converted (size, modification time or identity); "
                "the output would mix old and new data, so it was not written"
            )


def _same_file(target: Path, source: Path) -> bool:
    if target == source.resolve():
        return True
    try:
        return os.path.samefile(target, source)
    except OSError:  # either does not exist
        return False


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones this call created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile by someone else: not ours to remove
                path.mkdir()
                created.insert(0, path)
    except OSError:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[Path]) -> None:
    """Remove the folders a failed run created, where they are still empty."""
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


@atexit.register
def _remove_in_flight() -> None:
    """At interpreter exit, remove the temp files of writes that never finished.

    ComfyUI runs nodes on a daemon thread: when its server is stopped (Ctrl-C), the main thread
    exits and the conversion thread is frozen mid-write, its cleanup never run. Exit handlers
    still run, so the temp file goes; the frozen thread can no longer publish it.
    """
    for temp in list(_in_flight):
        with contextlib.suppress(OSError):
            os.unlink(temp)
