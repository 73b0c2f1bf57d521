"""Pickled files we did not write: read them with an allow-list, convert them to JSON once.

Two kinds of published data come as Python pickles: CIFAR's python archives (read in
place by :mod:`ltpipe.datasets.cifar`) and the label files of the COCO-LT / VOC-LT release
of Distribution-Balanced Loss (Wu et al., ECCV 2020), also shipped by CPRFL:

* ``class_freq.pkl``: ``gt_labels`` (N, C), ``class_freq`` (C,), ``neg_class_freq`` (C,),
  ``condition_prob`` (C, C), all numpy arrays;
* ``class_split.pkl``: ``{"head", "middle", "tail"}`` -> sets of class indices (a
  Python 2 pickle);
* ``terse_gt_2012.pkl`` / ``terse_gt_2017.pkl`` and ML-GCN's ``*_adj.pkl``: dicts of
  arrays and lists.

A pickle can name any importable callable and have it run on load, so ``pickle.load``
on a downloaded file runs whatever its author chose. The unpickler here resolves only
the names that rebuild numpy arrays, numpy scalars and sets, and refuses the rest
before anything runs. Even those are not numpy's own functions but stand-ins that
check their arguments (numpy's reconstructors and the C unpickler can be crashed or
made to allocate gigabytes by a damaged stream; a fuzz test keeps it so).

The converter turns such a file into JSON (arrays become nested lists, sets sorted
lists, bytes text) so the pipeline and the user never need the pickle again:

    python -m ltpipe.datasets.pickles appendix/coco/longtail2017/class_freq.pkl class_split.pkl

writes ``class_freq.json`` and ``class_split.json`` beside them (``--out-dir`` elsewhere).

ltpipe itself needs none of these files: class frequencies and the head/medium/tail
groups come from the list files, which give the same numbers (the lists' label counts
equal ``class_freq``, and the groups by count equal ``class_split``).
"""

import argparse
import io
import json
import math
import pickle
import re
import struct
import sys
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ltpipe.core.errors import DataError
from ltpipe.core.paths import atomic_target


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allow-list; nothing was run."""

    def __init__(self, module: str, name: str):
        super().__init__(f"refusing to load {module}.{name}")
        self.qualified = f"{module}.{name}"


class _Malformed(pickle.UnpicklingError):
    """An allowed name called with arguments no numpy pickle has."""


# numpy's own reconstructors are not hardened against crafted arguments (a fuzzed
# array pickle can crash the interpreter in them), so none of them is called: each
# allowed name maps to a stand-in that checks its arguments and builds the value with
# np.frombuffer on a plain dtype. Byte order, "S"/"U" strings and object arrays
# (whose items go through this same unpickler) are kept; structured, subarray,
# void and datetime dtypes are refused.
_DTYPE_CODE = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16)|[SU][0-9]{1,6}|O[48]?)")


def _text_arg(value) -> str:
    if isinstance(value, bytes):  # a Python 2 str read with encoding="bytes"
        value = value.decode("latin1")
    if not isinstance(value, str):
        raise _Malformed(f"expected a string, got {type(value).__name__}")
    return value


def _raw_bytes(value) -> bytes:
    if isinstance(value, str):  # a Python 2 str read with encoding="latin1" (numpy's convention)
        return value.encode("latin1")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise _Malformed(f"expected array data, got {type(value).__name__}")


class _DtypeSpec:
    """Stands in for ``numpy.dtype(code, align, copy)`` until the pickle sets its byte order."""

    def __init__(self, code, align=False, copy=True):
        code = _text_arg(code)
        if not _DTYPE_CODE.fullmatch(code):
            raise _Malformed(f"unsupported dtype {code!r}")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise _Malformed("only plain dtypes (no fields, no subarrays) are read")
        order = _text_arg(state[1])
        if len(order) != 1 or order not in "<>|=":
            raise _Malformed(f"bad byte order {order!r}")
        self.order = order

    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class _ArraySpec:
    """Stands in for ``ndarray._reconstruct(ndarray, (0,), code)`` until its state arrives."""

    def __init__(self, cls, *_ignored):
        if cls is not _NDARRAY:
            raise _Malformed("only numpy.ndarray is rebuilt")
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Malformed("unexpected array state")
        shape, spec, fortran, data = state[-4:]
        self.array = _build_array(data, spec, shape, "F" if fortran else "C")


_NDARRAY = object()  # what "numpy.ndarray" resolves to: only ever an argument of _ArraySpec


def _build_array(data, spec, shape, order) -> np.ndarray:
    if not isinstance(spec, _DtypeSpec):
        raise _Malformed("array without a dtype")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and 0 <= n for n in shape):
        raise _Malformed(f"bad array shape {shape!r}")
    count = math.prod(shape)
    dtype = spec.dtype()
    if dtype.kind == "O":
        if not isinstance(data, list) or len(data) != count:
            raise _Malformed("object array with the wrong number of items")
        array = np.empty(count, dtype=object)
        for i, item in enumerate(data):  # one by one: a list item must stay one object
            array[i] = item
        return array.reshape(shape, order=order)
    raw = _raw_bytes(data)
    if len(raw) != count * dtype.itemsize:
        raise _Malformed(f"array data of {len(raw)} bytes for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order=order).copy(order="A")


def _scalar(spec, data):
    if not isinstance(spec, _DtypeSpec) or spec.dtype().kind == "O":
        raise _Malformed("bad numpy scalar")
    return _build_array(data, spec, (), "C")[()]


def _frombuffer(data, spec, shape, order):  # numpy uses it for buffers only, never object arrays
    if order not in ("C", "F") or not isinstance(spec, _DtypeSpec) or spec.dtype().kind == "O":
        raise _Malformed("bad protocol-5 array")
    return _build_array(data, spec, shape, order)


def _empty_bytes():  # how protocol-2 pickles written by Python 3 store b""
    return b""


def _codecs_encode(text, encoding):
    if _text_arg(encoding) not in ("latin1", "latin-1"):
        raise _Malformed(f"bytes encoded as {encoding!r}")
    return _text_arg(text).encode("latin1")


_STAND_INS = {}
for _numpy in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 module names
    _STAND_INS[f"{_numpy}.multiarray", "_reconstruct"] = _ArraySpec
    _STAND_INS[f"{_numpy}.multiarray", "scalar"] = _scalar
    _STAND_INS[f"{_numpy}.numeric", "_frombuffer"] = _frombuffer  # protocol 5
for _builtins in ("builtins", "__builtin__"):  # Python 3 and Python 2 names
    _STAND_INS[_builtins, "set"] = set
    _STAND_INS[_builtins, "frozenset"] = frozenset
    _STAND_INS[_builtins, "bytes"] = _empty_bytes
_STAND_INS["numpy", "ndarray"] = _NDARRAY
_STAND_INS["numpy", "dtype"] = _DtypeSpec
_STAND_INS["_codecs", "encode"] = _codecs_encode  # how protocol-2 pickles written by Python 3 store bytes


class _DataOnlyUnpickler(pickle._Unpickler):
    """The pure-Python unpickler: a damaged length cannot make it allocate more than the
    file holds (the C one sizes its memo table from an index in the stream, gigabytes for
    one flipped byte), only the stand-ins above resolve, and only arrays and dtypes take
    a state (so a pickle cannot rewrite the stand-ins themselves)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, encoding: str):
        super().__init__(io.BytesIO(data), encoding=encoding)
        self._size = len(data)

    def find_class(self, module, name):
        try:
            return _STAND_INS[module, name]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def _load_bytearray8(self):  # the stock one allocates the declared length before reading
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size) if size <= self._size else b""
        if len(data) != size:
            raise pickle.UnpicklingError("the pickle is shorter than it declares: truncated or damaged")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def _load_build(self):  # the stock one sets attributes on anything, the stand-ins' classes included
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, (_ArraySpec, _DtypeSpec)):
            raise _Malformed(f"the pickle sets the state of a {type(target).__name__}; only arrays and dtypes have one")
        target.__setstate__(state)

    dispatch[pickle.BUILD[0]] = _load_build


def _finish(value, done=None):
    """Replace the stand-ins left in the loaded structure by the arrays they built."""
    done = {} if done is None else done
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, _ArraySpec):
        if value.array is None:
            raise _Malformed("an array that was never given its data")
        out = value.array
        if out.dtype.kind == "O":
            out = out.copy()
            flat = out.reshape(-1, order="A")
            for i, item in enumerate(flat):
                flat[i] = _finish(item, done)
    elif isinstance(value, _DtypeSpec):
        out = value.dtype()
    elif isinstance(value, dict):
        out = {}
        done[id(value)] = out
        for k, v in value.items():
            out[_finish(k, done)] = _finish(v, done)
    elif isinstance(value, list):
        out = []
        done[id(value)] = out
        out.extend(_finish(v, done) for v in value)
    elif isinstance(value, tuple):
        out = tuple(_finish(v, done) for v in value)
    elif isinstance(value, (set, frozenset)):
        out = type(value)(_finish(v, done) for v in value)
    else:
        out = value
    done[id(value)] = out
    return out


def restricted_loads(data: bytes, encoding: str = "latin1"):
    """Unpickle ``data`` admitting only numpy arrays, numpy scalars, sets and plain values.

    ``encoding`` decodes Python 2 ``str`` objects: ``latin1`` (numpy's advice: it keeps
    array buffers intact) or ``bytes`` to keep them as bytes. Raises :class:`RefusedGlobal`
    for any other callable and :class:`pickle.UnpicklingError` for a damaged stream.
    """
    try:
        return _finish(_DataOnlyUnpickler(data, encoding).load())
    except pickle.UnpicklingError:
        raise
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError, OverflowError,
            struct.error, UnicodeError, MemoryError) as exc:
        raise pickle.UnpicklingError(f"{type(exc).__name__}: {exc}") from None


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
    except pickle.UnpicklingError as exc:
        if _looks_like_text(data):
            raise DataError(
                f"{path} is plain text, not a pickle (DBL's img_id.pkl is such a file: one image id a line). "
                "It needs no conversion: read it as the text file it is.") from None
        raise DataError(f"{path} is not a readable pickle ({exc}): it may be truncated or damaged, or hold arrays "
                        "the converter does not read (structured, datetime). Download it again from its original "
                        "release.") from None
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
        prog="python -m ltpipe.datasets.pickles",
        description="Convert published .pkl label files (class_freq.pkl, class_split.pkl, terse_gt_*.pkl) to JSON "
                    "without running code from them.")
    parser.add_argument("files", nargs="+", type=Path, help=".pkl files to convert")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write NAME.json (default: beside each)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    failed = False
    for path in args.files:
        out = output_path(path, args.out_dir)
        try:
            summary = convert(path, out)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{path} -> {out}: " + ", ".join(f"{k}: {v}" for k, v in summary.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
