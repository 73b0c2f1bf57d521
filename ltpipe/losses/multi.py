"""Multi-label losses: logits ``[B, C]``, multi-hot targets ``[B, C]``."""

import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.losses import register


class BinaryCrossEntropy(nn.Module):
    """Element-wise binary cross-entropy with logits, averaged over ``B x C``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


@register("bce", "multi")
def _bce(section, class_counts):
    return BinaryCrossEntropy()
