"""Content hashes of the listed images, with a stat cache so unchanged files are not re-read.

Prepare records each image's SHA-256 in ``manifest.csv``, so the prepared output (a DVC
output) changes exactly when some image's bytes change, on any machine: no sizes, times or
inodes enter it. Extraction and fine-tuning check each image against its hash as they read it.

The cache (a SQLite file under ``data/partial/``, outside every DVC output) maps a file's
absolute path and its ``size:mtime_ns:ctime_ns:inode:device`` to the hash. A file
rewritten in place with its size and mtime restored (``os.utime``) still gets a new ctime,
which no user can set, so it is hashed again. As in git's "racy git" rule, an entry is
stored only when the file's last change lies :data:`RACY_SECONDS` before the hash was
taken: a file changed again within the same clock tick (filesystem timestamps are only as
fine as the kernel's coarse clock, a few ms) would otherwise keep a matching stat.
Losing the cache costs one re-read of every image, nothing else; a cache that cannot be
opened, read or written (full or read-only disk, lock) is a WARNING, never an error.
"""

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ltpipe.core import paths
from ltpipe.core.errors import DataError
from ltpipe.data import images

STAT_CACHE = paths.PARTIAL_DIR / "prepare-hashes.sqlite"
RACY_SECONDS = 2.0
# The stat key is text: inode and device numbers of some network and FUSE filesystems pass
# 2**63, which SQLite's integers cannot hold.
_SCHEMA = "CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, stat TEXT, algorithm TEXT, hash TEXT)"


@dataclass
class HashStats:
    """What one hashing pass did (printed by prepare; never written to its outputs)."""

    files: int = 0
    read: int = 0  # files read and hashed
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def cached(self) -> int:
        return self.files - self.read


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


class _Cache:
    """The stat cache, best effort: it only saves time, so any failure of it (a full or read-only
    disk, a locked or damaged file) is one WARNING and the files are hashed without it."""

    def __init__(self, cache_path: Optional[Path]):
        self.path = Path(cache_path) if cache_path is not None else None
        self.connection: Optional[sqlite3.Connection] = None
        if self.path is not None:
            self._attempt("open", self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.connection = sqlite3.connect(self.path, timeout=60)
            self.connection.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc):
                raise
            self.close()  # damaged: start afresh
            self.path.unlink(missing_ok=True)
            self.connection = sqlite3.connect(self.path, timeout=60)
            self.connection.execute(_SCHEMA)

    def _attempt(self, what: str, action, default=None):
        try:
            return action()
        except (sqlite3.Error, OSError, OverflowError) as exc:
            print(f"WARNING: the stat cache {self.path} cannot {what} ({type(exc).__name__}: {exc}); hashing "
                  "without it (every listed image is read). Delete the file if this persists.")
            self.close()
            return default

    def known(self) -> dict:
        if self.connection is None:
            return {}
        return self._attempt("be read", lambda: {row[0]: row[1:] for row in self.connection.execute(
            "SELECT path, stat, algorithm, hash FROM file_hashes")}, {})

    def store(self, rows: list) -> None:
        if self.connection is not None and rows:
            def write():
                with self.connection:
                    self.connection.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", rows)
            self._attempt("be written", write)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def hash_files(root: Path, rel_paths: Sequence[str], cache_path: Optional[Path] = STAT_CACHE
               ) -> Tuple[List[str], HashStats]:
    """The content hash of every ``root/rel`` (in order), reading only files whose stat changed."""
    started = time.perf_counter()
    stats = HashStats(files=len(rel_paths))
    cache = _Cache(cache_path)
    try:
        known = cache.known()
        hashes, fresh = [], []
        for rel in rel_paths:
            full = os.path.abspath(os.path.join(root, rel))
            try:
                st = os.stat(full)
                entry = known.get(full)
                if entry is not None and entry[0] == _stat_key(st) and entry[1] == images.HASH_NAME:
                    hashes.append(entry[2])
                    continue
                data = images.read_bytes(full)
                after = os.stat(full)
            except OSError as exc:
                raise DataError(f"cannot read image {full} to record its content hash ({type(exc).__name__}: "
                                f"{exc.strerror or exc}). Make it readable, or remove it from the list.") from None
            digest = images.content_hash(data)
            hashes.append(digest)
            stats.read += 1
            stats.bytes_read += len(data)
            settled = time.time_ns() - int(RACY_SECONDS * 1e9)
            # Cache only a file that did not change while read and whose last change is not racy.
            if _stat_key(after) == _stat_key(st) and max(st.st_mtime_ns, st.st_ctime_ns) < settled:
                fresh.append((full, _stat_key(st), images.HASH_NAME, digest))
        cache.store(fresh)
    finally:
        cache.close()
    stats.seconds = time.perf_counter() - started
    return hashes, stats
