"""Pickled files we did not write: read them with an allow-list, convert them to JSON once.

Two kinds of published data come as Python pickles: CIFAR's python archives (read in
place by :mod:`ltpipe.data.cifar`) and the label files of the COCO-LT / VOC-LT release
of Distribution-Balanced Loss (Wu et al., ECCV 2020), also shipped by CPRFL:

* ``class_freq.pkl``: ``gt_labels`` (N, C), ``class_freq`` (C,), ``neg_class_freq`` (C,),
  ``condition_prob`` (C, C), all numpy arrays;
* ``class_split.pkl``: ``{"head", "middle", "tail"}`` -> sets of class indices (a
  Python 2 pickle);
* ``terse_gt_2012.pkl`` / ``terse_gt_2017.pkl`` and ML-GCN's ``*_adj.pkl``: dicts of
  arrays and lists.

A pickle can name any importable callable and have it run on load, so ``pickle.load``
on a downloaded file runs whatever its author chose. The unpickler here resolves only
the globals that rebuild numpy arrays, numpy scalars and sets, and refuses the rest
before anything runs. The converter turns such a file into JSON (arrays become nested
lists, sets sorted lists, bytes text) so the pipeline and the user never need the
pickle again:

    python -m ltpipe.data.pickles appendix/coco/longtail2017/class_freq.pkl class_split.pkl

writes ``class_freq.json`` and ``class_split.json`` beside them (``--out-dir`` elsewhere).

ltpipe itself needs none of these files: class frequencies and the head/medium/tail
groups come from the list files, which give the same numbers (the lists' label counts
equal ``class_freq``, and the groups by count equal ``class_split``).
"""

import argparse
import importlib
import io
import json
import math
import pickle
import sys
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np

from ltpipe.errors import DataError
from ltpipe.paths import atomic_target

# What rebuilding numpy arrays, numpy scalars and sets needs, under numpy 1 and 2 module
# names and Python 2 builtins' name; each only builds data.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
})


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside :data:`ALLOWED_GLOBALS`; nothing was run."""

    def __init__(self, module: str, name: str):
        super().__init__(f"refusing to load {module}.{name}")
        self.qualified = f"{module}.{name}"


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedGlobal(module, name)
        if module == "__builtin__":  # a Python 2 pickle
            module = "builtins"
        return getattr(importlib.import_module(module), name)


def restricted_loads(data: bytes, encoding: str = "latin1"):
    """Unpickle ``data`` admitting only numpy arrays, numpy scalars, sets and plain values.

    ``encoding`` decodes Python 2 ``str`` objects: ``latin1`` (numpy's advice: it keeps
    array buffers intact) or ``bytes`` to keep them as bytes. Raises :class:`RefusedGlobal`
    for anything else, or the pickle module's own errors for a damaged stream.
    """
    return _DataOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()


def to_json_value(value):
    """A JSON-ready copy of unpickled data; NaN and infinities become ``null``."""
    if isinstance(value, dict):
        return {_json_key(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return [to_json_value(v) for v in sorted(value, key=_sort_key)]
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_value(value.tolist())
    if isinstance(value, np.generic):
        return to_json_value(value.item())
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin1")


def _json_key(key) -> str:
    key = to_json_value(key)
    return key if isinstance(key, str) else json.dumps(key)


def _sort_key(value):
    return (type(value).__name__, value)


def _looks_like_text(data: bytes) -> bool:
    """True for a plain-text file: DBL's ``img_id.pkl`` is one image id a line despite its name.

    A protocol 0 pickle is text too, but opens with one of a few opcodes and ends with ``.``.
    """
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False
    if not text or text[0] in "(c]}SIVLFNd" or text.endswith("."):
        return False
    return all(line.isprintable() for line in text.splitlines())


def convert(path: Path, out: Path) -> dict:
    """Convert the pickle at ``path`` to JSON at ``out``; returns a summary of the top level."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} not found. Give the path of a published .pkl label file.") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    try:
        value = restricted_loads(data)
    except RefusedGlobal as exc:
        raise DataError(
            f"{path} asks to run {exc.qualified} when loaded. A label file holds only numbers, strings and "
            "arrays, so this one is not what its name says; nothing from it was run. Download it again from its "
            "original release and check its checksum.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        if _looks_like_text(data):
            raise DataError(
                f"{path} is plain text, not a pickle (DBL's img_id.pkl is such a file: one image id a line). "
                "It needs no conversion: read it as the text file it is.") from None
        raise DataError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc}): it may be truncated or "
                        "damaged. Download it again from its original release.") from None
    try:
        plain = to_json_value(value)
    except TypeError as exc:
        raise DataError(f"{path}: {exc}; only numbers, strings, lists, dicts, sets and arrays convert.") from None
    with atomic_target(Path(out)) as partial:
        partial.write_text(json.dumps(plain, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return _describe(value)


def _describe(value) -> dict:
    if isinstance(value, dict):
        return {_json_key(k): _shape(v) for k, v in value.items()}
    return {"value": _shape(value)}


def _shape(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array {tuple(value.shape)} {value.dtype}"
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def output_path(path: Path, out_dir: Optional[Path]) -> Path:
    path = Path(path)
    return (Path(out_dir) if out_dir is not None else path.parent) / (path.stem + ".json")


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltpipe.data.pickles",
        description="Convert published .pkl label files (class_freq.pkl, class_split.pkl, terse_gt_*.pkl) to JSON "
                    "without running code from them.")
    parser.add_argument("files", nargs="+", type=Path, help=".pkl files to convert")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write NAME.json (default: beside each)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    failed: List[str] = []
    for path in args.files:
        out = output_path(path, args.out_dir)
        try:
            summary = convert(path, out)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed.append(str(path))
            continue
        print(f"{path} -> {out}: " + ", ".join(f"{k}: {v}" for k, v in summary.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
