"""Feeding cached features to a head, and batched prediction."""

import numpy as np
import torch
from torch import nn

from ltpipe.errors import ConfigError
from ltpipe.features.store import SplitFeatures


class FeatureInput:
    """Feeds a head the cached input it reads (pooled embeddings or token grids)."""

    def __init__(self, features: SplitFeatures, kind: str, device: torch.device):
        if kind not in ("pooled", "tokens"):
            raise ValueError(kind)
        if kind == "tokens" and not features.has_tokens:
            raise ConfigError(f"this head reads token grids, but {features.path} has none. "
                              "Set `extract.tokens: true` and re-run `dvc repro`.")
        self.features = features
        self.kind = kind
        self.device = device
        self._pooled = torch.from_numpy(features.pooled) if kind == "pooled" else None

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, index: np.ndarray) -> torch.Tensor:
        if self._pooled is not None:
            x = self._pooled[torch.from_numpy(np.asarray(index, dtype=np.int64))]
        else:
            x = torch.from_numpy(self.features.tokens(np.asarray(index)))
        return x.to(self.device, non_blocking=True)


@torch.inference_mode()
def predict(head: nn.Module, data: FeatureInput, batch_size: int = 1024) -> np.ndarray:
    head.eval()
    out = []
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        out.append(head(data.batch(index)).float().cpu())
    return torch.cat(out).numpy()
