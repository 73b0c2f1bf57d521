"""Imbalance losses keyed by the names users type (`loss:`).

Each entry declares its task (``single`` or ``multi``) and is built from the
training class counts and its `losses.<name>` params section.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ltpipe.config import Params
from ltpipe.errors import ConfigError
from ltpipe.registry import Registry


@dataclass(frozen=True)
class LossEntry:
    task: str  # "single" or "multi"
    factory: Callable[[Optional[Params], np.ndarray], torch.nn.Module]


LOSSES: Registry[LossEntry] = Registry("loss", "loss")


def register(name: str, task: str):
    def decorator(factory):
        LOSSES.register(name)(LossEntry(task, factory))
        return factory

    return decorator


def check(name: str, task: str) -> LossEntry:
    entry = LOSSES.get(name)
    if entry.task != task:
        valid = [n for n in LOSSES.names() if LOSSES.get(n).task == task]
        kind = "multi-label" if task == "multi" else "single-label"
        raise ConfigError(f"loss {name!r} is for {entry.task}-label tasks, but this dataset is {kind}. "
                          f"Losses for it: {', '.join(valid)}.")
    return entry


def build(name: str, task: str, section: Optional[Params], class_counts: np.ndarray) -> torch.nn.Module:
    return check(name, task).factory(section, np.asarray(class_counts, dtype=np.float64))


from ltpipe.losses import multi, single  # noqa: E402,F401  (registration)
