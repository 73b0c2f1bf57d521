"""Validated manifests and class tables: what every later stage reads.

``manifest.csv``: one row per image, columns ``split, path, labels, sha256`` (labels
space-separated; ``sha256``: the file's content hash, which extraction checks, see
:mod:`ltpipe.data.fingerprint`). ``classes.csv``: ``index, id, name, prompt, train_count,
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
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from ltpipe.core.errors import DataError
from ltpipe.data.checks import (
    check_every_class_trained,
    check_labels,
    check_leakage,
    check_listed_files,
    check_paths,
    class_counts,
)
from ltpipe.data.fingerprint import HashStats, hash_files
from ltpipe.data.formats import Entry, check_distinct_prompts, curated_prompts, read_classnames, read_list
from ltpipe.data.scan import scan
from ltpipe.data.source import SPLITS, DatasetSource, PrepareOptions
from ltpipe.data.validation_split import carve_report, carve_validation

# pandas is imported where tables are built or read: every stage imports this module (for the group names), and
# training on a feature cache must not pay for pandas nor need it (bench/gpu.py runs without it).
if TYPE_CHECKING:
    import pandas as pd

SINGLE_GROUPS = ("many", "medium", "few")
MULTI_GROUPS = ("head", "medium", "tail")


def group_of(train_count: int, multilabel: bool) -> str:
    if multilabel:
        return "head" if train_count >= 100 else "medium" if train_count >= 20 else "tail"
    return "many" if train_count > 100 else "medium" if train_count >= 20 else "few"


@dataclass
class Prepared:
    """A prepared dataset as later stages read it."""

    name: str
    multilabel: bool
    root: Path
    manifest: "pd.DataFrame"
    classes: "pd.DataFrame"
    report: dict = field(default_factory=dict)
    hash_stats: Optional[HashStats] = None  # what hashing cost this run (not saved: it varies by machine)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def task(self) -> str:
        return "multi" if self.multilabel else "single"

    def split(self, split: str) -> "pd.DataFrame":
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)

    def split_size(self, split: str) -> int:
        return int((self.manifest["split"] == split).sum())

    def content_hashes(self, split: str) -> Optional[List[str]]:
        """Prepare's content hash of each image of ``split``, or None if it recorded none."""
        if "sha256" not in self.manifest:
            return None
        hashes = self.split(split)["sha256"].tolist()
        return hashes if any(hashes) else None

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


def build(source: DatasetSource, options: Optional[PrepareOptions] = None, check_files: bool = True,
          hash_cache: Optional[Path] = None) -> Prepared:
    """Read, validate and assemble a dataset. Every problem raises a :class:`DataError`
    naming the file and the fix, before any feature is computed. With ``check_files``, every
    image's content hash is recorded (``hash_cache``: the stat cache that spares re-reading
    unchanged files; None: read every file)."""
    options = options or PrepareOptions()
    pairs = read_classnames(source.classnames, source.names_format)
    ids, names = [p[0] for p in pairs], [p[1] for p in pairs]
    num_classes = len(names)
    if source.expected_classes is not None and num_classes != source.expected_classes:
        raise DataError(
            f"{source.classnames} names {num_classes} classes, but {source.name} has {source.expected_classes}. "
            "Point the dataset's `classnames` at its own class-name file.")
    prompts = curated_prompts(ids, names)
    repeated_prompts = check_distinct_prompts(source.classnames, ids, names, prompts)
    if check_files:
        _check_root_sample(source, options)  # a wrong root shows in a few lines, before whole lists are read
    entries = {split: read_list(path, source.multilabel) for split, path in source.lists.items() if path is not None}
    for split in ("train", "test"):
        if split not in entries:
            raise DataError(f"dataset {source.name!r} has no {split} list. Set its `{split}_list` in params.yaml.")
    entries = check_paths(entries, source)
    check_labels(entries, num_classes, source)
    check_leakage(entries, source)
    report: dict = {"dataset": source.name}
    if repeated_prompts:
        report["repeated_prompts"] = repeated_prompts
    classes = (ids, names, prompts)
    entries, classes = check_every_class_trained(entries, classes, source, options, report)  # before the scan
    if check_files:
        entries = check_listed_files(entries, source, options, report)
    if options.scan_images:
        entries, report["scan"] = _scan(entries, source, options)
    entries, classes = check_every_class_trained(entries, classes, source, options, report)  # skips
    num_classes = len(classes[1])
    # Groups follow the published training list, before any validation split is carved
    # from it, so head/medium/tail match the benchmark's definition.
    list_counts = class_counts(entries["train"], num_classes)
    if "val" not in entries and options.val_fraction == 0:
        # The papers' protocol on lists without validation (COCO-LT, VOC-LT, iNaturalist-2018): train on every
        # listed image; training then keeps its last model (`train.select: last`).
        entries["val"] = []
        report["validation"] = {"none": True, "train_list_images": len(entries["train"])}
    elif "val" not in entries:
        entries["train"], entries["val"] = carve_validation(
            entries["train"], num_classes, options.val_fraction, options.split_seed, source.multilabel)
        report["validation"] = carve_report(entries, list_counts, classes[1], options, source)
    counts = class_counts(entries["train"], num_classes)
    manifest, hash_stats = _manifest_table(entries, source, check_files, hash_cache)
    class_table = _class_table(classes, counts, list_counts, source.multilabel)
    report["images"] = {s: len(entries[s]) for s in SPLITS}
    report["classes"] = num_classes
    report["groups"] = {g: int((class_table["group"] == g).sum()) for g in groups_for(source.multilabel)}
    report["train_count"] = {"max": int(counts.max()), "min": int(counts.min())}
    return Prepared(source.name, source.multilabel, Path(source.root), manifest, class_table, report, hash_stats)


def _manifest_table(entries: Dict[str, List[Entry]], source: DatasetSource, check_files: bool,
                    hash_cache: Optional[Path]) -> Tuple["pd.DataFrame", Optional[HashStats]]:
    """One row per listed image, split by split, with its content hash (``""`` without ``check_files``)."""
    import pandas as pd

    rows = [(split, rel, " ".join(str(x) for x in labels)) for split in SPLITS for rel, labels in entries[split]]
    hashes, hash_stats = [""] * len(rows), None
    if check_files:
        hashes, hash_stats = hash_files(source.root, [rel for _, rel, _ in rows], hash_cache)
    manifest = pd.DataFrame([(*row, digest) for row, digest in zip(rows, hashes)],
                            columns=["split", "path", "labels", "sha256"])
    return manifest, hash_stats


def _class_table(classes: Tuple[List[str], List[str], List[str]], counts: np.ndarray, list_counts: np.ndarray,
                 multilabel: bool) -> "pd.DataFrame":
    import pandas as pd

    ids, names, prompts = classes
    return pd.DataFrame({
        "index": np.arange(len(names)),
        "id": ids,
        "name": names,
        "prompt": prompts,
        "train_count": counts,
        "list_count": list_counts,
        "group": [group_of(int(n), multilabel) for n in list_counts],
    })


ROOT_SAMPLE = 20  # listed paths checked before whole lists are read


def _check_root_sample(source: DatasetSource, options: PrepareOptions) -> None:
    """Find a wrong image root from the first paths of each list, before reading whole lists:
    a 10-million-line list of missing files would otherwise take a minute and gigabytes to say so.
    With ``on_bad_image: skip``, only when no sampled image of any list exists (one list's sample
    may be a folder missing from the copy, which skipping is for)."""
    root = Path(source.root)
    if not root.is_dir():
        raise DataError(f"image root {root} does not exist. Set the dataset's `root` in params.yaml.")
    samples = {}
    for path in source.lists.values():
        if path is not None:
            # Normalised as check_paths does, so lists written with backslashes are sampled as read.
            sample = [posixpath.normpath(rel.replace("\\", "/"))
                      for rel, _ in read_list(path, source.multilabel, max_entries=ROOT_SAMPLE)]
            samples[path] = [rel for rel in sample if not (os.path.isabs(rel) or ".." in rel.split("/"))]
    lost = {path: sample for path, sample in samples.items()
            if sample and not any(os.path.exists(os.path.join(root, rel)) for rel in sample)}
    if options.on_bad_image == "skip" and len(lost) < len(samples):
        return
    for path, sample in lost.items():
        found = [folder for folder in [root.parent, *_subfolders(root)]
                 if any(os.path.exists(os.path.join(folder, rel)) for rel in sample)]
        hint = f" The listed images are under {found[0]}: set `root` to it." if found else ""
        raise DataError(
            f"none of the first {len(sample)} images listed in {path} exists under the image root {root} "
            f"(e.g. {os.path.join(root, sample[0])}). A wrong `root` is the usual cause: "
            f"`datasets.{source.name}.root` must be the folder the list paths are relative to.{hint}")


def _subfolders(root: Path, limit: int = 100) -> List[Path]:
    try:
        with os.scandir(root) as it:
            return sorted(Path(e.path) for e in it if e.is_dir())[:limit]
    except OSError:
        return []


def _scan(entries: Dict[str, List[Entry]], source: DatasetSource, options: PrepareOptions):
    paths = [rel for items in entries.values() for rel, _ in items]
    result = scan(source.root, paths, options.workers)
    summary = {"images": len(paths), "modes": dict(sorted(result.modes.items())),
               "converted_to_rgb": result.converted, "multi_frame": sorted(result.multi_frame),
               "bad": dict(sorted(result.bad.items()))}
    if result.bad and options.on_bad_image == "fail":
        first = next(iter(sorted(result.bad.items())))
        raise DataError(
            f"{len(result.bad)} image(s) under {source.root} cannot be decoded (first: {first[0]}: {first[1]}). "
            "Replace them, or set `prepare.on_bad_image: skip` to leave them out (they are listed in "
            "data/prepared/report.json).")
    if result.bad:
        entries = {s: [e for e in items if e[0] not in result.bad] for s, items in entries.items()}
    return entries, summary


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


def load(prepared_dir: Path, tables: Tuple[str, ...] = ("manifest", "classes", "report")) -> Prepared:
    """The prepared dataset; dataset.json and only the ``tables`` a stage declares in dvc.yaml are read.
    Without ``manifest`` it has no image; without ``classes`` its class table holds only ``index`` (the
    class count comes from dataset.json); without ``report``, an empty report."""
    import pandas as pd

    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: the prepare stage has not run. Run `dvc repro prepare`.")
    meta = json.loads(meta_path.read_text())
    if "manifest" in tables:
        manifest = pd.read_csv(prepared_dir / "manifest.csv", dtype={"labels": str, "sha256": str},
                               keep_default_na=False)
    else:
        manifest = pd.DataFrame({"split": [], "path": [], "labels": [], "sha256": []}, dtype=str)
    if "classes" in tables:
        # Ids and names stay text even when they look like numbers (iNat ids, classes named "1").
        classes = pd.read_csv(prepared_dir / "classes.csv", keep_default_na=False,
                              dtype={"id": str, "name": str, "prompt": str})
    else:
        classes = pd.DataFrame({"index": np.arange(meta["num_classes"])})
    report_path = prepared_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() and "report" in tables else {}
    return Prepared(meta["name"], meta["task"] == "multi", Path(meta["root"]), manifest, classes, report)


def groups_for(multilabel: bool):
    return MULTI_GROUPS if multilabel else SINGLE_GROUPS
