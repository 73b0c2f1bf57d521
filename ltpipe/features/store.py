"""The HDF5 feature cache: one self-describing file per split, plus one for text.

Layout of a split file (contiguous, uncompressed: compression saves at most ~14 %
on float16 embeddings and costs up to 150x on random reads, see docs/outputs.md):

* ``pooled`` ``[N, D]`` image embeddings after the projection
* ``tokens`` ``[N, T, W]`` token grid (ViT: CLS + patches; ResNet: last stage), optional,
  with ``tokens_crc32`` ``[N]``: the CRC-32 of each row's bytes
* ``labels`` ``[N]`` int64 (single-label) or ``[N, C]`` uint8 (multi-label)
* ``paths`` ``[N]`` image paths relative to the dataset root
* ``skipped_paths``, ``skipped_errors`` ``[S]`` images left out as unreadable
  (``extract.on_bad_image: skip``) and why; empty when none were
* attributes: model arch, pretrained tag, weights sha256, preprocessing, token
  layer, dtype, ltpipe version, ``complete``, and ``checksums``.

Checksums (:mod:`ltpipe.features.checksums`) catch damage that keeps a file's size and
modification time: writers record them, readers check every dataset they load and every
token row the first time they read it.

Writes go to ``<name>.partial`` and are renamed into place only when complete, so
the output path never holds a half-written file; a failed write removes its
``.partial``. Readers open files read-only, which keeps their mtime (and DVC's hash
state) untouched.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import h5py
import numpy as np

from ltpipe.core.errors import DataError
from ltpipe.core.paths import atomic_target, disk_full_error, is_disk_full, partial_path
from ltpipe.features.checksums import (
    CHECKSUMS,
    HDF5_READ_ERRORS,
    ROW_CHECKSUMS,
    CheckedFile,
    array_checksum,
    attrs_checksum,
    damaged,
    row_checksums,
)
from ltpipe.features.token_reader import TokenRows

DTYPES = {"float16": np.float16, "float32": np.float32}
# Token rows verified at a time by `verify_file` (a bounded buffer, however large the split).
VERIFY_ROWS = 1024


# ---------------------------------------------------------------- checksums recorded, token rows checked


def record_checksums(fh: h5py.File) -> None:
    """Store the checksum of every dataset read whole, and of the attributes, in ``fh``."""
    sums = {name: array_checksum(fh[name][()]) for name in sorted(fh.keys()) if name not in ROW_CHECKSUMS}
    sums["attrs"] = attrs_checksum(fh.attrs)
    fh.attrs[CHECKSUMS] = json.dumps(sums, sort_keys=True)


def check_rows(path: Path, name: str, rows: np.ndarray, index: np.ndarray, expected: np.ndarray,
               paths: Optional[Sequence[str]] = None) -> None:
    """Raise if any of ``rows`` (rows ``index`` of dataset ``name``) does not match its checksum."""
    bad = np.flatnonzero(row_checksums(rows) != expected)
    if len(bad):
        first = int(index[bad[0]])
        image = f" (image {paths[first]})" if paths is not None and first < len(paths) else ""
        more = f" and {len(bad) - 1} more of rows {int(index[0])}-{int(index[-1])}" if len(bad) > 1 else ""
        raise damaged(path, f"dataset `{name}`, row {first}{image}{more},")


# ---------------------------------------------------------------- writing


class SplitWriter:
    """Writes one split file: labels and paths at once, features in slices; renames it
    into place on :meth:`commit`.

    Variable-length strings written in several slices would land in HDF5's global heap
    in a layout that depends on the slicing; written once, the file's bytes depend only
    on its contents.

    A full disk raises :class:`DiskFullError` naming the file (``kept`` says what the
    caller keeps for a re-run) and removes the half-written ``.partial``.
    """

    def __init__(self, path: Path, pooled_dim: int, token_shape: Optional[Tuple[int, int]],
                 labels: np.ndarray, paths: Sequence[str], dtype: str, attrs: Dict,
                 skipped: Sequence[Tuple[str, str]] = (), kept: str = ""):
        num = len(paths)
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.kept = kept
        self.dtype = DTYPES[dtype]
        item = np.dtype(self.dtype).itemsize
        self.needed = num * (pooled_dim + (int(np.prod(token_shape)) if token_shape is not None else 0)) * item
        self.file = None
        self._token_sums = np.zeros(num, dtype=np.uint32) if token_shape is not None else None
        with self._on_disk_full():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = h5py.File(self.partial, "w", libver=("earliest", "v110"))
            self.file.create_dataset("pooled", shape=(num, pooled_dim), dtype=self.dtype)
            if token_shape is not None:
                self.file.create_dataset("tokens", shape=(num,) + tuple(token_shape), dtype=self.dtype)
            self.file.create_dataset("labels", data=labels)
            self.file.create_dataset("paths", data=list(paths), dtype=h5py.string_dtype())
            self.file.create_dataset("skipped_paths", data=[p for p, _ in skipped], shape=(len(skipped),),
                                     dtype=h5py.string_dtype())
            self.file.create_dataset("skipped_errors", data=[e for _, e in skipped], shape=(len(skipped),),
                                     dtype=h5py.string_dtype())
            self.file.attrs["skipped_images"] = len(skipped)
            for key, value in attrs.items():
                self.file.attrs[key] = _attr(value)
            self.file.attrs["dtype"] = dtype
            self.file.attrs["complete"] = False

    @contextlib.contextmanager
    def _on_disk_full(self):
        try:
            with _disk_full_reported_once():
                yield
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.abort()
            raise disk_full_error(self.path, self.needed, self.kept) from None

    def write(self, start: int, pooled: np.ndarray, tokens: Optional[np.ndarray]) -> None:
        stop = start + len(pooled)
        with self._on_disk_full():
            self.file["pooled"][start:stop] = pooled.astype(self.dtype)
            if tokens is not None:
                tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
                self.file["tokens"][start:stop] = tokens
                self._token_sums[start:stop] = row_checksums(tokens)

    def commit(self) -> None:
        with self._on_disk_full():
            if self._token_sums is not None:
                self.file.create_dataset(ROW_CHECKSUMS["tokens"], data=self._token_sums)
            record_checksums(self.file)
            self.file.attrs["complete"] = True
            self.file.close()
            os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Close and remove the half-written file: a ``.partial`` is never resumed."""
        if self.file is not None and self.file.id.valid:
            try:
                self.file.close()
            except HDF5_READ_ERRORS:
                pass  # a full disk can fail the final flush too; the file goes anyway
        self.partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _disk_full_reported_once():
    """When a write to a full disk fails, h5py's objects of that file report it again as they are
    freed (``Exception ignored in ... ObjectID.__dealloc__``, a traceback each); the error raised
    says it once, so these repeats are dropped."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not is_disk_full(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _attr(value):
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def write_text(path: Path, embeddings: np.ndarray, per_template: np.ndarray, prompts: Sequence[Sequence[str]],
               classnames: Sequence[str], attrs: Dict) -> None:
    """Build the (small) file in memory, then write its bytes: a full disk then fails a plain
    file write, never an HDF5 flush, which would leave the library holding a half-closed file
    (and crash the interpreter at exit)."""
    image = io.BytesIO()
    with h5py.File(image, "w", libver=("earliest", "v110")) as fh:
        fh.create_dataset("embeddings", data=embeddings.astype(np.float32))
        fh.create_dataset("per_template", data=per_template.astype(np.float32))
        fh.create_dataset("prompts", data=np.asarray([list(p) for p in prompts], dtype=object),
                          dtype=h5py.string_dtype())
        fh.create_dataset("classnames", data=list(classnames), dtype=h5py.string_dtype())
        for key, value in attrs.items():
            fh.attrs[key] = _attr(value)
        record_checksums(fh)
        fh.attrs["complete"] = True
    data = image.getvalue()
    with atomic_target(path, needed=len(data)) as partial:
        Path(partial).write_bytes(data)


# ---------------------------------------------------------------- reading


def open_read(path: Path, stage: str = "extract") -> h5py.File:
    """``path`` opened for reading, once it is known complete; ``stage``: the DVC stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature cache {path} not found. Run the {stage} stage: `dvc repro {stage}`.")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"feature cache {path} is not a readable HDF5 file ({exc}). "
                        f"Delete it and re-run `dvc repro {stage}`.") from None
    try:
        complete = bool(fh.attrs.get("complete", False))
    except HDF5_READ_ERRORS as exc:
        fh.close()
        raise damaged(path, "the `complete` attribute", f"cannot be read ({exc})") from None
    if not complete:
        fh.close()
        raise DataError(f"feature cache {path} is incomplete. Re-run `dvc repro {stage}`.")
    return fh


class SplitFeatures:
    """A split's cached features: pooled features held in memory (float32), token
    grids read from the file on demand.

    Token reads go by file offset (:class:`~ltpipe.features.token_reader.TokenRows`): a sorted
    batch's runs of consecutive rows, one ``preadv`` each, into a reused buffer in the file's
    dtype (``bench/tokens.py``: within a small factor of plain ``preadv``, ~10x faster than
    h5py's fancy indexing; a memory map is slower still, its page faults read a row in many
    small pieces, ``bench/features.py``). Nothing holds a whole split in RAM unless
    ``load_tokens=True`` or :meth:`load_tokens` is called.

    Every dataset loaded is checked against its checksum; a token row the first time
    this object reads it (``load_tokens=True``: all rows at once).
    """

    def __init__(self, path: Path, load_tokens: bool = False):
        self.path = Path(path)
        with open_read(self.path) as fh:
            try:
                checked = CheckedFile(fh, self.path)
                self.attrs = {k: fh.attrs[k] for k in fh.attrs}
                self.pooled = checked.read("pooled").astype(np.float32)
                self.labels = checked.read("labels")
                self.paths = _strings(checked.read("paths"))
                self.skipped_paths = _strings(checked.read("skipped_paths")) if "skipped_paths" in fh else []
                self.has_tokens = "tokens" in fh
                self.token_shape = tuple(fh["tokens"].shape[1:]) if self.has_tokens else None
                self.token_dtype = fh["tokens"].dtype if self.has_tokens else None
                self._row_sums = checked.row_sums("tokens") if self.has_tokens else None
                self._loaded = None
                if self.has_tokens and load_tokens:
                    self._load_tokens(fh)
            except HDF5_READ_ERRORS as exc:
                raise damaged(self.path, "its HDF5 structure", f"cannot be read ({exc})") from None
        self._verified = np.zeros(len(self.pooled), dtype=bool) if self._row_sums is not None else None
        self._rows: Optional[TokenRows] = None
        self._buffer: Optional[np.ndarray] = None  # reused by `tokens`

    def __len__(self) -> int:
        return len(self.pooled)

    @property
    def token_bytes(self) -> int:
        """Bytes of all token grids (0 without tokens)."""
        if not self.has_tokens:
            return 0
        return len(self) * int(np.prod(self.token_shape, dtype=np.int64)) * self.token_dtype.itemsize

    @property
    def tokens_in_memory(self) -> bool:
        return self._loaded is not None

    def load_tokens(self) -> None:
        """Hold every token grid in RAM from now on, each row checked against its checksum at once."""
        if not self.has_tokens or self._loaded is not None:
            return
        with open_read(self.path) as fh:
            try:
                self._load_tokens(fh)
            except HDF5_READ_ERRORS as exc:
                raise damaged(self.path, "its HDF5 structure", f"cannot be read ({exc})") from None

    def _load_tokens(self, fh: h5py.File) -> None:
        loaded = fh["tokens"][()]
        if self._row_sums is not None:
            check_rows(self.path, "tokens", loaded, np.arange(len(loaded)), self._row_sums, self.paths)
        self._loaded = loaded

    @staticmethod
    def read_labels(path: Path) -> np.ndarray:
        """Only the labels of a split file (no features loaded)."""
        with open_read(Path(path)) as fh:
            return CheckedFile(fh, path).read("labels")

    def token_buffer(self, rows: int) -> np.ndarray:
        """An uninitialised array for ``rows`` token grids in the file's dtype (for :meth:`token_rows`)."""
        return np.empty((rows,) + tuple(self.token_shape), dtype=self.token_dtype)

    def token_rows(self, index: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Token grids of rows ``index`` in the file's dtype, in the order asked (repeats allowed),
        written into ``out[:len(index)]`` (a reused buffer, see :meth:`token_buffer`; a new array
        when None), which is returned."""
        if not self.has_tokens:
            raise DataError(f"{self.path} has no token grids. Set `extract.tokens: true` and re-run extraction.")
        index = np.asarray(index, dtype=np.int64)
        out = (self.token_buffer(len(index)) if out is None else out)[:len(index)]
        if len(index) == 0:
            return out
        if index.min() < 0 or index.max() >= len(self):
            raise IndexError(f"token rows {index.min()}..{index.max()} asked of {self.path}, which has {len(self)}")
        if self._loaded is not None:
            return np.take(self._loaded, index, axis=0, out=out, mode="clip")  # bounds checked above
        if self._rows is None:
            self._rows = TokenRows(self.path)
        inverse = None
        if len(index) == 1 or bool(np.all(index[1:] > index[:-1])):  # sorted, unique: the training feed's batches
            unique, rows = index, self._rows.read(index, out)
        else:
            unique, inverse = np.unique(index, return_inverse=True)
            rows = self._rows.read(unique, self.token_buffer(len(unique)))
        if self._verified is not None:
            self._check_new_rows(unique, rows)
        if inverse is not None:
            np.take(rows, inverse, axis=0, out=out, mode="clip")
        return out

    def advise_token_rows(self, index: np.ndarray) -> None:
        """Rows ``index`` (sorted, unique) will be read next: start reading them from the disk
        (:meth:`TokenRows.advise`); nothing to do for grids in memory."""
        if not self.has_tokens or self._loaded is not None or len(index) == 0:
            return
        if self._rows is None:
            self._rows = TokenRows(self.path)
        self._rows.advise(np.asarray(index, dtype=np.int64))

    def tokens(self, index: np.ndarray) -> np.ndarray:
        """Token grids of rows ``index`` as a new float32 array, in the order asked (repeats allowed)."""
        index = np.asarray(index, dtype=np.int64)
        if self._buffer is None or len(self._buffer) < len(index):
            self._buffer = self.token_buffer(len(index)) if self.has_tokens else None
        return self.token_rows(index, self._buffer).astype(np.float32)

    def _check_new_rows(self, unique: np.ndarray, rows: np.ndarray) -> None:
        new = np.flatnonzero(~self._verified[unique])
        if len(new) == 0:
            return
        if len(new) == len(unique):
            check_rows(self.path, "tokens", rows, unique, self._row_sums[unique], self.paths)
        else:
            check_rows(self.path, "tokens", rows[new], unique[new], self._row_sums[unique[new]], self.paths)
        self._verified[unique[new]] = True

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
            self._rows = None


def _strings(values: np.ndarray) -> list:
    return [p.decode() if isinstance(p, bytes) else p for p in values]


class TextFeatures:
    def __init__(self, path: Path):
        path = Path(path)
        self.path = path
        with open_read(path, stage="text") as fh:
            try:
                checked = CheckedFile(fh, path)
                self.attrs = {k: fh.attrs[k] for k in fh.attrs}
                self.embeddings = checked.read("embeddings")
                self.classnames = _strings(checked.read("classnames"))
                self.logit_scale = float(fh.attrs["logit_scale"])
            except HDF5_READ_ERRORS as exc:
                raise damaged(path, "its HDF5 structure", f"cannot be read ({exc})") from None


# ---------------------------------------------------------------- explicit verification


def verify_file(path: Path) -> bool:
    """Check every checksum of a cache file; raise :class:`DataError` naming the first damage.
    Returns False for a file written without checksums (nothing could be checked)."""
    path = Path(path)
    with open_read(path) as fh:
        try:
            checked = CheckedFile(fh, path, warn=False)  # the caller reports a file without checksums
            if not checked.checked:
                return False
            names = sorted(fh.keys())
            unchecked = [n for n in names if n not in checked.sums and n not in ROW_CHECKSUMS]
            if unchecked:
                raise damaged(path, f"dataset `{unchecked[0]}`", "has no recorded checksum")
            for name in names:
                if name in ROW_CHECKSUMS:
                    _verify_rows(fh, checked, path, name)
                else:
                    checked.read(name)
        except HDF5_READ_ERRORS as exc:
            raise damaged(path, "its HDF5 structure", f"cannot be read ({exc})") from None
    return True


def _verify_rows(fh: h5py.File, checked: CheckedFile, path: Path, name: str) -> None:
    sums = checked.row_sums(name)
    dataset = fh[name]
    for start in range(0, len(dataset), VERIFY_ROWS):
        stop = min(start + VERIFY_ROWS, len(dataset))
        try:
            rows = dataset[start:stop]
        except HDF5_READ_ERRORS as exc:
            raise damaged(path, f"dataset `{name}`, rows {start}-{stop - 1},", f"cannot be read ({exc})") from None
        check_rows(path, name, rows, np.arange(start, stop), sums[start:stop])
