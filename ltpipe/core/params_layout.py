"""The keys params.yaml may hold, and the typed options of its shared `model` and `evaluate` sections.

Method sections (`heads.*`, `losses.*`, `datasets.*`, `finetune.<mode>`, `stage2_methods.*`) and the
sections one stage owns (`prepare`, `extract`, `train`, `sweep.train`, `finetune.train`) are parsed
into their options dataclasses where they are read, refusing unknown keys there. What no single
stage owns is checked here, by :func:`check_layout`, which the `inputs` stage runs first on every
`dvc repro`, before any image is read or encoded: a misspelt top-level key (`los: bsm`), `model` or
`evaluate` key, or `sweep` key would otherwise be ignored. Light on purpose (no torch): the `inputs`
stage's no-change run is budgeted in tenths of a second.
"""

import re
from dataclasses import dataclass
from typing import Any, Optional

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.core.options import option, parse

TOP_LEVEL_KEYS = ("dataset", "task", "seed", "preset", "model", "prepare", "extract", "head", "loss", "sampler",
                  "stage2", "train", "heads", "losses", "stage2_methods", "sweep", "finetune", "evaluate",
                  "datasets")
SWEEP_KEYS = ("heads", "seeds", "losses", "sampler", "train")
FINETUNE_KEYS = ("modes", "launcher", "train")  # and one options section per mode (ltpipe.finetune.modes)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
POSTHOC = ("none", "logit_adjust")


def _device_problem(name: str) -> Optional[str]:
    return None if name in DEVICES or re.fullmatch(r"cuda:\d+", name) else "must be auto, cpu, cuda or cuda:N"


def threads_problem(value: Any) -> Optional[str]:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return "must be auto, or a number of threads >= 1"


@dataclass(frozen=True)
class ModelOptions:
    """The CLIP model every stage shares (`model` in params.yaml)."""

    arch: str = option("ltpipe-tiny", doc="open_clip architecture (ViT-B-16, RN50, ...) or ltpipe-tiny")
    pretrained: Optional[str] = option(None, doc="null: seeded random init; an open_clip tag (openai, ...); or a "
                                                 "checkpoint file")
    init_seed: int = option(0, minimum=0, doc="seed of the random init when pretrained is null")
    precision: str = option("auto", choices=PRECISIONS, doc="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16")
    device: str = option("auto", check=_device_problem, doc="auto, cpu, cuda or cuda:N")
    threads: Any = option("auto", check=threads_problem,
                          doc="CPU threads per stage: auto (1 for small steps, else torch's default) or a count")


@dataclass(frozen=True)
class EvaluateOptions:
    """How `evaluate` scores the trained model (`evaluate` in params.yaml)."""

    posthoc: str = option("none", choices=POSTHOC, doc="none, or logit_adjust (z - tau log prior, tau chosen on "
                                                       "validation)")


def check_layout(params: Params) -> None:
    """Refuse an unknown top-level, `model`, `evaluate` or `sweep` key, and a bad `model` or `evaluate` value."""
    _refuse_unknown(params, TOP_LEVEL_KEYS, "params.yaml has no top-level key")
    parse(ModelOptions, params.sub("model"))
    parse(EvaluateOptions, params.sub("evaluate"))
    _refuse_unknown(params.sub("sweep"), SWEEP_KEYS, "`sweep` has no key")


def _refuse_unknown(section: Params, known, what: str) -> None:
    unknown = sorted(set(section.data) - set(known))
    if unknown:
        raise ConfigError(f"{what} {unknown[0]!r}; its keys: {', '.join(known)}. A misspelt key would otherwise "
                          "be ignored.")
