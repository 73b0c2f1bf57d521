"""CLIP's zero-shot classifier as a head (Radford et al. 2021).

``z = logit_scale * cos(x, t_c)``, where ``t_c`` are the class text embeddings that the
extract stage cached. It has no trainable parameters and nothing to fit. Training leaves
it as it is, and evaluating it gives the `zeroshot` stage's numbers through the
`train`/`evaluate` path.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.core.errors import ConfigError
from ltpipe.core.options import NoOptions
from ltpipe.heads import HeadContext, register


@register("zeroshot", input="pooled", trains=False)
class ZeroShotHead(nn.Module):
    """CLIP's zero-shot classifier: ``logit_scale * cos(image, class text embedding)``; nothing trained."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "num_classes": num_classes}
        self.register_buffer("text", torch.zeros(num_classes, in_dim))
        self.register_buffer("logit_scale", torch.tensor(100.0))

    @classmethod
    def from_options(cls, options: NoOptions, ctx: HeadContext) -> "ZeroShotHead":
        text = ctx.text_embeddings
        if text is None:
            raise ConfigError("head `zeroshot` needs the class text embeddings (text.h5), but none were loaded. "
                              "Re-run `dvc repro text`.")
        if text.ndim != 2 or text.shape[1] != ctx.pooled_dim:
            raise ConfigError(f"head `zeroshot`: the class text embeddings have shape {tuple(text.shape)}, but the "
                              f"pooled image features are {ctx.pooled_dim} wide; they come from different "
                              "models. Re-run `dvc repro extract text`.")
        if text.shape[0] != ctx.num_classes:
            raise ConfigError(f"head `zeroshot`: there are text embeddings for {text.shape[0]} classes but the "
                              f"dataset has {ctx.num_classes}. Re-run `dvc repro text`.")
        head = cls(ctx.pooled_dim, ctx.num_classes)
        with torch.no_grad():
            head.text.copy_(F.normalize(torch.as_tensor(text, dtype=torch.float32), dim=-1))
            head.logit_scale.fill_(float(ctx.logit_scale))
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.linear(F.normalize(x.float(), dim=-1), self.text)
