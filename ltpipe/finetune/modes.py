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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from ltpipe.core.errors import ConfigError
from ltpipe.core.options import NoOptions, option
from ltpipe.core.params_layout import FINETUNE_KEYS
from ltpipe.core.registry import Registry

MODES: Registry = Registry("fine-tuning mode", "finetune.modes", section="finetune",
                          section_keys=FINETUNE_KEYS)


def register(name: str, options: type = NoOptions, *, vit_only: bool, text_prompts: bool = False):
    """Register a mode class under ``name`` with its options dataclass and capabilities:

    - ``vit_only``: needs a ViT image encoder (it selects transformer blocks or extends the token sequence);
    - ``text_prompts``: trains the zero-shot head's text context instead of the image encoder.
    """

    def decorator(cls):
        cls.name = name  # a mode rebuilt from a checkpoint knows its name and what it trains
        cls.text_prompts = text_prompts
        return MODES.register(name, options, vit_only=vit_only, text_prompts=text_prompts)(cls)

    return decorator


def is_vit(visual: nn.Module) -> bool:
    return hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks") and hasattr(visual, "ln_post")


class Mode:
    """A mode: which encoder parameters train, and any module it adds (VPT's prompts)."""

    name = ""
    text_prompts = False

    def __init__(self, options: Any):
        self.options = options

    @property
    def kwargs(self) -> Dict:
        """The options as JSON-able values, saved with the fine-tuned model."""
        return dataclasses.asdict(self.options)

    def apply(self, visual: nn.Module) -> Optional[nn.Module]:
        """Set ``requires_grad`` on ``visual``'s parameters; return a module to add, if any."""
        if MODES.capability(self.name, "vit_only") and not is_vit(visual):
            others = " or ".join(f"`{n}`" for n in MODES.names(vit_only=False, text_prompts=False))
            raise ConfigError(f"fine-tuning mode {self.name!r} needs a ViT image encoder, not "
                              f"{type(visual).__name__}. Use {others} with ResNet architectures.")
        return self._apply(visual)

    def _apply(self, visual: nn.Module) -> Optional[nn.Module]:
        raise NotImplementedError


@register("full", vit_only=False)
class Full(Mode):
    """The whole image encoder."""

    def _apply(self, visual):
        visual.requires_grad_(True)
        return None


@dataclass(frozen=True)
class PartialOptions:
    blocks: int = option(2, minimum=1, doc="the last blocks trained (with the final LayerNorm and projection)")


@register("partial", PartialOptions, vit_only=True)
class Partial(Mode):
    """The last transformer blocks, the final LayerNorm and the projection."""

    def _apply(self, visual):
        blocks = visual.transformer.resblocks
        count = self.options.blocks
        if count > len(blocks):
            raise ConfigError(f"`finetune.partial.blocks` is {count} but the encoder has {len(blocks)} blocks; "
                              f"use 1-{len(blocks)} (or mode `full`).")
        visual.requires_grad_(False)
        for block in blocks[len(blocks) - count:]:
            block.requires_grad_(True)
        visual.ln_post.requires_grad_(True)
        if isinstance(getattr(visual, "proj", None), nn.Parameter):
            visual.proj.requires_grad_(True)
        return None


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d)


@register("bitfit", vit_only=False)
class BitFit(Mode):
    """Biases and normalisation parameters only (Ben Zaken et al., ACL 2022)."""

    def _apply(self, visual):
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


@dataclass(frozen=True)
class VptOptions:
    prompts: int = option(8, minimum=1, doc="VPT-shallow prompt tokens")


@register("vpt", VptOptions, vit_only=True)
class Vpt(Mode):
    """Learnable prompt tokens after CLS, the encoder frozen (VPT-shallow, Jia et al., ECCV 2022)."""

    def _apply(self, visual):
        visual.requires_grad_(False)
        patch = visual.conv1.kernel_size[0] if hasattr(visual, "conv1") else 16
        return VisualPrompts(self.options.prompts, visual.transformer.width, patch)


@dataclass(frozen=True)
class CoOpOptions:
    context: int = option(4, minimum=1, doc="learnable context vectors")
    init: Optional[str] = option("a photo of a", doc="words to initialise the context from (as many tokens as "
                                                     "`context`); null: random")


@register("coop", CoOpOptions, vit_only=False, text_prompts=True)
class CoOp(Mode):
    """Learnable text context for the zero-shot head, encoders frozen (Zhou et al., IJCV 2022)."""

    def _apply(self, visual):
        visual.requires_grad_(False)
        return None


def build(name: str, options: Any = None) -> Mode:
    """Mode ``name`` with its typed ``options`` (``MODES.options(name, params)``; ``None``: the defaults)."""
    entry = MODES.entry(name)
    return entry.obj(entry.options() if options is None else options)


def rebuild(name: str, kwargs: Dict) -> Mode:
    """Mode ``name`` from a checkpoint's ``kwargs``; an option missing from them takes its default."""
    return build(name, MODES.entry(name).options(**kwargs))
