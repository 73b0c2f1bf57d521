"""Benchmark (issue 19): the default sweep's losses as queued DVC experiments, run one and two at a time.

A throw-away copy of the project (git + DVC, the embedded default) is reproduced once up to `evaluate`;
then one experiment per single-label loss of `sweep.losses` is queued (`dvc exp run --queue -S loss=X
evaluate`: train and evaluate, the features are shared) and the queue is run with `dvc exp run --run-all
-j N` for N = 1 and 2, side by side in this run. It prints the wall time of each and the speed-up.

Run: .venv/bin/python -m bench.exp_queue [--record]      (about 6 minutes on 2 cores)
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from bench import results
from tests import dvc_repo
from tests.conftest import REPO

SINGLE_LABEL = ("ce", "focal", "cbw", "cb", "bsm", "la", "ldam", "grw", "lade")


def _run(repo: Path, *args: str) -> str:
    return dvc_repo.run(repo, *args).stdout


def _project(path: Path) -> Path:
    """The project at its defaults (the embedded default, not the tests' small sizes), reproduced."""
    repo = dvc_repo.make(path, overrides={})
    _run(repo, "dvc", "repro", "evaluate")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "reproduced")
    return repo


def _queue_and_run(repo: Path, losses, jobs: int) -> float:
    for loss in losses:
        _run(repo, "dvc", "exp", "run", "--queue", "-n", f"{loss}-j{jobs}", "-S", f"loss={loss}", "evaluate")
    started = time.perf_counter()
    _run(repo, "dvc", "exp", "run", "--run-all", "-j", str(jobs))
    seconds = time.perf_counter() - started
    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    done = sum(1 for rev in shown for exp in (rev.get("experiments") or [])
               if str(exp.get("name", "")).endswith(f"-j{jobs}") and exp["revs"][0].get("data", {}).get("metrics"))
    if done < len(losses):
        raise SystemExit(f"only {done} of {len(losses)} experiments of -j {jobs} finished")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    sweep = yaml.safe_load((REPO / "params.yaml").read_text())["sweep"]["losses"]
    losses = [loss for loss in sweep if loss in SINGLE_LABEL]
    with tempfile.TemporaryDirectory() as tmp:
        repo = _project(Path(tmp) / "project")
        times = {jobs: _queue_and_run(repo, losses, jobs) for jobs in (1, 2)}
    per = {jobs: seconds / len(losses) for jobs, seconds in times.items()}
    for jobs, seconds in times.items():
        print(f"dvc exp run --run-all -j {jobs}: {len(losses)} experiments in {seconds:.1f} s "
              f"({per[jobs]:.1f} s each)")
    print(f"speed-up of -j 2 over -j 1: {times[1] / times[2]:.2f}x")
    if args.record:
        what = f"{len(losses)} queued experiments (the default sweep's single-label losses, train + evaluate each)"
        rows = [(f"{what}, `dvc exp run --run-all -j {jobs}`", f"{seconds:.1f} s ({per[jobs]:.1f} s an experiment)")
                for jobs, seconds in times.items()]
        rows.append(("speed-up, -j 2 over -j 1", f"{times[1] / times[2]:.2f}x"))
        results.record(results.section_key("exp_queue.py"), "python -m bench.exp_queue", rows)


if __name__ == "__main__":
    main()
