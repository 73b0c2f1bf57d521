"""Content hashes of the listed images, with a stat cache so unchanged files are not re-read.

Prepare records each image's SHA-256 in ``manifest.csv``, so the prepared output (a DVC
output) changes exactly when some image's bytes change, on any machine: no sizes, times or
inodes enter it. Extraction and fine-tuning check each image against its hash as they read it.

The cache (a SQLite file under ``data/partial/``, outside every DVC output) maps a file's
absolute path and its ``(size, mtime_ns, ctime_ns, inode, device)`` to the hash. A file
rewritten in place with its size and mtime restored (``os.utime``) still gets a new ctime,
which no user can set, so it is hashed again. As in git's "racy git" rule, an entry is
stored only when the file's last change lies :data:`RACY_SECONDS` before the hash was
taken: a file changed again within the same clock tick (filesystem timestamps are only as
fine as the kernel's coarse clock, a few ms) would otherwise keep a matching stat.
Losing the cache costs one re-read of every image, nothing else.
"""

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ltpipe import paths
from ltpipe.data import images

STAT_CACHE = paths.PARTIAL_DIR / "prepare-hashes.sqlite"
RACY_SECONDS = 2.0
_SCHEMA = ("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
           "ctime_ns INTEGER, inode INTEGER, device INTEGER, algorithm TEXT, hash TEXT)")


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


def _stat_key(st: os.stat_result) -> Tuple[int, int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def _open_cache(cache_path: Path) -> Optional[sqlite3.Connection]:
    """The cache, created if needed; a corrupt one is replaced (it only saves time)."""
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            connection = sqlite3.connect(cache_path, timeout=60)
            connection.execute(_SCHEMA)
            return connection
        except sqlite3.DatabaseError:
            if attempt:
                raise
            cache_path.unlink(missing_ok=True)
    return None


def hash_files(root: Path, rel_paths: Sequence[str], cache_path: Optional[Path] = STAT_CACHE
               ) -> Tuple[List[str], HashStats]:
    """The content hash of every ``root/rel`` (in order), reading only files whose stat changed."""
    started = time.perf_counter()
    stats = HashStats(files=len(rel_paths))
    connection = _open_cache(cache_path) if cache_path is not None else None
    try:
        known = {}
        if connection is not None:
            known = {row[0]: (tuple(row[1:6]), row[6], row[7]) for row in connection.execute("SELECT * FROM hashes")}
        hashes, fresh = [], []
        for rel in rel_paths:
            full = os.path.abspath(os.path.join(root, rel))
            st = os.stat(full)
            entry = known.get(full)
            if entry is not None and entry[0] == _stat_key(st) and entry[1] == images.HASH_NAME:
                hashes.append(entry[2])
                continue
            data = images.read_bytes(full)
            after = os.stat(full)
            digest = images.content_hash(data)
            hashes.append(digest)
            stats.read += 1
            stats.bytes_read += len(data)
            settled = time.time_ns() - int(RACY_SECONDS * 1e9)
            # Cache only a file that did not change while read and whose last change is not racy.
            if _stat_key(after) == _stat_key(st) and max(st.st_mtime_ns, st.st_ctime_ns) < settled:
                fresh.append((full, *_stat_key(st), images.HASH_NAME, digest))
        if connection is not None and fresh:
            with connection:
                connection.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", fresh)
    finally:
        if connection is not None:
            connection.close()
    stats.seconds = time.perf_counter() - started
    return hashes, stats
