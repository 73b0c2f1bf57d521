"""Content hashes of the listed images, with a stat cache so unchanged files are not re-read.

Prepare records each image's SHA-256 in ``manifest.csv``, so the prepared output (a DVC
output) changes exactly when some image's bytes change, on any machine: no sizes, times or
inodes enter it. Extraction and fine-tuning check each image against its hash as they read it.

The cache (one SQLite file per user, :func:`stat_cache_path`, outside every repository, so the
`inputs` stage, prepare and every queued experiment's temporary copy share it) maps a file's
absolute path and its ``size:mtime_ns:ctime_ns:inode:device`` to the hash. A file
rewritten in place with its size and mtime restored (``os.utime``) still gets a new ctime,
which no user can set, so it is hashed again. As in git's "racy git" rule, an entry is
stored only when the file's last change lies :data:`RACY_SECONDS` before the hash was
taken: a file changed again within the same clock tick (filesystem timestamps are only as
fine as the kernel's coarse clock, a few ms) would otherwise keep a matching stat.
Losing the cache costs one re-read of every image, nothing else; a cache that cannot be
opened, read or written (full or read-only disk, lock) is a WARNING, never an error.
"""

import errno
import hashlib
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ltpipe.core.errors import DataError
from ltpipe.data import images

CACHE_DIR_VARIABLE = "LTPIPE_CACHE_DIR"
RACY_SECONDS = 2.0
_POINT_LOOKUPS = 64  # up to this many files in a folder not loaded yet are looked up one by one
# The stat key is text: inode and device numbers of some network and FUSE filesystems pass
# 2**63, which SQLite's integers cannot hold.
_SCHEMA = "CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, stat TEXT, algorithm TEXT, hash TEXT)"
# A whole list's digest keyed by the stats of every file it names (FileHasher.listing).
_LISTINGS_SCHEMA = "CREATE TABLE IF NOT EXISTS listings (stats TEXT PRIMARY KEY, digest TEXT)"


def stat_cache_path() -> Path:
    """``$LTPIPE_CACHE_DIR/file-hashes.sqlite``, else under ``$XDG_CACHE_HOME/ltpipe`` (``~/.cache/ltpipe``).

    Per user, not per repository: its keys are absolute paths with inode and device, valid in any
    checkout, and a queued experiment (``dvc exp run --queue``) runs in a fresh copy of the repository."""
    folder = os.environ.get(CACHE_DIR_VARIABLE)
    if not folder:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                              "ltpipe")
    return Path(folder) / "file-hashes.sqlite"


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
            self.connection.execute(_LISTINGS_SCHEMA)
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc):
                raise
            self.close()  # damaged: start afresh
            self.path.unlink(missing_ok=True)
            self.connection = sqlite3.connect(self.path, timeout=60)
            self.connection.execute(_SCHEMA)
            self.connection.execute(_LISTINGS_SCHEMA)

    def _attempt(self, what: str, action, default=None):
        try:
            return action()
        except (sqlite3.Error, OSError, OverflowError) as exc:
            print(f"WARNING: the stat cache {self.path} cannot {what} ({type(exc).__name__}: {exc}); hashing "
                  "without it (every listed image is read). Delete the file if this persists.")
            self.close()
            return default

    def known(self, under: str) -> dict:
        """``{path: "stat algorithm hash"}`` of the files under the folder ``under`` (a range of the primary
        key: the cache may hold other datasets' files, and reading them would cost time in proportion).
        One text value per path, so that sqlite3 builds the dict in C (437k rows: 0.3 s, not 1 s)."""
        if self.connection is None:
            return {}
        prefix = under.rstrip(os.sep) + os.sep
        # os.sep + 1 sorts right after every path that starts with the prefix.
        end = prefix[:-1] + chr(ord(os.sep) + 1)
        return self._attempt("be read", lambda: dict(self.connection.execute(
            "SELECT path, stat || ' ' || algorithm || ' ' || hash FROM file_hashes WHERE path >= ? AND path < ?",
            (prefix, end))), {})

    def lookup(self, paths: Sequence[str]) -> dict:
        """:meth:`known` for the given paths only."""
        if self.connection is None:
            return {}
        query = "SELECT path, stat || ' ' || algorithm || ' ' || hash FROM file_hashes WHERE path = ?"
        return self._attempt("be read", lambda: dict(
            row for path in paths for row in self.connection.execute(query, (path,))), {})

    def listing(self, stats_key: str) -> Optional[str]:
        if self.connection is None:
            return None
        row = self._attempt("be read", lambda: self.connection.execute(
            "SELECT digest FROM listings WHERE stats = ?", (stats_key,)).fetchone())
        return row[0] if row else None

    def store(self, rows: list, listings: list) -> None:
        if self.connection is not None and (rows or listings):
            def write():
                with self.connection:
                    self.connection.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", rows)
                    self.connection.executemany("INSERT OR REPLACE INTO listings VALUES (?, ?)", listings)
            self._attempt("be written", write)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _is_plain(rel: str) -> bool:
    """Relative, and unchanged by os.path.normpath; cheap string tests first, the regex only for the rare rest."""
    if rel[:1] in ("/", ".", "") or "\\" in rel or "//" in rel or rel[-1:] == "/":
        return False
    return "/." not in rel or not _NOT_PLAIN.search(rel)


def _absolute(root: str, rel: str) -> str:
    # root is absolute and rel normalised (prepare's check_paths): a join is enough, and much cheaper
    # than os.path.abspath on a 437k-line list.
    if _is_plain(rel):
        return root + os.sep + rel if root != os.sep else os.sep + rel
    return os.path.abspath(os.path.join(root, rel))


_NOT_PLAIN = re.compile(r"\\|//|(^|/)\.\.?(/|$)|/$")


def unreadable_mark(exc: OSError) -> str:
    """What :func:`hash_files` records instead of a hash for a file it cannot read (``missing_ok``)."""
    return "!" + (errno.errorcode.get(exc.errno, "") if exc.errno else type(exc).__name__)


class FileHasher:
    """Content hashes through the stat cache, for several calls in one process: the cache is opened once,
    the entries under each folder read from it once, and the new ones written when it closes."""

    def __init__(self, cache_path: Optional[Path]):
        self._cache = _Cache(cache_path)
        self._known: dict = {}  # folder -> its entries
        self._fresh: list = []
        self._fresh_listings: list = []

    def __enter__(self) -> "FileHasher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def entries(self, folder: str, files: Sequence[str] = ()) -> dict:
        """The cached entries under ``folder`` (absolute), from a folder read before when it holds it; for
        a few ``files`` in a folder not read yet, only theirs (a list file must not load a whole dataset)."""
        for loaded, entries in self._known.items():
            if folder == loaded or folder.startswith(loaded.rstrip(os.sep) + os.sep):
                return entries
        if 0 < len(files) <= _POINT_LOOKUPS:
            return self._cache.lookup(files)
        entries = self._known[folder] = self._cache.known(folder)
        return entries

    def hashes(self, root: Path, rel_paths: Sequence[str], missing_ok: bool = False) -> Tuple[List[str], HashStats]:
        """The content hash of every ``root/rel`` (in order), reading only files whose stat changed.

        A file that cannot be read is an error naming it, or with ``missing_ok`` its
        :func:`unreadable_mark` (the `inputs` stage records it; prepare then says what is wrong)."""
        root_abs = os.path.abspath(root)
        hashes, stats, _ = self._hashes(root_abs, rel_paths, [None] * len(rel_paths), missing_ok)
        return hashes, stats

    def listing(self, root: Path, rel_paths: Sequence[str]) -> Tuple[str, int, HashStats]:
        """SHA-256 over ``rel<TAB>hash<LF>`` of every listed file (in order), and how many cannot be read
        (:func:`unreadable_mark` in place of their hash).

        The digest is recorded under the stat keys of all the files; when every one of them matches a
        recorded listing, that digest is the answer without a look at the per-file entries (437k files:
        the stats alone). As sound as the per-file cache, whose rule it follows: no stat changed, so no
        content did. A listing is recorded only when every file in it was cacheable."""
        started = time.perf_counter()
        root_abs = os.path.abspath(root)
        stat_results = []
        for rel in rel_paths:
            try:
                stat_results.append(os.stat(_absolute(root_abs, rel)))
            except OSError:
                stat_results.append(None)  # _hashes says why
        stats_text = "".join([f"{rel}\t{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}\n"
                              if st is not None else f"{rel}\t!\n" for rel, st in zip(rel_paths, stat_results)])
        stats_key = hashlib.sha256(f"{images.HASH_NAME}\n{root_abs}\n{stats_text}".encode()).hexdigest()
        recorded = self._cache.listing(stats_key)
        if recorded is not None:
            return recorded, 0, HashStats(files=len(rel_paths), seconds=time.perf_counter() - started)
        hashes, stats, uncacheable = self._hashes(root_abs, rel_paths, stat_results, missing_ok=True)
        listing = "".join([f"{rel}\t{content}\n" for rel, content in zip(rel_paths, hashes)])
        digest = hashlib.sha256(listing.encode()).hexdigest()
        if not uncacheable:
            self._fresh_listings.append((stats_key, digest))
        stats.seconds = time.perf_counter() - started
        return digest, sum(content.startswith("!") for content in hashes), stats

    def _hashes(self, root_abs: str, rel_paths: Sequence[str], stat_results: list, missing_ok: bool
                ) -> Tuple[List[str], HashStats, int]:
        """:meth:`hashes`, from the files' stats where given, and how many hashes could not be cached."""
        started = time.perf_counter()
        stats = HashStats(files=len(rel_paths))
        known = self.entries(root_abs, [_absolute(root_abs, rel) for rel in rel_paths[:_POINT_LOOKUPS + 1]])
        tag = f" {images.HASH_NAME} "
        hashes, uncacheable = [], 0
        for rel, st in zip(rel_paths, stat_results):
            full = _absolute(root_abs, rel)
            try:
                if st is None:
                    st = os.stat(full)
                key = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"
                entry = known.get(full)
                if entry is not None and entry.startswith(key + tag):
                    hashes.append(entry[len(key) + len(tag):])
                    continue
                data = images.read_bytes(full)
                after = os.stat(full)
            except OSError as exc:
                if missing_ok:
                    hashes.append(unreadable_mark(exc))
                    uncacheable += 1
                    continue
                raise DataError(f"cannot read image {full} to record its content hash ({type(exc).__name__}: "
                                f"{exc.strerror or exc}). Make it readable, or remove it from the list.") from None
            digest = images.content_hash(data)
            hashes.append(digest)
            stats.read += 1
            stats.bytes_read += len(data)
            settled = time.time_ns() - int(RACY_SECONDS * 1e9)
            # Cache only a file that did not change while read and whose last change is not racy.
            if _stat_key(after) == key and max(st.st_mtime_ns, st.st_ctime_ns) < settled:
                self._fresh.append((full, key, images.HASH_NAME, digest))
                known[full] = key + tag + digest
            else:
                uncacheable += 1
        stats.seconds = time.perf_counter() - started
        return hashes, stats, uncacheable

    def close(self) -> None:
        try:
            self._cache.store(self._fresh, self._fresh_listings)
        finally:
            self._cache.close()


def hash_files(root: Path, rel_paths: Sequence[str], cache_path: Optional[Path], missing_ok: bool = False
               ) -> Tuple[List[str], HashStats]:
    """The content hash of every ``root/rel`` (in order), reading only files whose stat changed
    (:meth:`FileHasher.hashes`, with the cache opened for this call)."""
    with FileHasher(cache_path) as hasher:
        return hasher.hashes(root, rel_paths, missing_ok)


def hash_file(path: Path, cache_path: Optional[Path], missing_ok: bool = False) -> str:
    """The content hash of one file (a list, a checkpoint, an archive part), through the same stat cache."""
    path = Path(os.path.abspath(path))
    return hash_files(path.parent, [path.name], cache_path, missing_ok)[0][0]
