"""CPRFL: Category-Prompt Refined Feature Learning (Yan et al., ACM MM 2024, arXiv:2408.08125).

On the cached visual token grid ``F`` (ViT CLS + patches, or a ResNet grid) and the
frozen class text embeddings ``W`` (``text.h5``):

* Prompt Initialisation (PI, Eq. 2): ``P = Linear(GELU(Linear(W)))``, hidden size
  ``tau * dim`` (tau = 0.5).
* Projection (Eq. 1): ``phi(F) = Linear(F)`` to ``dim``.
* Visual-Semantic Interaction (VSI, Eqs. 3-5): one pre-LayerNorm transformer layer with
  *no residual connections* over ``Z = [phi(F); P]``; only the category rows ``P'`` are
  used. With one layer and no residuals those rows depend on the other rows only as keys
  and values, so only the prompt rows are computed: queries from the prompts, keys and
  values from all tokens (``PromptVSI.forward``; ``forward_full`` is the whole layer, kept
  to prove the equality in the tests and measure the saving in ``bench/cprfl.py``). The
  prompt queries and keys do not depend on the image, so they are computed once per batch.
* Logits (Eq. 6): ``s_i = <P'_i, P_i>``: each category-specific feature against its own
  prompt, raw dot product (no normalisation, temperature or bias), sigmoid in the loss.
  ``P`` reaches the loss through the VSI and through the dot product; plain autograd sums
  both (the paper's "progressive dual-path back-propagation"; the official code has no
  other mechanism).

Architecture as the official code (``src/models/TF.py``, ``build_model_TF.py``): qkv
projection without bias, attention scale ``head_dim^-0.5``, output projection
``heads*head_dim -> dim`` then dropout, FFN ``dim -> ffn -> dim`` with GELU and dropout,
no positional encoding, no dropout on the attention weights. The paper's sizes are the
preset ``dim 2048, heads 8, head_dim 512, ffn 2048, dropout 0.1`` (see docs/methods.md); the
defaults are small enough to train in seconds on the embedded default.

Deviations, all deliberate: the text embeddings are CLIP's unit-norm class embeddings
from the cache and stay frozen (the paper freezes them; the official code trained the
whole text encoder and fed it un-normalised); visual features are CLIP's, not a
fine-tuned ResNet-101; with many classes the prompt queries are processed in chunks of
``class_chunk``, so attention memory stays bounded (exact, not an approximation).
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.core.errors import ConfigError
from ltpipe.core.options import option
from ltpipe.heads import HeadContext, register


class PromptVSI(nn.Module):
    """The VSI layer: ``out = FFN(LN2(Attn(LN1(Z))))`` with no residuals, prompt rows only."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn: int, dropout: float, class_chunk: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.class_chunk = class_chunk
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim),
                                 nn.Dropout(dropout))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n, heads*head_dim]`` to ``[..., heads, n, head_dim]``."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def forward(self, visual: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Refined prompts ``[B, C, dim]`` from visual tokens ``[B, T, dim]`` and prompts ``[C, dim]``."""
        batch = visual.shape[0]
        inner = self.heads * self.head_dim
        w_q, w_kv = self.to_qkv.weight[:inner], self.to_qkv.weight[inner:]
        z_visual, z_prompt = self.norm1(visual), self.norm1(prompts)
        k_visual, v_visual = F.linear(z_visual, w_kv).chunk(2, dim=-1)  # [B, T, inner]
        k_prompt, v_prompt = F.linear(z_prompt, w_kv).chunk(2, dim=-1)  # [C, inner], the same for every image
        keys = self._split(torch.cat([k_visual, k_prompt.expand(batch, -1, -1)], dim=1))  # [B, h, T+C, d]
        values = self._split(torch.cat([v_visual, v_prompt.expand(batch, -1, -1)], dim=1))
        queries = self._split(F.linear(z_prompt, w_q))  # [h, C, d]
        out = []
        for start in range(0, prompts.shape[0], self.class_chunk):
            q = queries[:, start:start + self.class_chunk].expand(batch, -1, -1, -1)
            attended = F.scaled_dot_product_attention(q, keys, values)  # scale head_dim^-0.5
            out.append(self.ffn(self.norm2(self.to_out(attended.transpose(1, 2).flatten(2)))))
        return torch.cat(out, dim=1)

    def forward_full(self, visual: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The whole layer over all ``T + C`` tokens, as the official code runs it; returns the
        prompt rows. Reference for tests and benchmarks only."""
        tokens = torch.cat([visual, prompts.expand(visual.shape[0], -1, -1)], dim=1)
        q, k, v = (self._split(t) for t in self.to_qkv(self.norm1(tokens)).chunk(3, dim=-1))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        out = self.ffn(self.norm2(self.to_out((attn @ v).transpose(1, 2).flatten(2))))
        return out[:, visual.shape[1]:]


def _below_one(value: float) -> Optional[str]:
    return None if value < 1 else "must be below 1 (0 turns EMA off; the official code uses 0.998)"


@dataclass(frozen=True)
class CPRFLOptions:
    """Defaults: a small head for the embedded default; the paper's preset: see docs/methods.md."""

    dim: int = option(128, minimum=1, doc="prompt and token width inside the head (paper: 2048)")
    heads: int = option(4, minimum=1, doc="attention heads (paper: 8)")
    head_dim: int = option(32, minimum=1, doc="width of each attention head (paper: 512)")
    ffn: int = option(128, minimum=1, doc="feed-forward width (paper: 2048)")
    dropout: float = option(0.1, minimum=0, maximum=1)
    tau: float = option(0.5, above=0, doc="prompt-initialisation hidden size: tau * dim")
    ema: float = option(0.0, minimum=0, check=_below_one,
                        doc="EMA of the weights, validated and kept (official code: 0.998); 0: off")
    class_chunk: int = option(256, minimum=1, doc="prompt queries per attention chunk: bounds memory")


@register("cprfl", CPRFLOptions, input="tokens", trains=True)
class CPRFLHead(nn.Module):
    """CPRFL: category prompts from the class text embeddings refined by the token grid (VSI)."""

    def __init__(self, token_dim: int, text_dim: int, num_classes: int, dim: int, heads: int,
                 head_dim: int, ffn: int, dropout: float, tau: float, class_chunk: int, ema: float):
        super().__init__()
        self.kwargs = {"token_dim": token_dim, "text_dim": text_dim, "num_classes": num_classes, "dim": dim,
                       "heads": heads, "head_dim": head_dim, "ffn": ffn, "dropout": dropout, "tau": tau,
                       "class_chunk": class_chunk, "ema": ema}
        self.ema_decay = ema  # read by the training loop: 0 = no EMA of the weights
        self.register_buffer("text", torch.zeros(num_classes, text_dim))
        hidden = max(1, int(tau * dim))
        self.prompt_init = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.project = nn.Linear(token_dim, dim)
        self.vsi = PromptVSI(dim, heads, head_dim, ffn, dropout, class_chunk)

    @classmethod
    def from_options(cls, options: CPRFLOptions, ctx: HeadContext) -> "CPRFLHead":
        if ctx.token_shape is None:
            raise ConfigError("head `cprfl` reads token grids, but the feature cache has none. "
                              "Set `extract.tokens: true` and re-run `dvc repro`.")
        text = ctx.text_embeddings
        if text is None or text.ndim != 2 or text.shape[0] != ctx.num_classes:
            raise ConfigError("head `cprfl` starts its category prompts from the class text embeddings, but "
                              "text.h5 does not hold one per class. Re-run `dvc repro text`.")
        head = cls(ctx.token_shape[-1], text.shape[1], ctx.num_classes, **asdict(options))
        with torch.no_grad():
            head.text.copy_(torch.as_tensor(text, dtype=torch.float32))
        return head

    def prompts(self) -> torch.Tensor:
        """The category prompts ``P = PI(W)``, ``[C, dim]``."""
        return self.prompt_init(self.text)

    def score(self, tokens: torch.Tensor, prompts_vsi: torch.Tensor, prompts_classifier: torch.Tensor):
        """``<VSI(phi(tokens), prompts_vsi)_i, prompts_classifier_i>``; the two prompt arguments are
        the two gradient paths (the same tensor in :meth:`forward`)."""
        refined = self.vsi(self.project(tokens), prompts_vsi)
        return (refined * prompts_classifier).sum(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts()
        return self.score(tokens, prompts, prompts)
