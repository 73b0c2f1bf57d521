"""Benchmark: manifest building and image scanning (issue 3).

1. `prepare` on a generated 100,000-line single-label list with every file's
   existence checked, against only parsing the lists (the validation overhead).
2. The image scan rate (decode every image) on the real CIFAR-10-LT JPEGs in
   ../shared, with one process and with two, side by side.

Run: .venv/bin/python bench/datasets.py [--record]   (--record: write the figures to docs/results.md)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ltpipe.data.formats import read_classnames, read_list
from ltpipe.data.manifest import build
from ltpipe.data.scan import scan
from ltpipe.data.source import DatasetSource, PrepareOptions

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-lt"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _write_split(root: Path, split: str, labels) -> None:
    rows = []
    for i, label in enumerate(labels):
        rel = f"{split}/{label:04d}/{i:06d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
        rows.append(f"{rel} {label}")
    (root / f"{split}.txt").write_text("\n".join(rows) + "\n")


def bench_manifest(lines: int = 100_000, classes: int = 1000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_split(root, "train", [i % classes for i in range(lines)])
        _write_split(root, "val", range(classes))
        _write_split(root, "test", range(classes))
        (root / "names.txt").write_text("".join(f"class{c}\n" for c in range(classes)))
        source = DatasetSource("custom", root, {s: root / f"{s}.txt" for s in ("train", "val", "test")},
                               root / "names.txt", False)
        _, parse_only = timed(lambda: ([read_list(source.lists[s], False) for s in source.lists],
                                       read_classnames(source.classnames)))
        prepared, full = timed(lambda: build(source, PrepareOptions()))
        n = len(prepared.manifest)
        print(f"manifest: {n:,} lines; parse only {parse_only:.2f} s, full prepare with existence checks "
              f"{full:.2f} s ({n / full:,.0f} lines/s); validation overhead x{full / parse_only:.1f}")
        return [(f"`prepare` of a {n:,}-line list, every file's existence checked",
                 f"{full:.2f} s ({n / full:,.0f} lines/s; parsing alone {parse_only:.2f} s)")]


def bench_scan() -> None:
    if not CIFAR.is_dir():
        print(f"scan: skipped, {CIFAR} is absent")
        return []
    paths = [rel for name in ("CIFAR10_LT_train.txt", "CIFAR10_LT_test.txt")
             for rel, _ in read_list(CIFAR / name, False)]
    root = CIFAR / "images"
    for rel in paths:  # warm the page cache, so neither timing pays the first disk read
        (root / rel).read_bytes()
    one, t1 = timed(lambda: scan(root, paths, workers=0))
    two, t2 = timed(lambda: scan(root, paths, workers=2))
    assert not one.bad and not two.bad
    print(f"scan: {len(paths):,} CIFAR-10-LT JPEGs (32x32); 1 process {len(paths) / t1:,.0f} img/s, "
          f"2 processes {len(paths) / t2:,.0f} img/s; ratio x{t1 / t2:.2f}")
    return [(f"image scan of the {len(paths):,} real CIFAR-10-LT JPEGs (warm cache)",
             f"{len(paths) / t1:,.0f} img/s with 1 process, {len(paths) / t2:,.0f} img/s with 2 (x{t1 / t2:.2f})")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    rows = bench_manifest() + bench_scan()
    if args.record:
        results.record(results.section_key(__file__), "python bench/datasets.py", rows)
    sys.exit(0)
