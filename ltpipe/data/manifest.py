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
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from ltpipe.data.fingerprint import HashStats, hash_files
from ltpipe.data.formats import Entry, check_distinct_prompts, curated_prompts, read_classnames, read_list
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
    allow_links_outside_root: bool = False
    drop_classes_without_training: bool = False


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
    hash_stats: Optional[HashStats] = None  # what hashing cost this run (not saved: it varies by machine)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def task(self) -> str:
        return "multi" if self.multilabel else "single"

    def split(self, split: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)

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


def _shown(items, limit: int = 3) -> str:
    items = list(items)
    return ", ".join(str(x) for x in items[:limit]) + (" ..." if len(items) > limit else "")


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
    entries = _check_paths(entries, source)
    _check_labels(entries, num_classes, source)
    _check_leakage(entries, source)
    report: dict = {"dataset": source.name}
    if repeated_prompts:
        report["repeated_prompts"] = repeated_prompts
    classes = (ids, names, prompts)
    entries, classes = _check_every_class_trained(entries, classes, source, options, report)  # before the scan
    if check_files:
        entries = _check_files(entries, source, options, report)
    if options.scan_images:
        entries, report["scan"] = _scan(entries, source, options)
    entries, (ids, names, prompts) = _check_every_class_trained(entries, classes, source, options, report)  # skips
    num_classes = len(names)
    # Groups follow the published training list, before any validation split is carved
    # from it, so head/medium/tail match the benchmark's definition.
    list_counts = _class_counts(entries["train"], num_classes)
    if "val" not in entries:
        entries["train"], entries["val"] = carve_validation(
            entries["train"], num_classes, options.val_fraction, options.split_seed, source.multilabel)
        report["validation"] = _carve_report(entries, list_counts, names, options, source)
    counts = _class_counts(entries["train"], num_classes)

    rows = [(split, rel, " ".join(str(x) for x in labels)) for split in SPLITS for rel, labels in entries[split]]
    hashes, hash_stats = [""] * len(rows), None
    if check_files:
        hashes, hash_stats = hash_files(source.root, [rel for _, rel, _ in rows], hash_cache)
    manifest = pd.DataFrame([(*row, digest) for row, digest in zip(rows, hashes)],
                            columns=["split", "path", "labels", "sha256"])
    classes = pd.DataFrame({
        "index": np.arange(num_classes),
        "id": ids,
        "name": names,
        "prompt": prompts,
        "train_count": counts,
        "list_count": list_counts,
        "group": [group_of(int(n), source.multilabel) for n in list_counts],
    })
    report["images"] = {s: len(entries[s]) for s in SPLITS}
    report["classes"] = num_classes
    report["groups"] = {g: int((classes["group"] == g).sum()) for g in groups_for(source.multilabel)}
    report["train_count"] = {"max": int(counts.max()), "min": int(counts.min())}
    return Prepared(source.name, source.multilabel, Path(source.root), manifest, classes, report, hash_stats)


def _check_every_class_trained(entries: Dict[str, List[Entry]], classes: Tuple[List[str], List[str], List[str]],
                               source: DatasetSource, options: PrepareOptions, report: dict):
    """Refuse a class without training images; for multi-label data,
    ``prepare.drop_classes_without_training`` drops such classes instead: from the class table
    ``(ids, names, prompts)`` and from every split's labels, re-indexed (recorded in ``report``)."""
    ids, names, prompts = classes
    counts = _class_counts(entries["train"], len(names))
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return entries, classes
    problem = (f"{len(empty)} class(es) of {source.name!r} have no training image: "
               f"{_shown((f'{i} ({names[i]})' for i in empty), limit=5)}.")
    same_classes = (f"The class-name file ({source.classnames}, {len(names)} classes) and the train list must "
                    "describe the same classes")
    if not source.multilabel:
        raise DataError(f"{problem} {same_classes}: remove the class from the class-name file (and the lists), "
                        "or add training images of it. (A single-label test image of a dropped class would have "
                        "no label, so `prepare.drop_classes_without_training` is for multi-label data only.)")
    if not options.drop_classes_without_training:
        raise DataError(f"{problem} {same_classes}, or set `prepare.drop_classes_without_training: true` to leave "
                        "them out of the class table, of every split's labels and of the metrics.")
    keep = [int(i) for i in np.flatnonzero(counts > 0)]
    new_index = {old: new for new, old in enumerate(keep)}
    relabelled: Dict[Tuple[int, ...], Tuple[int, ...]] = {}  # one tuple per label set, as read_list does
    dropped = {int(i): {"id": ids[i], "name": names[i]} for i in empty}
    for split, items in entries.items():
        for i in dropped:
            dropped[i][f"{split}_images"] = int(sum(i in labels for _, labels in items))
        entries[split] = [(rel, relabelled.get(labels) or relabelled.setdefault(
            labels, tuple(new_index[c] for c in labels if c in new_index))) for rel, labels in items]
    report.setdefault("dropped_classes", []).extend(dropped.values())
    return entries, tuple([values[i] for i in keep] for values in classes)


def _check_paths(entries: Dict[str, List[Entry]], source: DatasetSource) -> Dict[str, List[Entry]]:
    """Refuse paths leaving the root (as written in the list); return the entries with
    normalised paths, so `./a.jpg` and `a.jpg` are one image to the duplicate and leakage checks."""
    normalised = {}
    for split, items in entries.items():
        escaping = [rel for rel, _ in items
                    if os.path.isabs(rel) or ".." in rel and ".." in rel.replace("\\", "/").split("/")]
        if escaping:
            raise DataError(
                f"{source.lists[split]}: {len(escaping)} path(s) leave the dataset root ({_shown(escaping)}). "
                "List paths must be relative to `root` and stay inside it.")
        # In place, and only where a path needs it: a copy of every path doubles the memory of big lists.
        for index, (rel, labels) in enumerate(items):
            if _NOT_NORMAL.search(rel):
                items[index] = (posixpath.normpath(rel.replace("\\", "/")), labels)
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
            if bad and bad[0] < 0:
                raise DataError(
                    f"{source.lists[split]}: label {bad[0]} of {rel} is negative: labels are class indices "
                    f"0..{num_classes - 1} ({source.classnames} names {num_classes} classes). Other formats use -1 "
                    "for 'unknown': give the image its class, or leave it out of the list (check `classnames` "
                    "if the classes are numbered differently).")
            if bad:
                raise DataError(
                    f"{source.lists[split]}: label {bad[0]} of {rel} is out of range: {source.classnames} "
                    f"names {num_classes} classes, so labels must be 0..{num_classes - 1}. The class count "
                    "disagrees with the names file: fix the list or point `classnames` at the right file.")


def _check_leakage(entries: Dict[str, List[Entry]], source: DatasetSource) -> None:
    """No train or validation image may be in the test list."""
    test = {rel for rel, _ in entries["test"]}
    for split in ("train", "val"):
        if split in entries:
            shared = [rel for rel, _ in entries[split] if rel in test]
            if shared:
                raise DataError(
                    f"{len(shared)} image(s) are in both the {split} and the test list of {source.name} "
                    f"({_shown(shared)}). Remove them from one list: evaluation must not see training images.")


_NOT_NORMAL = re.compile(r"\\|//|(^|/)\.(/|$)|/$")  # what posixpath.normpath would change (".." is refused)
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
            # Normalised as _check_paths does, so lists written with backslashes are sampled as read.
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


def _check_files(entries: Dict[str, List[Entry]], source: DatasetSource, options: PrepareOptions,
                 report: dict) -> Dict[str, List[Entry]]:
    """Every listed image must exist; with ``on_bad_image: skip``, missing ones are left out
    (listed in ``report``). Paths are resolved through symbolic links (each folder once), so a
    link leaving the root is refused unless ``allow_links_outside_root``, and two listed paths
    of one file are a duplicate (one split) or a leak (two splits)."""
    root = Path(source.root)
    if not root.is_dir():
        raise DataError(f"image root {root} does not exist. Set the dataset's `root` in params.yaml.")
    real_root = os.path.realpath(root)
    inside = os.path.join(real_root, "")
    folders: Dict[str, Tuple[str, bool]] = {}  # listed folder -> (real folder, is it where the path says)
    missing, outside, relocated = [], [], {}
    for split, items in entries.items():
        for index, (rel, _) in enumerate(items):
            folder, name = posixpath.split(rel)
            if folder not in folders:
                real_folder = os.path.realpath(os.path.join(real_root, folder))
                folders[folder] = real_folder, real_folder == os.path.normpath(os.path.join(real_root, folder))
            real_folder, as_listed = folders[folder]
            full = os.path.join(real_folder, name)
            try:
                mode = os.lstat(full).st_mode
                if stat.S_ISLNK(mode):
                    as_listed, full = False, os.path.realpath(full)
                    mode = os.stat(full).st_mode
            except OSError:
                mode = 0
            if not stat.S_ISREG(mode):
                missing.append(rel)
            elif not as_listed:
                # Where the file really is, relative to the root when inside it, as listed paths are.
                relocated[split, index] = full[len(inside):] if full.startswith(inside) else full
                if not full.startswith(inside):
                    outside.append((rel, full))
    if outside and not options.allow_links_outside_root:
        rel, target = outside[0]
        raise DataError(
            f"{len(outside)} listed image(s) are symbolic links (or in linked folders) that resolve outside the "
            f"dataset root {root}: {rel} -> {target}{' ...' if len(outside) > 1 else ''}. Images outside the "
            "root are refused, so that `root` says where the data is. If the link is intended (commonly the "
            "image folder is a symlink to another disk), set `prepare.allow_links_outside_root: true`, or point "
            "`root` at the real folder.")
    if outside:
        report["links_outside_root"] = len(outside)
    if relocated:
        _check_same_files(entries, relocated, real_root, source)
    if missing and options.on_bad_image != "skip":
        raise DataError(
            f"{len(missing)} image(s) listed are missing under {root} (first: {_shown(missing)}). "
            "Check the dataset's `root` in params.yaml points at the folder the list paths are relative to, "
            "or set `prepare.on_bad_image: skip` to leave them out.")
    if missing:
        gone = set(missing)
        entries = {s: [e for e in items if e[0] not in gone] for s, items in entries.items()}
        report["missing_skipped"] = sorted(missing)
    return entries


def _check_same_files(entries: Dict[str, List[Entry]], relocated: Dict[Tuple[str, int], str], real_root: str,
                      source: DatasetSource) -> None:
    """Two listed paths that resolve to one file (through a link): a duplicate (one split) or a
    leak (train or val and test), as :func:`_check_paths` and :func:`_check_leakage` judge listed paths."""
    owner: Dict[str, Tuple[str, str]] = {}
    for split in SPLITS:
        for index, (rel, _) in enumerate(entries.get(split, ())):
            key = relocated.get((split, index), rel)
            first_split, first = owner.setdefault(key, (split, rel))
            if first == rel and first_split == split or {first_split, split} == {"train", "val"}:
                continue
            shared = key if os.path.isabs(key) else os.path.join(real_root, key)
            if first_split == split:
                raise DataError(f"{source.lists[split]}: {first} and {rel} are the same file ({shared}, through a "
                                "symbolic link): it is listed twice and would be trained on twice. Remove one "
                                "of the two lines.")
            raise DataError(f"{first} ({first_split} list) and {rel} ({split} list) of {source.name} are the same "
                            f"file ({shared}, through a symbolic link): the image is in both the {first_split} and "
                            f"the {split} list. Remove it from one list: evaluation must not see training images.")


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


def _class_counts(items: List[Entry], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, labels in items:
        for label in set(labels):
            counts[label] += 1
    return counts


def carve_validation(train: List[Entry], num_classes: int, fraction: float, seed: int,
                     multilabel: bool) -> Tuple[List[Entry], List[Entry]]:
    """A stratified validation split of ``round(fraction * N)`` images taken from train
    (fewer only where taking more would empty a class's training set).

    Each image belongs to the stratum of its rarest label (single-label: its class; multi-label
    images without labels form one stratum). The total is shared among the strata in proportion
    to their sizes by the largest-remainder method (ties: the rarer stratum, then a seeded draw),
    so the outcome stays proportional when strata are smaller than ``1 / fraction``, where
    rounding each stratum's share on its own carved nothing. Strata are then served rarest first,
    as in iterative stratification (Sechidis et al., ECML-PKDD 2011), each image in a seeded
    random order and skipped when it holds the last training image of one of its labels; a
    share a stratum cannot give passes to the next ones.
    """
    del multilabel  # one rule for both: a single-label image's rarest label is its class
    counts = _class_counts(train, num_classes)
    strata: Dict[int, List[int]] = {}
    for i, (_, labels) in enumerate(train):
        key = min(labels, key=lambda c: (counts[c], c)) if labels else -1
        strata.setdefault(key, []).append(i)
    keys = sorted(strata, key=lambda k: (len(strata[k]), k))  # rarest first
    rng = np.random.default_rng(seed)
    sizes = np.array([len(strata[k]) for k in keys])
    quotas = fraction * sizes
    shares = np.floor(quotas).astype(np.int64)
    remainders = np.round(quotas - shares, 9)  # equal sizes must tie despite float noise
    draw = rng.permutation(len(keys))
    by_remainder = sorted(range(len(keys)), key=lambda j: (-remainders[j], sizes[j], draw[j]))
    target = int(np.floor(fraction * len(train) + 0.5))
    shares[by_remainder[:max(0, target - int(shares.sum()))]] += 1

    remaining = counts.copy()
    chosen = np.zeros(len(train), dtype=bool)
    orders = {key: rng.permutation(strata[key]) for key in keys}

    def take(i: int) -> bool:
        labels = set(train[i][1])
        if chosen[i] or not all(remaining[c] > 1 for c in labels):
            return False
        chosen[i] = True
        for c in labels:
            remaining[c] -= 1
        return True

    owed = 0
    for key, share in zip(keys, shares):
        share += owed
        for i in orders[key]:
            if share == 0:
                break
            share -= take(int(i))
        owed = share
    for key in keys:  # what the last strata could not give, from any stratum that still can
        for i in orders[key]:
            if owed == 0:
                break
            owed -= take(int(i))
    return ([e for i, e in enumerate(train) if not chosen[i]], [e for i, e in enumerate(train) if chosen[i]])


def _carve_report(entries: Dict[str, List[Entry]], list_counts: np.ndarray, names: List[str],
                  options: PrepareOptions, source: DatasetSource) -> dict:
    carved, listed = len(entries["val"]), int(len(entries["val"]) + len(entries["train"]))
    if not carved:
        raise DataError(
            f"no validation image could be carved from {source.name}'s train list ({listed} images, "
            f"`prepare.val_fraction` {options.val_fraction}): "
            + ("every class has a single training image. " if (list_counts <= 1).all() else
               f"{options.val_fraction} of {listed} rounds to 0. ")
            + "Give a `val_list`, or raise `prepare.val_fraction`.")
    without = np.flatnonzero(_class_counts(entries["val"], len(names)) == 0)
    return {"carved_from_train": carved, "fraction": options.val_fraction,
            "achieved_fraction": round(carved / listed, 4), "train_list_images": listed, "seed": options.split_seed,
            "classes_without_validation": [int(i) for i in without]}


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
    manifest = pd.read_csv(prepared_dir / "manifest.csv", dtype={"labels": str, "sha256": str},
                           keep_default_na=False)
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
