"""Imbalance losses keyed by the names users type (`loss:`).

One name can stand for a single-label and a multi-label variant (``focal`` on
ImageNet-LT and on COCO-LT): a name holds one factory per task (``single`` or
``multi``), and both variants read the same `losses.<name>` params section (each
reads its own keys and ignores the others).

Factories are called with the loss's typed options (its options dataclass, read once from
`losses.<name>`) and the training class counts: ``factory(options, class_counts)`` for
single-label losses (``class_counts`` = images per class); ``factory(options, class_counts,
num_images)`` for multi-label ones (``class_counts`` = training images having each class,
``labels.sum(0)``; ``num_images`` = the number of training images ``N``, which the multi-hot
counts do not determine; ``None`` when the caller does not know it, which only the losses that
need it refuse). A loss that needs the head's classifier at a fixed scale (LDAM) declares
``needs_fixed_scale``; its module then exposes ``head_scale``.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ltpipe.core.errors import ConfigError
from ltpipe.core.options import NoOptions
from ltpipe.core.registry import Registry, import_package_modules

TASKS = ("single", "multi")
_KIND = {"single": "single-label", "multi": "multi-label"}


@dataclass(frozen=True)
class LossEntry:
    """One task's variant of a loss: what :func:`check` returns."""

    task: str  # "single" or "multi"
    factory: Callable[..., torch.nn.Module]


class LossVariants:
    """Everything registered under one loss name: one :class:`LossEntry` per task."""

    def __init__(self):
        self._entries: Dict[str, LossEntry] = {}

    @property
    def __doc__(self) -> str:  # what `python -m ltpipe list losses` shows: the first variant's summary
        return next((e.factory.__doc__ for e in self._entries.values() if e.factory.__doc__), "")

    def add(self, entry: LossEntry) -> None:
        if entry.task not in TASKS:
            raise ValueError(f"a loss task is one of {TASKS}, got {entry.task!r}")
        if entry.task in self._entries:
            raise ValueError(f"this loss has a {entry.task}-label variant already")
        self._entries[entry.task] = entry

    @property
    def tasks(self) -> Tuple[str, ...]:
        """The tasks this name has a variant for, in the order of ``TASKS``."""
        return tuple(t for t in TASKS if t in self._entries)

    def for_task(self, task: str) -> Optional[LossEntry]:
        return self._entries.get(task)


LOSSES: Registry[LossVariants] = Registry("loss", "loss", section="losses")


def register(name: str, task: str, options: type = NoOptions, needs_fixed_scale: bool = False):
    """Register ``factory`` as the ``task`` variant of loss ``name``; a name can have both variants,
    which share one options dataclass (one `losses.<name>` section)."""

    def decorator(factory):
        if name not in LOSSES:
            LOSSES.register(name, options, tasks=[], needs_fixed_scale=needs_fixed_scale)(LossVariants())
        entry = LOSSES.entry(name)
        if entry.options is not options or entry.capabilities["needs_fixed_scale"] != needs_fixed_scale:
            raise ValueError(f"loss {name!r}: both variants must declare the same options and capabilities")
        entry.capabilities["tasks"].append(task)
        try:
            entry.obj.add(LossEntry(task, factory))
        except ValueError as exc:
            raise ValueError(f"loss {name!r}: {exc}") from None
        return factory

    return decorator


def names_for(task: str, **capabilities) -> List[str]:
    """The sorted loss names with a variant for ``task`` (``single`` or ``multi``), optionally
    filtered by capability (``needs_fixed_scale=False``)."""
    if task not in TASKS:
        raise ValueError(f"a loss task is one of {TASKS}, got {task!r}")
    return LOSSES.names(tasks=task, **capabilities)


def check(name: str, task: str) -> LossEntry:
    """The ``task`` variant of loss ``name``; a :class:`ConfigError` naming the valid losses if
    the name is unknown or has no variant for this task."""
    variants = LOSSES.get(name)
    entry = variants.for_task(task)
    if entry is None:
        other = " and ".join(_KIND[t] for t in variants.tasks)
        raise ConfigError(f"loss {name!r} is for {other} tasks, but this dataset is {_KIND[task]}. "
                          f"Losses for it: {', '.join(names_for(task))}.")
    return entry


def build(name: str, task: str, options, class_counts: np.ndarray,
          num_images: Optional[int] = None) -> torch.nn.Module:
    """Build the ``task`` variant of loss ``name`` with its typed ``options``
    (``LOSSES.options(name, params)``; ``None``: the defaults). ``num_images`` (the number of training images) is passed
    to multi-label factories only; single-label losses get it from ``class_counts``."""
    factory = check(name, task).factory
    options = LOSSES.entry(name).options() if options is None else options
    counts = np.asarray(class_counts, dtype=np.float64)
    if task == "multi":
        return factory(options, counts, num_images)
    return factory(options, counts)


import_package_modules(__name__, __path__)  # every loss module registers itself
