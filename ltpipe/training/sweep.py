"""Sweeps: every head x loss x seed listed under `sweep` in params.yaml, trained and
evaluated on the cached features, one metrics file per cell (the `sweep` matrix stage;
``ltpipe.evaluation.report`` compares them).

A cell trains ``head`` with ``loss`` and ``seed`` using the sweep's own `sweep.sampler`
and `sweep.train` (the options of `heads.<head>` and `losses.<loss>` are shared with the
main experiment), so changing the main experiment's `train` or `sampler` re-runs no cell.
Two-stage methods and post-hoc adjustment belong to the main experiment. A loss that has
no variant for the dataset's task (``ce`` on COCO-LT) gives a cell marked ``skipped``
with the reason, so one sweep list serves both tasks.
"""

import json
from typing import Dict

from ltpipe import losses
from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.runtime import resolve_device
from ltpipe.data import manifest
from ltpipe.evaluation.inference import FeatureInput, predict
from ltpipe.evaluation.report import cell_name
from ltpipe.evaluation.results import check_features, check_task, run_fields, write_metrics
from ltpipe.features.store import SplitFeatures
from ltpipe.training.loop import fit
from ltpipe.training.spec import read_run_spec


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
    spec = read_run_spec(params, task, head=head, loss=loss, seed=seed, sampler_key="sweep.sampler",
                         train_key="sweep.train", with_stage2=False)
    model, summary = fit(spec, prepared)
    device = resolve_device(spec.device)
    test = SplitFeatures(paths.FEATURES_DIR / "test.h5")
    check_features(test, prepared)
    logits = predict(model.to(device), FeatureInput(test, model.input, device))
    fields = run_fields(dict(spec.identity(), posthoc="none", posthoc_tau=None, threads=summary["threads"]),
                        prepared, test)
    fields["protocol"] = summary["protocol"]
    return write_metrics(logits, test.labels, prepared, fields, name, paths.SWEEP_DIR, per_class=False)
