"""Evaluation metrics: one schema per task, so `dvc metrics diff` compares any two runs.

Single-label: top1, top5, balanced_acc, many/medium/few (means of per-class
accuracy within each training-count group), macro_f1, nll, ece (15 equal-width
confidence bins, Guo et al. 2017). Multi-label: mAP (mean of per-class average
precision, scikit-learn's tie-correct definition; classes with no test positive
are left out), mAP_head/mAP_medium/mAP_tail, CF1 and OF1 at a threshold on the
sigmoid (the per-class and overall F1 of ML-GCN, Chen et al. 2019; per-class
precision and recall averaged over classes with a test positive).

The group keys of multi-label metrics carry an ``mAP_`` prefix so they never
collide with the run's ``head`` name in the same JSON file.
"""

from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import numpy as np

from ltpipe.data.manifest import MULTI_GROUPS, SINGLE_GROUPS

# pandas, scipy and scikit-learn are imported inside the functions that use them: together they cost about a
# second of every stage's start-up, and single-label training (which needs only `selection_score` and
# `chance_score`) must run on a machine without them (bench/gpu.py).
if TYPE_CHECKING:
    import pandas as pd


def _mean_or_none(values: np.ndarray) -> Optional[float]:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def per_class_accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class absent from ``labels``."""
    labels, pred = np.asarray(labels, dtype=np.int64), np.asarray(pred)
    # Counts, not one mask per class: training scores every epoch, and iNat has 8,142 classes.
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[pred == labels], minlength=num_classes).astype(np.float64)
    acc = np.full(num_classes, np.nan)
    present = total > 0
    acc[present] = correct[present] / total[present]  # the same quotient as a mask's mean: count / n
    return acc


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """The mean of :func:`per_class_accuracy` over the classes present in ``labels``: scikit-learn's
    ``balanced_accuracy_score`` to the last bit (the same per-class quotients, averaged in class order)."""
    labels = np.asarray(labels)
    pred = np.asarray(pred)
    num_classes = int(max(labels.max(), pred.max())) + 1
    return _mean_or_none(per_class_accuracy(labels, pred, num_classes))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> "pd.DataFrame":
    """The reliability diagram's table: per equal-width confidence bin ``(lo, hi]`` with any
    prediction, the mean confidence, the accuracy and the count."""
    import pandas as pd

    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            rows.append({"bin_upper": float(hi), "confidence": float(confidence[in_bin].mean()),
                         "accuracy": float(correct[in_bin].mean()), "count": int(in_bin.sum())})
    return pd.DataFrame(rows, columns=["bin_upper", "confidence", "accuracy", "count"])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): the count-weighted gap between accuracy and confidence over the
    bins of :func:`reliability`."""
    table = reliability(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)
    return float((table["count"] * (table["accuracy"] - table["confidence"]).abs()).sum() / len(labels))


def reliability_table(logits: np.ndarray, labels: np.ndarray, multilabel: bool, bins: int = 15) -> "pd.DataFrame":
    """Single-label: top-1 softmax confidence against top-1 correctness. Multi-label: every
    (image, class) sigmoid probability against whether the class is present."""
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    if multilabel:
        return reliability((1.0 / (1.0 + np.exp(-logits))).ravel(), np.asarray(labels).astype(bool).ravel(), bins)
    probs = np.exp(log_softmax(logits, axis=1))
    return reliability(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


CONFUSION_MAX_CLASSES = 100


def confusion_rows(logits: np.ndarray, labels: np.ndarray, names: Sequence[str], multilabel: bool) -> "pd.DataFrame":
    """``actual, predicted`` class names per test image, for DVC's confusion template; empty
    (header only) for multi-label tasks and above :data:`CONFUSION_MAX_CLASSES` classes, where
    a confusion matrix is unreadable."""
    import pandas as pd

    if multilabel or len(names) > CONFUSION_MAX_CLASSES:
        return pd.DataFrame(columns=["actual", "predicted"])
    names = np.asarray(names, dtype=object)
    return pd.DataFrame({"actual": names[np.asarray(labels)], "predicted": names[np.asarray(logits).argmax(axis=1)]})


def single_label(logits: np.ndarray, labels: np.ndarray, groups: Sequence[str]) -> Tuple[Dict, np.ndarray]:
    """Metrics and per-class accuracy from logits ``[N, C]`` and labels ``[N]``."""
    from scipy.special import log_softmax
    from sklearn.metrics import f1_score

    logits = np.asarray(logits, dtype=np.float64)
    num_classes = logits.shape[1]
    pred = logits.argmax(axis=1)
    k = min(5, num_classes)
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    log_probs = log_softmax(logits, axis=1)
    per_class = per_class_accuracy(labels, pred, num_classes)
    groups = np.asarray(groups)
    result = {
        "top1": float((pred == labels).mean()),
        "top5": float((topk == labels[:, None]).any(axis=1).mean()),
        "balanced_acc": balanced_accuracy(labels, pred),
    }
    for group in SINGLE_GROUPS:
        result[group] = _mean_or_none(per_class[groups == group])
    result["macro_f1"] = float(f1_score(labels, pred, average="macro", labels=np.unique(labels), zero_division=0))
    result["nll"] = float(-log_probs[np.arange(len(labels)), labels].mean())
    result["ece"] = expected_calibration_error(np.exp(log_probs), labels)
    return result, per_class


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    from sklearn.metrics import average_precision_score

    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            ap[c] = average_precision_score(targets[:, c], scores[:, c])
    return ap


def multi_label(logits: np.ndarray, targets: np.ndarray, groups: Sequence[str],
                threshold: float = 0.5) -> Tuple[Dict, np.ndarray]:
    """Metrics and per-class AP from logits ``[N, C]`` and multi-hot targets ``[N, C]``."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    ap = per_class_ap(logits, targets)
    groups = np.asarray(groups)
    result = {"mAP": _mean_or_none(ap)}
    for group in MULTI_GROUPS:
        result[f"mAP_{group}"] = _mean_or_none(ap[groups == group])
    pred = 1.0 / (1.0 + np.exp(-logits)) >= threshold
    tp = (pred & targets).sum(axis=0).astype(np.float64)
    fp = (pred & ~targets).sum(axis=0).astype(np.float64)
    fn = (~pred & targets).sum(axis=0).astype(np.float64)
    present = targets.any(axis=0)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    cp = float(precision[present].mean()) if present.any() else 0.0
    cr = float(recall[present].mean()) if present.any() else 0.0
    op = tp.sum() / max(tp.sum() + fp.sum(), 1.0)
    orr = tp.sum() / max(tp.sum() + fn.sum(), 1.0)
    result["CF1"] = float(2 * cp * cr / (cp + cr)) if cp + cr > 0 else 0.0
    result["OF1"] = float(2 * op * orr / (op + orr)) if op + orr > 0 else 0.0
    return result, ap


def evaluate(logits: np.ndarray, labels: np.ndarray, classes: "pd.DataFrame", multilabel: bool):
    """Metrics dict and a per-class table (for `dvc plots`).

    The table's ``score`` column is the per-class accuracy (single-label) or average
    precision (multi-label): one column name, so one plot definition serves both."""
    import pandas as pd

    groups = classes["group"].to_numpy()
    if multilabel:
        result, per_class = multi_label(logits, labels, groups)
        test_count = np.asarray(labels).sum(axis=0)
    else:
        result, per_class = single_label(logits, labels, groups)
        test_count = np.bincount(labels, minlength=len(classes))
    table = pd.DataFrame({
        "index": classes["index"], "name": classes["name"], "train_count": classes["train_count"],
        "test_count": test_count, "group": classes["group"], "score": per_class,
    })
    return result, table


def selection_score(logits: np.ndarray, labels: np.ndarray, multilabel: bool) -> float:
    """Model-selection score on the validation split: balanced accuracy or mAP."""
    if multilabel:
        return float(np.nanmean(per_class_ap(logits, np.asarray(labels).astype(bool))))
    return balanced_accuracy(labels, np.asarray(logits).argmax(axis=1))


def chance_score(labels: np.ndarray, multilabel: bool) -> float:
    """The :func:`selection_score` of a model that ignores its input: balanced accuracy 1/K of always
    predicting one class (K: classes present in ``labels``; 1/C when all are); for multi-label, the
    mean over classes with a positive of the class's prevalence, the average precision of a
    constant score."""
    if multilabel:
        targets = np.asarray(labels).astype(bool)
        prevalence = targets.mean(axis=0)
        return float(prevalence[targets.any(axis=0)].mean())
    return 1.0 / len(np.unique(labels))


CHANCE_MEANING = {"single": "what always predicting one class scores",
                  "multi": "the mean class prevalence in validation, what a constant score gets"}


def above_chance(score: float, chance: float) -> bool:
    """``score`` beats ``chance`` by more than float rounding."""
    return score > chance + 1e-9


TAU_GRID = tuple(float(t) for t in np.round(np.arange(0.0, 2.01, 0.1), 2))


def pick_on_validation(candidates, score) -> tuple:
    """The candidate with the best validation ``score(candidate)`` (ties: the first), and its score.
    Post-hoc choices (tau of logit adjustment or tau-normalisation) are made here, never on test."""
    scores = [score(c) for c in candidates]
    best = int(np.argmax(scores))
    return candidates[best], scores[best]
