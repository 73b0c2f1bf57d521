"""Validated manifests and class tables: what every later stage reads.

``manifest.csv``: one row per image, columns ``split, path, labels`` (labels
space-separated). ``classes.csv``: ``index, id, name, prompt, train_count,
group``. ``dataset.json``: name, task, image root, class count and split sizes.

Groups come from training counts. Single-label: many > 100, medium 20-100,
few < 20 (Liu et al., OLTR, CVPR 2019). Multi-label: head >= 100, medium 20-99,
tail < 20 (Wu et al., ECCV 2020; CPRFL).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from ltpipe.data.formats import Entry, read_classnames, read_list
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
    """Where a dataset's files are: an image root, one list per split, a class-name file."""

    name: str
    root: Path
    lists: Dict[str, Path]
    classnames: Path
    multilabel: bool


@dataclass
class Prepared:
    """A prepared dataset as later stages read it."""

    name: str
    multilabel: bool
    root: Path
    manifest: pd.DataFrame
    classes: pd.DataFrame

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


def build(source: DatasetSource, check_files: bool = True) -> Prepared:
    names = read_classnames(source.classnames)
    num_classes = len(names)
    entries = {split: read_list(path, source.multilabel) for split, path in source.lists.items()}
    for split in SPLITS:
        if split not in entries:
            raise DataError(f"dataset {source.name!r} has no {split} list. Set its `{split}_list` in params.yaml.")
    _check_labels(entries, num_classes, source)
    if check_files:
        _check_files(entries, source.root)

    counts = np.zeros(num_classes, dtype=np.int64)
    for _, labels in entries["train"]:
        for label in set(labels):
            counts[label] += 1
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = ", ".join(f"{i} ({names[i]})" for i in empty[:5])
        raise DataError(
            f"{len(empty)} class(es) of {source.name!r} have no training image: {shown}"
            f"{' ...' if len(empty) > 5 else ''}. Check the train list and the class-name file "
            f"({source.classnames}) describe the same classes."
        )

    manifest = pd.DataFrame(
        [(split, rel, " ".join(str(x) for x in labels)) for split in SPLITS for rel, labels in entries[split]],
        columns=["split", "path", "labels"],
    )
    ids, display = zip(*(_split_id(n) for n in names))
    classes = pd.DataFrame({
        "index": np.arange(num_classes),
        "id": ids,
        "name": display,
        "prompt": [prompt_name(n) for n in display],
        "train_count": counts,
        "group": [group_of(int(n), source.multilabel) for n in counts],
    })
    return Prepared(source.name, source.multilabel, Path(source.root), manifest, classes)


def _split_id(line: str):
    """``n01440764 tench`` -> (``n01440764``, ``tench``); a bare name is its own id."""
    parts = line.split(maxsplit=1)
    if len(parts) == 2 and parts[0][:1].isalpha() and parts[0][1:].isdigit():
        return parts[0], parts[1]
    return line, line


def prompt_name(name: str) -> str:
    return name.replace("_", " ").strip()


def _check_labels(entries: Dict[str, List[Entry]], num_classes: int, source: DatasetSource) -> None:
    for split, items in entries.items():
        for rel, labels in items:
            bad = [x for x in labels if not 0 <= x < num_classes]
            if bad:
                raise DataError(
                    f"{source.lists[split]}: label {bad[0]} of {rel} is out of range: {source.classnames} "
                    f"names {num_classes} classes, so labels must be 0..{num_classes - 1}. Fix the list "
                    "or the class-name file."
                )


def _check_files(entries: Dict[str, List[Entry]], root: Path) -> None:
    if not Path(root).is_dir():
        raise DataError(f"image root {root} does not exist. Set the dataset's `root` in params.yaml.")
    missing = [rel for items in entries.values() for rel, _ in items if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        shown = ", ".join(missing[:3])
        raise DataError(
            f"{len(missing)} image(s) listed are missing under {root} (first: {shown}). "
            "Check the dataset's `root` in params.yaml points at the folder the list paths are relative to."
        )


def save(prepared: Prepared, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared.manifest.to_csv(out_dir / "manifest.csv", index=False)
    prepared.classes.to_csv(out_dir / "classes.csv", index=False)
    root = Path(prepared.root)
    meta = {
        "name": prepared.name,
        "task": prepared.task,
        "root": str(root),
        "num_classes": prepared.num_classes,
        "splits": {s: int((prepared.manifest["split"] == s).sum()) for s in SPLITS},
        "groups": prepared.classes["group"].value_counts().to_dict(),
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def load(prepared_dir: Path) -> Prepared:
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: the prepare stage has not run. Run `dvc repro prepare`.")
    meta = json.loads(meta_path.read_text())
    manifest = pd.read_csv(prepared_dir / "manifest.csv", dtype={"labels": str}, keep_default_na=False)
    classes = pd.read_csv(prepared_dir / "classes.csv", keep_default_na=False)
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
