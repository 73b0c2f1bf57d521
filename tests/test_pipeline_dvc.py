"""The DAG end to end through DVC, in a temporary git repository."""

import json
import statistics
from pathlib import Path

import pytest
import yaml

from ltpipe import losses
from ltpipe.evaluation import report
from tests import dvc_repo

pytestmark = pytest.mark.slow
SINGLE_LABEL_METRICS = ("top1", "top5", "balanced_acc", "many", "medium", "few", "macro_f1", "nll", "ece")


def summary_from_cells(sweep_dir: Path) -> dict:
    """Each method's row of metrics/summary.json, recomputed from the per-seed cell files alone: the
    number of seeds and, per metric, the mean and the sample standard deviation (n - 1 in the
    denominator, 0 for one seed: the convention of ltpipe/evaluation/report.py) over seeds."""
    runs = {}
    for path in sorted(sweep_dir.glob("*.json")):
        cell = json.loads(path.read_text())
        if "skipped" not in cell:
            runs.setdefault(f"{cell['head']}/{cell['loss']}", []).append(cell)
    rows = {}
    for method, cells in runs.items():
        rows[method] = {"seeds": len(cells)}
        for key in SINGLE_LABEL_METRICS:
            values = [c[key] for c in cells if c.get(key) is not None]
            rows[method][key] = {"mean": statistics.fmean(values) if values else None,
                                 "std": (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None}
    return rows


def assert_summary_matches_cells(summary: dict, sweep_dir: Path) -> None:
    expected = summary_from_cells(sweep_dir)
    assert expected and summary["methods"].keys() == expected.keys()
    for method, row in expected.items():
        shown = summary["methods"][method]
        assert shown.keys() == row.keys() and shown["seeds"] == row["seeds"], method
        for key in SINGLE_LABEL_METRICS:
            for stat, value in row[key].items():
                got, want = shown[key][stat], value if value is None else pytest.approx(value, rel=1e-12, abs=1e-15)
                assert got == want, f"{method} {key} {stat}: summary {got}, cells {value}"


def test_summary_check_recomputes_mean_and_sample_std_from_the_cell_files(tmp_path):
    # The check the end-to-end sweep test relies on, on cells written by hand: top1 0.5 and 0.8 have
    # mean 0.65 and sample std sqrt(0.045) = 0.2121 (the population std would be 0.15).
    values = {"top1": (0.5, 0.8), "few": (0.1, 0.1), "nll": (2.0, 1.0)}
    for seed in (0, 1):
        cell = {"dataset": "d", "task": "single", "head": "h", "loss": "l", "seed": seed,
                **{key: values.get(key, (None, None))[seed] for key in SINGLE_LABEL_METRICS}}
        (tmp_path / f"h-l-{seed}.json").write_text(json.dumps(cell))
    row = {"seeds": 2, **{key: {"mean": None, "std": None} for key in SINGLE_LABEL_METRICS},
           "top1": {"mean": 0.65, "std": 0.045 ** 0.5}, "few": {"mean": 0.1, "std": 0.0},
           "nll": {"mean": 1.5, "std": 0.5 ** 0.5}}
    assert_summary_matches_cells({"methods": {"h/l": row}}, tmp_path)
    cells = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("*.json"))]
    assert_summary_matches_cells(report.aggregate(cells, SINGLE_LABEL_METRICS), tmp_path)  # the stage's layout
    wrong = [("top1", "std", 0.15), ("top1", "std", 0.0), ("few", "mean", 0.2), ("nll", "std", None)]
    for key, stat, value in wrong:
        broken = json.loads(json.dumps(row))
        broken[key][stat] = value
        with pytest.raises(AssertionError, match=f"h/l {key} {stat}"):
            assert_summary_matches_cells({"methods": {"h/l": broken}}, tmp_path)
    with pytest.raises(AssertionError):
        assert_summary_matches_cells({"methods": {"h/l": row, "h/other": row}}, tmp_path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = dvc_repo.make(tmp_path_factory.mktemp("project"))
    result = dvc_repo.run(path, "dvc", "repro")
    cells = [f"sweep@cosine-{loss}-{seed}" for loss in ("ce", "bsm") for seed in (0, 1)]
    assert sorted(dvc_repo.stages_run(result.stdout)) == sorted(
        ["weights", "prepare", "extract", "text", "zeroshot", "train", "evaluate", "report"] + cells)
    dvc_repo.run(path, "git", "add", "-A")
    dvc_repo.run(path, "git", "commit", "-qm", "baseline")
    return path


def back_to_baseline(repo: Path) -> None:
    """The committed baseline after an experiment: tracked files, no file an experiment added to an
    uncached output (metrics/train's stage-2 curves), DVC's outputs of the lock; nothing stale."""
    dvc_repo.run(repo, "git", "checkout", "--", ".")
    dvc_repo.run(repo, "git", "clean", "-fdq")
    dvc_repo.run(repo, "dvc", "checkout", "--force")
    assert dvc_repo.stale_stages(repo) == {}


def test_repro_writes_every_output(repo):
    for split in ("train", "val", "test"):
        assert (repo / "data/features" / f"{split}.h5").is_file()
    assert (repo / "data/text/text.h5").is_file()
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["head"] == "cosine" and metrics["loss"] == "ce" and metrics["dataset"] == "synthetic"
    for key in ("top1", "top5", "balanced_acc", "many", "medium", "few", "macro_f1", "nll", "ece"):
        assert key in metrics
    zeroshot = json.loads((repo / "metrics/zeroshot.json").read_text())
    # zeroshot is one numpy product: no torch threads to record
    assert zeroshot["head"] == "zeroshot" and set(metrics) - {"threads"} == set(zeroshot)
    # model.threads: auto runs the tiny cosine head's small steps on one thread, and says so
    assert metrics["threads"] == 1
    assert json.loads((repo / "metrics/train/metrics.json").read_text())["threads"] == 1
    assert json.loads((repo / "metrics/sweep/cosine-ce-0.json").read_text())["threads"] == 1


def test_plots_render(repo, tmp_path):
    dvc_repo.run(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots/index.html").read_text()
    assert '"scale": {"type": "log"}' in page  # per-class score against training count
    # Plots are drawn under their titles; file names show only in the legend of an overlay.
    for title in ("Reliability diagram", "Confusion matrix", "Sweep: test score per method", "Training loss per epoch"):
        assert title in page, title
    assert "eval_reliability.csv" in page and "zeroshot_reliability.csv" in page
    confusion = (repo / "metrics/eval_confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1 + 6 * 6  # 6 classes x 6 test images


def test_plots_show_draws_the_titled_plots_with_data(repo):
    # Only the top-level plots of dvc.yaml, each with its rows, title and axis names (issue 15).
    definitions = {name: spec for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
                   for name, spec in entry.items()}
    shown = json.loads(dvc_repo.run(repo, "dvc", "plots", "show", "--json").stdout)
    assert not shown.get("errors") and set(shown["data"]) == set(definitions) and len(definitions) == 6
    for name, (rendered,) in shown["data"].items():
        assert rendered["content"]["data"]["values"], f"plot {name} is empty"
        spec = json.dumps(rendered["content"])
        for key in ("title", "x_label", "y_label"):
            assert json.dumps(definitions[name][key]) in spec, f"plot {name} does not show its {key}"


def test_sweep_reports_every_loss_over_seeds(repo):
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary["methods"]) == {"cosine/ce", "cosine/bsm"}
    for row in summary["methods"].values():
        assert row["seeds"] == 2
    assert_summary_matches_cells(summary, repo / "metrics/sweep")
    cells = [json.loads((repo / f"metrics/sweep/cosine-{loss}-{seed}.json").read_text())
             for loss in ("ce", "bsm") for seed in (0, 1)]
    # The sweep cell with the main experiment's head, loss and seed reproduces it exactly.
    main = json.loads((repo / "metrics/eval.json").read_text())
    assert cells[0]["top1"] == main["top1"] and cells[0]["few"] == main["few"]
    assert "**" in (repo / "metrics/summary.md").read_text()


def test_adding_a_loss_to_the_sweep_runs_only_its_cells(repo):
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "sweep.losses=[ce,bsm,la]")
    assert sorted(dvc_repo.stages_run(result.stdout)) == ["report", "sweep@cosine-la-0", "sweep@cosine-la-1"]
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary["methods"]) == {"cosine/ce", "cosine/bsm", "cosine/la"}
    # la with tau 1 is Balanced Softmax: the same numbers, seed for seed.
    assert summary["methods"]["cosine/la"]["top1"] == summary["methods"]["cosine/bsm"]["top1"]
    back_to_baseline(repo)
    # Back on the baseline, `dvc checkout` has deleted the removed cells' files (cached outputs
    # DVC placed, now of no stage), so the report's folder is the baseline's: nothing re-runs.
    assert not list((repo / "metrics/sweep").glob("cosine-la-*.json"))
    assert dvc_repo.stages_run(dvc_repo.run(repo, "dvc", "repro").stdout) == []
    assert json.loads((repo / "metrics/summary.json").read_text())["methods"].keys() == {"cosine/ce", "cosine/bsm"}


def test_second_repro_runs_nothing(repo):
    result = dvc_repo.run(repo, "dvc", "repro")
    # Only the fingerprint of the data outside the repository, which finds it unchanged.
    assert dvc_repo.stages_run(result.stdout, include_inputs=True) == ["inputs"]
    assert "inputs: unchanged" in result.stdout and "didn't change, skipping" in result.stdout
    assert dvc_repo.stale_stages(repo) == {}


def test_finetune_runs_only_when_a_mode_is_listed(repo):
    # Runs before the experiments below, which leave metrics/train changed. The fixture's plain
    # `dvc repro` ran no finetune stage: `finetune.modes` is empty by default.
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "finetune.modes=[bitfit]")
    assert dvc_repo.stages_run(result.stdout) == ["finetune@bitfit"]
    tuned = json.loads((repo / "metrics/finetune/bitfit.json").read_text())
    cached = json.loads((repo / "metrics/eval.json").read_text())
    assert set(cached) < set(tuned) and tuned["mode"] == "bitfit" and tuned["loss"] == "ce"
    assert (repo / "metrics/finetune/bitfit_log/plots/metrics/loss.tsv").is_file()
    assert (repo / "data/finetune/bitfit.pt").is_file()
    shown = json.loads(dvc_repo.run(repo, "dvc", "metrics", "show", "--json").stdout)
    assert any("metrics/finetune/bitfit.json" in entry.get("data", {}) for entry in shown.values())
    back_to_baseline(repo)


def test_loss_experiment_reruns_only_train_and_evaluate(repo):
    features = repo / "data/features/train.h5"
    before = features.stat().st_mtime_ns
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-n", "bsm-run", "-S", "loss=bsm")
    assert dvc_repo.stages_run(result.stdout) == ["train", "evaluate"]
    assert features.stat().st_mtime_ns == before, "extraction must not be repeated"
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["loss"] == "bsm"

    diff = json.loads(dvc_repo.run(repo, "dvc", "metrics", "diff", "--json", "--all").stdout)
    assert "metrics/eval.json" in diff and "top1" in diff["metrics/eval.json"]
    shown = dvc_repo.run(repo, "dvc", "exp", "show", "--md", "--no-pager").stdout
    assert "bsm-run" in shown and "bsm" in shown


def test_two_stage_and_posthoc_experiments(repo):
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "loss=ldam", "-S", "stage2=marc")
    assert dvc_repo.stages_run(result.stdout) == ["train", "evaluate"]
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert (metrics["loss"], metrics["stage2"], metrics["posthoc"]) == ("ldam", "marc", "none")
    assert "stage2/val/score" in (repo / "metrics/train/metrics.json").read_text() or \
        (repo / "metrics/train/plots/metrics/stage2/val/score.tsv").is_file()
    # A post-hoc change re-runs evaluate only.
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "loss=ldam", "-S", "stage2=marc",
                          "-S", "evaluate.posthoc=logit_adjust")
    assert dvc_repo.stages_run(result.stdout) == ["evaluate"]
    adjusted = json.loads((repo / "metrics/eval.json").read_text())
    assert adjusted["posthoc"] == "logit_adjust" and 0 <= adjusted["posthoc_tau"] <= 2
    back_to_baseline(repo)


def test_unknown_loss_fails_before_work_with_valid_names(repo):
    try:
        result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "loss=focl", check=False)
    finally:
        back_to_baseline(repo)  # DVC leaves the failed value in params.yaml for the user to fix
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unknown loss 'focl'" in output and f"Valid names: {', '.join(losses.LOSSES.names())}." in output
    assert "Traceback" not in output
    # Refused by `inputs` (ltpipe/validate.py), first: nothing else runs.
    assert "failed to reproduce 'inputs'" in output and dvc_repo.stages_run(result.stdout) == []


def test_re_extraction_with_identical_features_stops_there(repo):
    # Worker count changes nothing in the features: the cache keeps its hash, so nothing after
    # extraction re-runs.
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "extract.workers=1")
    assert dvc_repo.stages_run(result.stdout) == ["extract"]
    assert (repo / "metrics/extract_report.json").is_file()


# A misspelt key of each kind, typed into params.yaml (`dvc exp run -S` refuses a key params.yaml lacks):
# refused with one line naming it by `inputs`, first on every run, before any other stage.
MISSPELT = [("train.epochz", "inputs", "`train` has no option 'epochz'"),
            ("los", "inputs", "params.yaml has no top-level key 'los'"),
            ("model.precison", "inputs", "`model` has no option 'precison'"),
            ("evaluate.posthok", "inputs", "`evaluate` has no option 'posthok'"),
            ("sweep.seed", "inputs", "`sweep` has no key 'seed'"),
            ("datasets.synthetc", "inputs", "`datasets.synthetc` names no dataset"),
            ("heads.cosin", "inputs", "`heads.cosin` names no head")]


@pytest.mark.parametrize("key,stage,message", MISSPELT, ids=[m[0] for m in MISSPELT])
def test_a_misspelt_key_is_refused_by_dvc(repo, key, stage, message):
    params = (repo / "params.yaml").read_bytes()
    data = dvc_repo.set_param(yaml.safe_load(params), key, {} if key.split(".")[0] in ("datasets", "heads") else 3)
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        result = dvc_repo.run(repo, "dvc", "repro", check=False)
    finally:
        (repo / "params.yaml").write_bytes(params)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ltpipe error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert f"failed to reproduce '{stage}'" in result.stderr, result.stderr
    assert dvc_repo.stages_run(result.stdout) == [], result.stdout


@pytest.mark.parametrize("key,value,message", [
    ("train.lr", -1, "`train.lr` must be"),
    ("sweep.train.epochs", 0, "`sweep.train.epochs` must be"),
    ("heads.cosine.scale", "big", "`heads.cosine.scale` must be a number"),
    ("loss", "bce", "loss 'bce'"),  # multi-label only; the default dataset is single-label
])
def test_a_bad_option_of_a_later_stage_is_refused_before_any_image_is_read(tmp_path, key, value, message):
    """On a first `dvc repro`, `train` starts after extraction (hours on a benchmark): its options are
    checked by `inputs` (ltpipe/validate.py), with the message `train` would give."""
    repo = dvc_repo.make(tmp_path / "repo")
    data = dvc_repo.set_param(yaml.safe_load((repo / "params.yaml").read_text()), key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = dvc_repo.run(repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ltpipe error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "failed to reproduce 'inputs'" in result.stderr, result.stderr
    assert dvc_repo.stages_run(result.stdout) == [] and not (repo / "data/features").exists()


def test_multilabel_default_runs_the_dag(repo):
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "dataset=synthetic_ml", "-S", "loss=bce")
    ran = dvc_repo.stages_run(result.stdout)
    assert "weights" not in ran and {"prepare", "extract", "train", "evaluate"} <= set(ran)
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["task"] == "multi" and metrics["head"] == "cosine" and metrics["loss"] == "bce"
    for key in ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "CF1", "OF1"):
        assert isinstance(metrics[key], float) or metrics[key] is None, key
    assert isinstance(metrics["mAP"], float)
