"""Where the pipeline's stages read and write, relative to the repository root."""

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Optional

from ltpipe.core.errors import DiskFullError

DATA = Path("data")
# Fingerprints of the dataset and checkpoint outside the repository (the `inputs` stage).
INPUTS_DIR = DATA / "inputs"
DATASET_INPUTS = INPUTS_DIR / "dataset.json"
CHECKPOINT_INPUTS = INPUTS_DIR / "checkpoint.json"
WEIGHTS_DIR = DATA / "weights"
WEIGHTS_JSON = WEIGHTS_DIR / "weights.json"
PREPARED_DIR = DATA / "prepared"
FEATURES_DIR = DATA / "features"
# The class text embeddings: a stage of their own, so new class names or templates re-encode no image.
TEXT_DIR = DATA / "text"
TEXT_FEATURES = TEXT_DIR / "text.h5"
# Extraction shards: not a DVC output, so a failed run's work survives DVC deleting data/features.
PARTIAL_DIR = DATA / "partial"
MODELS_DIR = DATA / "models"
HEAD_CHECKPOINT = MODELS_DIR / "head.pt"
FINETUNE_DIR = DATA / "finetune"  # fine-tuned models, one per mode
METRICS_DIR = Path("metrics")
FINETUNE_METRICS_DIR = METRICS_DIR / "finetune"
TRAIN_LOG_DIR = METRICS_DIR / "train"
SWEEP_DIR = METRICS_DIR / "sweep"  # one metrics file per sweep cell
SUMMARY = METRICS_DIR / "summary"  # .json, .md, .csv: the report over the sweep
# Timings live outside data/features: identical features must keep an identical DVC hash.
EXTRACT_REPORT = METRICS_DIR / "extract_report.json"

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def partial_path(path: Path) -> Path:
    """The sibling a file is written to before it is renamed onto ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def is_disk_full(exc: Exception) -> bool:
    """Whether a write failed for want of space (or quota); h5py passes the errno on, or names it."""
    return getattr(exc, "errno", None) in NO_SPACE or any(f"errno = {code}," in str(exc) for code in NO_SPACE)


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:,.0f} {unit}" if unit == "B" else f"{num_bytes:,.1f} {unit}"
        num_bytes /= 1024
    return ""


def disk_full_error(path: Path, needed: Optional[int] = None, kept: str = "") -> DiskFullError:
    """The error for ``path`` not written for want of space: where, how much is free, what is kept."""
    path = Path(path)
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    wants = f", and it needs about {_size(needed)}" if needed else ""
    kept = kept or "Nothing half-written was left behind."
    return DiskFullError(
        f"disk full: cannot write {path} ({_size(usage.free)} free of {_size(usage.total)} on the filesystem "
        f"holding {existing}{wants}). {kept} Free space there (or move the directory to a larger disk and link "
        "it back), then re-run the stage (`dvc repro`)."
    )


@contextlib.contextmanager
def atomic_target(path: Path, needed: Optional[int] = None, kept: str = ""):
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` only if the
    block finishes, so ``path`` never holds a half-written file. On failure the sibling
    is removed (nothing resumes from it), and a full disk becomes a :class:`DiskFullError`
    naming ``path`` (``needed``: its expected size; ``kept``: what the caller keeps)."""
    path = Path(path)
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        os.replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise disk_full_error(path, needed, kept) from None
        raise
