"""Classifier heads trained on cached features, keyed by the names users type (`head:`).

A head declares which cached input it reads (``pooled`` embeddings or the
``tokens`` grid). Its constructor takes only JSON-able keyword arguments, which
are saved with the weights so :func:`rebuild` restores it exactly.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ltpipe.config import Params
from ltpipe.errors import DataError
from ltpipe.paths import atomic_target
from ltpipe.registry import Registry
from ltpipe.runtime import load_tensors

HEADS: Registry = Registry("head", "head")


@dataclass
class HeadContext:
    """What a head may need from the data to be built."""

    num_classes: int
    pooled_dim: int
    token_shape: Optional[tuple]
    text_embeddings: Optional[np.ndarray] = None
    logit_scale: float = 100.0
    tokens_have_cls: bool = True  # ViT grids start with CLS; ResNet grids do not


def build(name: str, section: Optional[Params], ctx: HeadContext) -> torch.nn.Module:
    """Build head ``name`` from its `heads.<name>` params section."""
    return HEADS.get(name).from_params(section, ctx)


def rebuild(name: str, kwargs: Dict) -> torch.nn.Module:
    return HEADS.get(name)(**kwargs)


def save_checkpoint(path: Path, head: torch.nn.Module, name: str, run: Dict, **extra) -> None:
    """Only tensors and plain values, so :func:`load_checkpoint` needs no unpickling of code."""
    payload = {"head": name, "kwargs": head.kwargs, "run": run,
               "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}, **extra}
    with atomic_target(path) as partial:
        torch.save(payload, partial)


def load_checkpoint(path: Path) -> Tuple[torch.nn.Module, Dict]:
    """Rebuild a trained head (``weights_only=True``); return it with its run names."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"trained head {path} not found. Run `dvc repro train`.")
    checkpoint = load_tensors(path, "a trained head")
    head = rebuild(checkpoint["head"], checkpoint["kwargs"])
    if checkpoint.get("stage2", "none") != "none":
        from ltpipe import stage2  # stage-2 methods wrap heads; imported late to avoid a cycle

        head = stage2.rebuild(checkpoint["stage2"], head)
    head.load_state_dict(checkpoint["state_dict"])
    return head.eval(), checkpoint["run"]


# Import for registration side effects.
from ltpipe.heads import cprfl, decoder, linear, neighbors, zeroshot  # noqa: E402,F401
