"""The `extract` section of params.yaml read through the typed options (ltpipe.core.options): a
misspelt key is refused naming the valid ones (not silently ignored), every bound is enforced, and
the repository's params.yaml reads to the defaults."""

import copy
import dataclasses

import pytest
import yaml

from ltpipe.core.config import Params, load_yaml
from ltpipe.core.errors import ConfigError
from ltpipe.core.options import option_fields
from ltpipe.features.extract_options import ExtractOptions, options_from_params
from tests.conftest import REPO

PARAMS = load_yaml(REPO / "params.yaml")


def params_with(**extract) -> Params:
    """The repository's params.yaml with ``extract`` keys set (or added)."""
    data = copy.deepcopy(PARAMS)
    data["extract"].update(extract)
    return Params(data)


def test_repository_params_read_to_todays_values():
    options = options_from_params(Params(copy.deepcopy(PARAMS)))
    assert options == ExtractOptions()
    assert dataclasses.asdict(options) == dict(
        batch_size=64, workers=2, tokens=True, token_layer="pre_ln", templates="single", dtype="float16",
        checkpoint_every=2048, views=0, view_seed=0, view_min_scale=0.08, draft=False, on_bad_image="fail",
        launcher="python")


def test_values_set_in_params_are_read():
    options = options_from_params(params_with(batch_size=16, workers=0, token_layer="post_ln", view_min_scale=1,
                                              on_bad_image="skip", launcher="torchrun --nproc_per_node 4"))
    assert (options.batch_size, options.workers, options.token_layer, options.view_min_scale,
            options.on_bad_image) == (16, 0, "post_ln", 1.0, "skip")
    assert options.launcher == "torchrun --nproc_per_node 4"  # dvc.yaml's cmd reads it; accepted, not refused


def test_misspelt_key_is_refused_naming_it_and_the_valid_options():
    with pytest.raises(ConfigError) as error:
        options_from_params(params_with(batchsize=32))
    valid = ", ".join(f.name for f in option_fields(ExtractOptions))
    assert f"`extract` has no option 'batchsize'; its options: {valid}." in str(error.value)
    assert "batch_size" in valid.split(", ")


def test_misspelt_key_stops_the_stage_with_one_ltpipe_error(tmp_path, monkeypatch, capsys):
    from stages import extract as extract_stage

    data = copy.deepcopy(PARAMS)
    data["extract"]["batchsize"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        extract_stage.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ltpipe error: `extract` has no option 'batchsize'; its options: batch_size, "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("key,bad,message", [
    ("batch_size", 0, "`extract.batch_size` must be at least 1, got 0"),
    ("workers", -1, "`extract.workers` must be at least 0, got -1"),
    ("view_min_scale", 0, "`extract.view_min_scale` must be greater than 0, got 0.0"),
    ("view_min_scale", 1.5, "`extract.view_min_scale` must be at most 1, got 1.5"),
    ("dtype", "float8", "`extract.dtype` is 'float8'; valid values: float16, float32"),
    ("token_layer", "last", "`extract.token_layer` is 'last'; valid values: post_ln, pre_ln"),
    ("tokens", "yes", "`extract.tokens` must be true or false, got 'yes'"),
])
def test_out_of_bounds_values_are_refused_naming_the_key(key, bad, message):
    with pytest.raises(ConfigError) as error:
        options_from_params(params_with(**{key: bad}))
    assert message in str(error.value)


def test_options_built_in_code_keep_their_defaults_and_are_validated():
    options = ExtractOptions(batch_size=16, workers=0)
    assert (options.batch_size, options.workers, options.checkpoint_every, options.dtype) == (16, 0, 2048, "float16")
    options.validate()
    with pytest.raises(ConfigError, match=r"`extract.on_bad_image` is 'ignore'; valid values: fail, skip"):
        ExtractOptions(on_bad_image="ignore").validate()
    with pytest.raises(ConfigError, match=r"`extract.batch_size` must be at least 1, got 0"):
        ExtractOptions(batch_size=0).validate()
