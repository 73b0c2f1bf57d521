import pytest

from ltpipe.core.config import Params, load_yaml
from ltpipe.core.errors import ConfigError
from ltpipe.core.registry import Registry
from tests.conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_anchor_and_alias_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="anchor &lr"):
        load_yaml(write(tmp_path, "a: &lr 0.1\nb: *lr\n"))


def test_repository_params_load_without_anchors():
    data = load_yaml(REPO / "params.yaml")
    assert data["dataset"] in data["datasets"]


def test_typed_getters_name_the_full_key(tmp_path):
    params = Params.load(write(tmp_path, "train: {lr: '0.1x', epochs: 2.5, neg: -1, sci: 1e-3}\n"))
    train = params.sub("train")
    with pytest.raises(ConfigError, match=r"`train.lr` must be a number, got '0.1x'"):
        train.float("lr")
    with pytest.raises(ConfigError, match=r"`train.epochs` must be an integer"):
        train.int("epochs")
    with pytest.raises(ConfigError, match=r"`train.neg` must be greater than 0"):
        train.float("neg", minimum=0, exclusive_minimum=True)
    with pytest.raises(ConfigError, match=r"no key `train.missing`"):
        train.int("missing")
    # YAML 1.1 reads 1e-3 (no dot) as a string; users type it, so it is accepted.
    assert train.float("sci") == pytest.approx(1e-3)


def test_choices_list_valid_values(tmp_path):
    params = Params.load(write(tmp_path, "task: both\n"))
    with pytest.raises(ConfigError, match="valid values: auto, multi, single"):
        params.str("task", choices=("auto", "single", "multi"))


def test_registry_unknown_name_lists_valid_names():
    registry = Registry("loss", "loss")
    registry.register("ce")(object())
    registry.register("bsm")(object())
    with pytest.raises(ConfigError, match=r"unknown loss 'bms' \(params.yaml key `loss`\). Valid names: bsm, ce"):
        registry.get("bms")


def test_non_finite_numbers_are_refused(tmp_path):
    params = Params.load(write(tmp_path, "train: {lr: .nan, wd: .inf}\n"))
    with pytest.raises(ConfigError, match=r"`train.lr` must be a finite number"):
        params.float("train.lr")
    with pytest.raises(ConfigError, match=r"`train.wd` must be a finite number"):
        params.sub("train").float("wd")
