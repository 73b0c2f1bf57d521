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
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

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
        for start, stop in _runs(rows):
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

    def advise(self, rows: np.ndarray) -> None:
        """Tell the kernel rows ``rows`` (sorted, unique) will be read soon (``POSIX_FADV_WILLNEED``): it
        starts reading them from the disk at once, all together, and returns. A later :meth:`read` of
        rows not in the page cache then waits for none of them, or for all at once instead of one after
        another (``bench/tokens.py``: a cold depth-0 decoder step 34 ms without the advice, 15 ms with).
        Costs ~2 us a run when the rows are cached; no-op where there is no such advice (macOS) or the
        rows are read through h5py."""
        if len(rows) == 0 or not self.by_offset or not hasattr(os, "posix_fadvise"):
            return
        fd = self._open()
        for start, stop in _runs(rows):
            try:
                os.posix_fadvise(fd, self.offset + int(rows[start]) * self.row_bytes, (stop - start) * self.row_bytes,
                                 os.POSIX_FADV_WILLNEED)
            except OSError:  # advice only: a failure here is the read's to report
                return

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


def _runs(rows: np.ndarray) -> List[Tuple[int, int]]:
    """``(start, stop)`` positions in ``rows`` (sorted, unique) of each run of consecutive rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return list(zip(np.concatenate(([0], breaks)).tolist(), np.concatenate((breaks, [len(rows)])).tolist()))


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


# ---------------------------------------------------------------- whole blocks (`train.shuffle: blocks`)


class BlockReads:
    """One epoch's token batches served from whole blocks of rows, each read once, in full.

    ``batches`` are the epoch's sorted index arrays in training order, laid out by
    :func:`ltpipe.training.samplers.block_order` with ``block_rows`` and ``block_buffer``;
    ``read(rows, out)`` reads the grids of the input rows ``rows`` (sorted) into ``out``. A block is
    read whole (rows ``b * block_rows`` up to the next block) by the first batch that needs it, or
    earlier, and dropped after the last batch that needs it.

    Reading only when needed would read a whole window at its first batch (its rows are shuffled
    together, so that batch needs nearly every block of it), a burst one batch of read-ahead cannot
    hide. So each batch also reads ahead the next blocks to be needed, as many as the epoch has
    blocks per batch, while at most ``2 x block_buffer`` blocks are held: the window's reads spread
    over the previous window's batches. Blocks held: at most ``max(2 x block_buffer, block_buffer +
    the blocks one batch reads)``, i.e. ``2 x block_buffer`` when a batch is no longer than a window
    (``block_rows x block_buffer`` rows). Batches must be asked for in order (the read-ahead thread
    and the training step both do).
    """

    def __init__(self, batches: List[np.ndarray], block_rows: int, block_buffer: int, total: int,
                 read: Callable[[np.ndarray, np.ndarray], np.ndarray], buffer: Callable[[int], np.ndarray]):
        self.batches = batches
        self.block_rows = block_rows
        self.total = total
        self._read = read
        self._buffer = buffer
        needs = [np.unique(np.asarray(index) // block_rows).tolist() for index in batches]
        self._last_use: Dict[int, int] = {}
        first_use: Dict[int, int] = {}
        for k, blocks in enumerate(needs):
            for block in blocks:
                first_use.setdefault(block, k)
                self._last_use[block] = k
        self._schedule = list(first_use.items())  # (block, first batch needing it), in that batch order
        self._scheduled = 0  # blocks of the schedule read so far
        self._pace = -(-len(first_use) // max(len(batches), 1))  # blocks read ahead per batch
        self._most = 2 * block_buffer  # blocks held at most, by reads ahead of need
        self._held: Dict[int, np.ndarray] = {}
        self._free: List[np.ndarray] = []  # buffers of dropped blocks, reused for the next ones
        self._next = 0
        self.blocks_read = 0
        self.most_held = 0

    def rows(self, index: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The grids of the next batch, ``index`` (which must be it), into ``out[:len(index)]``."""
        k = self._next
        if k >= len(self.batches) or not np.array_equal(index, self.batches[k]):
            raise RuntimeError(f"batch {k} of the epoch's block plan asked for out of order")
        self._next += 1
        for block in [b for b in self._held if self._last_use[b] < k]:
            self._free.append(self._held.pop(block))
        while self._scheduled < len(self._schedule) and self._schedule[self._scheduled][1] <= k:
            self._read_next()  # needed now
        for _ in range(self._pace):
            if self._scheduled == len(self._schedule) or len(self._held) >= self._most:
                break
            self._read_next()  # needed later
        self.most_held = max(self.most_held, len(self._held))
        out = out[:len(index)]
        blocks = index // self.block_rows
        # Sorted rows: each block's rows are one slice of the batch.
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        starts, stops = np.concatenate(([0], bounds)).tolist(), np.concatenate((bounds, [len(index)])).tolist()
        for first, stop in zip(starts, stops):
            block = int(blocks[first])
            np.take(self._held[block], index[first:stop] - block * self.block_rows, axis=0, out=out[first:stop],
                    mode="clip")  # rows within the block by construction
        return out

    def _read_next(self) -> None:
        block = self._schedule[self._scheduled][0]
        self._scheduled += 1
        start, stop = block * self.block_rows, min((block + 1) * self.block_rows, self.total)
        held = self._free.pop() if self._free else self._buffer(self.block_rows)
        self._read(np.arange(start, stop), held)
        self._held[block] = held
        self.blocks_read += 1


# ---------------------------------------------------------------- read-ahead

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(load: Callable[[T], R], items: Iterable[T], enabled: bool = True,
               advise: Optional[Callable[[T], None]] = None) -> Iterator[Tuple[T, R]]:
    """``(item, load(item))`` in the order of ``items``, loading the next item in a background thread
    while the caller works on the current one. An exception raised by ``load`` is raised here, in the
    caller, when it reaches that item; a caller that stops early waits only for the load under way.

    ``advise(item)``, if given, is called once per item, a load ahead of it: in the background thread
    just before the previous item's load (the first item's: before its own). A hint that the item is
    loaded next, e.g. to start its reads from the disk (:meth:`TokenRows.advise`) a whole step before
    they are needed, with no buffer of its own."""
    if not enabled:
        for item in items:
            yield item, load(item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltpipe-read-ahead")

    def task(item: T, following) -> R:
        if advise is not None and following is not _END:
            advise(following)
        return load(item)

    try:
        iterator = iter(items)
        current = next(iterator, _END)
        following = next(iterator, _END)
        if advise is not None and current is not _END:
            advise(current)
        pending = pool.submit(task, current, following) if current is not _END else None
        while current is not _END:
            after = next(iterator, _END) if following is not _END else _END
            result = pending.result()
            pending = pool.submit(task, following, after) if following is not _END else None
            yield current, result
            current, following = following, after
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
