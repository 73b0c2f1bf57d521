"""Static checks of dvc.yaml against the code and params.yaml (no DVC run)."""

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ltpipe import heads, losses
from ltpipe.datasets.registry import DATASETS
from ltpipe.features.extract_options import ExtractOptions
from ltpipe.training import stage2
from ltpipe.training.samplers import SAMPLERS
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
STAGES = DVC["stages"]


@functools.lru_cache(maxsize=None)
def imported_files(stage: str) -> tuple:
    code = (f"import importlib, sys, os; importlib.import_module('stages.{stage}'); "
            "print('\\n'.join(sorted(os.path.relpath(m.__file__) for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] in ('ltpipe', 'stages') and getattr(m, '__file__', None))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return tuple(out.stdout.split())


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_cover_every_imported_module(stage):
    deps = [Path(d) for d in STAGES[stage]["deps"]]
    for path in imported_files(stage):
        if path.endswith("__init__.py") and path.startswith("stages"):
            continue
        covered = any(Path(path) == d or d in Path(path).parents for d in deps)
        assert covered, f"stage {stage} imports {path} but does not list it (or its folder) in deps"


def test_extraction_does_not_depend_on_training_params():
    for stage in ("weights", "prepare", "extract"):
        params = set(STAGES[stage]["params"])
        assert not params & {"loss", "head", "sampler", "stage2", "seed", "train", "heads", "losses"}, stage
        assert "params.yaml" not in params and None not in params


def test_extract_declares_every_extract_option_but_the_templates():
    # New class names or templates must re-encode no image: they are the text stage's (issue 25).
    fields = {f"extract.{field.name}" for field in dataclasses.fields(ExtractOptions)}
    assert set(STAGES["extract"]["params"]) - {"model.precision", "model.device", "model.threads"} == \
        fields - {"extract.templates"}
    assert "extract.templates" in STAGES["text"]["params"]
    assert "data/prepared/classes.csv" not in STAGES["extract"]["deps"]
    assert "data/prepared" not in STAGES["extract"]["deps"]


def test_sweep_cells_have_their_own_training_section():
    # The main experiment's `train` and `sampler` must not re-run the sweep's cells (issue 15);
    # by default the sweep trains exactly as the main experiment does, so its cell with the main
    # head, loss and seed reproduces the main run.
    params = set(STAGES["sweep"]["params"])
    assert not params & {"train", "sampler"} and {"sweep.train", "sweep.sampler"} <= params
    assert PARAMS["sweep"]["train"] == PARAMS["train"] and PARAMS["sweep"]["sampler"] == PARAMS["sampler"]


def test_every_valid_name_has_its_params_section():
    # Users find a method's options under its name; `-S heads.<name>.key=v` needs the key to exist.
    assert set(heads.HEADS.names()) <= set(PARAMS["heads"])
    assert set(losses.LOSSES.names()) <= set(PARAMS["losses"])
    assert set(DATASETS.names()) <= set(PARAMS["datasets"])
    assert set(stage2.STAGE2.names()) <= set(PARAMS["stage2_methods"])


def test_default_choices_are_valid():
    heads.HEADS.get(PARAMS["head"])
    losses.LOSSES.get(PARAMS["loss"])
    SAMPLERS.get(PARAMS["sampler"])
    DATASETS.get(PARAMS["dataset"])


def test_every_key_the_readme_sets_exists_in_params():
    """Every `-S key=value` in README.md and docs/*.md (quoted or not) names a key of params.yaml."""
    import re

    keys = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        keys += [(page.name, key) for key in re.findall(r"-S\s+['\"]?([A-Za-z_][\w.]*)=", page.read_text())]
    assert len({page for page, _ in keys}) >= 5 and len(keys) >= 40
    for page, key in keys:
        node = PARAMS
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{page} sets `{key}`, which params.yaml lacks"
            node = node[part]


def declared(stage: str, key: str, item: dict = None) -> bool:
    """``key`` is declared, lies under a declared key, or is a section holding declared keys
    (``params.sub("model")`` navigates; the leaves read below it are recorded on their own).
    ``item``: the values of a matrix stage's ``${item.*}`` templates."""
    declared_keys = [p.replace("${item.", "{").replace("}", "}").format(**(item or {}))
                     for p in STAGES[stage].get("params", [])]
    return any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in declared_keys)


# Keys a stage reads only to refuse a choice early, never to compute an output: declaring them would
# re-run the stage when they change. train refuses `evaluate.posthoc` values the task cannot use; prepare
# refuses the main experiment's choices that need a validation split when the data has none (before extraction).
# extract and text each read the whole `extract` section, so a bad key is refused by whichever runs first,
# but each computes from its own keys only: `templates` is the text stage's, the rest extract's.
_EXTRACT_KEYS = {f"extract.{field.name}" for field in dataclasses.fields(ExtractOptions)}
VALIDATE_ONLY = {"train": {"evaluate", "evaluate.posthoc"},
                 "prepare": {"train.select", "evaluate.posthoc"},
                 "extract": {"extract.templates"}, "text": _EXTRACT_KEYS - {"extract.templates"}}


@pytest.mark.parametrize("views,second,posthoc", [(0, "none", "none"), (2, "marc", "logit_adjust")])
def test_every_param_a_stage_reads_is_declared(tmp_path, monkeypatch, capsys, views, second, posthoc):
    import importlib

    from ltpipe.core.config import Params
    from tests.dvc_repo import small_params

    params = small_params()
    params["extract"]["views"] = views
    params["stage2"] = second
    params["evaluate"]["posthoc"] = posthoc
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)

    reads = []
    original = Params.raw

    def recording(self, key, *args, **kwargs):
        reads.append(self._full(key))
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(Params, "raw", recording)
    for stage in STAGES:  # dvc.yaml lists them in dependency order
        reads.clear()
        module = importlib.import_module(f"stages.{stage}")
        if "matrix" in STAGES[stage]:
            # Every cell of a matrix stage: its params are templated by the cell's values.
            if stage == "sweep":
                cells = [dict(head=h, loss=loss, seed=str(seed)) for h in params["sweep"]["heads"]
                         for loss in params["sweep"]["losses"] for seed in params["sweep"]["seeds"]]
            else:
                cells = [dict(mode="partial")]  # finetune: the mode with options of its own
            for item in cells:
                reads.clear()
                module.main(list(item.values()))
                undeclared = sorted({key for key in reads if not declared(stage, key, item)})
                assert not undeclared, f"stage {stage}@{item} reads {undeclared} without declaring them"
            continue
        module.main()
        assert reads, f"stage {stage} read no parameter"
        if STAGES[stage].get("always_changed"):
            continue  # runs every time, whatever it reads: inputs checks every option (ltpipe/validate.py)
        validate_only = VALIDATE_ONLY.get(stage, set())
        undeclared = sorted({key for key in reads if not declared(stage, key) and key not in validate_only})
        assert not undeclared, f"stage {stage} reads {undeclared} without declaring them in dvc.yaml"
    trained_on_views = "training on 2 cached augmented views per image" in capsys.readouterr().out
    assert trained_on_views == (views == 2)
