"""The HDF5 feature cache: one self-describing file per split, plus one for text.

Layout of a split file (contiguous, uncompressed: compression saves at most ~14 %
on float16 embeddings and costs up to 150x on random reads, see README):

* ``pooled`` ``[N, D]`` image embeddings after the projection
* ``tokens`` ``[N, T, W]`` token grid (ViT: CLS + patches; ResNet: last stage), optional
* ``labels`` ``[N]`` int64 (single-label) or ``[N, C]`` uint8 (multi-label)
* ``paths`` ``[N]`` image paths relative to the dataset root
* ``skipped_paths``, ``skipped_errors`` ``[S]`` images left out as unreadable
  (``extract.on_bad_image: skip``) and why; empty when none were
* attributes: model arch, pretrained tag, weights sha256, preprocessing, token
  layer, dtype, ltpipe version, ``complete``.

Writes go to ``<name>.partial`` and are renamed into place only when complete, so
the output path never holds a half-written file. Readers open files read-only,
which keeps their mtime (and DVC's hash state) untouched.
"""

import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import h5py
import numpy as np

from ltpipe.errors import DataError
from ltpipe.paths import atomic_target, partial_path

DTYPES = {"float16": np.float16, "float32": np.float32}


class SplitWriter:
    """Writes one split file: labels and paths at once, features in slices; renames it
    into place on :meth:`commit`.

    Variable-length strings written in several slices would land in HDF5's global heap
    in a layout that depends on the slicing; written once, the file's bytes depend only
    on its contents.
    """

    def __init__(self, path: Path, pooled_dim: int, token_shape: Optional[Tuple[int, int]],
                 labels: np.ndarray, paths: Sequence[str], dtype: str, attrs: Dict,
                 skipped: Sequence[Tuple[str, str]] = ()):
        num = len(paths)
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = DTYPES[dtype]
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

    def write(self, start: int, pooled: np.ndarray, tokens: Optional[np.ndarray]) -> None:
        stop = start + len(pooled)
        self.file["pooled"][start:stop] = pooled.astype(self.dtype)
        if tokens is not None:
            self.file["tokens"][start:stop] = tokens.astype(self.dtype)

    def commit(self) -> None:
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _attr(value):
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def write_text(path: Path, embeddings: np.ndarray, per_template: np.ndarray, prompts: Sequence[Sequence[str]],
               classnames: Sequence[str], attrs: Dict) -> None:
    with atomic_target(path) as partial, h5py.File(partial, "w", libver=("earliest", "v110")) as fh:
        fh.create_dataset("embeddings", data=embeddings.astype(np.float32))
        fh.create_dataset("per_template", data=per_template.astype(np.float32))
        fh.create_dataset("prompts", data=np.asarray([list(p) for p in prompts], dtype=object),
                          dtype=h5py.string_dtype())
        fh.create_dataset("classnames", data=list(classnames), dtype=h5py.string_dtype())
        for key, value in attrs.items():
            fh.attrs[key] = _attr(value)
        fh.attrs["complete"] = True


def open_read(path: Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature cache {path} not found. Run the extract stage: `dvc repro extract`.")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"feature cache {path} is not a readable HDF5 file ({exc}). "
                        "Delete it and re-run `dvc repro extract`.") from None
    if not bool(fh.attrs.get("complete", False)):
        fh.close()
        raise DataError(f"feature cache {path} is incomplete. Re-run `dvc repro extract`.")
    return fh


class SplitFeatures:
    """A split's cached features: pooled features held in memory (float32), token
    grids read from the file on demand.

    Token reads index the contiguous dataset with sorted, unique rows through one
    read-only handle: measured in ``bench/features.py`` (256 grids of 50x768 from a
    cache not in the page cache), 32 ms a batch, against 441 ms through a memory map
    (page faults read a row in many small pieces) and 87 ms row by row. Nothing holds
    a whole split in RAM unless ``load_tokens=True``.
    """

    def __init__(self, path: Path, load_tokens: bool = False):
        self.path = Path(path)
        with open_read(self.path) as fh:
            self.attrs = {k: fh.attrs[k] for k in fh.attrs}
            self.pooled = fh["pooled"][:].astype(np.float32)
            self.labels = fh["labels"][:]
            self.paths = _strings(fh["paths"])
            self.skipped_paths = _strings(fh["skipped_paths"]) if "skipped_paths" in fh else []
            self.has_tokens = "tokens" in fh
            self.token_shape = tuple(fh["tokens"].shape[1:]) if self.has_tokens else None
            self._loaded = fh["tokens"][:] if (self.has_tokens and load_tokens) else None
        self._handle: Optional[h5py.File] = None

    def __len__(self) -> int:
        return len(self.pooled)

    @staticmethod
    def read_labels(path: Path) -> np.ndarray:
        """Only the labels of a split file (no features loaded)."""
        with open_read(Path(path)) as fh:
            return fh["labels"][:]

    def tokens(self, index: np.ndarray) -> np.ndarray:
        """Token grids of rows ``index`` as float32, in the order asked (repeats allowed)."""
        if not self.has_tokens:
            raise DataError(f"{self.path} has no token grids. Set `extract.tokens: true` and re-run extraction.")
        index = np.asarray(index, dtype=np.int64)
        unique, inverse = np.unique(index, return_inverse=True)
        if self._loaded is not None:
            rows = self._loaded[unique]
        else:
            if self._handle is None:
                self._handle = h5py.File(self.path, "r")
            rows = self._handle["tokens"][unique]
        if len(unique) != len(index) or not np.array_equal(unique, index):
            rows = rows[inverse]  # only when asked out of order or with repeats
        return rows.astype(np.float32)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _strings(dataset) -> list:
    return [p.decode() if isinstance(p, bytes) else p for p in dataset[:]]


class TextFeatures:
    def __init__(self, path: Path):
        with open_read(Path(path)) as fh:
            self.attrs = {k: fh.attrs[k] for k in fh.attrs}
            self.embeddings = fh["embeddings"][:]
            self.classnames = [c.decode() if isinstance(c, bytes) else c for c in fh["classnames"][:]]
            self.logit_scale = float(fh.attrs["logit_scale"])
