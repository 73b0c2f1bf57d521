"""What no single stage owns in params.yaml (ltpipe.core.params_layout), and the method sections'
names (Registry.check_section): the repository's params.yaml reads to the declared defaults and keys,
and a misspelt key or section name of each kind is refused naming the valid ones. Through DVC:
tests/test_pipeline_dvc.py::test_a_misspelt_key_is_refused_by_dvc."""

import copy
import dataclasses

import pytest

from ltpipe import heads, losses
from ltpipe.core import runtime
from ltpipe.core.config import Params, load_yaml
from ltpipe.core.errors import ConfigError
from ltpipe.core.options import defaults, parse
from ltpipe.core.params_layout import (
    FINETUNE_KEYS,
    SWEEP_KEYS,
    TOP_LEVEL_KEYS,
    EvaluateOptions,
    ModelOptions,
    check_layout,
)
from ltpipe.datasets.registry import DATASETS
from ltpipe.finetune.modes import MODES
from ltpipe.training.stage2 import STAGE2
from tests.conftest import REPO
from tests.dvc_repo import set_param

PARAMS = load_yaml(REPO / "params.yaml")


def edited(key: str, value) -> Params:
    return Params(set_param(copy.deepcopy(PARAMS), key, value))


def test_the_repository_params_hold_the_declared_keys_and_defaults():
    assert tuple(PARAMS) == TOP_LEVEL_KEYS
    assert tuple(PARAMS["sweep"]) == SWEEP_KEYS
    assert set(PARAMS["finetune"]) == set(FINETUNE_KEYS) | set(MODES.names())
    assert PARAMS["model"] == defaults(ModelOptions) and PARAMS["evaluate"] == defaults(EvaluateOptions)
    check_layout(Params(copy.deepcopy(PARAMS)))
    for registry in (heads.HEADS, losses.LOSSES, DATASETS, MODES, STAGE2):
        registry.check_section(Params(copy.deepcopy(PARAMS)))


@pytest.mark.parametrize("key,value,message", [
    ("los", "bsm", "params.yaml has no top-level key 'los'; its keys: dataset, task,"),
    ("model.precison", "fp32", "`model` has no option 'precison'; its options: arch, pretrained, init_seed,"),
    ("model.precision", "fp64", "`model.precision` is 'fp64'; valid values: auto, bf16, fp16, fp32."),
    ("model.device", "gpu", "`model.device` must be auto, cpu, cuda or cuda:N, got gpu."),
    ("model.threads", 0, "`model.threads` must be auto, or a number of threads >= 1, got 0."),
    ("model.threads", "four", "`model.threads` must be auto, or a number of threads >= 1, got four."),
    ("model.init_seed", -1, "`model.init_seed` must be"),
    ("model.pretrained", 7, "`model.pretrained` must be a string or null, got 7"),
    ("evaluate.posthoc", "la", "`evaluate.posthoc` is 'la'; valid values: logit_adjust, none."),
    ("sweep.seed", [1], "`sweep` has no key 'seed'; its keys: heads, seeds, losses, sampler, train."),
])
def test_check_layout_refuses(key, value, message):
    with pytest.raises(ConfigError) as error:
        check_layout(edited(key, value))
    assert message in str(error.value)


@pytest.mark.parametrize("registry,key,message", [
    (heads.HEADS, "heads.cosin", "`heads.cosin` names no head; the keys of `heads`: cosine, cprfl,"),
    (losses.LOSSES, "losses.bsn", "`losses.bsn` names no loss; the keys of `losses`: asl, bce,"),
    (DATASETS, "datasets.cusom", "`datasets.cusom` names no dataset;"),
    (MODES, "finetune.ful", "`finetune.ful` names no fine-tuning mode; the keys of `finetune`: modes, launcher, "
                            "train, bitfit,"),
    (STAGE2, "stage2_methods.crT", "`stage2_methods.crT` names no stage-2 method;"),
])
def test_a_misspelt_method_section_is_refused_where_options_are_read(registry, key, message):
    params = edited(key, {})
    with pytest.raises(ConfigError) as error:
        registry.options(registry.names()[0], params)
    assert message in str(error.value)


def test_valid_values_read_through():
    options = parse(ModelOptions, edited("model.threads", 3).sub("model"))
    assert dataclasses.replace(options, threads="auto") == ModelOptions() and options.threads == 3
    assert parse(ModelOptions, edited("model.device", "cuda:1").sub("model")).device == "cuda:1"
    assert runtime.parse_threads(4) == 4
