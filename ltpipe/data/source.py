"""Where a dataset's files are and how prepare reads them: the input of
:func:`ltpipe.data.manifest.build`."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

SPLITS = ("train", "val", "test")
ON_BAD_IMAGE = ("fail", "skip")


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


def relative_to_cwd(path: Path) -> Path:
    """Keep paths inside the repository relative, so a moved clone still works."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def optional_path(value: Optional[str], root: Path) -> Optional[Path]:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else root / p
