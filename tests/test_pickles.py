"""The converter of published .pkl label files (DBL's COCO-LT / VOC-LT release) to JSON."""

import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ltpipe.core.errors import DataError
from ltpipe.datasets import pickles
from tests.conftest import REPO


def dbl_class_freq(rng, images=37, classes=6):
    """A file shaped like DBL's ``class_freq.pkl``."""
    gt = (rng.random((images, classes)) < 0.3).astype(np.int64)
    freq = gt.sum(0)
    co = gt.T @ gt
    return {"gt_labels": gt, "class_freq": freq, "neg_class_freq": images - freq,
            "condition_prob": co / np.maximum(freq, 1)[:, None].astype(np.float64)}


class Python2StrPickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 wrote ``str``: the BINSTRING opcode, raw bytes inline."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def python2_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    Python2StrPickler(buffer, protocol=2, fix_imports=True).dump(obj)
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_class_freq_converts_to_the_same_numbers(tmp_path, protocol):
    data = dbl_class_freq(np.random.default_rng(protocol))
    source = tmp_path / "class_freq.pkl"
    source.write_bytes(pickle.dumps(data, protocol=protocol))
    summary = pickles.convert(source, tmp_path / "class_freq.json")
    out = json.loads((tmp_path / "class_freq.json").read_text())
    assert set(out) == set(data)
    for key, array in data.items():
        np.testing.assert_array_equal(np.asarray(out[key]), array, err_msg=key)
    assert summary["gt_labels"] == "array (37, 6) int64"


def test_python2_pickles_of_sets_strings_and_arrays(tmp_path):
    # DBL's class_split.pkl: a Python 2 pickle of {"head", "middle", "tail"} -> sets.
    split = {b"head": {9, 0, 4}, b"middle": {1, 3}, b"tail": {2, 5, 6, 7, 8}}
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    source = tmp_path / "class_split.pkl"
    raw = python2_dumps({**split, b"freq": array})
    assert b"__builtin__\nset" in raw and pickle.BINSTRING in raw  # the Python 2 forms are really there
    source.write_bytes(raw)
    pickles.convert(source, tmp_path / "class_split.json")
    out = json.loads((tmp_path / "class_split.json").read_text())
    assert out["head"] == [0, 4, 9] and out["middle"] == [1, 3] and out["tail"] == [2, 5, 6, 7, 8]
    np.testing.assert_array_equal(np.asarray(out["freq"], dtype=np.float32), array)


def test_non_finite_numbers_become_null_and_scalars_plain(tmp_path):
    source = tmp_path / "odd.pkl"
    source.write_bytes(pickle.dumps({"p": np.array([0.5, np.nan, np.inf]), "n": np.int64(3), 7: (b"\xe9t\xe9",)}))
    pickles.convert(source, tmp_path / "odd.json")
    assert json.loads((tmp_path / "odd.json").read_text()) == {"p": [0.5, None, None], "n": 3, "7": ["été"]}


def test_plain_text_named_pkl_is_recognised(tmp_path):
    source = tmp_path / "img_id.pkl"  # DBL ships the COCO-LT ids as text under this name
    source.write_text("000000554625\n000000391895\n000000522418\n")
    with pytest.raises(DataError, match=r"img_id\.pkl is plain text, not a pickle.*needs no conversion"):
        pickles.convert(source, tmp_path / "img_id.json")
    assert not (tmp_path / "img_id.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_or_missing_file_is_named(tmp_path, damage):
    source = tmp_path / "class_freq.pkl"
    if damage == "truncated":
        source.write_bytes(pickle.dumps(dbl_class_freq(np.random.default_rng(0)), protocol=2)[:200])
        match = r"class_freq\.pkl is not a readable pickle.*truncated or damaged.*Download it again"
    else:
        match = r"class_freq\.pkl not found"
    with pytest.raises(DataError, match=match):
        pickles.convert(source, tmp_path / "class_freq.json")
    assert not list(tmp_path.glob("*.json*")), "nothing is written for a bad input"


def test_command_line_converts_each_file_and_reports_failures(tmp_path, capsys):
    good = tmp_path / "in" / "class_freq.pkl"
    good.parent.mkdir()
    data = dbl_class_freq(np.random.default_rng(1))
    good.write_bytes(pickle.dumps(data, protocol=2))
    bad = tmp_path / "in" / "img_id.pkl"
    bad.write_text("2008_000023\n2008_000026\n")
    assert pickles.main([str(good), str(bad), "--out-dir", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "img_id.pkl is plain text" in captured.err and "class_freq.json" in captured.out
    out = json.loads((tmp_path / "out" / "class_freq.json").read_text())
    np.testing.assert_array_equal(np.asarray(out["class_freq"]), data["class_freq"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["class_freq.json"]
    assert pickles.main([str(good)]) == 0 and (tmp_path / "in" / "class_freq.json").is_file()


def numpy_zoo():
    return {"int": np.arange(6, dtype=np.int64).reshape(2, 3), "big_endian": np.arange(4, dtype=">f4") / 3,
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)), "bool": np.array([True, False]),
            "text": np.array(["person", "tv"]), "bytes": np.array([b"ab", b"c"]), "empty": np.zeros((0, 80)),
            "objects": np.array([1, "x", [2, 3]], dtype=object), "scalar": np.float32(0.25), "u8": np.uint8(7)}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_arrays_are_rebuilt_exactly_without_numpy_reconstructors(protocol):
    zoo = numpy_zoo()
    back = pickles.restricted_loads(pickle.dumps(zoo, protocol=protocol))
    for key, value in zoo.items():
        assert type(back[key]) is type(value), key
        if key == "objects":
            assert back[key].tolist() == value.tolist()
            continue
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert back["fortran"].flags.f_contiguous and back["int"].flags.writeable


def test_structured_arrays_are_refused(tmp_path):
    source = tmp_path / "odd.pkl"
    source.write_bytes(pickle.dumps(np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]), protocol=2))
    with pytest.raises(DataError, match=r"odd\.pkl is not a readable pickle \(unsupported dtype.*structured"):
        pickles.convert(source, tmp_path / "odd.json")


def test_a_pickle_cannot_rewrite_the_stand_ins():
    # GLOBAL numpy.dtype (the stand-in class), then BUILD with slot state {"__init__": set}:
    # the stock unpickler would setattr it on the class, for every later load in the process.
    raw = (b"\x80\x02cnumpy\ndtype\nN}X\x08\x00\x00\x00__init__c__builtin__\nset\ns\x86b.")
    init = pickles._DtypeSpec.__init__
    with pytest.raises(pickle.UnpicklingError, match="sets the state of a type"):
        pickles.restricted_loads(raw)
    assert pickles._DtypeSpec.__init__ is init


FUZZ = textwrap.dedent("""
    import pickle, random, sys
    from ltpipe.datasets.pickles import restricted_loads
    from tests.test_pickles import numpy_zoo
    for protocol in (0, 2, 4, 5):
        raw, rng = pickle.dumps(numpy_zoo(), protocol=protocol), random.Random(protocol)
        for _ in range(2000):
            damaged = bytearray(raw)
            for _ in range(rng.randint(1, 3)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            try:
                restricted_loads(bytes(damaged))
            except pickle.UnpicklingError:
                pass  # RefusedGlobal is one too
""")


def test_damaged_array_pickles_never_crash_or_leak_other_errors():
    # With pickle's C unpickler and numpy's own reconstructors, these streams segfaulted
    # the interpreter within 400 mutations per protocol, and some asked for gigabytes: run
    # apart, so that a crash fails this test instead of ending the test session.
    result = subprocess.run([sys.executable, "-c", FUZZ], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
