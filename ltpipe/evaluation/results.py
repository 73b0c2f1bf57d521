"""What every stage that scores a model shares: the task, checks of the cached features, the
run's identity and the metrics file.

Every stage writes one schema (``ltpipe.evaluation.metrics``) plus the run's identity (dataset,
head, loss, sampler, stage-2 method, seed and the feature cache it read), so
`dvc metrics diff` compares any two runs, zero-shot included.
"""

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np

from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, DataError
from ltpipe.core.options import parse
from ltpipe.core.params_layout import EvaluateOptions
from ltpipe.data import manifest
from ltpipe.data.validation_split import POSTHOC_WITHOUT_VALIDATION
from ltpipe.evaluation import metrics
from ltpipe.features.store import SplitFeatures, TextFeatures

TASKS = ("auto", "single", "multi")


def check_task(params: Params, prepared: manifest.Prepared) -> bool:
    """Validate `task` against the dataset; return whether the task is multi-label."""
    task = params.str("task", choices=TASKS)
    if task != "auto" and (task == "multi") != prepared.multilabel:
        raise ConfigError(f"`task` is {task!r} but dataset {prepared.name!r} is {prepared.task}-label. "
                          "Set `task: auto`.")
    return prepared.multilabel


def check_features(features: Union[SplitFeatures, TextFeatures], prepared: manifest.Prepared,
                   weights_json: Path = paths.WEIGHTS_JSON) -> None:
    """The cache (image features, or the text stage's class embeddings) must hold this dataset's features,
    made by the model `weights` names now."""
    stage = "text" if isinstance(features, TextFeatures) else "extract"
    cached = int(features.attrs.get("num_classes", -1))
    if cached != prepared.num_classes or str(features.attrs.get("dataset")) != prepared.name:
        raise DataError(
            f"{features.path} holds features of {features.attrs.get('dataset')!r} with {cached} classes, but the "
            f"prepared dataset is {prepared.name!r} with {prepared.num_classes}. Re-run `dvc repro {stage}`.")
    weights_json = Path(weights_json)
    if not weights_json.is_file():
        return  # no weights stage here (library use): nothing to compare with
    current = json.loads(weights_json.read_text())
    made_by = str(features.attrs.get("weights_sha256", ""))
    if made_by and made_by != current.get("sha256"):
        raise DataError(
            f"{features.path} holds features made by another model ({cache_id(features)}) than the one the "
            f"params name now ({model_id(current.get('arch'), current.get('pretrained'), current.get('sha256'))}). "
            f"Re-run `dvc repro {stage}`.")


def model_id(arch, pretrained, sha256) -> str:
    """``arch/pretrained/sha256[:12]``: which weights, in the metrics JSON and in messages."""
    return f"{arch}/{pretrained or 'random-init'}/{str(sha256)[:12]}"


def cache_id(features: SplitFeatures) -> str:
    """The :func:`model_id` of the weights that made the cached features."""
    attrs = features.attrs
    return model_id(attrs.get("arch"), attrs.get("pretrained"), attrs.get("weights_sha256"))


def warn_skipped(features: SplitFeatures) -> None:
    if features.skipped_paths:
        print(f"WARNING: {len(features.skipped_paths)} unreadable test image(s) were left out at extraction "
              f"(extract.on_bad_image: skip); metrics cover the other {len(features)}. "
              f"See `skipped_paths` in {features.path}.")


def run_fields(run: Dict, prepared: manifest.Prepared, features: SplitFeatures) -> Dict:
    return dict(dataset=prepared.name, task=prepared.task, **run, features=cache_id(features))


def write_metrics(logits: np.ndarray, labels: np.ndarray, prepared: manifest.Prepared, fields: Dict,
                  name: str, out_dir: Path = paths.METRICS_DIR, per_class: bool = True,
                  compare: Optional[Callable[[Dict], Optional[Dict]]] = None) -> Dict:
    """``<out_dir>/<name>.json`` (the run's identity, then its metrics, then ``compare(metrics)`` as
    ``preset`` unless it is ``None``: a preset's published figures) and, with ``per_class``, the plot
    tables ``<name>_per_class.csv``, ``_reliability.csv`` and ``_confusion.csv``."""
    result, table = metrics.evaluate(logits, labels, prepared.classes, prepared.multilabel)
    clash = set(fields) & set(result) | ({"preset"} & (set(fields) | set(result)))
    if clash:
        raise AssertionError(f"metric keys {sorted(clash)} would overwrite the run's identity fields")
    payload = dict(fields, **result)
    block = compare(result) if compare is not None else None
    if block is not None:
        payload["preset"] = block
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if per_class:
        table.to_csv(out_dir / f"{name}_per_class.csv", index=False)
        metrics.reliability_table(logits, labels, prepared.multilabel).to_csv(
            out_dir / f"{name}_reliability.csv", index=False)
        metrics.confusion_rows(logits, labels, prepared.classes["name"].tolist(), prepared.multilabel).to_csv(
            out_dir / f"{name}_confusion.csv", index=False)
    return payload


def log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)  # a class whose every image was skipped: no infinite adjustment
    return np.log(counts / counts.sum())


def logit_adjust(logits: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021, Eq. 9): ``argmax_c z_c - tau log p_c``."""
    return logits - tau * prior


def check_posthoc(params: Params, multilabel: bool, val_images: Optional[int] = None) -> str:
    """`evaluate.posthoc`, refused where it cannot apply (``val_images``: the validation split's size,
    when known). The train stage calls this too, to validate only (it never uses the value), so the
    refusal comes before training."""
    posthoc = parse(EvaluateOptions, params.sub("evaluate")).posthoc
    if posthoc == "logit_adjust" and val_images == 0:
        raise ConfigError(POSTHOC_WITHOUT_VALIDATION)
    if posthoc == "logit_adjust" and multilabel:
        raise ConfigError("`evaluate.posthoc: logit_adjust` is single-label only: on a multi-label task it would "
                          "shift each class's logits by a constant, which leaves mAP unchanged, so tau could not be "
                          "chosen on validation. Set `evaluate.posthoc: none`.")
    return posthoc
