"""The checks :func:`ltpipe.data.manifest.build` runs on the lists it read: paths that leave the
root or repeat, labels out of range, images shared with the test list, missing files and links
(resolved, so two listed paths of one file are caught), classes without training images. Each
problem raises a :class:`DataError` naming the file and the fix."""

import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ltpipe.core.errors import DataError
from ltpipe.data.formats import Entry
from ltpipe.data.source import SPLITS, DatasetSource, PrepareOptions


def _shown(items, limit: int = 3) -> str:
    items = list(items)
    return ", ".join(str(x) for x in items[:limit]) + (" ..." if len(items) > limit else "")


def check_every_class_trained(entries: Dict[str, List[Entry]], classes: Tuple[List[str], List[str], List[str]],
                               source: DatasetSource, options: PrepareOptions, report: dict):
    """Refuse a class without training images; for multi-label data,
    ``prepare.drop_classes_without_training`` drops such classes instead: from the class table
    ``(ids, names, prompts)`` and from every split's labels, re-indexed (recorded in ``report``)."""
    ids, names, prompts = classes
    counts = class_counts(entries["train"], len(names))
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


def check_paths(entries: Dict[str, List[Entry]], source: DatasetSource) -> Dict[str, List[Entry]]:
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
                items[index] = (normalised_path(rel), labels)
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


def normalised_path(rel: str) -> str:
    """A list's path as prepare records it: ``./a.jpg``, ``a//b.jpg`` and ``a\\b.jpg`` are ``a.jpg``, ``a/b.jpg``."""
    if "\\" not in rel and "//" not in rel and "./" not in rel and rel[-1:] != "/" and rel[-2:] != "/." \
            and rel != ".":
        return rel  # the common case, without the regex (437k lines: 0.1 s, not 0.45 s)
    return posixpath.normpath(rel.replace("\\", "/")) if _NOT_NORMAL.search(rel) else rel


def check_labels(entries: Dict[str, List[Entry]], num_classes: int, source: DatasetSource) -> None:
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


def check_leakage(entries: Dict[str, List[Entry]], source: DatasetSource) -> None:
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


def check_listed_files(entries: Dict[str, List[Entry]], source: DatasetSource, options: PrepareOptions,
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
    leak (train or val and test), as :func:`check_paths` and :func:`check_leakage` judge listed paths."""
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


def class_counts(items: List[Entry], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, labels in items:
        for label in set(labels):
            counts[label] += 1
    return counts

