"""The markers a developer selects a part of the suite with (`pytest -m realdata`, ...) pick what they say.

Collection only: one child pytest collects the whole suite with this module loaded as a plugin, which
writes each test's marker names to a file.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import GPU_PATH_TESTS, REPO

DUMP = "LTPIPE_TEST_MARKERS_DUMP"


def pytest_collection_finish(session):
    """A hook for the child run below only (`-p tests.test_markers`); a collected test module is no plugin."""
    target = os.environ.get(DUMP)
    if target:
        with open(target, "w") as out:
            json.dump({item.nodeid: sorted({m.name for m in item.iter_markers()}) for item in session.items}, out)


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> dict:
    """Each collected test's id and its marker names, as a plain `pytest` run sees them."""
    dump = tmp_path_factory.mktemp("markers") / "markers.json"
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "-p", "tests.test_markers"], cwd=REPO, env=dict(os.environ, **{DUMP: str(dump)}),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(dump.read_text())


def marked(collected: dict, name: str) -> set:
    return {test for test, names in collected.items() if name in names}


def test_reliability_is_exactly_the_tests_under_tests_reliability(collected):
    under = {test for test in collected if test.startswith("tests/reliability/")}
    assert under and marked(collected, "reliability") == under


def test_realdata_is_every_test_of_a_file_that_reads_shared(collected):
    # A file reads the shared data when it names the folder beside the repository.
    readers = {path.relative_to(REPO).as_posix() for path in (REPO / "tests").rglob("test_*.py")
               if re.search(r"""parent\s*/\s*["']shared["']""", path.read_text())}
    assert "tests/test_shared_data.py" in readers
    expected = {test for test in collected if test.split("::")[0] in readers}
    assert marked(collected, "realdata") == expected


def test_gpu_marks_the_listed_tests_and_each_listed_test_exists(collected):
    gpu = marked(collected, "gpu")
    assert {test.split("[")[0] for test in gpu} == GPU_PATH_TESTS
    assert {"tests/test_finetune.py::test_reduced_precision_paths_train[bf16]",
            "tests/test_finetune.py::test_reduced_precision_paths_train[fp16]"} <= gpu


def test_dvc_follows_the_test_and_its_fixtures_to_the_dvc_command(collected):
    dvc = marked(collected, "dvc")
    # Through a module fixture (`repo`), a session fixture in a conftest (`extracted`), a helper of the
    # test module (`_changed_stages`), and `dvc_repo.make` (which runs `dvc init`).
    for test in [t for t in collected if t.startswith(("tests/test_pipeline_dvc.py::test_repro",
                                                       "tests/reliability/test_train_kills.py::",
                                                       "tests/reliability/test_user_view.py::"))]:
        assert test in dvc, test
    assert any(t.startswith("tests/test_stage_deps.py::") for t in dvc)
    # Not: unit tests, even beside tests that run dvc in the same module.
    assert not [t for t in dvc if t.startswith(("tests/test_metrics.py::", "tests/test_markers.py::"))]
    for test in ("tests/test_pipeline_dvc.py::test_summary_check_recomputes_mean_and_sample_std_from_the_cell_files",
                 "tests/test_stage_deps.py::test_extraction_never_imports_the_dataset_sources"):
        assert test in collected and test not in dvc, test


def test_slow_stays_as_the_tests_set_it(collected):
    assert {t for t in collected if t.startswith("tests/test_pipeline_dvc.py::")} <= marked(collected, "slow")
    assert "tests/test_metrics.py" not in {t.split("::")[0] for t in marked(collected, "slow")}


def test_an_unregistered_marker_fails_the_run(tmp_path):
    (tmp_path / "test_typo.py").write_text("import pytest\n\n\n@pytest.mark.relaibility\ndef test_x():\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "'relaibility' not found in `markers`" in result.stdout + result.stderr
