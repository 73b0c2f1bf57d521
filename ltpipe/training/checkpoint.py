"""The trained head on disk: written by `train`, read by `evaluate`.

Here rather than in :mod:`ltpipe.heads` because a saved model may be a two-stage method wrapping
its head (:mod:`ltpipe.training.stage2`): whoever loads one needs that code, and says so by
importing this module (so DVC's declared code dependencies follow the imports).
"""

from pathlib import Path
from typing import Dict, Tuple

import torch

from ltpipe import heads
from ltpipe.core.errors import DataError
from ltpipe.core.paths import atomic_target
from ltpipe.core.runtime import load_tensors
from ltpipe.training import stage2


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
    head = heads.rebuild(checkpoint["head"], checkpoint["kwargs"])
    if checkpoint.get("stage2", "none") != "none":
        head = stage2.rebuild(checkpoint["stage2"], head)
    head.load_state_dict(checkpoint["state_dict"])
    return head.eval(), checkpoint["run"]
