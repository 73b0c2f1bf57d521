"""Validated manifests and class tables: what every later stage reads.

``manifest.csv``: one row per image, columns ``split, path, labels`` (labels
space-separated). ``classes.csv``: ``index, id, name, prompt, train_count,
list_count, group``: ``train_count`` counts the images trained on, ``list_count``
those of the published training list (they differ when a validation split is
carved from it), and ``group`` follows ``list_count``, the benchmark's definition.
``dataset.json``: name, task, image root, class count and split sizes.
``report.json``: what prepare found and did (carved split, scanned modes, skips).

Groups come from training counts. Single-label: many > 100, medium 20-100,
few < 20 (Liu et al., OLTR, CVPR 2019). Multi-label: head >= 100, medium 20-99,
tail < 20 (Wu et al., ECCV 2020; CPRFL).
"""

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from ltpipe.data.formats import Entry, curated_prompts, read_classnames, read_list
from ltpipe.data.scan import scan
from ltpipe.errors import DataError

SPLITS = ("train", "val", "test")
SINGLE_GROUPS = ("many", "medium", "few")
MULTI_GROUPS = ("head", "medium", "tail")


def group_of(train_count: int, multilabel: bool) -> str:
    if multilabel:
        return "head" if train_count >= 100 else "medium" if train_count >= 20 else "tail"
    return "many" if train_count > 100 else "medium" if train_count >= 20 else "few"


@dataclass
class DatasetSource:
    """Where a dataset's files are: an image root, one list per split, a class-name file.

    A ``None`` validation list means "carve one from train" (``PrepareOptions.val_fraction``).
    """

    name: str
    root: Path
    lists: Dict[str, Optional[Path]]
    classnames: Path
    multilabel: bool
    names_format: str = "plain"
    expected_classes: Optional[int] = None


@dataclass
class PrepareOptions:
    scan_images: bool = False
    on_bad_image: str = "fail"  # fail | skip
    workers: int = 2
    val_fraction: float = 0.1
    split_seed: int = 0


ON_BAD_IMAGE = ("fail", "skip")


@dataclass
class Prepared:
    """A prepared dataset as later stages read it."""

    name: str
    multilabel: bool
    root: Path
    manifest: pd.DataFrame
    classes: pd.DataFrame
    report: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def task(self) -> str:
        return "multi" if self.multilabel else "single"

    def split(self, split: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)

    def label_array(self, split: str) -> np.ndarray:
        """int64 ``[N]`` for single-label, uint8 multi-hot ``[N, C]`` for multi-label."""
        rows = self.split(split)["labels"]
        parsed = [[int(x) for x in str(s).split()] if isinstance(s, str) and s else [] for s in rows]
        if not self.multilabel:
            return np.asarray([p[0] for p in parsed], dtype=np.int64)
        out = np.zeros((len(parsed), self.num_classes), dtype=np.uint8)
        for i, labels in enumerate(parsed):
            out[i, labels] = 1
        return out


def _shown(items, limit: int = 3) -> str:
    items = list(items)
    return ", ".join(str(x) for x in items[:limit]) + (" ..." if len(items) > limit else "")


def build(source: DatasetSource, options: Optional[PrepareOptions] = None, check_files: bool = True) -> Prepared:
    """Read, validate and assemble a dataset. Every problem raises a :class:`DataError`
    naming the file and the fix, before any feature is computed."""
    options = options or PrepareOptions()
    pairs = read_classnames(source.classnames, source.names_format)
    ids, names = [p[0] for p in pairs], [p[1] for p in pairs]
    num_classes = len(names)
    if source.expected_classes is not None and num_classes != source.expected_classes:
        raise DataError(
            f"{source.classnames} names {num_classes} classes, but {source.name} has {source.expected_classes}. "
            "Point the dataset's `classnames` at its own class-name file.")
    entries = {split: read_list(path, source.multilabel) for split, path in source.lists.items() if path is not None}
    for split in ("train", "test"):
        if split not in entries:
            raise DataError(f"dataset {source.name!r} has no {split} list. Set its `{split}_list` in params.yaml.")
    entries = _check_paths(entries, source)
    _check_labels(entries, num_classes, source)
    _check_leakage(entries, source)
    _check_every_class_trained(entries["train"], num_classes, names, source)  # before the (slow) scan
    report: dict = {"dataset": source.name}
    if check_files:
        entries, missing = _check_files(entries, source.root, options.on_bad_image == "skip")
        if missing:
            report["missing_skipped"] = missing
    if options.scan_images:
        entries, report["scan"] = _scan(entries, source, options)
    # Groups follow the published training list, before any validation split is carved
    # from it, so head/medium/tail match the benchmark's definition.
    list_counts = _class_counts(entries["train"], num_classes)
    if "val" not in entries:
        entries["train"], entries["val"] = carve_validation(
            entries["train"], num_classes, options.val_fraction, options.split_seed, source.multilabel)
        if not entries["val"]:
            raise DataError(f"no validation image could be carved from {source.name}'s train list: every class "
                            "is too small. Give a `val_list`, or raise `prepare.val_fraction`.")
        report["validation"] = {"carved_from_train": len(entries["val"]), "fraction": options.val_fraction,
                                "seed": options.split_seed}

    counts = _check_every_class_trained(entries["train"], num_classes, names, source)  # after skips

    manifest = pd.DataFrame(
        [(split, rel, " ".join(str(x) for x in labels)) for split in SPLITS for rel, labels in entries[split]],
        columns=["split", "path", "labels"],
    )
    classes = pd.DataFrame({
        "index": np.arange(num_classes),
        "id": ids,
        "name": names,
        "prompt": curated_prompts(ids, names),
        "train_count": counts,
        "list_count": list_counts,
        "group": [group_of(int(n), source.multilabel) for n in list_counts],
    })
    report["images"] = {s: len(entries[s]) for s in SPLITS}
    report["classes"] = num_classes
    report["groups"] = {g: int((classes["group"] == g).sum()) for g in groups_for(source.multilabel)}
    report["train_count"] = {"max": int(counts.max()), "min": int(counts.min())}
    return Prepared(source.name, source.multilabel, Path(source.root), manifest, classes, report)


def _check_every_class_trained(train: List[Entry], num_classes: int, names: List[str],
                               source: DatasetSource) -> np.ndarray:
    counts = _class_counts(train, num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(
            f"{len(empty)} class(es) of {source.name!r} have no training image: "
            f"{_shown(f'{i} ({names[i]})' for i in empty)}. The class-name file ({source.classnames}, "
            f"{num_classes} classes) and the train list must describe the same classes.")
    return counts


def _check_paths(entries: Dict[str, List[Entry]], source: DatasetSource) -> Dict[str, List[Entry]]:
    """Refuse paths leaving the root (as written in the list); return the entries with
    normalised paths, so `./a.jpg` and `a.jpg` are one image to the duplicate and leakage checks."""
    normalised = {}
    for split, items in entries.items():
        escaping = [rel for rel, _ in items
                    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/")]
        if escaping:
            raise DataError(
                f"{source.lists[split]}: {len(escaping)} path(s) leave the dataset root ({_shown(escaping)}). "
                "List paths must be relative to `root` and stay inside it.")
        items = [(posixpath.normpath(rel.replace("\\", "/")), labels) for rel, labels in items]
        seen, dupes = set(), []
        for rel, _ in items:
            if rel in seen:
                dupes.append(rel)
            seen.add(rel)
        if dupes:
            raise DataError(f"{source.lists[split]}: {len(dupes)} path(s) listed twice ({_shown(dupes)}). "
                            "Remove the duplicate lines.")
        normalised[split] = items
    return normalised


def _check_labels(entries: Dict[str, List[Entry]], num_classes: int, source: DatasetSource) -> None:
    for split, items in entries.items():
        for rel, labels in items:
            bad = [x for x in labels if not 0 <= x < num_classes]
            if bad:
                raise DataError(
                    f"{source.lists[split]}: label {bad[0]} of {rel} is out of range: {source.classnames} "
                    f"names {num_classes} classes, so labels must be 0..{num_classes - 1}. The class count "
                    "disagrees with the names file: fix the list or point `classnames` at the right file.")


def _check_leakage(entries: Dict[str, List[Entry]], source: DatasetSource) -> None:
    test = {rel for rel, _ in entries["test"]}
    for split in ("train", "val"):
        if split in entries:
            shared = [rel for rel, _ in entries[split] if rel in test]
            if shared:
                raise DataError(
                    f"{len(shared)} image(s) are in both the {split} and the test list of {source.name} "
                    f"({_shown(shared)}). Remove them from one list: evaluation must not see training images.")


def _check_files(entries: Dict[str, List[Entry]], root: Path, skip: bool):
    """Every listed image must exist; with ``skip``, missing ones are dropped and returned."""
    if not Path(root).is_dir():
        raise DataError(f"image root {root} does not exist. Set the dataset's `root` in params.yaml.")
    missing = [rel for items in entries.values() for rel, _ in items if not os.path.isfile(os.path.join(root, rel))]
    if missing and not skip:
        raise DataError(
            f"{len(missing)} image(s) listed are missing under {root} (first: {_shown(missing)}). "
            "Check the dataset's `root` in params.yaml points at the folder the list paths are relative to, "
            "or set `prepare.on_bad_image: skip` to leave them out.")
    if missing:
        gone = set(missing)
        entries = {s: [e for e in items if e[0] not in gone] for s, items in entries.items()}
    return entries, sorted(missing)


def _scan(entries: Dict[str, List[Entry]], source: DatasetSource, options: PrepareOptions):
    paths = [rel for items in entries.values() for rel, _ in items]
    result = scan(source.root, paths, options.workers)
    summary = {"images": len(paths), "modes": dict(sorted(result.modes.items())),
               "converted_to_rgb": result.converted, "bad": dict(sorted(result.bad.items()))}
    if result.bad and options.on_bad_image == "fail":
        first = next(iter(sorted(result.bad.items())))
        raise DataError(
            f"{len(result.bad)} image(s) under {source.root} cannot be decoded (first: {first[0]}: {first[1]}). "
            "Replace them, or set `prepare.on_bad_image: skip` to leave them out (they are listed in "
            "data/prepared/report.json).")
    if result.bad:
        entries = {s: [e for e in items if e[0] not in result.bad] for s, items in entries.items()}
    return entries, summary


def _class_counts(items: List[Entry], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, labels in items:
        for label in set(labels):
            counts[label] += 1
    return counts


def carve_validation(train: List[Entry], num_classes: int, fraction: float, seed: int,
                     multilabel: bool) -> Tuple[List[Entry], List[Entry]]:
    """A stratified validation split taken from train, never emptying a class.

    Each class (multi-label: each image's rarest label) gives ``round(fraction * n)``
    images, fewer when taking one would leave one of its labels without training images.
    """
    counts = _class_counts(train, num_classes)
    strata: Dict[int, List[int]] = {}
    for i, (_, labels) in enumerate(train):
        key = min(labels, key=lambda c: (counts[c], c)) if labels else -1
        strata.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    remaining = counts.copy()
    chosen = set()
    for key in sorted(strata):
        members = strata[key]
        quota = int(np.floor(fraction * len(members) + 0.5))
        for i in rng.permutation(members):
            if quota == 0:
                break
            labels = set(train[i][1])
            if all(remaining[c] > 1 for c in labels):
                chosen.add(int(i))
                quota -= 1
                for c in labels:
                    remaining[c] -= 1
    return ([e for i, e in enumerate(train) if i not in chosen], [e for i, e in enumerate(train) if i in chosen])


def save(prepared: Prepared, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared.manifest.to_csv(out_dir / "manifest.csv", index=False)
    prepared.classes.to_csv(out_dir / "classes.csv", index=False)
    meta = {
        "name": prepared.name,
        "task": prepared.task,
        "root": str(prepared.root),
        "num_classes": prepared.num_classes,
        "splits": {s: int((prepared.manifest["split"] == s).sum()) for s in SPLITS},
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "report.json").write_text(json.dumps(prepared.report, indent=2) + "\n")


def load(prepared_dir: Path) -> Prepared:
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: the prepare stage has not run. Run `dvc repro prepare`.")
    meta = json.loads(meta_path.read_text())
    manifest = pd.read_csv(prepared_dir / "manifest.csv", dtype={"labels": str}, keep_default_na=False)
    # Ids and names stay text even when they look like numbers (iNat ids, classes named "1").
    classes = pd.read_csv(prepared_dir / "classes.csv", keep_default_na=False,
                          dtype={"id": str, "name": str, "prompt": str})
    return Prepared(meta["name"], meta["task"] == "multi", Path(meta["root"]), manifest, classes)


def relative_to_cwd(path: Path) -> Path:
    """Keep paths inside the repository relative, so a moved clone still works."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def groups_for(multilabel: bool):
    return MULTI_GROUPS if multilabel else SINGLE_GROUPS


def optional_path(value: Optional[str], root: Path) -> Optional[Path]:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else root / p
