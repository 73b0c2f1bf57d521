"""The sweep report: aggregation over seeds, best-of-column marks, the markdown table."""

import json

import numpy as np
import pytest

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, DataError
from ltpipe.evaluation import report


def cell(head, loss, seed, **values):
    return {"dataset": "d", "task": "single", "head": head, "loss": loss, "seed": seed, **values}


CELLS = [cell("cosine", "ce", 0, top1=0.50, few=0.10, nll=2.0),
         cell("cosine", "ce", 1, top1=0.54, few=0.14, nll=1.0),
         cell("cosine", "bsm", 0, top1=0.52, few=0.30, nll=1.8),
         cell("cosine", "bsm", 1, top1=0.52, few=0.20, nll=1.6)]


def test_mean_std_over_seeds_and_best_per_column():
    summary = report.aggregate(CELLS, ("top1", "few", "nll"))
    ce, bsm = summary["methods"]["cosine/ce"], summary["methods"]["cosine/bsm"]
    assert ce["seeds"] == 2 and ce["top1"]["mean"] == pytest.approx(0.52)
    assert ce["top1"]["std"] == pytest.approx(np.std([0.50, 0.54], ddof=1))  # sample std, 0.0283
    assert bsm["top1"]["std"] == pytest.approx(0.0)
    assert bsm["few"]["mean"] == pytest.approx(0.25)
    # top1 ties at 0.52: the first listed method wins; nll: lower is better (1.5 vs 1.7).
    assert summary["best"] == {"top1": "cosine/ce", "few": "cosine/bsm", "nll": "cosine/ce"}


def test_markdown_marks_the_best_and_lists_skipped_cells():
    summary = report.aggregate(CELLS, ("top1", "few"))
    summary["skipped"] = [{"cell": "cosine-bce-0", "reason": "loss 'bce' has no single-label variant"}]
    text = report.markdown(summary, ("top1", "few"))
    lines = text.splitlines()
    assert lines[0] == "| method | seeds | top1 | few |"
    assert lines[2] == "| cosine/ce | 2 | **0.520 ± 0.028** | 0.120 ± 0.028 |"
    assert lines[3] == "| cosine/bsm | 2 | 0.520 ± 0.000 | **0.250 ± 0.071** |"
    assert "Skipped: cosine-bce-0 (loss 'bce' has no single-label variant)." in text


def test_a_metric_missing_in_every_run_is_a_dash():
    summary = report.aggregate([cell("h", "l", 0, top1=0.5, few=None)], ("top1", "few"))
    assert summary["methods"]["h/l"]["few"] == {"mean": None, "std": None} and "few" not in summary["best"]
    assert report.markdown(summary, ("top1", "few")).splitlines()[2] == "| h/l | 1 | **0.500 ± 0.000** | – |"


def test_run_report_reads_only_the_listed_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "metrics/sweep"
    sweep.mkdir(parents=True)
    for c in CELLS + [cell("cosine", "old", 0, top1=0.99)]:  # a stale file of a removed cell
        (sweep / f"{c['head']}-{c['loss']}-{c['seed']}.json").write_text(json.dumps(c))
    skipped = cell("cosine", "bce", 0, skipped="loss 'bce' has no single-label variant")
    (sweep / "cosine-bce-0.json").write_text(json.dumps(skipped))
    params = Params({"sweep": {"heads": ["cosine"], "losses": ["ce", "bsm", "bce"], "seeds": [0, 1]}})
    with pytest.raises(DataError, match=r"metrics/sweep/cosine-bce-1.json is missing. Run `dvc repro sweep`"):
        report.run_report(params)
    (sweep / "cosine-bce-1.json").write_text(json.dumps(dict(skipped, seed=1)))
    summary = report.run_report(params)
    assert set(summary["methods"]) == {"cosine/ce", "cosine/bsm"}
    assert [s["cell"] for s in summary["skipped"]] == ["cosine-bce-0", "cosine-bce-1"]
    assert json.loads((tmp_path / "metrics/summary.json").read_text())["best"]["few"] == "cosine/bsm"
    csv = (tmp_path / "metrics/summary.csv").read_text().splitlines()
    assert csv[0] == "method,score,tail_score,score_std" and csv[1].startswith("cosine/ce,0.52")
    # The only sweep numbers `dvc exp show` tabulates: the best method of top-1 (a tie at 0.52,
    # the first listed wins) and of the few-shot group (0.25 vs 0.12), with its mean over seeds.
    best = json.loads((tmp_path / "metrics/sweep_best.json").read_text())
    assert best == {"top1": {"method": "cosine/ce", "mean": pytest.approx(0.52)},
                    "few": {"method": "cosine/bsm", "mean": pytest.approx(0.25)}}


def test_bad_sweep_lists_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for lists, message in (({"heads": "cosine"}, r"`sweep.heads` must be a non-empty list of strs"),
                           ({"seeds": [0, 0]}, r"`sweep.seeds` lists a value twice"),
                           ({"losses": []}, r"`sweep.losses` must be a non-empty list")):
        values = dict({"heads": ["cosine"], "losses": ["ce"], "seeds": [0]}, **lists)
        with pytest.raises(ConfigError, match=message):
            report.run_report(Params({"sweep": values}))


def test_a_sweep_with_every_cell_skipped_gives_an_empty_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics/sweep").mkdir(parents=True)
    skipped = cell("cosine", "ce", 0, skipped="loss 'ce' has no multi-label variant", task="multi")
    (tmp_path / "metrics/sweep/cosine-ce-0.json").write_text(json.dumps(skipped))
    summary = report.run_report(Params({"sweep": {"heads": ["cosine"], "losses": ["ce"], "seeds": [0]}}))
    assert summary["methods"] == {} and summary["task"] == "multi" and len(summary["skipped"]) == 1
    assert (tmp_path / "metrics/summary.md").read_text().startswith("| method | seeds | mAP |")
    assert json.loads((tmp_path / "metrics/sweep_best.json").read_text()) == {
        "mAP": {"method": None, "mean": None}, "mAP_tail": {"method": None, "mean": None}}
