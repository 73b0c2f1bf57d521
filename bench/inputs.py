"""What the `inputs` stage costs on every `dvc repro`: its command on trees of small files, next to
the floor of any check that looks at every listed file (one ``os.stat`` each) and an empty Python.

    python -m bench.inputs [--dir /tmp/ltpipe-bench-inputs] [--record]

Generates, once, two `custom` datasets of small files (100 bytes each, so the time is the per-file
cost, not reading): a 38,000-image tree (1,000 class folders) and an iNaturalist-2018-shaped one,
437,513 training lines over 8,142 class folders (the published train list's size). For each, the
stage command (``python -m stages.inputs``, in a work folder whose params.yaml names the dataset)
runs three times, printed side by side: with an empty stat cache (every file read and hashed),
with nothing changed (the cost every `dvc repro` pays: the issue's budget is 1 s for 38k files and
5 s for 437k lines, on 2 cores), and after one image is rewritten in place. The floors, measured in
the same run: ``python -c pass``, and one ``os.stat`` per listed file from a warm dentry cache.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

REPO = Path(__file__).resolve().parents[1]
TREES = {"tree38k": (38_000, 1_000), "inat437k": (437_513, 8_142)}


def make_tree(root: Path, images: int, classes: int) -> Path:
    """``images`` files of 100 distinct bytes in ``classes`` folders, a train list naming them all, and
    one-line val/test lists; made once (``done`` marks a finished tree)."""
    done = root / "done"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        label = i % classes
        rel = f"train_val2018/c{label:05d}/{i:07d}.jpg"
        if i < classes:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(i.to_bytes(8, "little") * 12 + b"jpeg")
        lines.append(f"{rel} {label}\n")
    (root / "train.txt").write_text("".join(lines))
    (root / "val.txt").write_text(lines[0])
    (root / "test.txt").write_text(lines[1])
    (root / "classnames.txt").write_text("".join(f"class {c}\n" for c in range(classes)))
    done.write_text("")
    time.sleep(2.1)  # past the stat cache's racy window: every file is cacheable
    return root


def workspace(work: Path, root: Path) -> Path:
    """A folder whose params.yaml names ``root`` as a `custom` dataset (the stage reads no other file)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"] = "custom"
    params["datasets"]["custom"].update(root=str(root), train_list="train.txt", val_list="val.txt",
                                        test_list="test.txt", classnames="classnames.txt")
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def timed_command(args, cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def stat_floor(root: Path) -> float:
    rels = [line.split()[0] for line in (root / "train.txt").read_text().splitlines()]
    started = time.perf_counter()
    for rel in rels:
        os.stat(os.path.join(root, rel))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ltpipe-bench-inputs")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), LTPIPE_CACHE_DIR=str(args.dir / "cache"))
    args.dir.mkdir(parents=True, exist_ok=True)
    python_s = min(timed_command([sys.executable, "-c", "pass"], args.dir, env) for _ in range(3))
    stage = [sys.executable, "-m", "stages.inputs"]
    rows = []
    for name, (images, classes) in TREES.items():
        print(f"{name}: {images:,} files in {classes:,} folders ...", flush=True)
        root = make_tree(args.dir / name, images, classes)
        work = workspace(args.dir / f"work-{name}", root)
        (args.dir / "cache" / "file-hashes.sqlite").unlink(missing_ok=True)
        (work / "data/inputs/dataset.json").unlink(missing_ok=True)
        first = timed_command(stage, work, env)
        unchanged = min(timed_command(stage, work, env) for _ in range(3))
        edited = root / "train_val2018/c00000/0000000.jpg"
        before = edited.stat()
        edited.write_bytes(b"x" * before.st_size)
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime kept: ctime tells
        one_edit = timed_command(stage, work, env)
        floor = stat_floor(root)
        rows.append((name, images + 2, first, unchanged, one_edit, floor))
        edited.write_bytes(0 .to_bytes(8, "little") * 12 + b"jpeg")

    print(f"\n`python -m stages.inputs` (an empty Python: {python_s:.3f}s)")
    print(f"  {'tree':9s} {'files':>8s} {'cache empty':>11s} {'unchanged':>10s} {'1 edit':>8s} "
          f"{'os.stat floor':>13s} {'unchanged / (python + floor)':>29s}")
    for name, files, first, unchanged, one_edit, floor in rows:
        print(f"  {name:9s} {files:8,d} {first:10.2f}s {unchanged:9.2f}s {one_edit:7.2f}s {floor:12.2f}s "
              f"{unchanged / (python_s + floor):28.2f}x")
    if args.record:
        measured = [(f"`inputs` stage, {name} ({files:,} files of 100 bytes), nothing changed",
                     f"{unchanged:.2f} s (floor: python {python_s:.2f} s + one os.stat per file {floor:.2f} s = "
                     f"{python_s + floor:.2f} s; {unchanged / (python_s + floor):.1f}x); empty stat cache "
                     f"{first:.2f} s; one image rewritten with size and mtime kept {one_edit:.2f} s")
                    for name, files, first, unchanged, one_edit, floor in rows]
        results.record(results.section_key("inputs.py"), "python -m bench.inputs", measured)


if __name__ == "__main__":
    main()
