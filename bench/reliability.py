"""The reliability suite's figures (issue 9): runs ``tests/reliability`` and prints one table.

Each test there is parametrized by the fault it injects (the id in brackets); a fault
counts as handled when its test passes. Rows: bad images by kind (each tried through
prepare and extract, failing by default and skipped with ``on_bad_image: skip``), bad
lists and params by case (refused before any expensive work, the message naming the
problem and the fix), determinism by head, kills, safe loading, concurrency.

Run: .venv/bin/python bench/reliability.py [--record]   (about 6 minutes on 2 cores; --record writes the
     table, the number of tests and the run time to docs/results.md)
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

REPO = Path(__file__).resolve().parents[1]
KILLS = ("kills (SIGKILL): extraction resumes byte-identical, never an incomplete file; training re-run by "
         "`dvc repro` equals an uninterrupted run")
CATEGORIES = {  # test module -> the table's category and what "handled" means there
    "test_bad_images": "bad images (fail by default, recorded skip), by kind",
    "test_bad_inputs": "bad lists and params (refused before work, problem and fix named), by case",
    "test_determinism": "determinism: same seed, identical metrics JSON; another seed, another run (by head)",
    "test_extract_kills": KILLS,
    "test_train_kills": KILLS,
    "test_safe_loading": "safe loading: no code runs from a file, damaged files named",
    "test_concurrency": "concurrency: two queued experiments with `dvc queue start -j 2`, correct and distinct",
    # Round 2 (issue 15): the classes an independent adversarial test found.
    "test_stale_inputs": "stale inputs: images changed in place are never extracted from their old record",
    "test_cache_integrity": "cache integrity: bytes changed inside a feature file are found before use",
    "test_list_files": "list and class-name files: encodings, shapes, links, duplicates (named, with the fix)",
    "test_image_modes": "image modes and shapes: each mode converted against independent pixels, or refused",
    "test_training_outcomes": "training outcomes: a worse stage 2 or a run at chance is never shipped silently",
    "test_disk_full": "disk full: the path and the space named, resumable work kept, the rest cleaned",
    "test_orphans": "orphans: a stage stops when the dvc process that started it dies",
    "test_user_view": "what the user sees: plots, lock, sweep and exp show as documented",
}


def run_suite(junit: Path) -> None:
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                    f"--junitxml={junit}", "-o", "junit_family=xunit1", "tests/reliability"], cwd=REPO, check=False)


def tally(junit: Path):
    """``{category: {fault: [passed, tried]}}`` from a JUnit XML report."""
    table = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        match = re.search(r"\[(.+)\]$", case.get("name", ""))
        if module not in CATEGORIES or not match:
            continue
        if case.find("skipped") is not None:
            continue
        failed = case.find("failure") is not None or case.find("error") is not None
        # A test that injects several faults in one run says how many (record_property "faults").
        faults = int(next((p.get("value") for p in case.iter("property") if p.get("name") == "faults"), 1))
        cell = table[CATEGORIES[module]][match.group(1)]
        cell[0] += 0 if failed else faults
        cell[1] += faults
    return table


def table_rows(table) -> list:
    """The table printed and recorded: per category a bold line of all its faults, then each fault."""
    rows = []
    for category, faults in table.items():
        handled = sum(v[0] for v in faults.values())
        tried = sum(v[1] for v in faults.values())
        rows.append((category, f"**all {len(faults)}**", f"**{handled} / {tried}**"))
        rows += [("", fault, f"{ok} / {n}") for fault, (ok, n) in faults.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the table to docs/results.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        run_suite(junit)
        minutes, seconds = divmod(round(time.perf_counter() - started), 60)
        tests = sum(1 for _ in ET.parse(junit).getroot().iter("testcase"))
        table = tally(junit)
    rows = table_rows(table)
    print("\n| category | fault | handled / tried |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.record:
        handled = sum(v[0] for faults in table.values() for v in faults.values())
        tried = sum(v[1] for faults in table.values() for v in faults.values())
        rows.append(("**total**", "", f"**{handled} / {tried}**"))
        note = (f"{tests} tests, {minutes} min {seconds} s. Each test in `tests/reliability/` is parametrized by the "
                "fault it injects; a fault counts as handled when its test passes (a test that injects several "
                "records how many).")
        results.record(results.section_key(__file__), "python bench/reliability.py", rows,
                       ("category", "fault", "handled / tried"), note)


if __name__ == "__main__":
    main()
