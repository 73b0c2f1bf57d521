"""Reliability (issue 9): two experiments queued and run at once share the DVC cache safely.

Two `dvc exp run --queue` experiments (different losses) run with `dvc queue start -j 2`.
Both must finish; each one's metrics must equal the same experiment run alone in the
workspace; they must differ from each other; and after applying each, `dvc status`
must find every output matching the shared cache.
"""

import json
import subprocess
import time

import psutil  # a dependency of dvc
import pytest

from tests import dvc_repo

pytestmark = pytest.mark.slow
LOSSES = ("bsm", "focal")  # not la: with tau 1 the logit-adjusted loss is Balanced Softmax


def exp_metrics(repo) -> dict:
    """``{experiment name: metrics/eval.json}`` of the finished experiments."""
    shown = json.loads(dvc_repo.run(repo, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                metrics = ((data.get("metrics") or {}).get("metrics/eval.json") or {}).get("data")
                if metrics and data.get("status", "Success") == "Success":
                    found[exp.get("name") or rev.get("name")] = metrics
    return found


@pytest.mark.parametrize("kind", ["queue_two_jobs"])
def test_two_queued_experiments_run_at_once(tmp_path_factory, kind):
    overrides = dict(dvc_repo.SMALL, sweep=dict(heads=["cosine"], losses=["ce"], seeds=[0]))  # a short baseline
    repo = dvc_repo.make(tmp_path_factory.mktemp("queue") / "repo", overrides)
    dvc_repo.run(repo, "dvc", "repro")
    dvc_repo.run(repo, "git", "add", "-A")
    dvc_repo.run(repo, "git", "commit", "-qm", "baseline")
    for loss in LOSSES:
        dvc_repo.run(repo, "dvc", "exp", "run", "--queue", "-n", f"q-{loss}", "-S", f"loss={loss}")
    # `dvc queue start` leaves a daemon behind that inherits its stdout and stderr: captured, the
    # call would wait for that daemon (and, when DVC's worker monitor shuts down mid-task and the
    # worker never exits, a DVC race seen here, forever). The queue's own status is what is waited for.
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=dvc_repo.env(), check=True, timeout=120,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while True:
            status = dvc_repo.run(repo, "dvc", "queue", "status").stdout
            if not any(word in status for word in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
        check_queued_results(repo, status)
    finally:
        stop_queue_processes(repo)


def stop_queue_processes(repo) -> None:
    """End what the queue left running in ``repo`` (a worker that missed its shutdown)."""
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["cwd"] == str(repo) and ("queue" in cmdline or "exec-run" in cmdline):
            proc.kill()


def check_queued_results(repo, status: str) -> None:
    assert "Failed" not in status, dvc_repo.run(repo, "dvc", "queue", "logs", "q-bsm", check=False).stdout
    queued = exp_metrics(repo)
    assert {f"q-{loss}" for loss in LOSSES} <= set(queued), (status, sorted(queued))
    assert queued["q-bsm"]["loss"] == "bsm" and queued["q-focal"]["loss"] == "focal"
    assert queued["q-bsm"]["nll"] != queued["q-focal"]["nll"]
    for loss in LOSSES:
        # The same experiment alone in the workspace gives the same metrics...
        dvc_repo.run(repo, "dvc", "exp", "run", "-n", f"w-{loss}", "-S", f"loss={loss}")
        alone = json.loads((repo / "metrics/eval.json").read_text())
        # `dvc exp show --json` leaves out null metrics (e.g. `many` when no class is many-shot).
        assert {k: v for k, v in alone.items() if v is not None} == queued[f"q-{loss}"], loss
        # ...and the queued one's outputs, applied, match the shared cache.
        dvc_repo.run(repo, "dvc", "exp", "apply", f"q-{loss}")
        assert dvc_repo.stale_stages(repo) == {}
