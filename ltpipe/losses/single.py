"""Single-label losses: logits ``[B, C]``, integer targets ``[B]``."""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.losses import register


class CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)


class BalancedSoftmax(nn.Module):
    """Balanced Softmax (Ren et al., NeurIPS 2020, Eq. 4): cross-entropy on
    ``z + log p``, with ``p_c = n_c / N`` the training class prior. Prediction uses the
    raw logits. Equal to the logit-adjusted loss with tau = 1 (Menon et al. 2021)."""

    def __init__(self, class_counts: np.ndarray):
        super().__init__()
        prior = np.asarray(class_counts, dtype=np.float64) / np.sum(class_counts)
        self.register_buffer("log_prior", torch.as_tensor(np.log(prior), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), target)


@register("ce", "single")
def _ce(section, class_counts):
    return CrossEntropy()


@register("bsm", "single")
def _bsm(section, class_counts):
    return BalancedSoftmax(class_counts)
