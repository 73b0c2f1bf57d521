"""Reliability (issue 9): extraction SIGKILLed at five points and resumed each time.

The final feature files must be byte-identical to an uninterrupted run's, and at no
moment may the output directory hold an incomplete file: a watcher thread opens every
``data/features/*.h5`` it sees, all through the runs, and checks its ``complete`` flag.
"""

import hashlib
import signal
import subprocess
import sys
import threading
import time

import h5py
import pytest

from ltpipe.data.manifest import build
from tests.conftest import REPO, make_source
from tests.dvc_repo import env
from tests.test_extract_resume import project, run_stage

FILES = ("train.h5", "val.h5", "test.h5")


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shards(root, split: str) -> int:
    return len(list((root / "data/partial").glob(f"{split}-*/*.npz")))


# Where each kill lands: predicates on the run's progress, in the order the run meets them.
KILL_POINTS = {
    "first_train_shard": lambda root: shards(root, "train") >= 1,
    "mid_train": lambda root: shards(root, "train") >= 12,
    "train_assembled": lambda root: (root / "data/features/train.h5").exists(),
    "mid_val": lambda root: shards(root, "val") >= 2,
    "mid_test": lambda root: shards(root, "test") >= 2,
}


class Watcher(threading.Thread):
    """Opens every feature file that appears at the output path; records any incomplete one."""

    def __init__(self, features_dir):
        super().__init__(daemon=True)
        self.features_dir = features_dir
        self.incomplete, self.checks = [], 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for path in self.features_dir.glob("*.h5"):
                try:
                    with h5py.File(path, "r") as fh:
                        if not bool(fh.attrs.get("complete", False)):
                            self.incomplete.append(path.name)
                    self.checks += 1
                except OSError as exc:  # a file at the output path that HDF5 cannot even open
                    self.incomplete.append(f"{path.name}: {exc}")
            time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["extract_sigkill_at_5_points"])
def test_extraction_killed_at_five_points_resumes_to_the_same_bytes(tmp_path, tiny_weights, kind, record_property):
    record_property("faults", len(KILL_POINTS))  # bench/reliability.py counts each kill
    # ~1,600 training images in shards of 16, 240 val and 360 test: every kill point is a window of
    # at least half a second on 2 cores.
    prepared = build(make_source(tmp_path / "images", classes=6, max_per_class=400, imbalance=2,
                                 val_per_class=40, test_per_class=60))
    options = dict(batch_size=16, checkpoint_every=16, workers=0)
    reference = project(tmp_path / "reference", tiny_weights, prepared, **options)
    run_stage(reference)
    killed = project(tmp_path / "killed", tiny_weights, prepared, **options)
    watcher = Watcher(killed / "data/features")
    (killed / "data/features").mkdir(parents=True, exist_ok=True)
    watcher.start()
    try:
        for point, reached in KILL_POINTS.items():
            process = subprocess.Popen([sys.executable, "-m", "stages.extract"], cwd=killed,
                                       env=dict(env(), PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 300
            while not reached(killed):
                assert process.poll() is None, f"extraction ended before kill point {point}"
                assert time.monotonic() < deadline, point
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert not (killed / "data/features/test.h5").exists(), "the last kill came after the run had finished"
        run_stage(killed)
    finally:
        watcher.stop.set()
        watcher.join()
    assert watcher.checks > 0 and not watcher.incomplete, watcher.incomplete[:5]
    for name in FILES:
        assert sha(killed / "data/features" / name) == sha(reference / "data/features" / name), name
    assert not list((killed / "data/partial").rglob("*.npz")), "shards are removed once assembled"
