"""What extraction and fine-tuning share about open_clip's towers: the image tower's input size
and preprocessing record, its token grid, and the class-name text embeddings.

One forward pass per batch yields both the pooled embedding (after the
projection) and the token grid, read by a forward hook (:class:`TokenTap`):

* ViT: the transformer's output, CLS + patch tokens, taken before the final
  LayerNorm (``token_layer: pre_ln``, what Imbalance-VLM's decoder reads; Wang
  et al. 2023, Sec. 3) or after it (``post_ln``, what open_clip's
  ``output_tokens`` returns, but that drops the CLS token, so we keep it).
* ResNet (``ModifiedResNet``): the last stage's spatial grid before attention
  pooling, flattened to ``[H*W, C]``; ``token_layer`` does not apply.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ltpipe.core.errors import ConfigError
from ltpipe.core.runtime import autocast

TEMPLATE_SETS = ("single", "imagenet80")
SINGLE_TEMPLATE = "a photo of a {}."


class TokenTap:
    """Forward hook that keeps the visual token grid of the last forward pass."""

    def __init__(self, visual: torch.nn.Module, token_layer: str):
        self.visual = visual
        self.token_layer = token_layer
        self.tokens: Optional[torch.Tensor] = None
        if hasattr(visual, "transformer") and hasattr(visual, "ln_post"):
            self.kind = "vit"
            self.handle = visual.transformer.register_forward_hook(self._vit)
        elif hasattr(visual, "layer4") and hasattr(visual, "attnpool"):
            self.kind = "resnet"
            self.handle = visual.layer4.register_forward_hook(self._resnet)
        else:
            raise ConfigError(
                f"token extraction supports open_clip ViT and ResNet towers, not {type(visual).__name__}. "
                "Set `extract.tokens: false` to cache pooled features only."
            )

    def _vit(self, module, inputs, output):
        tokens = output
        if self.token_layer == "post_ln":
            tokens = self.visual.ln_post(tokens)
        self.tokens = tokens

    def _resnet(self, module, inputs, output):
        self.tokens = output.flatten(2).transpose(1, 2)

    def remove(self) -> None:
        self.handle.remove()


def preprocess_attrs(preprocess_cfg: Dict) -> Dict:
    return {
        "image_size": list(np.atleast_1d(preprocess_cfg.get("size", 224)).tolist()),
        "interpolation": preprocess_cfg.get("interpolation", "bicubic"),
        "resize_mode": preprocess_cfg.get("resize_mode", "shortest"),
        "mean": list(preprocess_cfg.get("mean", ())),
        "std": list(preprocess_cfg.get("std", ())),
    }


def input_size(visual) -> int:
    """The side of the square images an open_clip image tower takes."""
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    return int(np.atleast_1d(cfg.get("size", 224))[0])


def templates_for(name: str) -> List:
    if name == "single":
        return [SINGLE_TEMPLATE.format]
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return list(OPENAI_IMAGENET_TEMPLATES)


def class_text_embeddings(model, tokenizer, prompts: Sequence[str], template_set: str, device: torch.device,
                          precision: str):
    """Class-name embeddings: each template encoded and L2-normalised, averaged, normalised again
    (CLIP's zero-shot classifier, Radford et al. 2021, Sec. 3.1.4). Returns ``(mean [C, D],
    per_template [C, T, D], texts)`` and the model's logit scale."""
    templates = templates_for(template_set)
    texts = [[template(p) for template in templates] for p in prompts]
    flat = [t for per_class in texts for t in per_class]
    with torch.inference_mode(), autocast(device, precision):
        chunks = []
        for start in range(0, len(flat), 256):
            tokens = tokenizer(flat[start:start + 256]).to(device)
            chunks.append(model.encode_text(tokens, normalize=True).float())
        per_template = torch.cat(chunks).reshape(len(prompts), len(templates), -1)
    mean = torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)
    logit_scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
    return mean.cpu().numpy(), per_template.cpu().numpy(), texts, logit_scale
