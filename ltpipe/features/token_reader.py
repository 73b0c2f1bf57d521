"""Reading token grids at the page cache's speed, a batch ahead of training, from disk or RAM.

A cache file's ``tokens`` dataset is written contiguous and uncompressed (see
:mod:`ltpipe.features.store`), so row ``r`` is the ``row_bytes`` bytes at ``offset + r * row_bytes``
of the file. :class:`TokenRows` reads a sorted batch's runs of consecutive rows with one
``os.preadv`` each, straight into a caller's reused buffer in the file's dtype: no per-row
HDF5 selection, no float32 copy on the CPU. h5py's fancy indexing of the same rows costs
~10x more (``bench/tokens.py``).
"""

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Tuple, TypeVar

import h5py
import numpy as np

from ltpipe.features.checksums import HDF5_READ_ERRORS, damaged

# `train.token_cache: auto` loads a split's grids into RAM when they take at most this share of
# the memory the kernel reports available (MemAvailable): the rest stays for the process's own
# arrays, the page cache and whatever else runs on the machine.
MEMORY_SHARE = 0.5
TOKEN_CACHES = ("auto", "memory", "disk")


class TokenRows:
    """Rows of one dataset of an HDF5 file, read by file offset when its layout allows."""

    def __init__(self, path: Path, name: str = "tokens"):
        self.path = Path(path)
        self.name = name
        self._fd: Optional[int] = None
        self._h5: Optional[h5py.File] = None
        self._lock = threading.Lock()
        try:
            with h5py.File(self.path, "r") as fh:
                dataset = fh[name]
                self.shape = dataset.shape
                self.dtype = dataset.dtype
                self.row_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
                offset = dataset.id.get_offset()
                # Offsets address the bytes only of a contiguous, unfiltered dataset in native byte order;
                # chunked, compressed or not-yet-allocated data (offset None) is read through h5py instead.
                plain = (dataset.chunks is None and dataset.id.get_create_plist().get_nfilters() == 0
                         and offset is not None and dataset.dtype.isnative)
                self.offset = int(offset) if plain else None
        except HDF5_READ_ERRORS as exc:
            raise damaged(self.path, f"dataset `{name}`", f"cannot be read ({exc})") from None
        self._finalizer = weakref.finalize(self, _close, [None, None])

    @property
    def by_offset(self) -> bool:
        return self.offset is not None

    def __len__(self) -> int:
        return self.shape[0]

    def buffer(self, rows: int) -> np.ndarray:
        return np.empty((rows,) + tuple(self.shape[1:]), dtype=self.dtype)

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) into ``out[:len(rows)]``, which is returned."""
        out = out[:len(rows)]
        if len(rows) == 0:
            return out
        if not self.by_offset:
            return self._read_h5(rows, out)
        fd = self._open()
        flat = out.reshape(len(rows), -1).view(np.uint8)
        # Runs of consecutive rows: one system call each (a sequential pass is a single run).
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [len(rows)]))
        for start, stop in zip(starts.tolist(), stops.tolist()):
            target = memoryview(flat[start:stop].reshape(-1))
            position = self.offset + int(rows[start]) * self.row_bytes
            done = 0
            while done < len(target):
                try:
                    got = os.preadv(fd, [target[done:]], position + done)
                except OSError as exc:
                    raise damaged(self.path, f"dataset `{self.name}`", f"cannot be read ({exc})") from None
                if got == 0:
                    row = int(rows[start]) + done // self.row_bytes
                    raise damaged(self.path, f"dataset `{self.name}`", f"cannot be read (the file ends in row {row})")
                done += got
        return out

    def _read_h5(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._h5 is None:
                self._h5 = h5py.File(self.path, "r")
                self._finalizer.detach()
                self._finalizer = weakref.finalize(self, _close, [self._fd, self._h5])
            try:
                out[...] = self._h5[self.name][rows]
            except HDF5_READ_ERRORS as exc:
                raise damaged(self.path, f"dataset `{self.name}`", f"cannot be read ({exc})") from None
        return out

    def _open(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
                    self._finalizer.detach()
                    self._finalizer = weakref.finalize(self, _close, [self._fd, self._h5])
        return self._fd

    def close(self) -> None:
        self._finalizer()
        self._fd = self._h5 = None


def _close(handles) -> None:
    fd, h5 = handles
    if fd is not None:
        os.close(fd)
    if h5 is not None:
        h5.close()


# ---------------------------------------------------------------- memory or disk


def available_memory() -> Optional[int]:
    """Bytes the kernel reports available for new allocations (``MemAvailable``), or None off Linux."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def choose_token_cache(mode: str, nbytes: int, available: Optional[int]) -> Tuple[bool, str]:
    """Whether a split whose grids take ``nbytes`` is loaded into RAM under ``mode``, and why."""
    size = _size(nbytes)
    if mode == "memory":
        return True, f"`token_cache: memory` ({size})"
    if mode == "disk":
        return False, f"`token_cache: disk` ({size} streamed from the file)"
    if available is None:
        return False, f"`token_cache: auto`: available memory unknown, {size} streamed from the file"
    budget = int(available * MEMORY_SHARE)
    verdict = "fit in" if nbytes <= budget else "exceed"
    return nbytes <= budget, (f"`token_cache: auto`: {size} {verdict} the budget of {_size(budget)} "
                              f"({MEMORY_SHARE:g} x MemAvailable)")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


# ---------------------------------------------------------------- read-ahead

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(load: Callable[[T], R], items: Iterable[T], enabled: bool = True) -> Iterator[Tuple[T, R]]:
    """``(item, load(item))`` in the order of ``items``, loading the next item in a background thread
    while the caller works on the current one. An exception raised by ``load`` is raised here, in the
    caller, when it reaches that item; a caller that stops early waits only for the load under way."""
    if not enabled:
        for item in items:
            yield item, load(item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltpipe-read-ahead")
    try:
        iterator = iter(items)
        current = next(iterator, _END)
        pending = pool.submit(load, current) if current is not _END else None
        while current is not _END:
            following = next(iterator, _END)
            result = pending.result()
            pending = pool.submit(load, following) if following is not _END else None
            yield current, result
            current = following
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
