"""What end-to-end fine-tuning trains in the image encoder, keyed by `finetune.modes` names.

Every mode freezes the text tower. Then:

* ``full``: the whole image encoder.
* ``partial``: the last ``blocks`` transformer blocks and the final LayerNorm and
  projection (``ln_post``, ``proj``).
* ``bitfit``: biases and normalisation parameters only (Ben Zaken et al., ACL 2022).
* ``vpt``: nothing of the encoder; ``prompts`` learnable tokens are inserted after the
  CLS token, before the first block, and dropped at its output (VPT-shallow, Jia et
  al., ECCV 2022, Sec. 3.2). Initialised uniform in ``+-sqrt(6 / (3 p^2 + d))``
  (Xavier over the patch embedding's fan-in, as VPT's code).
* ``coop``: nothing of the encoder; learnable text context for the zero-shot head
  (Zhou et al., IJCV 2022; :mod:`ltpipe.finetune.coop`).

Parameters of a trainable part that do not reach the head's input (``ln_post`` and
``proj`` for a head reading the pre-LayerNorm token grid) are frozen by
:func:`ltpipe.finetune.model.freeze_unreached`: they would never get a gradient.
"""

import math
from typing import Dict, Optional

import torch
from torch import nn

from ltpipe.config import Params
from ltpipe.errors import ConfigError
from ltpipe.registry import Registry

MODES: Registry = Registry("fine-tuning mode", "finetune.modes")


def is_vit(visual: nn.Module) -> bool:
    return hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks") and hasattr(visual, "ln_post")


def _need_vit(visual: nn.Module, mode: str) -> None:
    if not is_vit(visual):
        raise ConfigError(f"fine-tuning mode {mode!r} needs a ViT image encoder, not {type(visual).__name__}. "
                          "Use `full` or `bitfit` with ResNet architectures.")


class Mode:
    """A mode: which encoder parameters train, and any module it adds (VPT's prompts)."""

    name = ""
    text_prompts = False  # coop: trains the text side of the zero-shot head instead

    def __init__(self, **kwargs):
        self.kwargs: Dict = kwargs  # JSON-able, saved with the fine-tuned model

    @classmethod
    def from_params(cls, section: Optional[Params]) -> "Mode":
        return cls()

    def apply(self, visual: nn.Module) -> Optional[nn.Module]:
        """Set ``requires_grad`` on ``visual``'s parameters; return a module to add, if any."""
        raise NotImplementedError


@MODES.register("full")
class Full(Mode):
    name = "full"

    def apply(self, visual):
        visual.requires_grad_(True)
        return None


@MODES.register("partial")
class Partial(Mode):
    name = "partial"

    def __init__(self, blocks: int = 2):
        super().__init__(blocks=blocks)
        self.blocks = blocks

    @classmethod
    def from_params(cls, section):
        return cls(section.int("blocks", minimum=1, default=2) if section is not None else 2)

    def apply(self, visual):
        _need_vit(visual, self.name)
        blocks = visual.transformer.resblocks
        if self.blocks > len(blocks):
            raise ConfigError(f"`finetune.partial.blocks` is {self.blocks} but the encoder has {len(blocks)} blocks; "
                              f"use 1-{len(blocks)} (or mode `full`).")
        visual.requires_grad_(False)
        for block in blocks[len(blocks) - self.blocks:]:
            block.requires_grad_(True)
        visual.ln_post.requires_grad_(True)
        if isinstance(getattr(visual, "proj", None), nn.Parameter):
            visual.proj.requires_grad_(True)
        return None


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d)


@MODES.register("bitfit")
class BitFit(Mode):
    name = "bitfit"

    def apply(self, visual):
        visual.requires_grad_(False)
        for module in visual.modules():
            is_norm = isinstance(module, NORMS)
            for name, param in module.named_parameters(recurse=False):
                if is_norm or name.endswith("bias"):
                    param.requires_grad_(True)
        return None


class VisualPrompts(nn.Module):
    """VPT-shallow's prompt tokens, spliced into a ViT's token sequence by forward hooks."""

    def __init__(self, count: int, width: int, patch_size: int):
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
        self.tokens = nn.Parameter(torch.empty(count, width).uniform_(-bound, bound))
        self._handles = []

    def attach(self, visual: nn.Module) -> None:
        """Insert the prompts after CLS at the transformer's input; drop them at its output."""
        count = self.tokens.shape[0]

        def insert(module, args):
            x = args[0]
            prompts = self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return (torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1),) + tuple(args[1:])

        def drop(module, args, output):
            return torch.cat([output[:, :1], output[:, 1 + count:]], dim=1)

        self._handles = [visual.transformer.register_forward_pre_hook(insert),
                         visual.transformer.register_forward_hook(drop)]


@MODES.register("vpt")
class Vpt(Mode):
    name = "vpt"

    def __init__(self, prompts: int = 8):
        super().__init__(prompts=prompts)
        self.prompts = prompts

    @classmethod
    def from_params(cls, section):
        return cls(section.int("prompts", minimum=1, default=8) if section is not None else 8)

    def apply(self, visual):
        _need_vit(visual, self.name)
        visual.requires_grad_(False)
        patch = visual.conv1.kernel_size[0] if hasattr(visual, "conv1") else 16
        return VisualPrompts(self.prompts, visual.transformer.width, patch)


@MODES.register("coop")
class CoOp(Mode):
    name = "coop"
    text_prompts = True

    def __init__(self, context: int = 4, init: Optional[str] = "a photo of a"):
        super().__init__(context=context, init=init)
        self.context = context
        self.init = init

    @classmethod
    def from_params(cls, section):
        if section is None:
            return cls()
        return cls(section.int("context", minimum=1, default=4), section.optional_str("init", default="a photo of a"))

    def apply(self, visual):
        visual.requires_grad_(False)
        return None


def build(name: str, section: Optional[Params]) -> Mode:
    return MODES.get(name).from_params(section)


def rebuild(name: str, kwargs: Dict) -> Mode:
    return MODES.get(name)(**kwargs)
