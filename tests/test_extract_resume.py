"""Checkpointed extraction: interrupted runs resume to the same bytes; torchrun shards merge exactly."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from ltpipe.data.manifest import save
from ltpipe.features import extract
from tests.conftest import REPO, make_source
from tests.dvc_repo import env, small_params


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_crash_then_resume_gives_the_same_bytes(tmp_path, tiny_prepared, tiny_weights, tiny_features, monkeypatch):
    options = extract.ExtractOptions(batch_size=16, workers=0, checkpoint_every=32)  # train: 4 shards
    saved = []
    real_save = extract._save_shard

    def crash_after_two(path, *arrays):
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_save(path, *arrays)
        saved.append(path)

    monkeypatch.setattr(extract, "_save_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract.run(tiny_prepared, tiny_weights, options, tmp_path / "features", torch.device("cpu"), "fp32",
                    tmp_path / "partial")
    assert not (tmp_path / "features/train.h5").exists()
    assert len(list((tmp_path / "partial").glob("train-*/*.npz"))) == 2

    monkeypatch.setattr(extract, "_save_shard", real_save)
    report = extract.run(tiny_prepared, tiny_weights, options, tmp_path / "features", torch.device("cpu"),
                         "fp32", tmp_path / "partial")
    assert report["train"]["resumed_images"] == 64
    for name in ("train.h5", "val.h5", "test.h5"):
        assert sha(tmp_path / "features" / name) == sha(tiny_features / name), name
    assert not list((tmp_path / "partial").iterdir()), "shards are removed once assembled"


def test_shards_of_other_inputs_are_never_reused(tmp_path, tiny_prepared, tiny_weights):
    a = extract.ExtractOptions(batch_size=16, workers=0, checkpoint_every=32)
    b = extract.ExtractOptions(batch_size=16, workers=0, checkpoint_every=32, token_layer="post_ln")
    paths = tiny_prepared.split("train")["path"].tolist()
    fa = extract.work_fingerprint("train", tiny_prepared.root, paths, {"w": 1}, a, "fp32", torch.device("cpu"))
    fb = extract.work_fingerprint("train", tiny_prepared.root, paths, {"w": 1}, b, "fp32", torch.device("cpu"))
    fc = extract.work_fingerprint("train", tiny_prepared.root, paths, {"w": 2}, a, "fp32", torch.device("cpu"))
    fd = extract.work_fingerprint("train", tiny_prepared.root, paths[:-1], {"w": 1}, a, "fp32", torch.device("cpu"))
    assert len({fa, fb, fc, fd}) == 4


def project(tmp_path, tiny_weights, prepared, **extract_params):
    """A working directory holding what the extract stage reads."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = small_params()
    params["extract"].update(extract_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data/weights").mkdir(parents=True)
    shutil.copy(tiny_weights.checkpoint, tmp_path / "data/weights/w.pt")
    weights = tiny_weights.__class__(**dict(tiny_weights.__dict__, checkpoint=str(tmp_path / "data/weights/w.pt")))
    weights.save(tmp_path / "data/weights/weights.json")
    save(prepared, tmp_path / "data/prepared")
    return tmp_path


def run_stage(cwd, *launcher, check=True, **extra_env):
    cmd = list(launcher or [sys.executable]) + ["-m", "stages.extract"]
    return subprocess.run(cmd, cwd=cwd, env=dict(env(), PYTHONPATH=str(REPO), **extra_env), capture_output=True,
                          text=True, timeout=600, check=check)


@pytest.mark.slow
def test_sigkill_mid_extraction_then_resume(tmp_path, tiny_weights):
    source = make_source(tmp_path / "images", classes=6, max_per_class=150, imbalance=2)
    from ltpipe.data.manifest import build

    prepared = build(source)
    reference = project(tmp_path / "reference", tiny_weights, prepared, batch_size=8, checkpoint_every=8)
    run_stage(reference)
    killed = project(tmp_path / "killed", tiny_weights, prepared, batch_size=8, checkpoint_every=8)
    process = subprocess.Popen([sys.executable, "-m", "stages.extract"], cwd=killed,
                               env=dict(env(), PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "data/partial").glob("train-*/*.npz"))) < 3:
        assert process.poll() is None, "extraction ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "data/features/train.h5").exists(), "the output path never holds a partial file"
    result = run_stage(killed)
    assert result.returncode == 0
    for name in ("train.h5", "val.h5", "test.h5"):
        assert sha(killed / "data/features" / name) == sha(reference / "data/features" / name), name


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, tiny_weights, tiny_prepared):
    one = project(tmp_path / "one", tiny_weights, tiny_prepared, batch_size=8, checkpoint_every=16)
    two = project(tmp_path / "two", tiny_weights, tiny_prepared, batch_size=8, checkpoint_every=16)
    # torchrun gives each process one thread; float32 results can differ in the last bit with the
    # thread count, so the single-process reference uses one thread too.
    run_stage(one, OMP_NUM_THREADS="1")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = run_stage(two, torchrun, "--standalone", "--nproc_per_node", "2", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("train.h5", "val.h5", "test.h5"):
        assert sha(two / "data/features" / name) == sha(one / "data/features" / name), name
    report = yaml.safe_load((two / "metrics/extract_report.json").read_text())
    assert report["train"]["images"] == len(tiny_prepared.split("train"))
    assert np.isfinite(report["train"]["seconds"])
