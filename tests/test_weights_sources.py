"""Every documented way to name weights, through the DVC command line (issue 25): a local checkpoint
file in each format, an open_clip tag served from a pre-filled Hugging Face cache with the network
off, and a paper preset end to end on that tag. The stand-ins sit only at the network boundary
(tests/weights_standins.py); everything else is the stages as a user runs them."""

import csv
import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import torch

from ltpipe import presets
from tests import dvc_repo
from tests.weights_standins import (
    CHECKPOINT_FORMATS,
    checkpoint_name,
    fill_hf_cache,
    hub_env,
    random_state,
    write_voc_lt,
)

pytestmark = pytest.mark.slow
WEIGHTS_JSON = "data/weights/weights.json"
TEXT_H5 = "data/text/text.h5"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pooled(repo: Path, split: str = "train") -> np.ndarray:
    with h5py.File(repo / "data" / "features" / f"{split}.h5", "r") as f:
        return f["pooled"][:]


def text_embeddings(repo: Path) -> np.ndarray:
    with h5py.File(repo / TEXT_H5, "r") as f:
        return f["embeddings"][:]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = dvc_repo.make(tmp_path_factory.mktemp("weights-sources"))
    dvc_repo.run(path, "dvc", "repro", "extract")
    dvc_repo.run(path, "git", "add", "-A")
    dvc_repo.run(path, "git", "commit", "-qm", "seeded random init")
    return path


@pytest.fixture(scope="session")
def rn50_hub(tmp_path_factory):
    """A Hugging Face cache holding a random RN50 at the `openai` tag's hub path (float16: half the disk;
    open_clip copies it into the float32 model)."""
    home = tmp_path_factory.mktemp("hf-home")
    return home, fill_hf_cache(home, "RN50", "openai", random_state("RN50", seed=0, dtype=torch.float16))


def test_a_local_checkpoint_in_every_format_runs_through_dvc(repo, tmp_path):
    # Before the fix, any `model.pretrained` but null crashed the weights stage: DVC had removed
    # data/weights/ and only the random-init branch made it again (FileNotFoundError on weights.json).
    default = pooled(repo)
    state = random_state("ltpipe-tiny", seed=1)
    features = {}
    for fmt, save in CHECKPOINT_FORMATS.items():
        path = tmp_path / checkpoint_name(fmt)
        save(state, path)
        result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", f"model.pretrained={path}", "extract")
        assert {"weights", "extract"} <= set(dvc_repo.stages_run(result.stdout)), fmt
        recorded = json.loads((repo / WEIGHTS_JSON).read_text())
        assert recorded["checkpoint"] == str(path.resolve()) and recorded["sha256"] == sha256(path), fmt
        with h5py.File(repo / "data" / "features" / "train.h5", "r") as f:
            assert f.attrs["weights_sha256"] == sha256(path), fmt
        features[fmt] = pooled(repo)
    first = features["state_dict"]
    assert not np.array_equal(first, default)  # the file's weights, not the seeded default's
    for fmt, values in features.items():
        assert np.array_equal(values, first), f"{fmt}: other weights than the same state dict saved plainly"


def test_an_open_clip_tag_is_read_from_the_hub_cache_offline_through_dvc(repo, rn50_hub):
    home, standin = rn50_hub
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "model.arch=RN50", "-S", "model.pretrained=openai",
                          "extract", "text", extra_env=hub_env(home))
    assert {"weights", "extract", "text"} <= set(dvc_repo.stages_run(result.stdout))
    recorded = json.loads((repo / WEIGHTS_JSON).read_text())
    assert Path(recorded["checkpoint"]).resolve() == standin.resolve() and recorded["sha256"] == sha256(standin)
    # The tag's settings, which open_clip applies only when given the tag: QuickGELU (OpenAI trained with
    # it) and the preprocessing. Extraction builds the model from the file, so they must travel with it.
    assert recorded["quick_gelu"] is True
    cfg = open_clip.get_pretrained_cfg("RN50", "openai")
    assert recorded["preprocess"]["mean"] == pytest.approx(list(cfg["mean"]))
    with h5py.File(repo / "data" / "features" / "train.h5", "r") as f:
        attrs = {key: f.attrs[key] for key in ("mean", "interpolation")}
    assert json.loads(attrs["mean"]) == pytest.approx(list(cfg["mean"])) and attrs["interpolation"] == "bicubic"
    with open(repo / "data/prepared/classes.csv", newline="") as table:
        prompts = [row["prompt"] for row in csv.DictReader(table)]
    tokens = open_clip.get_tokenizer("RN50")([f"a photo of a {p}." for p in prompts])

    def embed(quick_gelu: bool) -> np.ndarray:
        model = open_clip.create_model("RN50", pretrained=str(standin), force_quick_gelu=quick_gelu).eval()
        with torch.no_grad():
            out = model.encode_text(tokens).float()
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    stored = text_embeddings(repo)
    assert np.allclose(stored, embed(True), atol=1e-5)
    assert not np.allclose(stored, embed(False), atol=1e-3)  # GELU would give other embeddings


def test_a_tag_missing_from_the_cache_offline_is_one_error_line_through_dvc(repo, tmp_path):
    # RN101: a tag no other test ran, so the weights stage runs (DVC's run-cache would restore a past run's).
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "model.arch=RN101", "-S", "model.pretrained=openai",
                          "extract", check=False, extra_env=hub_env(tmp_path / "empty-hf-home"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ltpipe error:")]
    assert len(errors) == 1 and "RN101/openai are not in the local cache" in errors[0], result.stderr
    assert "HF_HUB_OFFLINE is set" in errors[0] and "model.pretrained: /path/to/" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_a_preset_runs_end_to_end_on_the_tag_through_dvc(tmp_path, rn50_hub):
    home, _ = rn50_hub
    name = "cprfl-cached-voc_lt-rn50"
    repo = dvc_repo.make(tmp_path / "repo")
    root = write_voc_lt(tmp_path / "voc")
    # What a user adds to try the preset on a small copy: the data's root and a short schedule.
    extra = [f"datasets.voc_lt.root={root}", "train.epochs=2", "train.warmup_epochs=1"]
    cmd = [sys.executable, "-m", "ltpipe", "presets", "run", name, *[a for s in extra for a in ("-S", s)]]
    result = dvc_repo.run(repo, *cmd, extra_env=hub_env(home))
    assert {"weights", "prepare", "extract", "train", "evaluate"} <= set(dvc_repo.stages_run(result.stdout))
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    block = evaluated["preset"]
    assert block["name"] == name and block["compared"] is True, block
    published = presets.get(name).published
    assert block["published"] == {k: pytest.approx(v / 100) for k, v in published.items()}
    assert block["difference"]["mAP"] == pytest.approx(evaluated["mAP"] - published["mAP"] / 100, abs=1e-6)
    recorded = json.loads((repo / WEIGHTS_JSON).read_text())
    assert (recorded["arch"], recorded["pretrained"], recorded["quick_gelu"]) == ("RN50", "openai", True)
