"""Checksums of the HDF5 feature cache, and its datasets read checked against them.

Checksums catch damage that keeps a file's size and modification time (bit rot, a bad
copy), which neither HDF5 nor ``dvc status`` notices. ``checksums`` holds the CRC-32 of
every dataset read whole (and of the other attributes), verified whenever the dataset is
loaded; token grids are read a random batch at a time, so each row has its own CRC-32,
verified the first time this process reads the row. CRC-32 is the fastest of the hashes at
hand (``bench/features.py``: 4x sha1, 8x md5). zlib-ng computes it with carry-less multiplication
at ~35 GB/s on one core here, above a page-cache read (~6.5 GB/s); zlib's own runs at ~3.4 GB/s,
below it, so where zlib-ng is not installed (``bench/gpu.py`` on a bare machine) many rows are
checked in threads (``row_checksums``). Both give the same values: files and checksums are one format.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional

import h5py
import numpy as np

from ltpipe.core.errors import DataError

try:
    from zlib_ng.zlib_ng import crc32

    FAST_CRC32 = True
except ImportError:
    from zlib import crc32

    FAST_CRC32 = False

CHECKSUMS = "checksums"  # file attribute: JSON {dataset name, or "attrs": CRC-32 as 8 hex digits}
ROW_CHECKSUMS = {"tokens": "tokens_crc32"}  # datasets read in random rows -> their per-row CRC-32 dataset
UNCHECKED_ATTRS = ("complete", CHECKSUMS)  # set after the checksums are taken
# Errors h5py raises when a file's structure (headers, heaps) is damaged.
HDF5_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError)


def array_checksum(values: np.ndarray) -> str:
    """CRC-32 of an array as h5py reads it: dtype, shape and bytes (strings: their lengths, then their bytes)."""
    values = np.asarray(values)
    crc = crc32(f"{values.dtype.str}{values.shape}".encode())
    if values.dtype.kind == "O":
        items = [item if isinstance(item, bytes) else str(item).encode() for item in values.ravel()]
        crc = crc32(np.fromiter(map(len, items), dtype="<u8", count=len(items)), crc)
        crc = crc32(b"".join(items), crc)
    else:
        crc = crc32(np.ascontiguousarray(values), crc)
    return f"{crc:08x}"


def attrs_checksum(attrs) -> str:
    """CRC-32 of a file's attributes (but the ones set after it), in name order."""
    crc = 0
    for name in sorted(k for k in attrs.keys() if k not in UNCHECKED_ATTRS):
        value = attrs[name]
        if isinstance(value, str):
            data = b"s" + value.encode()
        elif isinstance(value, bytes):
            data = b"b" + value
        else:
            value = np.asarray(value)
            data = value.dtype.str.encode() + str(value.shape).encode() + np.ascontiguousarray(value).tobytes()
        crc = crc32(data, crc32(name.encode() + b"\0", crc))
    return f"{crc:08x}"


# zlib releases the GIL on buffers over 5 KB, so with zlib's CRC-32 rows checked in threads use several
# cores; zlib-ng's outruns the read on one.
PARALLEL_ROW_BYTES = 1 << 22  # rows checked in one call below this many bytes: one thread
_pool = []  # (executor, workers), made on first use


def _row_pool():
    if not _pool:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(1, min(cores, 8))
        _pool.append((ThreadPoolExecutor(workers, thread_name_prefix="ltpipe-crc"), workers))
    return _pool[0]


if hasattr(os, "register_at_fork"):  # a forked child (a DataLoader worker) has none of the parent's threads
    os.register_at_fork(after_in_child=_pool.clear)


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes, ``[len(rows)]`` uint32; many rows are checked in threads."""
    rows = np.ascontiguousarray(rows)
    out = np.empty(len(rows), dtype=np.uint32)

    def check(part: range) -> None:
        out[part.start:part.stop] = [crc32(rows[k]) for k in part]

    pool, workers = _row_pool()
    parts = min(workers, len(rows))
    if FAST_CRC32 or rows.nbytes < PARALLEL_ROW_BYTES or parts < 2 or rows[0].nbytes <= 5 * 1024:
        check(range(len(rows)))
        return out
    bounds = np.linspace(0, len(rows), parts + 1).astype(int)
    list(pool.map(check, [range(bounds[k], bounds[k + 1]) for k in range(parts)]))
    return out


def damaged(path: Path, what: str,
            problem: str = "fails its checksum (recorded when the file was written)") -> DataError:
    path = Path(path)
    return DataError(
        f"feature cache {path} is damaged: {what} {problem} (bit rot or a bad copy; size and modification time "
        f"can be unchanged, so `dvc status` does not see it). Restore DVC's copy with `dvc checkout --relink "
        f"{path.parent}` (a plain `dvc checkout` sees nothing to do) and check it with `python -m "
        f"ltpipe.features.verify {path}`; or delete {path} and re-extract: `dvc repro -f extract`."
    )


_warned_unchecked = set()


class CheckedFile:
    """An open cache file whose datasets are read whole and checked against ``checksums``.

    A file written before ltpipe recorded checksums (or by hand) is read unchecked, with one
    warning per process: the pipeline re-extracts it anyway, as extraction's code changed."""

    def __init__(self, fh: h5py.File, path: Path, warn: bool = True):
        self.fh = fh
        self.path = Path(path)
        raw = fh.attrs.get(CHECKSUMS)
        self.sums: Optional[Dict[str, str]] = None
        if raw is None:
            if warn and str(self.path) not in _warned_unchecked:
                _warned_unchecked.add(str(self.path))
                print(f"WARNING: feature cache {self.path} carries no checksums (written by an older ltpipe or "
                      "another tool), so damage to it cannot be detected. Re-extract to add them: delete it and "
                      "run `dvc repro -f extract`.")
            return
        try:
            sums = json.loads(raw)
            if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
                raise ValueError(raw)
        except (ValueError, TypeError):
            raise damaged(self.path, "the `checksums` attribute", "is not the JSON ltpipe wrote") from None
        self.sums = sums
        self._check("attrs", attrs_checksum(fh.attrs), "the set of its attributes (model, token layer, ...)")

    @property
    def checked(self) -> bool:
        return self.sums is not None

    def _check(self, name: str, actual: str, what: str) -> None:
        expected = self.sums.get(name)
        if expected is None:
            raise damaged(self.path, what, "has no recorded checksum")
        if expected != actual:
            raise damaged(self.path, what)

    def read(self, name: str) -> np.ndarray:
        """Dataset ``name`` whole, checked."""
        try:
            values = self.fh[name][()]
        except HDF5_READ_ERRORS as exc:
            raise damaged(self.path, f"dataset `{name}`", f"cannot be read ({exc})") from None
        if self.sums is not None:
            self._check(name, array_checksum(values), f"dataset `{name}`")
        return values

    def row_sums(self, name: str) -> Optional[np.ndarray]:
        """The per-row checksums of ``name`` (``tokens``), or None in a file without checksums."""
        if self.sums is None:
            return None
        sums = self.read(ROW_CHECKSUMS[name])
        if sums.shape != self.fh[name].shape[:1]:
            raise damaged(self.path, f"dataset `{ROW_CHECKSUMS[name]}`", f"has shape {sums.shape}, not "
                          f"{self.fh[name].shape[:1]}")
        return sums
