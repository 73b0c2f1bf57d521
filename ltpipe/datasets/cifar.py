"""CIFAR-10-LT and CIFAR-100-LT, built from the standard CIFAR python archives.

The rule of LDAM-DRW (Cao et al., NeurIPS 2019, ``imbalance_cifar.py``): class ``c``
keeps ``n_c = int(n_max * (1/IF) ** (c / (C - 1)))`` training images, chosen by
seeding numpy's global RNG with 0 and, for each class in label order, shuffling
its indices and keeping the first ``n_c``. We use a ``RandomState(seed)`` consumed
in the same order, which draws the same permutations. The test set stays balanced.

The archives are Python pickles. They are read with the allow-list unpickler of
:mod:`ltpipe.datasets.pickles`, which only rebuilds numpy arrays and plain containers,
so a tampered archive cannot run code.
"""

import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from ltpipe.core.errors import DataError
from ltpipe.datasets.pickles import restricted_loads

ARCHIVES = {
    10: {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
         "meta": "batches.meta", "names_key": b"label_names", "labels_key": b"labels"},
    100: {"folder": "cifar-100-python", "train": ["train"], "test": ["test"],
          "meta": "meta", "names_key": b"fine_label_names", "labels_key": b"fine_labels"},
}


def safe_unpickle(path: Path) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read CIFAR archive file {path}: {exc}") from None
    try:
        return restricted_loads(data, encoding="bytes")
    except pickle.UnpicklingError as exc:  # also what the allow-list refuses
        raise DataError(f"{path} is not a CIFAR python archive file ({exc}). Download the 'python version' "
                        "archive from the CIFAR page and extract it under the dataset root.") from None


def archive_files(root: Path, num_classes: int) -> List[Path]:
    """The archive files :func:`load_archive` reads."""
    spec = ARCHIVES[num_classes]
    folder = Path(root) / spec["folder"]
    return [folder / name for name in (spec["meta"], *spec["train"], *spec["test"])]


def load_archive(root: Path, num_classes: int) -> Tuple[Dict[str, Tuple[np.ndarray, np.ndarray]], List[str]]:
    spec = ARCHIVES[num_classes]
    folder = Path(root) / spec["folder"]
    if not folder.is_dir():
        raise DataError(f"{folder} not found. Set `datasets.cifar{num_classes}_lt.root` to the folder that holds "
                        f"the extracted `{spec['folder']}` archive.")
    meta = safe_unpickle(folder / spec["meta"])
    names = [n.decode() for n in meta[spec["names_key"]]]
    splits = {}
    for split in ("train", "test"):
        images, labels = [], []
        for name in spec[split]:
            batch = safe_unpickle(folder / name)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[spec["labels_key"]], dtype=np.int64))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits, names


def long_tailed_indices(labels: np.ndarray, num_classes: int, imbalance: float, seed: int = 0) -> np.ndarray:
    """Indices kept by LDAM-DRW's rule, class by class in label order."""
    n_max = int(np.bincount(labels, minlength=num_classes).max())
    rng = np.random.RandomState(seed)
    kept = []
    for c in range(num_classes):
        n_c = int(n_max * (1.0 / imbalance) ** (c / (num_classes - 1)))
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept)


def write(root: Path, num_classes: int, imbalance: float, seed: int, out_dir: Path) -> Dict[str, str]:
    """Write the long-tailed train split and the full test split as PNG files with list files."""
    splits, names = load_archive(root, num_classes)
    out_dir = Path(out_dir)
    train_images, train_labels = splits["train"]
    keep = {"train": long_tailed_indices(train_labels, num_classes, imbalance, seed),
            "test": np.arange(len(splits["test"][1]))}
    for split, indices in keep.items():
        images, labels = splits[split]
        lines = []
        for i in indices:
            rel = f"images/{split}/{labels[i]:03d}/{i:05d}.png"
            path = out_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path, format="PNG")
            lines.append(f"{rel} {labels[i]}")
        (out_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "classnames.txt").write_text("\n".join(names) + "\n")
    return {"train": "train.txt", "test": "test.txt", "classnames": "classnames.txt"}
