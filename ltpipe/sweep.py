"""Sweeps: every head x loss x seed listed under `sweep` in params.yaml, trained and
evaluated on the cached features, one metrics file per cell (the `sweep` matrix stage;
``ltpipe.report`` compares them).

A cell trains ``head`` with ``loss`` and ``seed`` using the sweep's own `sweep.sampler`
and `sweep.train` (the options of `heads.<head>` and `losses.<loss>` are shared with the
main experiment), so changing the main experiment's `train` or `sampler` re-runs no cell.
Two-stage methods and post-hoc adjustment belong to the main experiment. A loss that has
no variant for the dataset's task (``ce`` on COCO-LT) gives a cell marked ``skipped``
with the reason, so one sweep list serves both tasks.
"""

import json
from typing import Dict

from ltpipe import losses, paths
from ltpipe.config import Params
from ltpipe.data import manifest
from ltpipe.evaluation import check_features, check_task, run_fields, write_metrics
from ltpipe.features.store import SplitFeatures
from ltpipe.inference import FeatureInput, predict
from ltpipe.report import cell_name
from ltpipe.runtime import resolve_device
from ltpipe.training import fit, validate_choice


class SweepParams(Params):
    """The parameters as a cell reads them: the training schedule from `sweep.train`, so
    ``training.fit`` (which reads `train`) trains the cell with the sweep's own section."""

    def sub(self, key: str) -> Params:
        return super().sub("sweep.train" if key == "train" else key)


def run_cell(params: Params, head: str, loss: str, seed: int) -> Dict:
    """Train and evaluate one cell; write ``metrics/sweep/<head>-<loss>-<seed>.json``."""
    prepared = manifest.load(paths.PREPARED_DIR)
    task = "multi" if check_task(params, prepared) else "single"
    name = cell_name(head, loss, seed)
    if loss not in losses.names_for(task):
        losses.LOSSES.get(loss)  # an unknown name is an error, not a skip
        payload = {"dataset": prepared.name, "task": task, "head": head, "loss": loss, "seed": seed,
                   "skipped": f"loss {loss!r} has no {task}-label variant"}
        paths.SWEEP_DIR.mkdir(parents=True, exist_ok=True)
        (paths.SWEEP_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"sweep {name}: skipped ({payload['skipped']})")
        return payload
    choice = validate_choice(head, loss, params.str("sweep.sampler"), None, seed, task)
    model, _ = fit(SweepParams(params.data, params.source), prepared, choice)
    device = resolve_device(params.str("model.device"))
    test = SplitFeatures(paths.FEATURES_DIR / "test.h5")
    check_features(test, prepared)
    logits = predict(model.to(device), FeatureInput(test, model.input, device))
    fields = run_fields(dict(choice.identity(), posthoc="none", posthoc_tau=None), prepared, test)
    return write_metrics(logits, test.labels, prepared, fields, name, paths.SWEEP_DIR, per_class=False)
