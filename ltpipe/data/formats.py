"""Readers for the published list-file formats.

Single-label lists (ImageNet-LT, Places-LT, iNat-2018): ``relative/path label``.
Multi-label lists (COCO-LT, VOC-LT): ``relative/path l1 l2 ...``; a path with no
label is an image negative for every class.
"""

from pathlib import Path
from typing import List, Tuple

from ltpipe.errors import DataError

Entry = Tuple[str, Tuple[int, ...]]


def read_list(path: Path, multilabel: bool) -> List[Entry]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} not found. Check the dataset's list paths in params.yaml.")
    entries: List[Entry] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            rel, labels = parts[0], parts[1:]
            try:
                parsed = tuple(int(x) for x in labels)
            except ValueError:
                raise DataError(
                    f"{path}:{lineno}: labels must be integers, got {' '.join(labels)!r}. "
                    "Each line reads `relative/path label [label ...]`."
                ) from None
            if not multilabel and len(parsed) != 1:
                raise DataError(
                    f"{path}:{lineno}: a single-label list needs exactly one label per line, got "
                    f"{len(parsed)}. If the dataset is multi-label, set its `multilabel: true`."
                )
            entries.append((rel, parsed))
    if not entries:
        raise DataError(f"list file {path} is empty. Every split needs at least one image.")
    return entries


def read_classnames(path: Path) -> List[str]:
    """One class name per line, in label order; a leading WordNet-style id is kept as the name's id."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-name file {path} not found. Check the dataset's `classnames` in params.yaml.")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"class-name file {path} is empty.")
    return names
