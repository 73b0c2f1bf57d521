"""The `report` stage: the sweep's cells aggregated per method (mean ± std over seeds, the
best of each metric marked) into ``metrics/summary.json``, ``.md`` and ``.csv`` (plotted by
`dvc plots`), and the few numbers `dvc exp show` tabulates, ``metrics/sweep_best.json``.
Only the cells the current `sweep` lists name are read, so files of cells removed from the
lists never leak in.
"""

import json
from typing import Dict, List, Sequence

import numpy as np

from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, DataError

SINGLE_KEYS = ("top1", "top5", "balanced_acc", "many", "medium", "few", "macro_f1", "nll", "ece")
MULTI_KEYS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "CF1", "OF1")
LOWER_IS_BETTER = frozenset({"nll", "ece"})
# The sweep's headline metrics (overall and tail): `metrics/sweep_best.json`, the only sweep
# numbers DVC tabulates (every method x metric of summary.json would be a column in `dvc exp show`).
HEADLINE = {"single": ("top1", "few"), "multi": ("mAP", "mAP_tail")}
SWEEP_BEST = paths.METRICS_DIR / "sweep_best.json"


def cell_name(head: str, loss: str, seed: int) -> str:
    return f"{head}-{loss}-{seed}"


def _mean_std(values: List[float]) -> Dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std}


def aggregate(cells: Sequence[Dict], keys: Sequence[str]) -> Dict:
    """Per method (``head/loss``): the number of seeds and mean and sample standard deviation
    of each metric over them; and the best method of each metric (highest mean, lowest for
    ``nll`` and ``ece``; the first listed wins a tie)."""
    methods: Dict[str, List[Dict]] = {}
    for cell in cells:
        methods.setdefault(f"{cell['head']}/{cell['loss']}", []).append(cell)
    table = {method: {"seeds": len(runs), **{k: _mean_std([r.get(k) for r in runs]) for k in keys}}
             for method, runs in methods.items()}
    best = {}
    for key in keys:
        scored = [(m, row[key]["mean"]) for m, row in table.items() if row[key]["mean"] is not None]
        if scored:
            sign = -1 if key in LOWER_IS_BETTER else 1
            best[key] = max(scored, key=lambda item: sign * item[1])[0]
    return {"methods": table, "best": best}


def best_of(summary: Dict, keys: Sequence[str]) -> Dict:
    """Per metric in ``keys``: the best method and its mean over seeds (``None`` when no method
    has a value)."""
    best = {}
    for key in keys:
        method = summary["best"].get(key)
        best[key] = {"method": method, "mean": summary["methods"][method][key]["mean"] if method else None}
    return best


def markdown(summary: Dict, keys: Sequence[str]) -> str:
    """A table, mean ± std over seeds, the best value of each column in bold."""
    lines = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for method, row in summary["methods"].items():
        cells = []
        for key in keys:
            stat = row[key]
            if stat["mean"] is None:
                cells.append("–")
                continue
            text = f"{stat['mean']:.3f} ± {stat['std']:.3f}"
            cells.append(f"**{text}**" if summary["best"].get(key) == method else text)
        lines.append(f"| {method} | {row['seeds']} | " + " | ".join(cells) + " |")
    if summary.get("skipped"):
        lines.append("")
        lines.append("Skipped: " + "; ".join(f"{s['cell']} ({s['reason']})" for s in summary["skipped"]) + ".")
    return "\n".join(lines) + "\n"


def sweep_list(section: Params, key: str, kind: type) -> list:
    """`sweep.<key>`: a non-empty list of distinct ``kind`` values, else a ConfigError naming it."""
    values = section.raw(key)
    if not isinstance(values, list) or not values or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"`sweep.{key}` must be a non-empty list of {kind.__name__}s, got {values!r}.")
    if len(set(values)) != len(values):
        raise ConfigError(f"`sweep.{key}` lists a value twice: {values!r}.")
    return values


def load_cells(heads: Sequence[str], loss_names: Sequence[str], seeds: Sequence[int],
               sweep_dir=paths.SWEEP_DIR) -> List[Dict]:
    cells = []
    for head in heads:
        for loss in loss_names:
            for seed in seeds:
                path = sweep_dir / f"{cell_name(head, loss, seed)}.json"
                if not path.is_file():
                    raise DataError(f"sweep result {path} is missing. Run `dvc repro sweep` (or `dvc repro`).")
                cells.append(json.loads(path.read_text()))
    return cells


def run_report(params: Params) -> Dict:
    """The `report` stage: ``metrics/summary.{json,md,csv}`` over the cells `sweep` lists."""
    section = params.sub("sweep")
    cells = load_cells(sweep_list(section, "heads", str), sweep_list(section, "losses", str),
                       sweep_list(section, "seeds", int))
    done = [c for c in cells if "skipped" not in c]
    if not done:
        print("WARNING: every sweep cell was skipped: no loss in `sweep.losses` fits this dataset's task; "
              "the summary is empty.")
    multilabel = cells[0]["task"] == "multi"
    keys = MULTI_KEYS if multilabel else SINGLE_KEYS
    summary = {"dataset": cells[0]["dataset"], "task": cells[0]["task"], **aggregate(done, keys),
               "skipped": [{"cell": cell_name(c["head"], c["loss"], c["seed"]), "reason": c["skipped"]}
                           for c in cells if "skipped" in c]}
    paths.METRICS_DIR.mkdir(parents=True, exist_ok=True)
    paths.SUMMARY.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    paths.SUMMARY.with_suffix(".md").write_text(markdown(summary, keys))
    main, tail = HEADLINE[summary["task"]]
    SWEEP_BEST.write_text(json.dumps(best_of(summary, (main, tail)), indent=2) + "\n")
    import pandas as pd  # here, not at module level: the sweep stage imports this module for `cell_name` only

    pd.DataFrame([{"method": m, "score": row[main]["mean"], "tail_score": row[tail]["mean"],
                   "score_std": row[main]["std"]} for m, row in summary["methods"].items()]).to_csv(
        paths.SUMMARY.with_suffix(".csv"), index=False)
    print(markdown(summary, keys))
    return summary
