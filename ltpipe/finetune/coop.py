"""CoOp: learnable text context for a frozen CLIP (Zhou et al., "Learning to Prompt for
Vision-Language Models", IJCV 2022).

The class embedding of class ``c`` is CLIP's text encoder applied to the token embeddings of
``[SOS] ctx_1 ... ctx_M <class-name tokens> . [EOS]``, where ``ctx_1 .. ctx_M`` are learnable
vectors in the token-embedding space. Both CLIP encoders stay frozen; only the context is trained
(the head reads cached pooled image features, so the image encoder is not run here at all).
Logits are ``logit_scale * cos(image feature, text_c)``.

This is CoOp's default configuration: a *unified* context shared by all classes, with the class
token at the *end* of the prompt. Class-specific context (CSC) and the "middle"/"front" class-token
positions are not implemented. No deviations from the method are intended: with ``init`` the
context starts from the phrase's token embeddings (CoOp's ``ctx_init``), otherwise from N(0, 0.02^2).
One bookkeeping detail differs: CoOp takes the length of ``ctx_init`` as its word count
(``len(ctx_init.split(" "))``); here it is the phrase's BPE token count. The two agree for phrases of
common words such as "a photo of a", and the token count stays right for words the tokenizer splits.
"""

from typing import List, Optional, Sequence

import torch
from open_clip.model import text_global_pool
from torch import nn
from torch.nn import functional as F

from ltpipe.core.errors import ConfigError
from ltpipe.heads.zeroshot import ZeroShotHead

# One BPE token in CLIP's vocabulary; its embedding rows are overwritten by the context, so only its
# token count matters (as in CoOp's "X X X X" prompt prefix).
PLACEHOLDER = "X"
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def _inner_token_ids(tokenizer, text: str) -> List[int]:
    """The ids ``text`` tokenizes to, without the start and end tokens and the padding."""
    empty = tokenizer([""])[0]
    start, end = int(empty[0]), int(empty[1])
    ids = tokenizer([text])[0].tolist()
    if ids[0] != start or end not in ids:
        raise ConfigError(f"CoOp needs a tokenizer that writes prompts as [SOS] ... [EOS]; {type(tokenizer).__name__} "
                          f"tokenized {text!r} as {ids[:8]}...")
    return ids[1:ids.index(end)]


class CoOpHead(nn.Module):
    """CoOp prompt learner + cosine classifier on a frozen open_clip ``CLIP`` (see the module docstring).

    ``state_dict()`` holds only ``context`` (the learned vectors) and ``logit_scale``. Everything else is
    rebuilt from the constructor's arguments: the tokenized prompts are a non-persistent buffer (they follow
    ``.to(device)``) and their token embeddings are looked up again at each call, which costs little and
    avoids caching a ``[classes, context_length, width]`` tensor. The CLIP model is held in a plain tuple,
    so it is neither a submodule nor in ``state_dict()``/``parameters()``: the caller owns it and moves it
    to the device. Its text tower is frozen here (``requires_grad_(False)``, which changes the caller's
    model) and is run in whatever train/eval mode the caller has set.

    To save a trained head, convert it with :meth:`to_zeroshot`: the class embeddings are then fixed and
    the result is an ordinary, checkpointable :class:`ZeroShotHead`.
    """

    input = "pooled"

    def __init__(self, clip_model, tokenizer, prompts: Sequence[str], context: int = 4,
                 init: Optional[str] = "a photo of a", logit_scale: Optional[float] = None):
        super().__init__()
        missing = [name for name in TEXT_TOWER + ("attn_mask", "text_pool_type") if not hasattr(clip_model, name)]
        if missing:
            raise ConfigError(f"CoOp needs an open_clip CLIP model with its own text transformer; "
                              f"{type(clip_model).__name__} has no {', '.join(missing)}.")
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("CoOp needs at least one class prompt.")
        if context < 1:
            raise ConfigError(f"finetune.coop.context must be at least 1, got {context}.")
        self._clip = (clip_model,)  # a tuple, so nn.Module does not register (and save, and move) the model
        for name in TEXT_TOWER:
            part = getattr(clip_model, name)
            if part is not None:
                part.requires_grad_(False)

        token_ids = tokenizer([f"{' '.join([PLACEHOLDER] * context)} {prompt}." for prompt in prompts])
        placeholder = _inner_token_ids(tokenizer, PLACEHOLDER)
        slots = token_ids[:, 1:1 + context]
        if len(placeholder) != 1 or slots.shape[1] != context or not bool((slots == placeholder[0]).all()):
            raise ConfigError(f"finetune.coop.context={context}: the tokenizer does not put the {context} context "
                              f"tokens right after the start token (are the context and the class name longer "
                              f"than the {token_ids.shape[1]}-token text context?).")
        if token_ids.shape[1] != clip_model.positional_embedding.shape[0]:
            raise ConfigError(f"the tokenizer writes {token_ids.shape[1]} tokens but the model's text encoder "
                              f"takes {clip_model.positional_embedding.shape[0]}; they are for different models.")
        embedding = clip_model.token_embedding
        device = embedding.weight.device
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)

        if init is None:
            initial = torch.randn(context, embedding.embedding_dim) * 0.02
        else:
            init_ids = _inner_token_ids(tokenizer, init)
            if len(init_ids) != context:
                raise ConfigError(f"finetune.coop.init {init!r} is {len(init_ids)} tokens long, but "
                                  f"finetune.coop.context is {context}: the context starts from the init phrase's "
                                  f"token embeddings, one per context vector. Set finetune.coop.context to "
                                  f"{len(init_ids)}, choose a {context}-token phrase, or set finetune.coop.init "
                                  f"to null for a random context.")
            with torch.no_grad():
                initial = embedding(torch.tensor(init_ids, device=device)).float()
        self.context = nn.Parameter(initial.to(device=device, dtype=torch.float32).clone())

        if logit_scale is None:
            logit_scale = clip_model.logit_scale.exp().item()
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale), device=device))
        self._eval_text: Optional[torch.Tensor] = None

    def text_features(self) -> torch.Tensor:
        """[classes, embed_dim] L2-normalised class embeddings; gradients flow to ``self.context``.

        Mirrors ``open_clip.model.CLIP.encode_text`` step for step, except that the embedding rows of the
        placeholder tokens are replaced by the context.
        """
        model = self._clip[0]
        cast_dtype = model.transformer.get_cast_dtype()
        with torch.no_grad():  # the token embedding is frozen; only the context needs a graph
            embedded = model.token_embedding(self.token_ids).to(cast_dtype)
        width = self.context.shape[0]
        context = self.context.to(cast_dtype).unsqueeze(0).expand(embedded.shape[0], -1, -1)
        x = torch.cat([embedded[:, :1], context, embedded[:, 1 + width:]], dim=1)
        x = x + model.positional_embedding.to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        # Pooling reads the token ids, not the embeddings: with the default "argmax" it picks the EOS
        # position, which the placeholders do not move.
        x = text_global_pool(x, self.token_ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            if isinstance(model.text_projection, nn.Linear):
                x = model.text_projection(x)
            else:
                x = x @ model.text_projection
        return F.normalize(x.float(), dim=-1)

    def train(self, mode: bool = True) -> "CoOpHead":
        self._eval_text = None  # `eval()` comes through here too: the context may have changed since
        return super().train(mode)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            text = self.text_features()
        else:
            # Evaluation: the context is fixed, so the class embeddings are computed once, not per batch.
            if self._eval_text is None:
                self._eval_text = self.text_features()
            text = self._eval_text
        return self.logit_scale * F.linear(F.normalize(pooled.float(), dim=-1), text)

    def to_zeroshot(self) -> ZeroShotHead:
        """A frozen :class:`ZeroShotHead` with the current class embeddings, on this head's device."""
        with torch.no_grad():
            text = self.text_features()
        head = ZeroShotHead(text.shape[1], text.shape[0]).to(text.device)
        head.text.copy_(text)
        head.logit_scale.copy_(self.logit_scale)
        return head.eval()
