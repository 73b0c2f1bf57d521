"""Reliability (issue 9): nothing unpickles a file the user did not create, and nothing
evaluates what it reads.

Checkpoints ltpipe writes hold only tensors and plain values and are read with
``torch.load(weights_only=True)``; a file holding Python objects is refused without
running them, a damaged one is named. The source is audited for the ways data could
run code: unrestricted ``torch.load``, ``pickle``, ``numpy.load(allow_pickle=True)``,
``yaml.load`` without a safe loader, ``eval``/``exec``.
"""

import io
import json
import pickle
import re
import tokenize
import zipfile
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

from ltpipe.core.config import _NoAnchorLoader
from ltpipe.core.errors import DataError, WeightsError
from ltpipe.datasets import cifar, pickles
from ltpipe.features import models
from ltpipe.training.checkpoint import load_checkpoint
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


def _torch_load_calls():
    """Lines that call ``torch.load`` in code, not in a string (a message may tell the user to call it)."""
    found = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                  if t.type in (tokenize.NAME, tokenize.OP)]
        for first, dot, name, paren in zip(tokens, tokens[1:], tokens[2:], tokens[3:]):
            if (first.string, dot.string, name.string, paren.string) == ("torch", ".", "load", "("):
                number = first.start[0]
                found.append(f"{path.relative_to(REPO)}:{number}: {lines[number - 1].strip()}")
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
        calls = _torch_load_calls()
        assert calls, "the audit found no torch.load call at all: it is broken"
        unsafe_torch = [line for line in calls if "weights_only=True" not in line]
        assert not unsafe_torch, unsafe_torch
        assert not _lines(r"\bpickle\.(load|loads)\("), "pickle must not read data unrestricted"
        unpicklers = _lines(r"\bpickle\._?Unpickler\b")
        assert unpicklers and all(line.startswith("ltpipe/datasets/pickles.py") for line in unpicklers), unpicklers
        assert "def find_class" in (REPO / "ltpipe/datasets/pickles.py").read_text()  # the allow-list
        assert not _lines(r"allow_pickle\s*=\s*True")
        assert not _lines(r"(?<![\w.])(eval|exec)\("), "nothing evaluates what it reads"
        yaml_loads = _lines(r"yaml\.(load|unsafe_load|full_load)\(")
        assert all("_NoAnchorLoader" in line for line in yaml_loads), yaml_loads  # a SafeLoader subclass
        assert issubclass(_NoAnchorLoader, yaml.SafeLoader)


# Bad model checkpoints (issue 15): each kind is named, with its fix, and nothing in it runs.
def _tiny_model():
    with models._quiet_root_logger():
        models.register_project_configs()
        return open_clip.create_model("ltpipe-tiny", pretrained=None, device="cpu")


def _other_arch_state(monkeypatch):
    """A state dict of a registered architecture that is not ltpipe-tiny: the tiny one, 256 wide."""
    config = json.loads((models.CONFIG_DIR / "ltpipe-tiny.json").read_text())
    config["vision_cfg"]["width"] = 256
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "test-tiny-wide", config)
    with models._quiet_root_logger():
        return open_clip.create_model("test-tiny-wide", pretrained=None, device="cpu").state_dict()


def _write_bad_checkpoint(kind, path, state, tmp_path, monkeypatch):
    if kind == "pickled_model_object":
        torch.save(_tiny_model(), path)
    elif kind == "pickled_model_in_a_dict":
        torch.save({"epoch": 3, "model": _tiny_model()}, path)
    elif kind == "pickled_model_old_torch_format":
        torch.save(torch.nn.Linear(2, 3), path, _use_new_zipfile_serialization=False)
    elif kind == "pickled_code_as_weights":
        torch.save({"visual.proj": Payload(tmp_path / "ran.txt")}, path)
    elif kind == "pickled_code_posing_as_torchscript":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps(Payload(tmp_path / "ran.txt"), protocol=2))
            archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
            archive.writestr("archive/version", "3\n")
    elif kind == "state_dict_of_another_arch":
        torch.save(_other_arch_state(monkeypatch), path)
    elif kind == "training_checkpoint_dict":
        torch.save({"model": state, "optimizer": {"lr": 0.1}, "epoch": 3}, path)
    elif kind == "truncated_zip":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "jpeg_named_pt":
        image = io.BytesIO()
        Image.new("RGB", (8, 8)).save(image, "JPEG")
        path.write_bytes(image.getvalue())
    elif kind == "html_error_page":
        path.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    elif kind == "safetensors_named_pt":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))


BAD_CHECKPOINTS = {  # fault id: what the one line must say (what the file is, and the fix)
    "pickled_model_object": r"is a pickled `open_clip\.model\.CLIP` object.*torch\.save\(model\).*never unpickles"
                            r".*m = torch\.load\('\S+bad\.pt', weights_only=False\); torch\.save\(m\.state_dict\(\), "
                            r"'\S+bad_state\.pt'\).*set `model\.pretrained: \S+bad_state\.pt`",
    "pickled_model_in_a_dict": r"is a dict holding a pickled `open_clip\.model\.CLIP` object under 'model'"
                               r".*m = m\['model'\]; torch\.save\(m\.state_dict\(\)",
    "pickled_model_old_torch_format": r"is a pickled `torch\.nn\.modules\.linear\.Linear` object.*state_dict\(\)",
    "pickled_code_as_weights": r"is a dict holding a pickled `\S+` object.*never unpickles",
    "pickled_code_posing_as_torchscript": r"bad\.pt.*cannot be loaded as ltpipe-tiny weights",
    "state_dict_of_another_arch": r"is a state dict for another architecture: `visual\.class_embedding` is "
                                  r"\[256\] in the file but \[192\] in ltpipe-tiny.*Its shapes fit `model\.arch` "
                                  r"test-tiny-wide",
    "training_checkpoint_dict": r"is a dict of model, optimizer, epoch \(a training checkpoint\?\).*under 'model'"
                                r".*torch\.save\(c\['model'\]",
    "truncated_zip": r"is an incomplete or damaged zip archive \(\d+ bytes.*Copy or download it again",
    "jpeg_named_pt": r"is not a model checkpoint: it is a JPEG image\. Point `model\.pretrained` at the weights",
    "html_error_page": r"is not a model checkpoint: it is an HTML page \(a failed download\?\)",
    "safetensors_named_pt": r"is a safetensors file.*only when the name ends in `\.safetensors`.*Rename it",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS), ids=list(BAD_CHECKPOINTS))
def test_bad_model_checkpoint_is_named_with_its_fix(kind, tmp_path, tiny_weights, monkeypatch):
    state = torch.load(tiny_weights.checkpoint, weights_only=True)
    path = tmp_path / "bad.pt"
    _write_bad_checkpoint(kind, path, state, tmp_path, monkeypatch)
    resolved = models.resolve("ltpipe-tiny", str(path), tmp_path)
    with pytest.raises(WeightsError) as caught:
        models.load(resolved, torch.device("cpu"))
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith((f"checkpoint {path} (`model.pretrained`)", f"cannot load checkpoint {path}")), message
    assert re.search(BAD_CHECKPOINTS[kind], message), message
    assert "Weights only load failed" not in message and "\x1b[" not in message  # not torch's cut-off text
    assert not (tmp_path / "ran.txt").exists(), "loading ran code from the checkpoint"
