"""Readers for the published list and class-name formats.

List files, one image a line:

* single-label (ImageNet-LT, Places-LT, iNat-2018, CIFAR-LT): ``relative/path label``
* multi-label (COCO-LT, VOC-LT): ``relative/path l1 l2 ...``; a path with no label
  is an image negative for every class (48 COCO-LT test images are).

Class-name files (``names_format``), each giving ``(id, name)`` pairs in label order:

* ``plain``: one name a line (CIFAR, custom data)
* ``id_name``: ``id name ...`` (ImageNet's ``n01440764 tench``; Places' ``airfield airfield``)
* ``name_index``: ``name index`` (COCO-LT's ``coco_labels.txt``, VOC-LT's ``voc_labels.txt``)
* ``inat_json``: iNat-2018's ``categories.json`` (a list of ``{"id": ..., "name": ...}``)
"""

import json
from pathlib import Path
from typing import List, Tuple

from ltpipe.errors import DataError

Entry = Tuple[str, Tuple[int, ...]]
NAMES_FORMATS = ("plain", "id_name", "name_index", "inat_json")

# CLIP-friendly prompts for names that are not plain words (VOC's joined names).
PROMPT_FIXES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
                "aeroplane": "aeroplane", "motorbike": "motorbike"}


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


def read_classnames(path: Path, names_format: str = "plain") -> List[Tuple[str, str]]:
    """``(id, name)`` of every class, in label order."""
    path = Path(path)
    if names_format not in NAMES_FORMATS:
        raise DataError(f"unknown class-name format {names_format!r}; valid: {', '.join(NAMES_FORMATS)}.")
    if not path.is_file():
        raise DataError(f"class-name file {path} not found. Check the dataset's `classnames` in params.yaml.")
    if names_format == "inat_json":
        return _read_inat(path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"class-name file {path} is empty.")
    if names_format == "plain":
        return [(line, line) for line in lines]
    pairs = []
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected `{'id name' if names_format == 'id_name' else 'name index'}`,"
                            f" got {line!r}. Is `names_format: {names_format}` right for this file?")
        if names_format == "id_name":
            pairs.append((parts[0], " ".join(parts[1:])))
        else:
            name, index = " ".join(parts[:-1]), parts[-1]
            if index != str(lineno - 1):
                raise DataError(f"{path}:{lineno}: class {name!r} has index {index}, but its line gives "
                                f"index {lineno - 1}. Classes must be listed in index order.")
            pairs.append((name, name))
    return pairs


def _read_inat(path: Path) -> List[Tuple[str, str]]:
    try:
        categories = json.loads(path.read_text(encoding="utf-8"))
        by_id = {int(c["id"]): str(c["name"]) for c in categories}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not an iNaturalist categories.json (a list of objects with `id` and "
                        f"`name`): {exc}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(f"{path}: category ids must be 0..{len(by_id) - 1} without gaps.")
    return [(str(i), by_id[i]) for i in range(len(by_id))]


def prompt_name(name: str) -> str:
    """A name CLIP reads well: ``traffic_light`` -> ``traffic light``, VOC's ``diningtable`` -> ``dining table``."""
    name = name.strip()
    if name in PROMPT_FIXES:
        return PROMPT_FIXES[name]
    return name.replace("_", " ").replace("/", " ").strip()


def curated_prompts(ids: List[str], names: List[str]) -> List[str]:
    """CLIP's curated ImageNet class names when the classes are ImageNet-1k's (by WordNet id order)."""
    if len(ids) == 1000 and all(i.startswith("n") and i[1:].isdigit() for i in ids) and ids == sorted(ids):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    return [prompt_name(n) for n in names]
