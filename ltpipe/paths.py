"""Where the pipeline's stages read and write, relative to the repository root."""

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
METRICS_DIR = Path("metrics")
TRAIN_LOG_DIR = METRICS_DIR / "train"
# Timings live outside data/features: identical features must keep an identical DVC hash.
EXTRACT_REPORT = METRICS_DIR / "extract_report.json"
