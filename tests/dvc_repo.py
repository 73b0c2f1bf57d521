"""A throw-away copy of the project as its own git + DVC repository, for end-to-end tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from tests.conftest import REPO

PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "stages", "ltpipe", "plots"]
# Small enough that the whole DAG runs in well under a minute on 2 cores.
SMALL = {
    "datasets.synthetic": dict(classes=6, imbalance=10, max_per_class=40, val_per_class=4, test_per_class=6,
                               image_size=32),
    "datasets.synthetic_ml": dict(classes=5, imbalance=10, max_per_class=30, val_per_class=4, test_per_class=6,
                                  image_size=32),
    "train": dict(epochs=4),
    "extract": dict(workers=0),
    "sweep": dict(heads=["cosine"], losses=["ce", "bsm"], seeds=[0, 1]),
    "sweep.train": dict(epochs=4),
    "finetune.train": dict(epochs=1, batch_size=16, micro_batch=16, workers=0, warmup_epochs=0),
}


def env(extra: Optional[dict] = None) -> dict:
    out = dict(os.environ, **(extra or {}))
    out["PATH"] = str(Path(sys.executable).parent) + os.pathsep + out.get("PATH", "")
    out["DVC_NO_ANALYTICS"] = "1"
    out["GIT_AUTHOR_NAME"] = out["GIT_COMMITTER_NAME"] = "ltpipe tests"
    out["GIT_AUTHOR_EMAIL"] = out["GIT_COMMITTER_EMAIL"] = "tests@ltpipe.invalid"
    return out


def run(repo: Path, *args: str, check: bool = True, extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``args`` in ``repo``, with the test environment (plus ``extra_env``); fails the test on a non-zero exit."""
    result = subprocess.run(list(args), cwd=repo, env=env(extra_env), capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def set_param(params: dict, dotted: str, value) -> dict:
    """``params`` (a parsed params.yaml) with ``dotted`` (`train.lr`) set to ``value``, added if absent."""
    *parents, leaf = dotted.split(".")
    section = params
    for parent in parents:
        section = section[parent]
    section[leaf] = value
    return params


def small_params(overrides=SMALL) -> dict:
    """The repository's params.yaml with the small-test overrides applied."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, values in overrides.items():
        node = params
        for part in dotted.split("."):
            node = node[part]
        node.update(values)
    return params


def make(path: Path, overrides=SMALL) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, path / name)
    (path / "params.yaml").write_text(yaml.safe_dump(small_params(overrides), sort_keys=False))
    run(path, "git", "init", "-q", "-b", "main")
    run(path, "git", "config", "user.name", "ltpipe tests")
    run(path, "git", "config", "user.email", "tests@ltpipe.invalid")
    run(path, "dvc", "init", "-q")
    run(path, "dvc", "config", "core.analytics", "false")
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-qm", "project")
    return path


ALWAYS_RUN = "inputs"  # fingerprints the data outside the repository on every repro (always_changed)


def stages_run(output: str, include_inputs: bool = False) -> list:
    """The stages a `dvc repro` / `dvc exp run` output says it ran; `inputs`, which runs every time
    and leaves the rest skipped when its fingerprints are unchanged, only with ``include_inputs``."""
    ran = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
    return ran if include_inputs else [stage for stage in ran if stage != ALWAYS_RUN]


def stale_stages(repo: Path, target: Optional[str] = None) -> dict:
    """`dvc status` of ``repo`` (of ``target`` and the stages before it) but the `inputs` stage's
    permanent "always changed": {} when up to date."""
    import json

    status = json.loads(run(repo, "dvc", "status", "--json", *(["--with-deps", target] if target else [])).stdout)
    return {stage: entries for stage, entries in status.items()
            if not (stage == ALWAYS_RUN and entries == ["always changed"])}
