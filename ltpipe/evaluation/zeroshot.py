"""The `zeroshot` stage: CLIP's text classifier on the test split, nothing trained."""

from typing import Dict

import numpy as np

from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.data import manifest
from ltpipe.evaluation.results import check_features, check_task, run_fields, warn_skipped, write_metrics
from ltpipe.features.store import SplitFeatures, TextFeatures

ZEROSHOT_RUN = {"head": "zeroshot", "loss": "none", "sampler": "none", "stage2": "none", "seed": None,
                "posthoc": "none", "posthoc_tau": None}


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
    text = TextFeatures(paths.TEXT_FEATURES)
    check_features(text, prepared)
    logits = zeroshot_logits(test.pooled, text)
    return write_metrics(logits, test.labels, prepared, run_fields(ZEROSHOT_RUN, prepared, test), "zeroshot")
