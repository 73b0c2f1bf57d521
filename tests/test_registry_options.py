"""Every registered name's options against params.yaml: the section holds exactly the options
dataclass's defaults, an unknown key is refused naming the valid ones, and every declared bound
is enforced with a message naming the dotted key."""

import dataclasses
import re
import typing

import pytest

from ltpipe.core.config import Params, load_yaml
from ltpipe.core.errors import ConfigError
from ltpipe.core.options import defaults, option_fields, parse
from ltpipe.datasets.prepare import PREPARE_OPTIONS
from ltpipe.datasets.registry import DATASETS
from ltpipe.features.extract_options import ExtractOptions
from ltpipe.finetune.modes import MODES
from ltpipe.finetune.train import FinetuneConfig
from ltpipe.heads import HEADS
from ltpipe.losses import LOSSES
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import TrainConfig
from ltpipe.training.stage2 import STAGE2
from tests.conftest import REPO

PARAMS = load_yaml(REPO / "params.yaml")
REGISTRIES = {"heads": HEADS, "losses": LOSSES, "samplers": SAMPLERS, "stage2": STAGE2, "datasets": DATASETS,
              "finetune": MODES}
# The params.yaml mapping that holds each registry's `<name>: {options}` sections (samplers have no options).
SECTION = {"heads": "heads", "losses": "losses", "samplers": None, "stage2": "stage2_methods", "datasets": "datasets",
           "finetune": "finetune"}
ENTRIES = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names()]
# Sections that only map registered names to their options (`finetune` also holds `modes`, `train`, ...).
NAME_MAPS = {"heads": HEADS, "losses": LOSSES, "stage2_methods": STAGE2, "datasets": DATASETS}
# Options read from one params.yaml section that is not a registered name's.
SECTIONS = {"train": TrainConfig, "sweep.train": TrainConfig, "prepare": PREPARE_OPTIONS,
            "finetune.train": FinetuneConfig, "extract": ExtractOptions}


def section_at(dotted: str):
    node = PARAMS
    for part in dotted.split("."):
        node = node[part]
    return node


def assert_section_is_the_defaults(dotted: str, section, options_type: type) -> None:
    expected = defaults(options_type)
    assert isinstance(section, dict), f"params.yaml `{dotted}` is not a mapping: {section!r}"
    assert section == expected, f"params.yaml `{dotted}` differs from the defaults of {options_type.__name__}"
    for key, value in section.items():  # == takes True for 1: a bool must stay a bool, a string a string
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, expected[key]))
        assert numbers or type(value) is type(expected[key]), f"`{dotted}.{key}`: {value!r} vs {expected[key]!r}"


@pytest.mark.parametrize("kind,name", ENTRIES)
def test_params_section_is_the_options_defaults(kind, name):
    registry = REGISTRIES[kind]
    options_type = registry.entry(name).options
    assert registry.section == SECTION[kind], f"{kind}: `{registry.kind}` options are not read from params.yaml"
    if registry.section is None:  # no params.yaml section to hold options (samplers)
        assert defaults(options_type) == {}, f"{kind} {name} has options but params.yaml has no section for them"
        return
    dotted = f"{registry.section}.{name}"
    assert name in PARAMS[registry.section], f"params.yaml has no `{dotted}`"
    assert_section_is_the_defaults(dotted, PARAMS[registry.section][name], options_type)


@pytest.mark.parametrize("dotted", sorted(SECTIONS))
def test_other_sections_are_their_options_defaults(dotted):
    assert_section_is_the_defaults(dotted, section_at(dotted), SECTIONS[dotted])


def test_name_sections_hold_registered_names_only():
    for section, registry in NAME_MAPS.items():
        assert set(PARAMS[section]) == set(registry.names()), section


# (b) one name of each registry (with a misspelling of one of its options where it has any)
UNKNOWN = [("heads", "cosine", "scal"), ("losses", "ldam", "drw_begin"), ("samplers", "instance", "replace"),
           ("stage2", "crt", "losses"), ("datasets", "imagenet_lt", "train_lists"), ("finetune", "vpt", "prompt")]


@pytest.mark.parametrize("kind,name,key", UNKNOWN)
def test_unknown_key_is_refused_naming_the_valid_options(kind, name, key):
    registry = REGISTRIES[kind]
    dotted = f"{registry.section or kind}.{name}"
    valid = [f.name for f in option_fields(registry.entry(name).options)]
    with pytest.raises(ConfigError) as error:
        registry.parse(name, Params({key: 1}, prefix=dotted))
    listed = ", ".join(valid) or "none (write `{}`)"
    assert f"`{dotted}` has no option '{key}'; its options: {listed}." in str(error.value)


def test_every_registry_is_covered_by_the_unknown_key_test():
    assert {kind for kind, _, _ in UNKNOWN} == set(REGISTRIES)


# (c) every declared bound of every option, for every registered name and section
def bad_values(field: dataclasses.Field, hint) -> list:
    """Values just outside ``field``'s declared bounds."""
    meta = field.metadata
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    number = args[0] if args else hint
    step = 1 if number is int else 0.5
    bad = []
    if meta.get("minimum") is not None:
        bad.append(meta["minimum"] if meta.get("exclusive_minimum") else meta["minimum"] - step)
    if meta.get("maximum") is not None:
        bad.append(meta["maximum"] + step)
    if meta.get("choices"):
        bad.append("no-such-choice")
    return bad


def bound_cases():
    options = [(f"{registry.section or kind}.{name}", registry.entry(name).options)
               for kind, registry in REGISTRIES.items() for name in registry.names()]
    options += [(dotted, options_type) for dotted, options_type in SECTIONS.items()]
    cases = []
    for dotted, options_type in options:
        hints = typing.get_type_hints(options_type)
        for field in option_fields(options_type):
            cases += [(dotted, options_type, field.name, bad) for bad in bad_values(field, hints[field.name])]
    return cases


BOUND_CASES = bound_cases()


@pytest.mark.parametrize("dotted,options_type,key,bad", BOUND_CASES,
                         ids=[f"{d}.{k}={b}" for d, _, k, b in BOUND_CASES])
def test_value_out_of_bounds_is_refused_naming_the_key(dotted, options_type, key, bad):
    with pytest.raises(ConfigError, match=re.escape(f"`{dotted}.{key}`")):
        parse(options_type, Params({key: bad}, prefix=dotted))


def test_bounds_are_tested_for_every_registry_with_options():
    tested = {dotted.split(".")[0] for dotted, *_ in BOUND_CASES}
    assert tested >= {"heads", "losses", "datasets", "finetune", "train", "prepare", "extract"}


def test_registry_options_read_the_dotted_section():
    params = Params({"datasets": {"synthetic": {"classes": 1}}, "finetune": {"partial": {"blocks": 0}}})
    with pytest.raises(ConfigError, match=r"`datasets.synthetic.classes` must be at least 2, got 1"):
        DATASETS.options("synthetic", params)
    with pytest.raises(ConfigError, match=r"`finetune.partial.blocks` must be at least 1, got 0"):
        MODES.options("partial", params)
    assert DATASETS.options("synthetic_ml", params).classes == 20  # absent section: the defaults
