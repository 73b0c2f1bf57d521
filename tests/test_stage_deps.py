"""The code each stage declares in dvc.yaml matches the code it runs (issue 16).

A stage must list every module it imports (else an edit would not re-run it: a stale result), and
should not list code it never runs (else an edit re-runs it for nothing: hours of extraction at
benchmark scale). The first is `test_stage_code_deps_cover_every_imported_module`; here DVC
itself is asked which stages an edit invalidates.
"""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.dvc_repo import make, run
from tests.test_stage_contract import STAGES, imported_files

# Stages of the default DAG (a matrix stage is named by its template here).
DEFAULT_STAGES = sorted(s for s in STAGES if s != "finetune")


def closures() -> dict:
    return {stage: set(imported_files(stage)) for stage in STAGES}  # cached: shared with test_stage_contract


@pytest.fixture(scope="module")
def imports():
    return closures()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_declared_code_path_is_run(stage, imports):
    """Each `ltpipe/...` dependency holds at least one module the stage imports."""
    for dep in STAGES[stage]["deps"]:
        if not dep.startswith("ltpipe/") or dep.endswith("model_configs"):
            continue
        used = [f for f in imports[stage] if f == dep or f.startswith(dep.rstrip("/") + "/")]
        assert used, f"stage {stage} declares {dep} but imports nothing from it"


def test_extraction_never_imports_the_dataset_sources(imports):
    # The named regression: editing the .pkl converter or the CIFAR reader re-ran extraction.
    for stage in ("extract", "zeroshot", "train", "evaluate", "sweep", "finetune"):
        assert not [f for f in imports[stage] if f.startswith("ltpipe/datasets/")], stage


def _fake_outputs(repo: Path) -> None:
    """Stand-ins for every stage output, so `dvc commit` can record a lock without running anything."""
    status = json.loads(run(repo, "dvc", "status", "--json").stdout)
    outs = [out for entries in status.values() for entry in entries if isinstance(entry, dict)
            for out in entry.get("changed outs", {})]
    # An always-changed stage's status is only "always changed", without its outputs.
    outs += [next(iter(out)) if isinstance(out, dict) else out for stage in STAGES.values()
             if stage.get("always_changed") for out in stage["outs"]]
    # Files inside another stage's output folder that a stage depends on (data/prepared/manifest.csv).
    outs += [dep for stage in STAGES.values() for dep in stage.get("deps", []) if dep.startswith("data/")
             and Path(dep).suffix]
    for out in outs:
        path = repo / out
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("stand-in\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "stand-in").write_text("stand-in\n")


def _changed_stages(repo: Path) -> set:
    status = json.loads(run(repo, "dvc", "status", "--json").stdout)
    return {name.split("@")[0] for name, entries in status.items()
            if any("changed deps" in e or "changed command" in e for e in entries if isinstance(e, dict))}


@pytest.fixture(scope="module")
def locked_repo(tmp_path_factory):
    repo = make(tmp_path_factory.mktemp("deps") / "repo")
    (repo / "README.md").write_text((REPO / "README.md").read_text())
    (repo / "docs").mkdir()
    (repo / "docs" / "methods.md").write_text("# Methods\n")
    _fake_outputs(repo)
    run(repo, "dvc", "commit", "-f", "-q")
    assert _changed_stages(repo) == set(), "a freshly committed lock must be up to date"
    return repo


# Folders are declared whole, so an edit may re-run a stage that imports a sibling module only; these
# files must re-run exactly their importers (the converter re-ran extraction before issue 16).
EDITS = ["ltpipe/datasets/pickles.py", "ltpipe/datasets/cifar.py", "ltpipe/datasets/registry.py", "README.md",
         "docs/methods.md", "ltpipe/features/extract.py"]


@pytest.mark.parametrize("edited", EDITS)
def test_an_edit_reruns_only_the_stages_that_import_it(locked_repo, imports, edited):
    path = locked_repo / edited
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# an edit\n")
        changed = _changed_stages(locked_repo)
    finally:
        path.write_bytes(original)
    importers = {stage for stage in DEFAULT_STAGES if edited in imports[stage]}
    assert changed == importers, f"editing {edited} changes {sorted(changed)}; its importers: {sorted(importers)}"
