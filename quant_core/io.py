"""Streaming safetensors I/O: read one tensor at a time, write the header first (published by ``atomic``).

Why not ``safetensors.safe_open``? A whole-file memory map leaves every page it touched in the
process's resident set until it is closed, so converting a 24 GB file would show 24 GB of RSS.
Reading each tensor with an explicit ``readinto`` keeps resident memory at the size of the
tensors in flight. The format is small (8-byte header length, JSON header, raw data) and is
read and written here byte-for-byte as the safetensors specification describes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .atomic import atomic_output

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):  # torch >= 2.7; older torch refuses such files by the dtype's name
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
VISIT_BYTES = 1 << 20  # the pieces ``SafetensorsReader.read`` shows its ``visit``: a fraction of a core's cache


class SafetensorsFormatError(ValueError):
    """The file is not a readable safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a file and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset in the file
    nbytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dtype_nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _storage_users(tensor: torch.Tensor) -> int:
    """How many references torch holds to ``tensor``'s memory.

    Every view of a buffer adds one, so a buffer whose count is back to the one it had when it
    was made is referenced by nothing but the pool. (A private torch function: without it the
    pool hands out fresh memory.)
    """
    storage = tensor.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata)


def _anonymous_map(nbytes: int) -> mmap.mmap:
    """Fresh zero-page memory of its own, in 2 MB pages where Linux offers them: the first
    write then faults once per 2 MB instead of once per 4 KB. Private, not Python's default
    shared mapping: Linux gives shared memory huge pages only where ``shmem_enabled`` says so
    (rarely), and a first write to shared 4 KB pages took 6-10x as long (docs/benchmarks.md)."""
    if hasattr(mmap, "MAP_PRIVATE"):  # POSIX; Windows maps have no flags
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:
        memory = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


class BufferPool:
    """Large byte buffers for tensor reads and outputs, reused once nothing else views them.

    Why: a fresh buffer of many MB is mapped anew, and the kernel then faults in and zeroes
    each of its 4 KB pages on first write (a fifth of a large conversion's time; ``docs/benchmarks.md``).
    A free buffer is reused for a request of at least ``1 / FIT`` of its size, the smallest such
    one: models repeat a handful of shapes block after block, but two workers and the reader hold
    buffers of different shapes at once, and with exact sizes a calibrated conversion kept
    mapping (and zeroing) anew over three times the size of its file. The pool keeps at most
    ``SLACK`` times the bytes that were ever in use at once (its high-water mark), so its memory
    stays bounded by what a conversion needs at its peak. Buffers are anonymous memory maps
    of their own, so a dropped buffer goes back to the system at once rather than staying in
    the allocator's heap, which otherwise grows over a long conversion.
    Requests under 1 MiB go to the allocator, whose heap reuses them well.
    """

    SMALL = 1 << 20
    FIT = 2  # a buffer serves requests down to half its size
    SLACK = 1.5  # bytes kept, free or in use, per byte of the high-water mark

    def __init__(self) -> None:
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when alone)
        self._high_water = 0
        self._lock = threading.Lock()

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of ``nbytes``, in a reused buffer where one fits."""
        if nbytes < self.SMALL or not hasattr(torch._C, "_storage_Use_Count"):  # small, or no way to tell free
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            free = [entry for entry in self._buffers if _storage_users(entry[0]) == entry[1]]
            fits = [entry for entry in free if nbytes <= entry[0].numel() <= self.FIT * nbytes]
            chosen = min(fits, key=lambda entry: entry[0].numel(), default=None)
            if chosen is None:
                buffer = torch.frombuffer(_anonymous_map(nbytes), dtype=torch.uint8)  # no page touched yet
                chosen = (buffer, _storage_users(buffer))
                self._buffers.append(chosen)
            else:
                free = [entry for entry in free if entry is not chosen]
            held = self.nbytes
            self._high_water = max(self._high_water, held - sum(entry[0].numel() for entry in free))
            for spare in sorted(free, key=lambda entry: entry[0].numel(), reverse=True):
                if held <= self.SLACK * self._high_water:
                    break
                self._buffers = [entry for entry in self._buffers if entry is not spare]
                held -= spare[0].numel()
            return chosen[0][:nbytes]  # a view: while the caller holds it, the buffer counts as in use

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous ``dtype`` tensor of ``shape``, in a reused buffer where one fits."""
        count = math.prod(shape)
        return self.empty(count * dtype.itemsize).view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds, in use or free."""
        return sum(entry[0].numel() for entry in self._buffers)


class SafetensorsReader:
    """Reads a safetensors file's header once, then single tensors on demand."""

    def __init__(self, path: str | os.PathLike, pool: BufferPool | None = None):
        """``pool``: reuse memory for tensors read (see ``BufferPool``); each read is fresh without it."""
        self.path = Path(path)
        self.pool = pool
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()  # the file position, where there is no pread (Windows)
        try:
            self.metadata, self.tensors = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._direct = _open_direct(self.path) if pool is not None and _uncacheable(self.path) else None
        self._direct_refused = False

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        """The header, held to the rules the safetensors library enforces (ComfyUI loads with it):
        a file it would refuse is refused here, so a hostile file cannot read differently here."""
        head = self._file.read(8)
        size = os.fstat(self._file.fileno()).st_size
        if len(head) < 8:
            raise SafetensorsFormatError(f"{self.path} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise SafetensorsFormatError(f"{self.path} has an invalid header length {header_len}")
        try:
            header = json.loads(self._file.read(header_len), object_pairs_hook=_without_duplicates)
        except ValueError as exc:  # not UTF-8, not JSON, or a name given twice
            raise SafetensorsFormatError(f"{self.path} has an unreadable header: {exc}") from None
        if not isinstance(header, dict):
            raise SafetensorsFormatError(f"{self.path} has a header that is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsFormatError(f"{self.path}: __metadata__ must map names to strings")
        data_start = 8 + header_len
        tensors = {name: self._tensor_info(name, entry, data_start) for name, entry in header.items()}
        ordered = sorted(tensors.values(), key=lambda info: (info.start, info.nbytes))
        _check_layout(self.path, ordered, data_start, size)
        return metadata, {info.name: info for info in ordered}

    def _tensor_info(self, name: str, entry: object, data_start: int) -> TensorInfo:
        """One header entry: a known dtype, a shape and two offsets of unsigned integers that agree."""
        try:
            dtype = DTYPES[entry["dtype"]]
            shape, offsets = tuple(entry["shape"]), tuple(entry["data_offsets"])
        except KeyError as exc:
            raise SafetensorsFormatError(f"tensor {name!r} in {self.path}: missing or unknown {exc}") from None
        except TypeError:
            raise SafetensorsFormatError(f"tensor {name!r} in {self.path} has a malformed header entry") from None
        if not all(map(_is_size, shape + offsets)) or len(offsets) != 2 or _numel_overflows(shape):
            raise SafetensorsFormatError(f"tensor {name!r} in {self.path}: shape and offsets must be unsigned integers")
        begin, end = offsets
        info = TensorInfo(name, dtype, shape, data_start + begin, end - begin)
        if begin > end or info.nbytes != info.numel * dtype_nbytes(dtype):
            raise SafetensorsFormatError(f"tensor {name!r} has inconsistent shape or offsets in {self.path}")
        return info

    def read(
        self, name: str, visit: Callable[[torch.Tensor], None] | None = None, pool: BufferPool | None = None
    ) -> torch.Tensor:
        """One tensor, in its stored dtype, in memory of its own (not memory-mapped, and never
        shared with a tensor that is still alive).

        ``visit`` is called with each piece of the tensor (flat, in its dtype, in order) as soon as
        that piece is read: a pass over a piece still in the CPU's cache costs a fraction of a
        pass over the whole tensor from memory later. Threads may read concurrently (see ``_read_at``).
        ``pool``: where its memory comes from, if not from the reader's own.
        """
        info = self.tensors[name]
        direct = self._reads_directly(info)
        skip = info.start % DIRECT_BLOCK if direct else 0  # a direct read starts at the tensor's first block
        # uninitialised: the read fills it; room for whole blocks on both sides when read directly
        size = -(-info.nbytes // DIRECT_BLOCK) * DIRECT_BLOCK + DIRECT_BLOCK if direct else info.nbytes
        pool = pool or self.pool
        buffer = pool.empty(size) if pool else torch.empty(size, dtype=torch.uint8)
        view, stop, base = _tensor_bytes(buffer), skip + info.nbytes, info.start - skip
        piece = VISIT_BYTES if visit or direct else max(stop, 1)
        pieces = [(done, min(done + piece, stop)) for done in range(0, stop, piece)]
        if direct:
            filled = _ahead(pieces, lambda done, end: self._fill_direct(name, view, done, end, base))
        else:
            filled = _in_turn(pieces, lambda done, end: self._fill(name, view[done:end], base + done))
        for done, end in filled:
            if visit:
                visit(buffer[max(done, skip) : end].view(info.dtype))
        return buffer[skip:stop].view(info.dtype).reshape(info.shape)

    def _reads_directly(self, info: TensorInfo) -> bool:
        """Large tensors of a file read around the page cache (``_uncacheable``), where the tensor's
        offset in its first block suits its dtype."""
        large = self._direct is not None and not self._direct_refused and info.nbytes >= DIRECT_MIN
        return large and info.start % DIRECT_BLOCK % dtype_nbytes(info.dtype) == 0

    def _fill(self, name: str, view: memoryview, offset: int) -> None:
        """All of ``view`` from the file at ``offset``."""
        done = 0
        while done < len(view):
            got = _read_at(self._file, view[done:], offset + done, self._lock)
            if not got:
                raise SafetensorsFormatError(f"{self.path} ends inside tensor {name!r}")
            done += got

    def _fill_direct(self, name: str, view: memoryview, done: int, stop: int, base: int) -> None:
        """``view[done:stop]`` (``done`` on a block boundary) from the file at ``base + done``, in
        whole blocks around the page cache; what direct I/O cannot read is read as usual."""
        end = -(-stop // DIRECT_BLOCK) * DIRECT_BLOCK  # the buffer has room for the whole last block
        while done < stop:
            got = 0
            if not self._direct_refused:
                try:
                    got = os.preadv(self._direct, [view[done:end]], base + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct_refused = True  # an alignment this system does not accept: as usual from now on
            if not got or (done + got < stop and got % DIRECT_BLOCK):  # refused, the file's end, a partial block
                self._fill(name, view[done:stop], base + done)
                return
            done += got

    def close(self) -> None:
        _close_quietly(self._direct)
        self._direct = None
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_U64 = 2**64


def _without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object that names no key twice (the second entry would hide the first)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a name appears twice")
    return result


def _is_size(value: object) -> bool:
    """An unsigned 64-bit integer, as the format's sizes are (JSON true and 1.0 are not)."""
    return type(value) is int and 0 <= value < _U64


def _numel_overflows(shape: tuple[int, ...]) -> bool:
    """The element count overflows 64 bits at some dimension, multiplied left to right as
    safetensors does (so ``[2**62, 2**62, 0]`` is refused like there, though it holds nothing)."""
    count = 1
    for dim in shape:
        count *= dim
        if count >= _U64:
            return True
    return False


def _check_layout(path: Path, ordered: list[TensorInfo], data_start: int, size: int) -> None:
    """Tensors (sorted by offset) tile the data section exactly: no overlap, no gap, nothing after.

    Overlapping tensors would let one byte be two weights, and bytes no tensor claims could
    hide anything; the safetensors library refuses both, and so does this reader.
    """
    expected = data_start
    for info in ordered:
        if info.start != expected:
            problem = "overlaps the tensor before it" if info.start < expected else "leaves a gap before it"
            raise SafetensorsFormatError(f"tensor {info.name!r} in {path} {problem} in the data section")
        expected += info.nbytes
    if expected != size:
        problem = (
            "extends past the end of the file"
            if expected > size
            else f"has {size - expected} bytes after the last tensor"
        )
        raise SafetensorsFormatError(f"{path}: the data section {problem}")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Zero-copy view of a CPU tensor's bytes (the tensor must outlive the view)."""
    tensor = tensor.contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


# POSIX systems read and write at an offset without a shared file position; Windows has neither call
_POSITIONAL = hasattr(os, "preadv") and hasattr(os, "pwrite")


def _read_at(file: BinaryIO, view: memoryview, offset: int, lock: threading.Lock) -> int:
    """Read into ``view`` from ``offset``; returns the byte count (0 at the end of the file).

    ``os.preadv`` fills the tensor's memory directly and needs no lock; elsewhere the shared file
    position is moved under ``lock``.
    """
    if _POSITIONAL:
        return os.preadv(file.fileno(), [view], offset)
    with lock:
        file.seek(offset)
        return file.readinto(view) or 0


def _write_at(file: BinaryIO, data: memoryview, offset: int, lock: threading.Lock) -> None:
    """All of ``data`` at ``offset``, straight from the tensor's memory, then start writing it to disk.

    ``os.pwrite`` from the tensor's memory: a buffered file object copies the bytes once more and
    was several times slower (``docs/benchmarks.md``). ``_start_writeback`` then hands the
    pages to the disk at once, so the closing ``fsync`` does not wait for the whole file.
    """
    if _POSITIONAL:
        done = 0
        while done < len(data):
            done += os.pwrite(file.fileno(), data[done:], offset + done)
    else:
        with lock:
            file.seek(offset)
            file.write(data)
            file.flush()
    _start_writeback(file.fileno(), offset, len(data))


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to write these bytes to disk now, and not to keep them cached afterwards.

    On Linux ``POSIX_FADV_DONTNEED`` starts writeback of the dirty range without waiting for
    it. Without it nothing reaches the disk before the final ``fsync`` for outputs under the
    kernel's dirty threshold, and that ``fsync`` then waits for the whole file. It also keeps a large output from
    crowding the page cache that the user's other programs (ComfyUI itself) are using. Where
    the call does not exist (Windows, macOS) the closing ``fsync`` does all of the work.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


_Slots = dict[str, tuple[int, TensorInfo]]  # name -> (data offset, entry)


def _lay_out(entries: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, _Slots, int]:
    """The header bytes (padded), each entry's data offset and the data's total bytes.

    Entries are ordered by element size (largest first, as safetensors itself does) so that every
    tensor's data is aligned to its element size; large tensors of whole disk blocks come first,
    from a block boundary (the header is padded with spaces), so that they can be written around
    the page cache (``_DirectWrites``).
    """
    ordered = sorted(
        enumerate(entries), key=lambda item: (not _whole_blocks(item[1]), -dtype_nbytes(item[1].dtype), item[0])
    )
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    slots: _Slots = {}
    offset = 0
    for _, info in ordered:
        if info.name in slots:
            raise ValueError(f"duplicate output tensor name {info.name!r}")
        nbytes = info.numel * dtype_nbytes(info.dtype)
        header[info.name] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        slots[info.name] = (offset, info)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # the data region starts 8-byte aligned, and on a disk block where whole blocks can go out directly
    raw += b" " * (-(8 + len(raw)) % (DIRECT_BLOCK if any(map(_whole_blocks, entries)) else 8))
    return raw, slots, offset


def file_size(entries: list[TensorInfo], metadata: dict[str, str]) -> int:
    """The exact bytes of the file ``SafetensorsWriter`` writes for these entries and metadata."""
    raw, _, data_bytes = _lay_out(entries, metadata)
    return 8 + len(raw) + data_bytes


class SafetensorsWriter:
    """Writes a safetensors file whose header is fixed up front (``_lay_out``); tensors arrive in any order.

    Each ``write`` seeks to its entry's offset, so scales computed after their weights can be written late. ``close``
    checks that every entry was written exactly once.
    """

    def __init__(self, file: BinaryIO, entries: list[TensorInfo], metadata: dict[str, str]):
        """``file``: a real file opened for writing (tensor data goes out through its descriptor)."""
        self._file = file
        raw, self._slots, data_bytes = _lay_out(entries, metadata)
        self._data_start = 8 + len(raw)
        self.total_bytes = self._data_start + data_bytes
        self._written: set[str] = set()
        self._lock = threading.Lock()  # the file position, where there is no pwrite (Windows)
        file.write(struct.pack("<Q", len(raw)) + raw)
        self._direct = _DirectWrites(file)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put one tensor's data in its slot; dtype and shape must match the header."""
        if name not in self._slots:
            raise KeyError(f"{name!r} is not in the output header")
        if name in self._written:
            raise ValueError(f"{name!r} was already written")
        offset, info = self._slots[name]
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(
                f"{name!r}: got {tensor.dtype} {tuple(tensor.shape)}, header says {info.dtype} {info.shape}"
            )
        tensor = tensor.detach().to("cpu").contiguous()
        self._file.flush()  # the header, buffered, goes out first
        data, position = _tensor_bytes(tensor), self._data_start + offset
        start, written = self._direct.write(tensor, data, position)
        if start:
            _write_at(self._file, data[:start], position, self._lock)
        if start + written < len(data) or not data:
            _write_at(self._file, data[start + written :], position + start + written, self._lock)
        self._written.add(name)

    def finish(self) -> None:
        """Check completeness and size the file exactly."""
        missing = set(self._slots) - self._written
        if missing:
            raise RuntimeError(f"{len(missing)} output tensors were never written, e.g. {sorted(missing)[:3]}")
        self._direct.close()
        self._file.truncate(self.total_bytes)
        self._file.flush()


DIRECT_BLOCK = 4096  # what direct I/O must align to: the disk's logical block (512 or 4096 bytes)
DIRECT_MIN = 1 << 20  # smaller writes go through the page cache
_DIRECT_STEP = 16 << 20  # bytes per direct write call


def _whole_blocks(info: TensorInfo) -> bool:
    """A tensor large enough for direct writes whose size is whole disk blocks: the writer puts
    these first, from a block boundary, so that every one of them starts on a block."""
    nbytes = info.numel * dtype_nbytes(info.dtype)
    return nbytes >= DIRECT_MIN and nbytes % DIRECT_BLOCK == 0


class _DirectWrites:
    """Writes the whole disk blocks of large tensors around the page cache (``O_DIRECT``), where the system allows it.

    Why: through the page cache every byte is copied once more, and then waits for the kernel's
    writeback, which throttles a writer whenever the machine holds many dirty pages (another
    program's writes included): on the shared 2-core machine a 1 GB copy took 6-12 s that way and
    1.4-1.9 s with direct writes (``docs/benchmarks.md``). Direct I/O needs the file offset, the
    length and the memory address aligned to the disk block; a tensor's partial blocks at either
    end go through the page cache as before. The closing ``fsync`` still makes the whole file
    durable before it is published. A second descriptor of the temp file (``/proc/self/fd``, Linux)
    carries the flag, so buffered writes stay buffered; where any of this is missing or refused
    (another system, a file system without direct I/O), every write is buffered.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._fd: int | None = None
        if _POSITIONAL and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):
                self._fd = os.open(f"/proc/self/fd/{file.fileno()}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        self._closer = weakref.finalize(self, _close_quietly, self._fd)

    def write(self, tensor: torch.Tensor, data: memoryview, position: int) -> tuple[int, int]:
        """Write the whole blocks of ``data`` (``tensor``'s bytes) directly; returns where in
        ``data`` they start and how many bytes went out (0 and 0: the caller writes all of it)."""
        head = -position % DIRECT_BLOCK
        body = (len(data) - head) // DIRECT_BLOCK * DIRECT_BLOCK
        if self._fd is None or body < DIRECT_MIN or (tensor.data_ptr() + head) % DIRECT_BLOCK:
            return 0, 0
        done = 0
        try:
            while done < body:  # in steps, so that Ctrl-C is seen between them even on a slow disk
                step = data[head + done : head + min(done + _DIRECT_STEP, body)]
                done += os.pwrite(self._fd, step, position + head + done)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self.close()  # refused here (an alignment this system does not accept): buffered from now on
        return head, done - done % DIRECT_BLOCK  # a partial block written directly is written again buffered

    def close(self) -> None:
        self._closer()
        self._fd = None


def _in_turn(pieces: list[tuple[int, int]], fill: Callable[[int, int], None]) -> Iterator[tuple[int, int]]:
    """``pieces`` filled one after the other, each yielded once filled."""
    for piece in pieces:
        fill(*piece)
        yield piece


def _ahead(pieces: list[tuple[int, int]], fill: Callable[[int, int], None]) -> Iterator[tuple[int, int]]:
    """``pieces`` filled one after the other on a thread of their own, each yielded once filled.

    Direct reads have no read-ahead from the kernel: without this thread the disk would wait
    while the caller looks at each piece. Leaving early (an error) lets the piece in progress
    finish and cancels the rest.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="quant_core-read") as reads:
        futures = [reads.submit(fill, *piece) for piece in pieces]
        try:
            for piece, future in zip(pieces, futures, strict=True):
                future.result()
                yield piece
        finally:
            reads.shutdown(cancel_futures=True)


def _uncacheable(path: Path) -> bool:
    """Whether ``path`` is larger than half the computer's memory: then it cannot stay in the page
    cache beside everything else, and reading it around the cache (direct I/O) spares copying
    every byte twice and evicting other pages for it (``docs/benchmarks.md``). A smaller file is
    likely cached (just downloaded or loaded) and read through the cache as before."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows)
        return False
    return os.path.getsize(path) > memory // 2


def _open_direct(path: Path) -> int | None:
    """A descriptor of ``path`` for direct reads (Linux ``O_DIRECT``); None where there is none."""
    if not (_POSITIONAL and hasattr(os, "O_DIRECT")):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:  # a file system without direct I/O
        return None


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def write_stream(
    path: str | os.PathLike,
    entries: list[TensorInfo],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
    protect: tuple[Path, ...] = (),
) -> None:
    """Write ``entries`` atomically from an iterable of ``(name, tensor)`` that yields one tensor at a time."""
    with atomic_output(path, overwrite=overwrite, protect=protect) as file:
        writer = SafetensorsWriter(file, entries, metadata or {})
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.finish()


def write_file(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write a small in-memory state dict atomically (fixtures, calibration files)."""
    entries = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    write_stream(path, entries, tensors.items(), metadata, overwrite)
