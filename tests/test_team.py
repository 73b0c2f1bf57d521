"""Extract once, train everywhere (issue 19): one "GPU machine" repository extracts and pushes features,
run-cache and experiments; other clones pull them through DVC remotes (a directory, and an S3-compatible
server started here) and a bare git remote, and never re-extract."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import dvc_repo

pytestmark = [pytest.mark.slow, pytest.mark.dvc]


def _git_push(repo: Path) -> None:
    dvc_repo.run(repo, "git", "add", "-A")
    dvc_repo.run(repo, "git", "commit", "-qm", "extracted", check=False)
    dvc_repo.run(repo, "git", "push", "-q", "origin", "main")


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The GPU machine: extracts, trains, pushes data, run-cache and two experiments."""
    root = tmp_path_factory.mktemp("team")
    origin = root / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    gpu = dvc_repo.make(root / "gpu")
    dvc_repo.run(gpu, "git", "remote", "add", "origin", str(origin))
    dvc_repo.run(gpu, "dvc", "remote", "add", "-d", "store", str(root / "store"))
    dvc_repo.run(gpu, "dvc", "remote", "modify", "store", "verify", "true")  # hashes checked on every pull
    assert "Running stage 'extract'" in dvc_repo.run(gpu, "dvc", "repro", "evaluate").stdout
    _git_push(gpu)
    dvc_repo.run(gpu, "dvc", "push")
    # Two experiments: another loss (shared with `dvc exp push`) and float32 features (re-extracts: its
    # extraction is what the run-cache lets a clone restore).
    dvc_repo.run(gpu, "dvc", "exp", "run", "-n", "bsm", "-S", "loss=bsm", "evaluate")
    dvc_repo.run(gpu, "dvc", "exp", "run", "-n", "float32", "-S", "extract.dtype=float32", "evaluate")
    dvc_repo.run(gpu, "dvc", "exp", "push", "origin", "bsm")
    dvc_repo.run(gpu, "dvc", "push", "--run-cache")
    # `dvc exp run` leaves the last experiment in the workspace: back to the commit the clones get.
    dvc_repo.run(gpu, "git", "reset", "-q", "--hard")
    dvc_repo.run(gpu, "dvc", "checkout", "--force", "--with-deps", "evaluate")
    return root


def _clone(team: Path, name: str) -> Path:
    path = team / name
    subprocess.run(["git", "clone", "-q", str(team / "origin.git"), str(path)], check=True, env=dvc_repo.env())
    return path


def _experiments(repo: Path) -> dict:
    import json

    shown = json.loads(dvc_repo.run(repo, "dvc", "exp", "show", "--json").stdout)
    return {exp["name"]: exp["revs"][0]["data"] for rev in shown for exp in (rev.get("experiments") or [])}


def test_a_clone_pulls_the_cache_trains_without_extracting_and_shares_experiments(team):
    gpu, cpu = team / "gpu", _clone(team, "cpu")
    dvc_repo.run(cpu, "dvc", "pull", "--with-deps", "evaluate")
    assert dvc_repo.stages_run(dvc_repo.run(cpu, "dvc", "repro", "evaluate").stdout) == []
    assert (cpu / "metrics/eval.json").read_bytes() == (gpu / "metrics/eval.json").read_bytes()
    for name in ("features/train.h5", "features/val.h5", "features/test.h5", "text/text.h5"):
        assert (cpu / "data" / name).read_bytes() == (gpu / "data" / name).read_bytes()
    # Nothing the GPU machine wrote names a path of its own: outputs are the same bytes anywhere.
    for path in [*(cpu / "data").rglob("*"), *(cpu / "metrics").rglob("*"), cpu / "dvc.lock"]:
        if path.is_file():
            assert str(gpu).encode() not in path.read_bytes(), path

    # The GPU machine's experiment arrives with its params and metrics ...
    dvc_repo.run(cpu, "dvc", "exp", "pull", "origin", "bsm")
    shared = _experiments(cpu)["bsm"]
    assert shared["params"]["params.yaml"]["data"]["loss"] == "bsm"
    # ... and the same experiment run here trains and evaluates, never extracts, and gives the same numbers.
    out = dvc_repo.run(cpu, "dvc", "exp", "run", "-n", "bsm-here", "-S", "loss=bsm", "evaluate").stdout
    assert dvc_repo.stages_run(out) == ["train", "evaluate"]
    here = _experiments(cpu)["bsm-here"]
    assert here["metrics"]["metrics/eval.json"]["data"] == shared["metrics"]["metrics/eval.json"]["data"]


def test_the_run_cache_restores_an_extraction_a_clone_never_ran(team):
    cpu = _clone(team, "cpu-runcache")
    params = cpu / "params.yaml"
    data = yaml.safe_load(params.read_text())
    data["extract"]["dtype"] = "float32"  # what the GPU machine's `float32` experiment extracted
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    out = dvc_repo.run(cpu, "dvc", "repro", "--pull", "evaluate").stdout
    assert "Stage 'extract' is cached - skipping run, checking out outputs" in out
    assert dvc_repo.stages_run(out) == ["train", "evaluate"]  # their outputs are not cached: they always run
    import h5py

    with h5py.File(cpu / "data/features/train.h5", "r") as fh:
        assert fh["pooled"].dtype == "float32"


def _inodes(root: Path) -> dict:
    return {p.stat().st_ino: p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def test_a_hardlink_cache_holds_the_features_once_and_the_pipeline_leaves_them_intact(team):
    copy, linked = _clone(team, "cpu-copy"), _clone(team, "cpu-hardlink")
    dvc_repo.run(linked, "dvc", "config", "--local", "cache.type", "hardlink")
    for repo in (copy, linked):
        dvc_repo.run(repo, "dvc", "pull", "--with-deps", "extract", "text")
    train_h5 = linked / "data/features/train.h5"
    cached = {p.stat().st_ino for p in (linked / ".dvc/cache").rglob("*") if p.is_file()}
    assert train_h5.stat().st_ino in cached and train_h5.stat().st_nlink == 2
    assert train_h5.stat().st_mode & 0o222 == 0  # DVC makes linked outputs read-only; the pipeline only reads
    features = sum(p.stat().st_size for p in (copy / "data/features").iterdir())
    saved = sum(_inodes(copy).values()) - sum(_inodes(linked).values())
    assert saved >= 0.95 * features, (saved, features)

    before = train_h5.stat()
    out = dvc_repo.run(linked, "dvc", "exp", "run", "-S", "loss=bsm", "evaluate").stdout
    assert dvc_repo.stages_run(out) == ["train", "evaluate"]  # the features were read ...
    after = train_h5.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_nlink) == (before.st_ino, before.st_mtime_ns, 2)
    assert "Data and pipelines are up to date" in dvc_repo.run(linked, "dvc", "status", "extract").stdout


def test_an_interrupted_pull_completes_when_run_again(team):
    gpu = team / "gpu"
    for attempt in range(5):
        cpu = _clone(team, f"cpu-killed-{attempt}")
        objects = cpu / ".dvc/cache/files"
        pull = subprocess.Popen(["dvc", "pull", "--with-deps", "evaluate"], cwd=cpu, env=dvc_repo.env(),
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while pull.poll() is None and not (objects.exists() and any(p.is_file() for p in objects.rglob("*"))):
            time.sleep(0.002)
        os.killpg(pull.pid, signal.SIGKILL)
        pull.wait()
        if not (cpu / "data/features/train.h5").exists():
            break  # killed mid-transfer
    else:
        pytest.fail("dvc pull finished before every kill: the interruption was never injected")
    dvc_repo.run(cpu, "dvc", "pull", "--with-deps", "evaluate")
    assert "in sync" in dvc_repo.run(cpu, "dvc", "status", "--cloud", "extract").stdout
    for name in ("features/train.h5", "features/val.h5", "features/test.h5", "text/text.h5"):
        assert (cpu / "data" / name).read_bytes() == (gpu / "data" / name).read_bytes()
    assert dvc_repo.stages_run(dvc_repo.run(cpu, "dvc", "repro", "evaluate").stdout) == []


def test_a_corrupted_object_in_the_remote_never_reaches_the_workspace(team):
    gpu = team / "gpu"
    bad = team / "store-corrupt"
    shutil.copytree(team / "store", bad)
    lock = yaml.safe_load((gpu / "dvc.lock").read_text())
    (features,) = [o["md5"] for o in lock["stages"]["extract"]["outs"] if o["path"] == "data/features"]
    listing = yaml.safe_load((bad / "files/md5" / features[:2] / features[2:]).read_text())  # JSON is YAML
    (train,) = [entry["md5"] for entry in listing if entry["relpath"] == "train.h5"]
    obj = bad / "files/md5" / train[:2] / train[2:]
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    obj.write_bytes(bytes(data))

    cpu = _clone(team, "cpu-corrupt")
    dvc_repo.run(cpu, "dvc", "remote", "add", "--local", "-f", "store", str(bad))  # verify: true stays (config)
    failed = dvc_repo.run(cpu, "dvc", "pull", "extract", check=False)
    assert failed.returncode != 0
    assert "Checkout failed for following targets:\ndata/features" in failed.stderr + failed.stdout
    assert not (cpu / "data/features/train.h5").exists()
    assert not (cpu / ".dvc/cache/files/md5" / train[:2] / train[2:]).exists()  # the bad object was dropped


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3-compatible server on a free loopback port, with a bucket; stopped afterwards."""
    port = _free_port()
    log = open(tmp_path / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    credentials = {"AWS_ACCESS_KEY_ID": "ltpipe-test", "AWS_SECRET_ACCESS_KEY": "ltpipe-test-secret",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3

        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"the S3 server exited ({server.returncode}): {(tmp_path / 'moto.log').read_text()}")
            try:
                boto3.client("s3", endpoint_url=url, aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                             aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
                             region_name="us-east-1").create_bucket(Bucket="ltpipe")
                break
            except Exception as exc:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"the S3 server at {url} did not answer in 60 s: {exc}")
                time.sleep(0.2)
        yield url, credentials
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_extract_once_push_to_s3_pull_and_train_elsewhere(team, s3_server, monkeypatch):
    url, credentials = s3_server
    gpu, cpu = team / "gpu", _clone(team, "cpu-s3")
    for repo in (gpu, cpu):  # the remote and its credentials live in each machine's own config.local
        dvc_repo.run(repo, "dvc", "remote", "add", "--local", "-f", "s3", "s3://ltpipe/cache")
        dvc_repo.run(repo, "dvc", "remote", "modify", "--local", "s3", "endpointurl", url)
    dvc_repo.run(gpu, "dvc", "remote", "modify", "--local", "s3", "access_key_id", credentials["AWS_ACCESS_KEY_ID"])
    dvc_repo.run(gpu, "dvc", "remote", "modify", "--local", "s3", "secret_access_key",
                 credentials["AWS_SECRET_ACCESS_KEY"])
    assert "pushed" in dvc_repo.run(gpu, "dvc", "push", "-r", "s3", "--with-deps", "evaluate").stdout
    # The other machine gives its credentials through the environment.
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    dvc_repo.run(cpu, "dvc", "pull", "-r", "s3", "--with-deps", "evaluate")
    assert dvc_repo.stages_run(dvc_repo.run(cpu, "dvc", "repro", "evaluate").stdout) == []
    assert (cpu / "data/features/train.h5").read_bytes() == (gpu / "data/features/train.h5").read_bytes()
    assert (cpu / "metrics/eval.json").read_bytes() == (gpu / "metrics/eval.json").read_bytes()
    # No credential is in what git tracks, and the file that holds them is git-ignored.
    tracked = dvc_repo.run(gpu, "git", "grep", "-I", "-l", credentials["AWS_SECRET_ACCESS_KEY"], check=False)
    assert tracked.returncode == 1 and tracked.stdout == ""
    assert credentials["AWS_SECRET_ACCESS_KEY"] in (gpu / ".dvc/config.local").read_text()
    assert dvc_repo.run(gpu, "git", "check-ignore", ".dvc/config.local").returncode == 0
    assert "config.local" not in dvc_repo.run(gpu, "git", "status", "--porcelain", "--ignored=no").stdout
