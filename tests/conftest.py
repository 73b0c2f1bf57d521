import inspect
import os
import tempfile
import types
from pathlib import Path

import pytest
import torch

from ltpipe.data.manifest import build
from ltpipe.data.source import DatasetSource
from ltpipe.datasets.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parents[1]
# The per-user stat cache of content hashes (ltpipe.data.fingerprint): one of the test session's own, not
# the user's; subprocesses (dvc repro in temporary repositories) inherit it.
os.environ.setdefault("LTPIPE_CACHE_DIR", tempfile.mkdtemp(prefix="ltpipe-test-cache-"))
# A dataset small enough to extract in a second with the tiny model.
TINY = dict(classes=6, imbalance=10, max_per_class=40, val_per_class=4, test_per_class=6, image_size=32, seed=0)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _restore_threads(_threads):
    # Stages called in-process set torch's thread count for their work (model.threads); the next test
    # starts from the session's.
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def make_source(root: Path, multilabel: bool = False, **overrides) -> DatasetSource:
    spec = SyntheticSpec(**dict(TINY, multilabel=multilabel, **overrides))
    lists = generate(spec, root)
    return DatasetSource("synthetic_ml" if multilabel else "synthetic", root,
                         {s: root / lists[s] for s in ("train", "val", "test")}, root / lists["classnames"], multilabel)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_prepared(tiny_source):
    return build(tiny_source)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from ltpipe.features import models
    return models.resolve("ltpipe-tiny", None, tmp_path_factory.mktemp("weights"), init_seed=0)


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory, tiny_prepared, tiny_weights):
    from ltpipe.features import extract
    out = tmp_path_factory.mktemp("features")
    options = extract.ExtractOptions(batch_size=16, workers=0)
    extract.run(tiny_prepared, tiny_weights, options, out, torch.device("cpu"), "fp32")
    extract.run_text(tiny_prepared, tiny_weights, options.templates, out / "text.h5", torch.device("cpu"), "fp32")
    return out


# Markers given here from where a test lives and what it runs, so that no test file has to carry
# them (registered in pyproject.toml; `slow` stays on the tests themselves).
TESTS = REPO / "tests"
REALDATA_FILES = {"tests/test_shared_data.py"}  # read ../shared; they skip without it
# Code written for CUDA runs, exercised here on CPU: reduced-precision autocast with the loss
# scaler, and multi-process DistributedDataParallel (gloo here, NCCL on GPUs).
GPU_PATH_TESTS = {"tests/test_finetune.py::test_reduced_precision_paths_train",
                  "tests/test_finetune.py::test_two_gloo_processes_take_the_same_step_as_one",
                  "tests/test_extract_resume.py::test_torchrun_two_processes_match_one",
                  "tests/test_gpu_bench.py::test_gpu_bench_runs_without_pandas_scipy_sklearn_faiss_or_dvc"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in markers_for(item):
            item.add_marker(name)


def markers_for(item) -> set:
    """`reliability` and `realdata` by file, `gpu` by name, `dvc` by what the test or its fixtures call."""
    path = item.path.relative_to(REPO).as_posix() if item.path.is_relative_to(REPO) else str(item.path)
    names = set()
    if path.startswith("tests/reliability/"):
        names.add("reliability")
    if path in REALDATA_FILES:
        names.add("realdata")
    if item.nodeid.split("[")[0] in GPU_PATH_TESTS:
        names.add("gpu")
    fixture_info = getattr(item, "_fixtureinfo", None)  # each fixture the test needs, directly or not
    fixtures = [d.func for defs in fixture_info.name2fixturedefs.values() for d in defs] if fixture_info else []
    if any(_calls_dvc(f) for f in [getattr(item, "function", None), *fixtures]):
        names.add("dvc")
    return names


_CALLS_DVC: dict = {}
PROCESS_CALLS = {"run", "Popen", "check_call", "check_output"}  # subprocess's, and dvc_repo.run


def _calls_dvc(func) -> bool:
    """Whether a function of tests/ starts a process with "dvc" written in it (the command), or calls
    a function of tests/ that does (`dvc_repo.make` runs `dvc init`)."""
    func = inspect.unwrap(getattr(func, "__func__", func)) if func is not None else None
    code = getattr(func, "__code__", None)
    if code is None or not Path(code.co_filename).is_relative_to(TESTS):
        return False
    if code not in _CALLS_DVC:
        _CALLS_DVC[code] = False  # until known: a function that calls itself back adds nothing
        _CALLS_DVC[code] = _code_calls_dvc(code, func.__globals__)
    return _CALLS_DVC[code]


def _code_calls_dvc(code: types.CodeType, namespace: dict) -> bool:
    def constants(values):
        for value in values:
            yield from constants(value) if isinstance(value, (tuple, frozenset)) else (value,)

    consts = list(constants(code.co_consts))
    if "dvc" in consts and PROCESS_CALLS & set(code.co_names):
        return True
    if any(_code_calls_dvc(c, namespace) for c in consts if isinstance(c, types.CodeType)):  # lambdas, closures
        return True
    helpers = [m for m in map(namespace.get, code.co_names)  # modules of tests/ such as dvc_repo, not numpy's
               if isinstance(m, types.ModuleType) and Path(getattr(m, "__file__", None) or "/").is_relative_to(TESTS)]
    called = [namespace.get(n) for n in code.co_names] + [getattr(m, n, None) for m in helpers for n in code.co_names]
    return any(isinstance(f, types.FunctionType) and _calls_dvc(f) for f in called)
