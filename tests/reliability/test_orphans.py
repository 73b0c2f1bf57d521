"""Reliability (issue 15): a stage stops when the `dvc` process that started it dies.

DVC does not pass a SIGTERM on to the stage it runs, and with SIGKILL it cannot: the stage
went on as an orphan, writing its outputs while the user's immediate re-run removed and
rewrote them ("Directory not empty"). Every stage's `main_guard` now watches the DVC process
that started it (the nearest ancestor that did not inherit `DVC_STAGE`, past `$SHELL -c`
and `torchrun`) and stops the way Ctrl-C does when it is gone.

The fast cases build the process layouts DVC makes, with a stand-in for `dvc` that sets
`DVC_STAGE` as DVC does and a guarded stage whose `finally` block leaves a mark; the slow
case kills a real `dvc repro` mid-training and mid-extraction and re-runs at once.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil  # a dependency of dvc
import pytest
import yaml

from ltpipe.core.errors import DVC_WATCH_INTERVAL_S, STOP_GRACE_S
from tests import dvc_repo
from tests.conftest import REPO
from tests.reliability.conftest import EPOCHS, epochs_logged, outcome

MESSAGE = "ltpipe error: the dvc process that started this stage{} exited; stopping so a re-run does not collide"

STAGE = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from ltpipe.core.errors import main_guard

    @main_guard
    def main():
        out = Path(sys.argv[1])
        try:
            (out / "threads").write_text(" ".join(t.name for t in threading.enumerate()))
            time.sleep(float(sys.argv[2]))
            (out / "finished").write_text("")
        finally:
            (out / "cleaned_up").write_text("")

    main()
""")

# Stands in for `dvc repro`: starts the stage command as DVC's stage/run.py does (its own
# environment plus DVC_STAGE, through `$SHELL -c`), then lives for argv[3] seconds.
FAKE_DVC = textwrap.dedent("""
    import os, subprocess, sys, time
    subprocess.Popen([sys.argv[1], "-c", sys.argv[2]], env=dict(os.environ, DVC_STAGE="train"))
    time.sleep(float(sys.argv[3]))
""")

# case: (shell, stage command template, how the stand-in dvc dies, seconds the stand-in lives, stage's sleep)
CASES = {
    "sigterm_dvc_dash_stays_parent": ("/bin/sh", "{py} {stage} {out} 60", signal.SIGTERM, 60, None),
    "sigkill_dvc_bash_execs_stage": ("/bin/bash", "{py} {stage} {out} 60", signal.SIGKILL, 60, None),
    # torchrun's layout: one more process between the shell and Python, carrying DVC_STAGE too.
    "sigterm_dvc_two_wrappers": ("/bin/sh", "/bin/sh -c '{py} {stage} {out} 60'; true", signal.SIGTERM, 60, None),
    "dvc_gone_before_stage_started": ("/bin/sh", "sleep 1; {py} {stage} {out} 60", None, 0, None),
    "dvc_alive_stage_finishes": ("/bin/sh", "{py} {stage} {out} 1", None, 60, "finished"),
}


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running(stage, besides: int) -> list:
    """The stage's processes (and the shells around it), not counting the stand-in dvc."""
    alive = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if str(stage) in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE \
                and proc.pid != besides:
            alive.append(proc.pid)
    return alive


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_stage_stops_when_its_dvc_process_dies(case, tmp_path):
    shell, command, kill, dvc_lives, expected = CASES[case]
    stage = tmp_path / "stage.py"
    stage.write_text(STAGE)
    stderr = tmp_path / "stderr.txt"
    stage_command = command.format(py=sys.executable, stage=stage, out=tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("DVC_STAGE", None)
    with open(stderr, "w") as err:
        fake_dvc = subprocess.Popen([sys.executable, "-c", FAKE_DVC, shell, stage_command, str(dvc_lives)],
                                    env=env, stderr=err, start_new_session=True)
    try:
        if dvc_lives == 0:  # the stage may be stopped before its body runs
            wait_for(lambda: "ltpipe error" in stderr.read_text(), 30, "the stage to start and see dvc gone")
        else:
            wait_for(lambda: (tmp_path / "threads").exists(), 30, "the stage to start")
            assert "ltpipe-dvc-watcher" in (tmp_path / "threads").read_text()
        if kill is not None:
            fake_dvc.send_signal(kill)
            fake_dvc.wait()
        killed_at = time.monotonic()
        wait_for(lambda: not running(stage, besides=fake_dvc.pid), 5, "the stage to stop")
        print(f"{case}: the stage ended {time.monotonic() - killed_at:.2f} s after dvc")
    finally:
        os.killpg(fake_dvc.pid, signal.SIGKILL)
        fake_dvc.wait()
    text = stderr.read_text()
    if (tmp_path / "threads").exists():
        assert (tmp_path / "cleaned_up").exists(), "the stage did not unwind (its finally block never ran)"
    if expected == "finished":
        assert (tmp_path / "finished").exists() and "ltpipe error" not in text, text
        return
    assert not (tmp_path / "finished").exists()
    which = "" if kill is None else f" (pid {fake_dvc.pid})"
    assert MESSAGE.format(which) in text, text
    assert "Traceback" not in text, text


def test_a_stage_run_directly_has_no_watcher(tmp_path):
    stage = tmp_path / "stage.py"
    stage.write_text(STAGE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("DVC_STAGE", None)
    done = subprocess.run([sys.executable, str(stage), str(tmp_path), "0"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ltpipe-dvc-watcher" not in (tmp_path / "threads").read_text()


# The slow case: a real `dvc repro`, killed alone while training runs (SIGTERM, SIGKILL) and
# while extraction runs with a DataLoader worker; an immediate re-run must succeed and give
# an uninterrupted run's result.
def is_stage(cmdline, module: str) -> bool:
    return f"stages.{module}" in " ".join(cmdline or [])


def stage_pids(repo, module: str) -> list:
    alive = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        if proc.info["cwd"] == str(repo) and is_stage(proc.info["cmdline"], module) \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            alive.append(proc.pid)
    return alive


def saved_shards(repo) -> int:
    """Shards saved so far by a running extraction (of any split: each split's go when it is assembled)."""
    return len(list((repo / "data/partial").glob("*-*/*.npz")))


SLOW_CASES = {  # fault id: (stage it lands in, signal to dvc, when to send it)
    "sigterm_dvc_during_train": ("train", signal.SIGTERM, lambda repo: epochs_logged(repo) >= 2),
    "sigterm_dvc_during_extract": ("extract", signal.SIGTERM, lambda repo: saved_shards(repo) >= 1),
}


def features_md5(repo) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return next(out["md5"] for out in lock["extract"]["outs"] if out["path"] == "data/features")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dvc_killed_alone_mid_stage"])
def test_killing_dvc_alone_stops_the_stage_and_a_rerun_works(case, extracted, uninterrupted, tmp_path,
                                                              record_property):
    record_property("faults", len(SLOW_CASES))  # bench/reliability.py counts each kill
    for fault, (module, sig, when) in SLOW_CASES.items():
        repo = tmp_path / fault
        shutil.copytree(extracted, repo, symlinks=True)
        if module == "extract":
            params = yaml.safe_load((repo / "params.yaml").read_text())
            params["extract"]["workers"] = 1  # a DataLoader worker process, which must end too
            # A shard a batch, so the extraction is seen mid-way: with one shard a split (the default
            # size), a split's only shard is assembled and removed at once, and the poll can miss it.
            params["extract"]["checkpoint_every"] = 1
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            shutil.rmtree(repo / "data/features")
        target = "evaluate" if module == "train" else "extract"
        process = subprocess.Popen(["dvc", "repro", target], cwd=repo, env=dict(dvc_repo.env(), SHELL="/bin/sh"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not when(repo):
                assert process.poll() is None, f"{fault}: the pipeline ended before the kill"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert stage_pids(repo, module), f"{fault}: the {module} stage's process was not found"
            process.send_signal(sig)  # dvc alone, not its process group
            process.wait(timeout=30)
            killed_at = time.monotonic()
            while survivors := stage_pids(repo, module):
                # the watcher's poll, then the stage's own clean-up, bounded by its grace period
                assert time.monotonic() - killed_at < DVC_WATCH_INTERVAL_S + STOP_GRACE_S + 1, \
                    f"{fault}: {module} processes {survivors} outlived dvc"
                time.sleep(0.05)
            print(f"{fault}: the stage ended {time.monotonic() - killed_at:.2f} s after dvc")
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group, if the check failed
        if module == "train":
            killed_at_epoch = epochs_logged(repo)
            assert 2 <= killed_at_epoch < EPOCHS, f"{fault}: killed after {killed_at_epoch} epochs"
            dvc_repo.run(repo, "dvc", "repro", "evaluate")
            assert outcome(repo) == uninterrupted, fault
        else:
            dvc_repo.run(repo, "dvc", "repro", "extract")
            assert features_md5(repo) == features_md5(extracted), fault
