"""Reliability (issue 9): nothing unpickles a file the user did not create, and nothing
evaluates what it reads.

Checkpoints ltpipe writes hold only tensors and plain values and are read with
``torch.load(weights_only=True)``; a file holding Python objects is refused without
running them, a damaged one is named. The source is audited for the ways data could
run code: unrestricted ``torch.load``, ``pickle``, ``numpy.load(allow_pickle=True)``,
``yaml.load`` without a safe loader, ``eval``/``exec``.
"""

import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from ltpipe.config import _NoAnchorLoader
from ltpipe.data import cifar, pickles
from ltpipe.errors import DataError
from ltpipe.heads import load_checkpoint
from tests.conftest import REPO

SOURCES = sorted(p for d in ("ltpipe", "stages") for p in (REPO / d).rglob("*.py"))


class Payload:
    """Unpickling this would write a file: the proof that a loader ran code from its input."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the file ran"))


def _lines(pattern: str):
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line.split("#")[0]):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    return found


@pytest.mark.parametrize("kind", ["pickled_code_in_checkpoint", "damaged_checkpoint", "pickled_code_in_cifar_archive",
                                  "pickled_code_in_published_pkl", "source_audit"])
def test_safe_loading(kind, tmp_path):
    if kind == "pickled_code_in_checkpoint":
        marker = tmp_path / "ran.txt"
        path = tmp_path / "head.pt"
        torch.save({"head": "cosine", "kwargs": {}, "run": {}, "state_dict": {}, "extra": Payload(marker)}, path)
        with pytest.raises(DataError, match="holds Python objects.*never unpickles code.*Delete it"):
            load_checkpoint(path)
        assert not marker.exists(), "loading ran code from the checkpoint"
    elif kind == "damaged_checkpoint":
        path = tmp_path / "head.pt"
        torch.save({"head": "cosine", "state_dict": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
        with pytest.raises(DataError, match=r"head\.pt.*is damaged.*Delete it and re-run"):
            load_checkpoint(path)
    elif kind == "pickled_code_in_cifar_archive":
        # CIFAR's python archives are pickles by design: read with an unpickler that admits numpy arrays only.
        marker = tmp_path / "ran.txt"
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Payload(marker)}, protocol=2))
        with pytest.raises(DataError, match=r"batches\.meta is not a CIFAR python archive.*refusing to load"):
            cifar.load_archive(tmp_path, 10)
        assert not marker.exists(), "loading ran code from the archive"
    elif kind == "pickled_code_in_published_pkl":
        # A "class_freq.pkl" that is not what it says: the converter refuses it and writes nothing.
        marker = tmp_path / "ran.txt"
        source = tmp_path / "class_freq.pkl"
        source.write_bytes(pickle.dumps({"class_freq": [3, 1], "extra": Payload(marker)}, protocol=2))
        with pytest.raises(DataError, match=r"class_freq\.pkl asks to run \S+ when loaded.*nothing from it was run"):
            pickles.convert(source, tmp_path / "class_freq.json")
        assert not marker.exists(), "converting ran code from the file"
        assert not list(tmp_path.glob("class_freq.json*"))
    else:
        unsafe_torch = [line for line in _lines(r"torch\.load\(") if "weights_only=True" not in line]
        assert not unsafe_torch, unsafe_torch
        assert not _lines(r"\bpickle\.(load|loads)\("), "pickle must not read data unrestricted"
        unpicklers = _lines(r"\bpickle\._?Unpickler\b")
        assert unpicklers and all(line.startswith("ltpipe/data/pickles.py") for line in unpicklers), unpicklers
        assert "def find_class" in (REPO / "ltpipe/data/pickles.py").read_text()  # the allow-list
        assert not _lines(r"allow_pickle\s*=\s*True")
        assert not _lines(r"(?<![\w.])(eval|exec)\("), "nothing evaluates what it reads"
        yaml_loads = _lines(r"yaml\.(load|unsafe_load|full_load)\(")
        assert all("_NoAnchorLoader" in line for line in yaml_loads), yaml_loads  # a SafeLoader subclass
        assert issubclass(_NoAnchorLoader, yaml.SafeLoader)
