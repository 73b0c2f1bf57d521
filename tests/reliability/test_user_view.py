"""What a user sees through DVC (issue 15): the plots `dvc plots show` draws, a `dvc.lock` that
a clean re-run leaves alone, a sweep that the main experiment's knobs do not re-run and that the
run-cache restores, and a `dvc exp show` that is not flooded by the sweep's table."""

import json
import shutil
import subprocess

import pytest
import yaml

from tests import dvc_repo
from tests.conftest import REPO

# The plots of the top-level `plots:` in dvc.yaml; nothing else may be drawn.
INTENDED_PLOTS = {"per_class_score", "reliability", "confusion", "training_loss", "validation_score",
                  "sweep_methods"}


def plots_dvc_draws(tmp_path) -> set:
    """The plot names `dvc plots show` draws for the project's dvc.yaml (no data needed: DVC lists
    every plot it would draw, with an error for each missing file)."""
    for name in ("dvc.yaml", "params.yaml", "plots"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, tmp_path / name)
    dvc_repo.run(tmp_path, "dvc", "init", "-q", "--no-scm")
    shown = dvc_repo.run(tmp_path, "dvc", "plots", "show", "--json", check=False)
    return set(json.loads(shown.stdout)["data"])


@pytest.mark.parametrize("case", ["stage_plots_drawn", "plot_without_title_or_axis_names"])
def test_dvc_draws_only_the_intended_plots_each_titled(case, tmp_path):
    if case == "stage_plots_drawn":
        # A stage-level `plots:` entry is drawn on its own with DVC's default template (per-class
        # tables as line charts over "step", empty confusion grids): plot tables must be outputs.
        assert plots_dvc_draws(tmp_path) == INTENDED_PLOTS
    else:
        definitions = {name: spec for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
                       for name, spec in entry.items()}
        assert set(definitions) == INTENDED_PLOTS
        for name, spec in definitions.items():
            # Without a label DVC titles an axis with the raw column name ("step", "y", "train_count").
            columns = {spec["x"], "y", *spec["y"].values()}
            for key in ("title", "x_label", "y_label"):
                text = spec.get(key)
                assert isinstance(text, str) and text.strip() and text not in columns, f"plot {name}: {key} {text!r}"
        custom = json.loads((REPO / "plots/scatter_logx.json").read_text())["encoding"]
        assert custom["x"]["title"] == "<DVC_METRIC_X_LABEL>" and custom["y"]["title"] == "<DVC_METRIC_Y_LABEL>"


def stages_run(result: subprocess.CompletedProcess) -> list:
    return dvc_repo.stages_run(result.stdout)


def sweep_cells(repo) -> dict:
    return {path.name: path.read_bytes() for path in sorted((repo / "metrics/sweep").glob("*.json"))}


def metric_values(node) -> int:
    if isinstance(node, dict):
        return sum(metric_values(value) for value in node.values())
    return 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dvc_rerun_and_sweep"])
def test_rerun_leaves_git_clean_and_the_sweep_is_its_own(case, tmp_path, record_property):
    # lock_changes_after_rerun, sweep_reruns_on_train_change, sweep_not_restorable, exp_show_columns
    record_property("faults", 4)
    overrides = dict(dvc_repo.SMALL, sweep=dict(heads=["cosine"], losses=["ce", "bsm"], seeds=[0]))
    if "train" in yaml.safe_load((REPO / "params.yaml").read_text())["sweep"]:
        overrides["sweep.train"] = dvc_repo.SMALL["train"]
    repo = dvc_repo.make(tmp_path / "project", overrides)
    first = dvc_repo.run(repo, "dvc", "repro", "report")
    assert {"extract", "sweep@cosine-ce-0", "sweep@cosine-bsm-0", "report"} <= set(stages_run(first))
    dvc_repo.run(repo, "git", "add", "-A")
    dvc_repo.run(repo, "git", "commit", "-qm", "baseline")
    baseline_cells = sweep_cells(repo)

    # lock_changes_after_rerun: a forced re-run on the same machine changes no tracked byte
    # (timings are written, but are no DVC output, so their md5 is not in dvc.lock).
    forced = dvc_repo.run(repo, "dvc", "repro", "-f", "extract")
    assert sorted(stages_run(forced)) == ["extract", "prepare", "weights"]
    assert (repo / "metrics/extract_report.json").is_file()
    assert dvc_repo.run(repo, "git", "status", "--porcelain").stdout == ""

    # sweep_reruns_on_train_change: the main experiment's schedule and sampler are not the sweep's.
    main_changed = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "train.epochs=5", "-S", "sampler=sqrt", "report")
    assert stages_run(main_changed) == []

    # sweep_not_restorable: a sweep change re-runs the cells; changing it back restores them from
    # the run-cache, byte for byte, without training.
    changed = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "sweep.train.epochs=3", "report")
    assert {"sweep@cosine-ce-0", "sweep@cosine-bsm-0"} <= set(stages_run(changed))
    assert sweep_cells(repo) != baseline_cells
    back = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "sweep.train.epochs=4", "report")
    assert not {"sweep@cosine-ce-0", "sweep@cosine-bsm-0"} & set(stages_run(back)), back.stdout
    assert "Stage 'sweep@cosine-ce-0' is cached - skipping run, checking out outputs" in back.stdout
    assert sweep_cells(repo) == baseline_cells

    # exp_show_columns: of the sweep, DVC tabulates the best method per headline metric, not the
    # summary's every method x metric x (mean, std).
    shown = json.loads(dvc_repo.run(repo, "dvc", "metrics", "show", "--json").stdout)
    (workspace,) = shown.values()
    files = workspace["data"]
    assert "metrics/summary.json" not in files
    best = files["metrics/sweep_best.json"]["data"]
    assert set(best) == {"top1", "few"} and metric_values(best) == 4
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert best["top1"] == {"method": summary["best"]["top1"],
                            "mean": summary["methods"][summary["best"]["top1"]]["top1"]["mean"]}
