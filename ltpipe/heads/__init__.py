"""Classifier heads trained on cached features, keyed by the names users type (`head:`).

A head declares which cached input it reads (``pooled`` embeddings or the
``tokens`` grid). Its constructor takes only JSON-able keyword arguments, which
are saved with the weights so :func:`rebuild` restores it exactly.
"""

import inspect
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ltpipe.core.options import NoOptions, defaults
from ltpipe.core.registry import Registry, import_package_modules

HEADS: Registry = Registry("head", "head", section="heads")
TASKS = ("single", "multi")


def register(name: str, options: type = NoOptions, *, input: str, trains: bool, fits: bool = False,
             adjustable_classifier: bool = False, fixed_scale: bool = False, tasks: tuple = TASKS):
    """Register a head class under ``name`` with its options dataclass and capabilities:

    - ``input``: the cached input it reads, ``pooled`` or ``tokens``;
    - ``trains``: trained by gradient descent (else built, or fitted in one pass);
    - ``fits``: fitted to the training features in one pass (``head.fit(pooled, labels)``: knn, ncm);
    - ``adjustable_classifier``: has ``features`` and ``make_classifier``, so two-stage methods apply;
    - ``fixed_scale``: its classifier is ``s * cos`` with a scale that can be held fixed (LDAM needs it).
    """

    def decorator(cls):
        cls.input = input  # a head rebuilt from a checkpoint knows what it reads
        return HEADS.register(name, options, input=input, trains=trains, fits=fits, tasks=tasks,
                              adjustable_classifier=adjustable_classifier, fixed_scale=fixed_scale)(cls)

    return decorator


@dataclass
class HeadContext:
    """What a head may need from the data to be built."""

    num_classes: int
    pooled_dim: int
    token_shape: Optional[tuple]
    text_embeddings: Optional[np.ndarray] = None
    logit_scale: float = 100.0
    tokens_have_cls: bool = True  # ViT grids start with CLS; ResNet grids do not


def build(name: str, options, ctx: HeadContext) -> torch.nn.Module:
    """Build head ``name`` with its typed ``options`` (``HEADS.options(name, params)``; ``None``:
    the defaults)."""
    entry = HEADS.entry(name)
    return entry.obj.from_options(entry.options() if options is None else options, ctx)


def step_size(name: str, head: torch.nn.Module, pooled_dim: int, num_classes: int, rows: int) -> Optional[int]:
    """Multiply-adds of one step over ``rows`` inputs of a head on pooled features trained by gradient
    descent (its classifier's matmul), which decides its thread count (``ltpipe.core.runtime``); None
    for heads on token grids and for fitted heads (one large search or mean): large by nature."""
    if head.input != "pooled" or not HEADS.capability(name, "trains"):
        return None
    return rows * pooled_dim * num_classes


def rebuild(name: str, kwargs: Dict) -> torch.nn.Module:
    """The head ``name`` built from constructor ``kwargs`` (a checkpoint's); an option missing from
    them takes its default from the head's options dataclass."""
    entry = HEADS.entry(name)
    accepted = inspect.signature(entry.obj).parameters
    filled = {k: v for k, v in defaults(entry.options).items() if k in accepted}
    return entry.obj(**{**filled, **kwargs})


import_package_modules(__name__, __path__)  # every head module registers itself
