"""Reliability (issue 9): training SIGKILLed mid-epoch, then `dvc repro` again.

The train stage keeps no checkpoint (it takes seconds to minutes on cached features), so
recovery is DVC's job: a killed stage leaves no `dvc.lock` entry, the next `dvc repro`
runs it again from scratch, and the result must equal an uninterrupted run's: the same
model bytes, the same training summary and the same `metrics/eval.json`.

Two ways to die: only the stage's Python process is killed (DVC sees it fail and exits),
or the whole process group, `dvc repro` included (a crashed terminal or an OOM-killer
taking everything; DVC's own locks are left behind by a dead process).
"""

import os
import shutil
import signal
import subprocess
import time

import psutil  # a dependency of dvc
import pytest
import yaml

from tests import dvc_repo
from tests.reliability.conftest import EPOCHS, epochs_logged, outcome

pytestmark = pytest.mark.slow


def runs_training(cmdline) -> bool:
    return "stages.train" in " ".join(cmdline or [])


def stage_processes(process) -> list:
    """The train stage's processes under `process`: DVC runs the command through `$SHELL -c`,
    and dash (Debian's /bin/sh, what DVC uses when SHELL is unset) keeps itself as the parent
    of `python -m stages.train` where bash would exec it."""
    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if runs_training(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def kill_stage_process(process):
    """Only the train stage's Python process: `dvc repro` lives on, sees it fail and exits.

    The interpreter is the outermost Python process among the matches (any worker it forked
    is Python too); killing the shell around it would orphan a training that keeps writing
    into the workspace while the re-run below trains too."""
    pythons = [p for p in stage_processes(process) if p.name().startswith("python")]
    interpreters = [p for p in pythons if p.ppid() not in {q.pid for q in pythons}]
    assert interpreters, "the train stage's process was not found"
    for interpreter in interpreters:
        interpreter.send_signal(signal.SIGKILL)


def assert_no_training_survives(repo):
    deadline = time.monotonic() + 3  # SIGKILL is immediate; an orphan would run for many seconds
    while True:
        alive = []
        for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
            if proc.info["cwd"] == str(repo) and runs_training(proc.info["cmdline"]) \
                    and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        if not alive:
            return
        assert time.monotonic() < deadline, f"training processes {alive} outlived the kill"
        time.sleep(0.1)


def kill_process_group(process):
    """`dvc repro` and everything it started, at once."""
    os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.parametrize("kill", [pytest.param(kill_stage_process, id="train_stage_sigkill"),
                                  pytest.param(kill_process_group, id="dvc_repro_group_sigkill")])
def test_training_killed_mid_epoch_reruns_to_the_same_metrics(extracted, uninterrupted, tmp_path, kill):
    repo = tmp_path / "killed"
    shutil.copytree(extracted, repo, symlinks=True)
    # /bin/sh, not the caller's SHELL: where it is dash, the stage runs under a shell that
    # stays its parent, the layout a kill of "the stage" must see through.
    process = subprocess.Popen(["dvc", "repro", "evaluate"], cwd=repo, env=dict(dvc_repo.env(), SHELL="/bin/sh"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while epochs_logged(repo) < 2:
            assert process.poll() is None, "the pipeline ended before the kill"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        kill(process)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert_no_training_survives(repo)
    killed_at = epochs_logged(repo)
    assert 2 <= killed_at < EPOCHS, f"killed after {killed_at} epochs: not mid-training"
    print(f"{kill.__name__}: killed after {killed_at} of {EPOCHS} epochs")
    assert "train" not in yaml.safe_load((repo / "dvc.lock").read_text())["stages"], \
        "a killed stage must not be recorded as done"
    assert not (repo / "metrics/eval.json").exists()

    rerun = dvc_repo.run(repo, "dvc", "repro", "evaluate")
    assert dvc_repo.stages_run(rerun.stdout) == ["train", "evaluate"], rerun.stdout
    assert outcome(repo) == uninterrupted
    assert epochs_logged(repo) == EPOCHS, "the re-run's log starts afresh, with no rows left from the killed run"
    assert "up to date" in dvc_repo.run(repo, "dvc", "status", "evaluate").stdout.lower()
