"""Heads on pooled embeddings: linear and cosine classifiers.

Pooled features are L2-normalised before every pooled head, as CLIP's zero-shot
classifier and linear probes use them (Radford et al. 2021).
"""

import math
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.config import Params
from ltpipe.errors import ConfigError
from ltpipe.heads import HEADS, HeadContext

INITS = ("random", "text")


def _text_init(section: Optional[Params], ctx: HeadContext) -> Optional[np.ndarray]:
    init = section.str("init", choices=INITS, default="random") if section is not None else "random"
    if init == "random":
        return None
    if ctx.text_embeddings is None or ctx.text_embeddings.shape != (ctx.num_classes, ctx.pooled_dim):
        raise ConfigError("`init: text` needs class text embeddings of the pooled feature size; "
                          "re-run extraction so text.h5 matches the image features.")
    return ctx.text_embeddings


class _PooledHead(nn.Module):
    input = "pooled"


@HEADS.register("linear")
class LinearHead(_PooledHead):
    """``z = W x + b`` on normalised pooled features. ``init: text`` starts from CLIP's
    zero-shot classifier (W = logit_scale * text embeddings, b = 0)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "num_classes": num_classes}
        self.fc = nn.Linear(in_dim, num_classes)

    @classmethod
    def from_params(cls, section: Optional[Params], ctx: HeadContext) -> "LinearHead":
        head = cls(ctx.pooled_dim, ctx.num_classes)
        text = _text_init(section, ctx)
        if text is not None:
            with torch.no_grad():
                head.fc.weight.copy_(torch.as_tensor(text) * ctx.logit_scale)
                head.fc.bias.zero_()
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.normalize(x, dim=-1))


@HEADS.register("cosine")
class CosineHead(_PooledHead):
    """``z = s * cos(x, w_c)`` with a learnable scale ``s`` (cosine classifier, as in
    LIFT's and LDAM's normalised heads)."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "num_classes": num_classes, "scale": scale}
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    @classmethod
    def from_params(cls, section: Optional[Params], ctx: HeadContext) -> "CosineHead":
        scale = section.float("scale", minimum=0, exclusive_minimum=True, default=16.0) if section else 16.0
        head = cls(ctx.pooled_dim, ctx.num_classes, scale)
        text = _text_init(section, ctx)
        if text is not None:
            with torch.no_grad():
                head.weight.copy_(torch.as_tensor(text))
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))
