"""Where the pipeline's stages read and write, relative to the repository root."""

import contextlib
import os
from pathlib import Path

DATA = Path("data")
WEIGHTS_DIR = DATA / "weights"
WEIGHTS_JSON = WEIGHTS_DIR / "weights.json"
PREPARED_DIR = DATA / "prepared"
FEATURES_DIR = DATA / "features"
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


def partial_path(path: Path) -> Path:
    """The sibling a file is written to before it is renamed onto ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def atomic_target(path: Path):
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` only if the
    block finishes, so ``path`` never holds a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    yield partial
    os.replace(partial, path)
