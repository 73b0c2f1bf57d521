"""The papers' presets (issue 18): each sets existing params with valid values, runs end to end at tiny
scale with its method, schedule and protocol, and its run carries the published figure beside the result."""

import copy
import dataclasses
import json
import subprocess
import sys

import open_clip
import pytest
import yaml

from ltpipe import presets
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.evaluation.evaluate import run_evaluate
from tests import dvc_repo
from tests.conftest import REPO

ALL = list(presets.load().values())
MULTI_LABEL = {"coco_lt", "voc_lt"}


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_every_preset_goes_through_dvcs_own_set_param_parser_onto_existing_keys(tmp_path):
    # `dvc exp run -S` applies Hydra overrides in struct mode: a key that does not exist, or a value
    # Hydra would read back differently (a string read as a number, a list as a string), fails here.
    from dvc.utils.hydra import apply_overrides

    base = (REPO / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    for preset in ALL:
        path.write_text(base)
        apply_overrides(path, presets.set_params(preset))
        applied = yaml.safe_load(path.read_text())
        read = Params(applied)
        for key, value in preset.overrides:
            if isinstance(value, float):  # DVC writes 1e-05, which YAML 1.1 reads as a string; Params accepts it
                assert read.float(key) == value, (preset.name, key)
            else:
                assert _get(applied, key) == value and type(_get(applied, key)) is type(value), (preset.name, key)
        assert applied["preset"] == preset.name


def test_every_preset_names_a_dataset_model_and_tag_that_exist():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for preset in ALL:
        assert preset.benchmark in params["datasets"] and preset.value("dataset") == preset.benchmark
        assert preset.arch in open_clip.list_models(), preset.name
        assert preset.pretrained in open_clip.list_pretrained_tags_by_model(preset.arch), preset.name
        assert preset.deviations and all(d.strip() for d in preset.deviations), preset.name
        assert preset.published or preset.source, f"{preset.name}: neither a figure nor why there is none"


def test_the_issues_setups_are_there():
    names = set(presets.load())
    for benchmark in ("imagenet_lt", "places_lt", "inat18"):
        for backbone in ("vitb16", "vitl14"):
            assert f"ivlm-zeroshot-{benchmark}-{backbone}" in names
            for loss in ("ce", "focal", "bsm", "lade", "grw", "ldam"):
                for head in ("lp", "decoder"):
                    assert f"ivlm-{head}-{loss}-{benchmark}-{backbone}" in names
            for method in ("crt", "lws", "disalign", "marc"):
                assert f"ivlm-decoder-{method}-{benchmark}-{backbone}" in names
    for benchmark in ("coco_lt", "voc_lt"):
        assert {f"cprfl-finetune-{benchmark}-rn50", f"cprfl-cached-{benchmark}-rn50"} <= names
    for benchmark in ("imagenet_lt", "places_lt"):
        assert f"lift-lp-{benchmark}-vitb16" in names


def test_cprfl_published_figures_are_the_papers_table_1():
    coco = presets.get("cprfl-finetune-coco_lt-rn50")
    voc = presets.get("cprfl-cached-voc_lt-rn50")
    assert coco.published == {"mAP": 66.69, "mAP_head": 66.35, "mAP_medium": 70.99, "mAP_tail": 61.33}
    assert voc.published == {"mAP": 86.28, "mAP_head": 81.84, "mAP_medium": 90.51, "mAP_tail": 86.43}
    assert (coco.value("train.lr"), voc.value("train.lr")) == (1e-5, 5e-5)  # CPRFL section 4.1
    assert coco.reported_in == "metrics/finetune/full.json" and "finetune" in coco.targets
    # Imbalance-VLM's tables are not in ../shared: no figure, and the reason is given.
    decoder = presets.get("ivlm-decoder-bsm-imagenet_lt-vitl14")
    assert decoder.published is None and "could not be retrieved" in decoder.source


# --------------------------------------------------------------------------- tiny end to end


def _tiny(preset: presets.Preset) -> dict:
    """The repository's params with the preset applied, then shrunk: generated data of the benchmark's
    task, the tiny random-init model, a handful of steps. Method, loss, sampler, optimiser, schedule,
    selection and validation policy stay the preset's."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in preset.overrides:
        _set(params, key, copy.deepcopy(value))
    params["preset"] = preset.name
    dataset = "synthetic_ml" if preset.benchmark in MULTI_LABEL else "synthetic"
    params["dataset"] = dataset
    params["datasets"][dataset].update(dvc_repo.SMALL[f"datasets.{dataset}"])
    if preset.value("prepare.val_fraction") == 0:
        params["datasets"][dataset]["val_per_class"] = 0  # a list without validation, as the benchmark's
    params["model"].update(arch="ltpipe-tiny", pretrained=None)
    params["extract"]["workers"] = 0
    train = params["train"]
    train["batch_size"] = 16
    if train["iterations"] is not None:
        train.update(iterations=6, warmup_iterations=2)
    else:
        train.update(epochs=2, warmup_epochs=1 if train["warmup_epochs"] else 0)
    params["heads"]["cprfl"].update(dim=16, heads=2, head_dim=8, ffn=16)
    params["finetune"]["train"].update(iterations=4, warmup_iterations=2, batch_size=8, micro_batch=8, workers=0)
    return params


def _run_stages(params: dict) -> dict:
    from ltpipe.datasets.prepare import run_stage as prepare
    from ltpipe.features.extract import run_stage as extract
    from ltpipe.features.extract import run_text_stage as text
    from ltpipe.features.models import run_stage as weights
    from ltpipe.finetune.run import run_stage as finetune
    from ltpipe.training.loop import run_stage as train

    p = Params(params)
    weights(p)
    prepare(p)
    extract(p)
    text(p)
    summary = train(p)
    for mode in params["finetune"]["modes"]:
        finetune(p, mode)
    run_evaluate(p)
    return summary


def _representatives():
    """One preset per family and method (benchmark and backbone only change the data and the model,
    which the tiny run replaces), plus Imbalance-VLM's iNaturalist protocol (no validation list)."""
    seen, chosen = set(), []
    for preset in ALL:
        if (preset.family, preset.method) not in seen:
            seen.add((preset.family, preset.method))
            chosen.append(preset.name)
    chosen.append("ivlm-decoder-ce-inat18-vitb16")
    return chosen


@pytest.mark.parametrize("name", _representatives())
def test_every_preset_runs_at_tiny_scale_and_records_its_protocol(tmp_path, monkeypatch, name):
    preset = presets.get(name)
    monkeypatch.chdir(tmp_path)
    params = _tiny(preset)
    summary = _run_stages(params)
    no_validation = preset.value("prepare.val_fraction") == 0
    assert summary["protocol"] == {"validation": "none" if no_validation else "given",
                                   "select": preset.value("train.select"),
                                   "schedule": preset.value("train.schedule")}
    evaluated = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert (evaluated["head"], evaluated["loss"], evaluated["stage2"]) == (
        preset.value("head"), preset.value("loss"), preset.value("stage2"))
    block = evaluated["preset"]
    assert block["name"] == name and block["compared"] is False
    assert set(preset.published or {}) <= set(evaluated)  # the figures name metrics the run has
    if preset.reported_in == presets.EVAL_METRICS:
        assert block["why"] == f"the run's dataset is {params['dataset']!r}, the published figure is on " \
                               f"{preset.benchmark!r}"
    else:
        assert block["why"] == f"the preset's figure is compared in {preset.reported_in}"
        tuned = json.loads((tmp_path / preset.reported_in).read_text())
        assert tuned["preset"]["name"] == name and tuned["protocol"]["schedule"] == \
            preset.value("finetune.train.schedule")


def test_a_run_on_the_presets_benchmark_and_model_carries_the_published_figure(tmp_path, monkeypatch, capsys):
    # The CPRFL preset as if the generated multi-label data were COCO-LT and the tiny model CLIP RN50: the
    # published figures (fractions) and this run's difference to them land in eval.json and are printed.
    real = presets.get("cprfl-cached-coco_lt-rn50")
    overrides = dict(real.overrides, dataset="synthetic_ml", **{"model.arch": "ltpipe-tiny", "model.pretrained": None})
    stand_in = dataclasses.replace(real, benchmark="synthetic_ml", overrides=tuple(overrides.items()))
    monkeypatch.setattr(presets, "load", lambda: {real.name: stand_in})
    monkeypatch.chdir(tmp_path)
    _run_stages(_tiny(real))
    evaluated = json.loads((tmp_path / "metrics/eval.json").read_text())
    block = evaluated["preset"]
    assert block["compared"] is True and block["published"] == {"mAP": 0.6669, "mAP_head": 0.6635,
                                                                "mAP_medium": 0.7099, "mAP_tail": 0.6133}
    assert evaluated["mAP_head"] is None  # the tiny data has no head class: no figure to subtract from
    for key, published in block["published"].items():
        expected = None if evaluated[key] is None else pytest.approx(evaluated[key] - published, abs=1e-6)
        assert block["difference"][key] == expected
    assert list(evaluated)[-1] == "preset"  # after the metrics: the run's identity and metrics keep their place
    assert f"preset {real.name}: published mAP 0.6669 ({block['difference']['mAP']:+.4f})" in capsys.readouterr().out

    # A run that changed the preset's loss is not compared with the paper's figure.
    params = _tiny(real)
    params["loss"] = "bce"
    _run_stages(params)
    block = json.loads((tmp_path / "metrics/eval.json").read_text())["preset"]
    assert block["compared"] is False and block["why"] == "the run changed the preset's `loss` (asl -> bce)"


def test_without_a_preset_eval_json_has_no_preset_block():
    assert presets.comparison("none", {}, None, None, {}, presets.EVAL_METRICS) is None


def test_an_unknown_preset_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match=r"there is no preset 'ivlm-decoder-bsm-imagenet_lt-vitl16'\. Did you mean "
                                          r"ivlm-decoder-bsm-imagenet_lt-vitl14"):
        presets.check_param("ivlm-decoder-bsm-imagenet_lt-vitl16")
    with pytest.raises(ConfigError, match=r"`preset` must be `none` or a preset's name, got 3"):
        presets.check_param(3)


# --------------------------------------------------------------------------- the command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ltpipe", *args], capture_output=True, text=True, cwd=REPO)


def test_presets_list_show_and_the_printed_command():
    listed = _cli("presets", "cprfl", "coco")
    assert listed.returncode == 0 and listed.stdout.splitlines()[:3] == [
        f"cprfl: {presets.get('cprfl-cached-coco_lt-rn50').paper}; Table 1 (CPRFL-CLIP) and Table 2 (ASL)",
        "  cprfl-cached-coco_lt-rn50    CPRFL-CLIP, ASL, on cached frozen CLIP features  "
        "[published: mAP 66.69, mAP_head 66.35, mAP_medium 70.99, mAP_tail 61.33]",
        "  cprfl-finetune-coco_lt-rn50  CPRFL-CLIP, ASL, whole image encoder fine-tuned  "
        "[published: mAP 66.69, mAP_head 66.35, mAP_medium 70.99, mAP_tail 61.33]"]
    shown = _cli("presets", "show", "ivlm-decoder-ldam-inat18-vitl14")
    assert "losses.ldam.s: null" in shown.stdout and "no choice is made on test" in shown.stdout
    printed = _cli("presets", "run", "lift-lp-places_lt-vitb16", "--print", "--queue", "-S", "seed=1")
    preset = presets.get("lift-lp-places_lt-vitb16")
    expected = ["dvc", "exp", "run", "-n", preset.name, "--queue",
                *[arg for key, value in preset.overrides for arg in ("-S", f"{key}={presets.hydra_value(value)}")],
                "-S", f"preset={preset.name}", "-S", "seed=1", "evaluate"]
    assert printed.returncode == 0 and printed.stdout.split() == expected
    assert "-S heads.cosine.init=text" in printed.stdout and "-S loss=la" in printed.stdout
    no_dvc = subprocess.run([sys.executable, "-m", "ltpipe", "presets", "run", "lift-lp-places_lt-vitb16"],
                            capture_output=True, text=True, cwd=REPO, env={"PATH": "/nonexistent"})
    assert no_dvc.returncode == 2 and no_dvc.stderr.startswith("ltpipe error: `dvc` is not on PATH")
    unknown = _cli("presets", "show", "cprfl-coco")
    assert unknown.returncode == 2 and unknown.stderr.startswith("ltpipe error: there is no preset 'cprfl-coco'.")


@pytest.mark.slow
@pytest.mark.dvc
def test_presets_run_creates_a_named_experiment_that_dvc_exp_show_lists(tmp_path):
    repo = dvc_repo.make(tmp_path / "repo")
    name = "cprfl-cached-voc_lt-rn50"
    tiny = _tiny(presets.get(name))
    # On top of the preset, what makes it tiny here (a user would add their own -S the same way).
    extra = ["dataset=synthetic_ml", "model.arch=ltpipe-tiny", "model.pretrained=null",
             "datasets.synthetic_ml.val_per_class=0", "train.epochs=2", "train.warmup_epochs=1",
             *[f"heads.cprfl.{k}={v}" for k, v in tiny["heads"]["cprfl"].items() if k in ("dim", "heads", "head_dim",
                                                                                          "ffn")]]
    cmd = [sys.executable, "-m", "ltpipe", "presets", "run", name, *[a for s in extra for a in ("-S", s)]]
    result = subprocess.run(cmd, cwd=repo, env=dvc_repo.env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"dvc exp run -n {name} ")
    stages = dvc_repo.stages_run(result.stdout)
    assert "evaluate" in stages and "sweep" not in stages  # only what the preset's result needs
    shown = json.loads(dvc_repo.run(repo, "dvc", "exp", "show", "--json").stdout)
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    (ours,) = [exp for exp in experiments if exp.get("name") == name]
    data = ours["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["preset"] == name
    assert data["params"]["params.yaml"]["data"]["train"]["schedule"] == "onecycle"
    evaluated = data["metrics"]["metrics/eval.json"]["data"]
    assert evaluated["preset"]["name"] == name and "mAP" in evaluated
