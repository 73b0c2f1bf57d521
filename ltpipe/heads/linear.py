"""Heads on pooled embeddings: linear and cosine classifiers.

Pooled features are L2-normalised before every pooled head, as CLIP's zero-shot
classifier and linear probes use them (Radford et al. 2021).
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.core.errors import ConfigError
from ltpipe.core.options import option
from ltpipe.heads import HeadContext, register

INITS = ("random", "text")
INIT_DOC = "random, or text: start from CLIP's zero-shot classifier"


@dataclass(frozen=True)
class LinearOptions:
    init: str = option("random", choices=INITS, doc=INIT_DOC)


@dataclass(frozen=True)
class CosineOptions:
    init: str = option("random", choices=INITS, doc=INIT_DOC)
    scale: float = option(16.0, above=0, doc="initial scale s of s * cos (learned; LDAM fixes it at its s)")


def _text_init(init: str, ctx: HeadContext) -> Optional[np.ndarray]:
    if init == "random":
        return None
    if ctx.text_embeddings is None or ctx.text_embeddings.shape != (ctx.num_classes, ctx.pooled_dim):
        raise ConfigError("`init: text` needs class text embeddings of the pooled feature size; "
                          "re-run `dvc repro extract text` so text.h5 matches the image features.")
    return ctx.text_embeddings


class CosineClassifier(nn.Module):
    """``z = s * cos(h, w_c)`` with a learnable scale ``s`` (the normalised classifier of
    LDAM, Cao et al. 2019, and LIFT)."""

    def __init__(self, in_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def effective_weight(self) -> torch.Tensor:
        """The matrix ``W'`` with ``z = W' h`` for unit-norm ``h``."""
        return self.log_scale.exp() * F.normalize(self.weight, dim=-1)

    def fix_scale(self, scale: float) -> None:
        """Hold ``s`` at ``scale`` (LDAM trains ``s * cos`` with a fixed ``s``)."""
        with torch.no_grad():
            self.log_scale.fill_(math.log(scale))
        self.log_scale.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.linear(F.normalize(h, dim=-1), F.normalize(self.weight, dim=-1))


class _PooledHead(nn.Module):
    """A classifier on L2-normalised pooled features. ``features`` and ``classifier`` are
    what two-stage methods (``ltpipe.training.stage2``) freeze, re-initialise or adjust."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("linear", LinearOptions, input="pooled", trains=True, adjustable_classifier=True)
class LinearHead(_PooledHead):
    """``z = W x + b`` on normalised pooled features. ``init: text`` starts from CLIP's
    zero-shot classifier (W = logit_scale * text embeddings, b = 0)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "num_classes": num_classes}
        self.classifier = self.make_classifier()

    def make_classifier(self) -> nn.Module:
        return nn.Linear(self.kwargs["in_dim"], self.kwargs["num_classes"])

    @classmethod
    def from_options(cls, options: LinearOptions, ctx: HeadContext) -> "LinearHead":
        head = cls(ctx.pooled_dim, ctx.num_classes)
        text = _text_init(options.init, ctx)
        if text is not None:
            with torch.no_grad():
                head.classifier.weight.copy_(torch.as_tensor(text) * ctx.logit_scale)
                head.classifier.bias.zero_()
        return head


@register("cosine", CosineOptions, input="pooled", trains=True, adjustable_classifier=True, fixed_scale=True)
class CosineHead(_PooledHead):
    """A :class:`CosineClassifier` on normalised pooled features."""

    def __init__(self, in_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "num_classes": num_classes, "scale": scale}
        self.classifier = self.make_classifier()

    def make_classifier(self) -> nn.Module:
        return CosineClassifier(self.kwargs["in_dim"], self.kwargs["num_classes"], self.kwargs["scale"])

    @classmethod
    def from_options(cls, options: CosineOptions, ctx: HeadContext) -> "CosineHead":
        head = cls(ctx.pooled_dim, ctx.num_classes, options.scale)
        text = _text_init(options.init, ctx)
        if text is not None:
            with torch.no_grad():
                head.classifier.weight.copy_(torch.as_tensor(text))
        return head
