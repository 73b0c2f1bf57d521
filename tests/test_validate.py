"""ltpipe/validate.py: the options of the stages after extraction, checked by `inputs` before any image
is read, with the messages those stages give; remembered per content of params.yaml so an unchanged
`dvc repro` does not pay for the import of torch. Through DVC:
tests/test_pipeline_dvc.py::test_a_bad_option_of_a_later_stage_is_refused_before_any_image_is_read."""

import copy

import pytest

from ltpipe import validate
from ltpipe.core.config import Params, load_yaml
from ltpipe.core.errors import ConfigError
from tests.conftest import REPO
from tests.dvc_repo import set_param

PARAMS = load_yaml(REPO / "params.yaml")


def edited(**settings) -> Params:
    data = copy.deepcopy(PARAMS)
    for key, value in settings.items():
        set_param(data, key.replace("__", "."), value)
    return Params(data)


def test_the_repository_params_pass():
    validate.check_options(edited())


@pytest.mark.parametrize("settings,message", [
    (dict(train__lr=-1), "`train.lr` must be"),
    (dict(train__select="best"), "`train.select` is 'best'"),
    (dict(head="cosin"), "unknown head 'cosin'"),
    (dict(heads__decoder__heads=0, head="decoder"), "`heads.decoder.heads` must be"),
    (dict(losses__focal__gamma=-1, loss="focal"), "`losses.focal.gamma` must be"),
    (dict(loss="bce"), "loss 'bce'"),  # no single-label variant
    (dict(dataset="synthetic_ml"), "loss 'ce'"),  # the main loss, on a multi-label dataset
    (dict(stage2="crt", stage2_methods__crt__sampler="balanced"), "`stage2_methods.crt.sampler` is 'balanced'"),
    (dict(sweep__heads=["cosine", "linera"]), "unknown head 'linera'"),
    (dict(sweep__losses=["ce", "bsn"]), "unknown loss 'bsn'"),
    (dict(sweep__train__epochs=0), "`sweep.train.epochs` must be"),
    (dict(sweep__seeds=0), "`sweep.seeds` must be a non-empty list of ints, got 0."),
    (dict(finetune__modes="bitfit"), "`finetune.modes` must be a list of mode names"),
    (dict(sweep__sampler="sqr"), "unknown sampler 'sqr'"),
    (dict(finetune__modes=["ful"]), "unknown fine-tuning mode 'ful'"),
    (dict(finetune__modes=["partial"], finetune__partial__blocks=0), "`finetune.partial.blocks` must be"),
    (dict(finetune__modes=["bitfit"], finetune__train__lr=0), "`finetune.train.lr` must be"),
    (dict(stage2="crt", head="knn"), "`stage2: crt` adjusts a trained classifier; head knn has none"),
    (dict(finetune__modes=["coop"]), "set `head: zeroshot`"),
    (dict(finetune__modes=["full"], head="knn"), "head 'knn' is fitted in one pass"),
    (dict(dataset="synthetic_ml", loss="bce", evaluate__posthoc="logit_adjust"), "single-label only"),
])
def test_a_bad_option_is_refused(settings, message):
    with pytest.raises(ConfigError) as error:
        validate.check_options(edited(**settings))
    assert message in str(error.value)


def test_a_sweep_cell_the_sweep_skips_is_not_refused():
    # bce has no single-label variant: the sweep marks its cells skipped, so must the check.
    validate.check_options(edited(sweep__losses=["ce", "bce"]))


@pytest.mark.parametrize("settings,task", [
    (dict(), "single"), (dict(dataset="synthetic_ml"), "multi"), (dict(task="multi"), "multi"),
    (dict(dataset="custom", datasets__custom__multilabel=True), "multi"),
    (dict(dataset="custom"), "single"),
])
def test_the_task_is_known_before_the_data(settings, task):
    assert validate.dataset_task(edited(**settings)) == task


def test_checked_once_per_content_and_never_remembered_when_refused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(validate, "check_options", lambda params: calls.append(params.data["seed"]))
    assert validate.check_once(edited(seed=1), tmp_path) and not validate.check_once(edited(seed=1), tmp_path)
    assert validate.check_once(edited(seed=2), tmp_path) and calls == [1, 2]

    def refuse(params):
        raise ConfigError("no")

    monkeypatch.setattr(validate, "check_options", refuse)
    for _ in range(2):
        with pytest.raises(ConfigError):
            validate.check_once(edited(seed=3), tmp_path)
    assert not validate.check_once(edited(seed=1), tmp_path)


def test_a_record_that_cannot_be_written_only_means_checking_again(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    calls = []
    monkeypatch.setattr(validate, "check_options", lambda params: calls.append(1))
    assert validate.check_once(edited(), blocked) and validate.check_once(edited(), blocked) and len(calls) == 2
