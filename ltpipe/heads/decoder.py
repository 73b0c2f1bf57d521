"""The lightweight transformer decoder of Imbalance-VLM (Wang et al., IJCV 2023).

Architecture as in the official code (``imblearn/nets/clip/clip.py``): ``depth``
pre-norm ViT blocks (timm ``Block``: ``x + MHSA(LN(x))``, ``x + MLP(LN(x))``, MLP
``Linear(d, d*r) -> GELU -> Linear(d*r, d)``, qkv bias, no dropout, LayerNorm eps
1e-5) over all cached tokens (CLS + patches), read out at the CLS token, then a
linear classifier. Defaults follow the paper's runs: depth 3, 4 heads, MLP ratio
0.5, no final LayerNorm. Depth 0 is a linear probe on the CLS token.

Deviations: ``final_norm: true`` adds a LayerNorm before the classifier (the
official code has none); off by default. ResNet token grids have no CLS token, so
there the read-out is the mean over tokens (``readout: mean``), chosen
automatically from the cache.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ltpipe.core.errors import ConfigError
from ltpipe.core.options import option
from ltpipe.heads import HeadContext, register


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class DecoderOptions:
    depth: int = option(3, minimum=0, doc="transformer blocks (Imbalance-VLM: 3)")
    heads: int = option(4, minimum=1, doc="attention heads per block; must divide the token width")
    mlp_ratio: float = option(0.5, above=0, doc="MLP hidden width as a share of the token width")
    final_norm: bool = option(False, doc="LayerNorm on the read-out token")


@register("decoder", DecoderOptions, input="tokens", trains=True, adjustable_classifier=True)
class DecoderHead(nn.Module):
    """Imbalance-VLM's lightweight transformer decoder on the token grid, then a linear classifier."""

    def __init__(self, dim: int, num_classes: int, depth: int, heads: int, mlp_ratio: float,
                 final_norm: bool, readout: str = "cls"):
        super().__init__()
        if depth > 0 and dim % heads:
            raise ConfigError(f"`heads.decoder.heads` ({heads}) must divide the token width {dim}.")
        if readout not in ("cls", "mean"):
            raise ConfigError(f"decoder read-out must be cls or mean, got {readout!r}.")
        self.readout = readout
        self.kwargs = {"dim": dim, "num_classes": num_classes, "depth": depth, "heads": heads,
                       "mlp_ratio": mlp_ratio, "final_norm": final_norm, "readout": readout}
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-5) if final_norm else nn.Identity()
        self.classifier = self.make_classifier()

    def make_classifier(self) -> nn.Module:
        return nn.Linear(self.kwargs["dim"], self.kwargs["num_classes"])

    @classmethod
    def from_options(cls, options: DecoderOptions, ctx: HeadContext) -> "DecoderHead":
        if ctx.token_shape is None:
            raise ConfigError("head `decoder` reads token grids, but the feature cache has none. "
                              "Set `extract.tokens: true` and re-run `dvc repro`.")
        readout = "cls" if ctx.tokens_have_cls else "mean"
        return cls(ctx.token_shape[-1], ctx.num_classes, readout=readout, **asdict(options))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The representation the classifier reads (what two-stage methods freeze)."""
        x = self.blocks(tokens)
        return self.norm(x[:, 0] if self.readout == "cls" else x.mean(dim=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(tokens))
