"""Reliability (issue 15): the disk fills up while extraction saves a shard, assembles an
HDF5 split file, or (the text stage, after it) writes text.h5.

The fault is a real ENOSPC from the kernel, two ways: a small tmpfs mounted where the
files go (needs root with CAP_SYS_ADMIN, as in CI; skipped with the reason otherwise),
and, without mounting, the file to be written made a symlink to /dev/full (every write
fails with ENOSPC). Each must end in one DiskFullError line naming the file and the free
space, leave no ``*.partial`` behind, keep the finished shards, and, once space is freed,
resume from them to files byte-identical to an uninterrupted run's.
"""

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltpipe.core.errors import DiskFullError, LtpipeError
from ltpipe.data.manifest import build
from ltpipe.features import extract
from tests.conftest import REPO, make_source

FILES = ("train.h5", "val.h5", "test.h5", "text.h5")
OPTIONS = dict(batch_size=3, workers=0, checkpoint_every=3)  # train: 3 shards of 3 images


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_weights):
    """An uninterrupted run, and the shard directory name of each split (spied, not changed)."""
    root = tmp_path_factory.mktemp("disk-full")
    prepared = build(make_source(root / "images", classes=2, max_per_class=6, imbalance=2, val_per_class=1,
                                 test_per_class=1))
    work_dirs = {}
    real = extract._assemble

    def assemble(shards, per_shard, out_path, *args, **kwargs):
        work_dirs[out_path.stem] = shards[0].parent.name
        return real(shards, per_shard, out_path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "_assemble", assemble)
        report = run(prepared, tiny_weights, root / "ref")
    assert report["train"]["images"] == 9
    return prepared, {name: sha(root / "ref/features" / name) for name in FILES}, work_dirs, root / "ref/features"


def run(prepared, weights, where: Path):
    """The extract stage, then the text stage, writing into one folder (as the DAG runs them)."""
    options = extract.ExtractOptions(**OPTIONS)
    report = extract.run(prepared, weights, options, where / "features", torch.device("cpu"), "fp32",
                         where / "partial")
    extract.run_text(prepared, weights, options.templates, where / "features" / "text.h5", torch.device("cpu"),
                     "fp32")
    return report


@contextlib.contextmanager
def small_filesystem(where: Path, size: int):
    """A tmpfs of ``size`` bytes at ``where``; yields a function that grows it (frees space, contents kept)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def page_rounded(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096


# Each case: where the fault sits -> (file named in the error, setup returning "free the space").
def tmpfs_under_shards(where, ref):
    # half of the training features: the first shard fits, a later one does not
    return "partial/train-", small_filesystem(where / "partial", ref["dir"].joinpath("train.h5").stat().st_size // 2)


def tmpfs_under_features(where, ref):
    half = ref["dir"].joinpath("train.h5").stat().st_size // 2
    return "features/train.h5", small_filesystem(where / "features", half)


def tmpfs_full_after_splits(where, ref):
    splits = sum(page_rounded(ref["dir"] / name) for name in ("train.h5", "val.h5", "test.h5"))
    return "features/text.h5", small_filesystem(where / "features", splits + 4096)


@contextlib.contextmanager
def dev_full_at(partial: Path):
    """``partial`` (the sibling a file is first written to) as a link to /dev/full; removing it frees the space."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.symlink_to("/dev/full")
    yield lambda: partial.unlink(missing_ok=True)


def dev_full_second_shard(where, ref):
    return "partial/train-", dev_full_at(where / "partial" / ref["work_dirs"]["train"] / "00001.npz.partial")


def dev_full_train_h5(where, ref):
    return "features/train.h5", dev_full_at(where / "features/train.h5.partial")


def dev_full_text_h5(where, ref):
    return "features/text.h5", dev_full_at(where / "features/text.h5.partial")


CASES = {
    "shard_save_tmpfs": (tmpfs_under_shards, "kept"),
    "hdf5_assembly_tmpfs": (tmpfs_under_features, "kept"),
    "text_h5_tmpfs": (tmpfs_full_after_splits, None),
    "shard_save_dev_full": (dev_full_second_shard, "kept"),
    "hdf5_assembly_dev_full": (dev_full_train_h5, "kept"),
    "text_h5_dev_full": (dev_full_text_h5, None),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_disk_full_names_the_file_keeps_shards_and_resumes(case, reference, tiny_weights, tmp_path):
    prepared, want, work_dirs, ref_dir = reference
    setup, kept = CASES[case]
    named, fault = setup(tmp_path, {"dir": ref_dir, "work_dirs": work_dirs})
    with fault as free_space:
        with pytest.raises(DiskFullError) as caught:
            run(prepared, tiny_weights, tmp_path)
        message = str(caught.value)
        assert isinstance(caught.value, LtpipeError) and "\n" not in message
        assert "disk full" in message and named in message and " free of " in message, message
        assert "re-run" in message, message
        if kept:
            assert "are kept" in message, message
        leftovers = [p for p in tmp_path.rglob("*.partial") if not p.is_symlink()]
        assert not leftovers, f"half-written files left behind: {leftovers}"
        assert not any(p.is_symlink() for p in tmp_path.rglob("*.partial")), "the failed .partial was not removed"
        shards = sorted((tmp_path / "partial").glob("train-*/*.npz"))
        done = {"shard": 1, "hdf5": 3, "text": 0}[case.split("_")[0]]
        assert len(shards) == done, shards  # text.h5 is written after every split file is assembled
        free_space()
        report = run(prepared, tiny_weights, tmp_path)
        if case.startswith("text"):
            assert all((tmp_path / "features" / name).is_file() for name in FILES)
        else:
            assert report["train"]["resumed_images"] == 3 * done
        got = {name: sha(tmp_path / "features" / name) for name in FILES}
    assert got == want
    assert not list((tmp_path / "partial").rglob("*.npz")), "shards are removed once assembled"



# A stage that hits a full disk must exit like any refused input (status 2, one `ltpipe error:`
# line), not crash while the interpreter exits: an HDF5 file whose final flush failed stayed open
# inside the library and segfaulted the process at exit (text.h5 on a full tmpfs).
WRITE_TEXT = """
import sys
import numpy as np
from ltpipe.core.errors import main_guard
from ltpipe.features import store

@main_guard
def main():
    rng = np.random.default_rng(0)
    store.write_text(sys.argv[1], rng.standard_normal((64, 512)), rng.standard_normal((64, 4, 512)),
                     [["a photo of a c%d." % i] * 4 for i in range(64)], ["c%d" % i for i in range(64)],
                     {"logit_scale": 100.0})

main()
"""


def test_a_stage_that_fills_the_disk_exits_with_one_line(tmp_path):
    where = tmp_path / "features"
    with small_filesystem(where, 64 * 1024):
        done = subprocess.run([sys.executable, "-c", WRITE_TEXT, str(where / "text.h5")], capture_output=True,
                              text=True, cwd=REPO, timeout=120)
        leftovers = sorted(p.name for p in where.iterdir())
    assert done.returncode == 2, f"exit status {done.returncode}:\n{done.stderr[-2000:]}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ltpipe error: disk full: cannot write"), lines
    assert "text.h5" in lines[0] and leftovers == []


def test_the_process_that_met_a_full_disk_exits_cleanly():
    """The text.h5 case above, alone in a fresh interpreter: before text.h5 was built in memory,
    its test passed and the interpreter then died at exit (status 139)."""
    case = f"{Path(__file__)}::test_disk_full_names_the_file_keeps_shards_and_resumes[text_h5_tmpfs]"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", case],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, f"exit status {done.returncode}:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
