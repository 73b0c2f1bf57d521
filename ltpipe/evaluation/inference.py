"""Feeding cached features to a head, and batched prediction."""

import numpy as np
import torch
from torch import nn

from ltpipe.core.errors import ConfigError
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

    @property
    def labels(self) -> np.ndarray:
        return self.features.labels

    def set_epoch(self, epoch: int) -> None:
        """Inputs that change with the epoch (augmented views) override this."""

    def batch(self, index: np.ndarray) -> torch.Tensor:
        if self._pooled is not None:
            x = self._pooled[torch.from_numpy(np.asarray(index, dtype=np.int64))]
        else:
            x = torch.from_numpy(self.features.tokens(np.asarray(index)))
        return x.to(self.device, non_blocking=True)


@torch.inference_mode()
def predict(head: nn.Module, data: FeatureInput, batch_size: int = 1024) -> np.ndarray:
    head.eval()
    out = None  # filled in place: one [N, C] array, not a list of batches and their concatenation
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        logits = head(data.batch(index)).float().cpu().numpy()
        if out is None:
            out = np.empty((len(data), logits.shape[1]), dtype=np.float32)
        out[index[0]:index[-1] + 1] = logits
    return out


class ViewInput(FeatureInput):
    """Training input over ``train_views.h5``: each epoch, every image is seen through one
    of its ``views`` cached augmentations, drawn from ``(seed, epoch)``."""

    def __init__(self, features: SplitFeatures, kind: str, device: torch.device, views: int, seed: int):
        super().__init__(features, kind, device)
        self.views = views
        self.seed = seed
        self.count = len(features) // views
        self._choice = np.zeros(self.count, dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    @property
    def labels(self) -> np.ndarray:
        return self.features.labels[:: self.views]

    def set_epoch(self, epoch: int) -> None:
        self._choice = np.random.default_rng([self.seed, epoch, 7]).integers(0, self.views, self.count)

    def batch(self, index: np.ndarray) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        return super().batch(index * self.views + self._choice[index])
