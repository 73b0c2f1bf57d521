"""The `evaluate` stage: the trained head (stage 2 included) on the test split, with optional
post-hoc logit adjustment."""

from typing import Dict, Optional, Tuple

import numpy as np

from ltpipe import heads, presets
from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.runtime import read_threads, resolve_device, use_threads
from ltpipe.data import manifest
from ltpipe.evaluation import metrics
from ltpipe.evaluation.inference import PREDICT_BATCH, FeatureInput, predict
from ltpipe.evaluation.results import (
    check_features,
    check_posthoc,
    check_task,
    log_prior,
    logit_adjust,
    run_fields,
    warn_skipped,
    write_metrics,
)
from ltpipe.features.store import SplitFeatures
from ltpipe.training.checkpoint import load_checkpoint


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


def run_evaluate(params: Params) -> Dict:
    prepared = manifest.load(paths.PREPARED_DIR)
    check_task(params, prepared)
    posthoc = check_posthoc(params, prepared.multilabel, prepared.split_size("val"))
    preset = presets.check_param(params.raw("preset"))
    device = resolve_device(params.str("model.device"))
    head, run = load_checkpoint(paths.HEAD_CHECKPOINT)
    head.to(device)
    test = SplitFeatures(paths.FEATURES_DIR / "test.h5")
    check_features(test, prepared)
    warn_skipped(test)
    threads = use_threads(read_threads(params),
                          heads.step_size(run["head"], head, test.pooled.shape[1], prepared.num_classes,
                                          PREDICT_BATCH), f"predicting with {run['head']}")
    logits = predict(head, FeatureInput(test, head.input, device))
    run = dict(run, posthoc=posthoc, posthoc_tau=None, threads=threads)
    if posthoc == "logit_adjust":
        tau, prior = posthoc_logit_adjust(head, device, prepared)
        logits = logit_adjust(logits, prior, tau)
        run["posthoc_tau"] = tau
        print(f"post-hoc logit adjustment: tau {tau} (chosen on validation)")
    fields = run_fields(run, prepared, test)
    arch, pretrained = str(test.attrs.get("arch")), str(test.attrs.get("pretrained", "")) or None

    def compare(result: Dict) -> Optional[Dict]:
        return presets.comparison(preset, fields, arch, pretrained, result, presets.EVAL_METRICS)

    payload = write_metrics(logits, test.labels, prepared, fields, "eval", compare=compare)
    presets.report(payload.get("preset"))
    return payload
