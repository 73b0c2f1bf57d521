"""bench/gpu.py, the one command a GPU owner runs, at tiny size on this CPU: it must keep working and keep
needing nothing a bare CUDA machine lacks."""

import re
import subprocess
import sys

from tests.conftest import REPO

# What a machine with only torch, torchvision, h5py, numpy and open_clip_torch (and their dependencies) lacks
# (without zlib_ng the cache's CRC-32s are zlib's, checked in threads).
ABSENT = ("pandas", "scipy", "sklearn", "faiss", "dvc", "dvclive", "zlib_ng")
# Runs the bench as on such a machine: every finder answers "not found" for those packages, as it does when
# they are not installed (importlib.util.find_spec gives None, `import` raises ModuleNotFoundError).
BARE_MACHINE = f"""
import runpy, sys

class Absent:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {ABSENT!r}:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [Absent(finder) for finder in sys.meta_path]
runpy.run_module("bench.gpu", run_name="__main__", alter_sys=True)
"""
NUMBER = r"[0-9]+(\.[0-9]+)?"


def test_gpu_bench_runs_without_pandas_scipy_sklearn_faiss_or_dvc(tmp_path):
    args = ["--count", "48", "--val", "16", "--classes", "4", "--batch-size", "16", "--workers", "1",
            "--train-batch", "16", "--steps", "3", "--device", "cpu", "--work", str(tmp_path)]
    run = subprocess.run([sys.executable, "-c", BARE_MACHINE, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()

    def printed(pattern: str) -> bool:
        return any(re.fullmatch(pattern, line) for line in lines)

    peak = rf"peak {NUMBER} GiB RSS \(process peak\)"
    assert printed(rf"extract \(48 images, batch 16, 1 workers\): {NUMBER} images/s, {peak}"), run.stdout
    for head in ("decoder", "cprfl"):
        for where in ("on disk", "in memory"):
            assert printed(rf"train {head}, token grids [0-9]+x[0-9]+ {where} \(3 steps, batch 16\): "
                           rf"{NUMBER} steps/s, {peak}"), run.stdout
