"""Shared by the kill tests (`test_train_kills`, `test_orphans`): one extracted project and one
uninterrupted run per session, since each costs an extraction or a full training through DVC."""

import json
import shutil

import pytest
import yaml

from tests import dvc_repo

# The decoder head on the token grid, 12 epochs of about half a second each on 2 cores: a
# kill once two epochs are logged lands inside a later one.
EPOCHS = 12
OVERRIDES = dict(dvc_repo.SMALL, train=dict(epochs=EPOCHS))
LOSS_LOG = "metrics/train/plots/metrics/train/loss.tsv"


def epochs_logged(repo) -> int:
    try:
        return max(0, len((repo / LOSS_LOG).read_text().splitlines()) - 1)  # less the header
    except FileNotFoundError:
        return 0


def outcome(repo) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    model = {out["path"]: out["md5"] for out in lock["train"]["outs"] if out["path"] == "data/models"}
    return {"model": model,
            "train_summary": json.loads((repo / "metrics/train/metrics.json").read_text()),
            "eval": json.loads((repo / "metrics/eval.json").read_text())}


@pytest.fixture(scope="session")
def extracted(tmp_path_factory):
    """A project whose features are extracted and committed: each run below starts at `train`."""
    repo = dvc_repo.make(tmp_path_factory.mktemp("train_kills") / "base", OVERRIDES)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["head"] = "decoder"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_repo.run(repo, "dvc", "repro", "extract")
    dvc_repo.run(repo, "git", "add", "-A")
    dvc_repo.run(repo, "git", "commit", "-qm", "features")
    return repo


@pytest.fixture(scope="session")
def uninterrupted(extracted, tmp_path_factory):
    repo = tmp_path_factory.mktemp("train_kills") / "reference"
    shutil.copytree(extracted, repo, symlinks=True)
    dvc_repo.run(repo, "dvc", "repro", "evaluate")
    return outcome(repo)
