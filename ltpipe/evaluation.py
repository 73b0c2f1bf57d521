"""The `zeroshot` and `evaluate` stages: test-split predictions to metrics JSON.

Both write one schema (``ltpipe.metrics``) plus the run's identity (dataset,
head, loss, sampler, stage-2 method, seed and the feature cache it read), so
`dvc metrics diff` compares any two runs, zero-shot included.
"""

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from ltpipe import metrics, paths
from ltpipe.config import Params
from ltpipe.data import manifest
from ltpipe.errors import ConfigError, DataError
from ltpipe.features.store import SplitFeatures, TextFeatures
from ltpipe.heads import load_checkpoint
from ltpipe.inference import FeatureInput, predict
from ltpipe.runtime import resolve_device

TASKS = ("auto", "single", "multi")
POSTHOC = ("none", "logit_adjust")
ZEROSHOT_RUN = {"head": "zeroshot", "loss": "none", "sampler": "none", "stage2": "none", "seed": None,
                "posthoc": "none", "posthoc_tau": None}


def check_task(params: Params, prepared: manifest.Prepared) -> bool:
    """Validate `task` against the dataset; return whether the task is multi-label."""
    task = params.str("task", choices=TASKS)
    if task != "auto" and (task == "multi") != prepared.multilabel:
        raise ConfigError(f"`task` is {task!r} but dataset {prepared.name!r} is {prepared.task}-label. "
                          "Set `task: auto`.")
    return prepared.multilabel


def check_features(features: SplitFeatures, prepared: manifest.Prepared,
                   weights_json: Path = paths.WEIGHTS_JSON) -> None:
    """The cache must hold this dataset's features, made by the model `weights` names now."""
    cached = int(features.attrs.get("num_classes", -1))
    if cached != prepared.num_classes or str(features.attrs.get("dataset")) != prepared.name:
        raise DataError(
            f"{features.path} holds features of {features.attrs.get('dataset')!r} with {cached} classes, but the "
            f"prepared dataset is {prepared.name!r} with {prepared.num_classes}. Re-run `dvc repro extract`.")
    weights_json = Path(weights_json)
    if not weights_json.is_file():
        return  # no weights stage here (library use): nothing to compare with
    current = json.loads(weights_json.read_text())
    made_by = str(features.attrs.get("weights_sha256", ""))
    if made_by and made_by != current.get("sha256"):
        raise DataError(
            f"{features.path} holds features made by another model ({cache_id(features)}) than the one the "
            f"params name now ({model_id(current.get('arch'), current.get('pretrained'), current.get('sha256'))}). "
            "Re-run `dvc repro extract`.")


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
                  name: str, out_dir: Path = paths.METRICS_DIR, per_class: bool = True) -> Dict:
    """``<out_dir>/<name>.json`` (the run's identity, then its metrics) and, with ``per_class``,
    the plot tables ``<name>_per_class.csv``, ``_reliability.csv`` and ``_confusion.csv``."""
    result, table = metrics.evaluate(logits, labels, prepared.classes, prepared.multilabel)
    clash = set(fields) & set(result)
    if clash:
        raise AssertionError(f"metric keys {sorted(clash)} would overwrite the run's identity fields")
    payload = dict(fields, **result)
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


def zeroshot_logits(pooled: np.ndarray, text: TextFeatures) -> np.ndarray:
    """CLIP's zero-shot classifier: ``logit_scale * cos(image, class text)``."""
    image = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return text.logit_scale * image @ text.embeddings.T


def run_zeroshot(params: Params) -> Dict:
    prepared = manifest.load(paths.PREPARED_DIR)
    check_task(params, prepared)
    test = SplitFeatures(paths.FEATURES_DIR / "test.h5")
    check_features(test, prepared)
    warn_skipped(test)
    logits = zeroshot_logits(test.pooled, TextFeatures(paths.FEATURES_DIR / "text.h5"))
    return write_metrics(logits, test.labels, prepared, run_fields(ZEROSHOT_RUN, prepared, test), "zeroshot")


def log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)  # a class whose every image was skipped: no infinite adjustment
    return np.log(counts / counts.sum())


def logit_adjust(logits: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021, Eq. 9): ``argmax_c z_c - tau log p_c``."""
    return logits - tau * prior


def posthoc_logit_adjust(head, device, prepared: manifest.Prepared) -> Tuple[float, np.ndarray]:
    """tau from ``metrics.TAU_GRID`` chosen on the validation split (tau = 0 is no adjustment, so the
    validation score never drops), and the training log-prior it adjusts by."""
    val = SplitFeatures(paths.FEATURES_DIR / "val.h5")
    val_logits = predict(head, FeatureInput(val, head.input, device))
    prior = log_prior(SplitFeatures.read_labels(paths.FEATURES_DIR / "train.h5"), prepared.num_classes)
    tau, _ = metrics.pick_on_validation(
        metrics.TAU_GRID,
        lambda t: metrics.selection_score(logit_adjust(val_logits, prior, t), val.labels, False))
    return tau, prior


def check_posthoc(params: Params, multilabel: bool) -> str:
    """`evaluate.posthoc`, refused where it cannot apply. The train stage calls this too, to
    validate only (it never uses the value), so the refusal comes before training."""
    posthoc = params.str("evaluate.posthoc", choices=POSTHOC)
    if posthoc == "logit_adjust" and multilabel:
        raise ConfigError("`evaluate.posthoc: logit_adjust` is single-label only: on a multi-label task it would "
                          "shift each class's logits by a constant, which leaves mAP unchanged, so tau could not be "
                          "chosen on validation. Set `evaluate.posthoc: none`.")
    return posthoc


def run_evaluate(params: Params) -> Dict:
    prepared = manifest.load(paths.PREPARED_DIR)
    check_task(params, prepared)
    posthoc = check_posthoc(params, prepared.multilabel)
    device = resolve_device(params.str("model.device"))
    head, run = load_checkpoint(paths.HEAD_CHECKPOINT)
    head.to(device)
    test = SplitFeatures(paths.FEATURES_DIR / "test.h5")
    check_features(test, prepared)
    warn_skipped(test)
    logits = predict(head, FeatureInput(test, head.input, device))
    run = dict(run, posthoc=posthoc, posthoc_tau=None)
    if posthoc == "logit_adjust":
        tau, prior = posthoc_logit_adjust(head, device, prepared)
        logits = logit_adjust(logits, prior, tau)
        run["posthoc_tau"] = tau
        print(f"post-hoc logit adjustment: tau {tau} (chosen on validation)")
    return write_metrics(logits, test.labels, prepared, run_fields(run, prepared, test), "eval")
