"""The fine-tuned model: open_clip's image encoder feeding one of the cached-path heads.

The encoder hands a head exactly the input the extract stage caches (the pooled
embedding, or the token grid before or after the final LayerNorm), so every head of
:mod:`ltpipe.heads` trains unchanged on cached or on fine-tuned features.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ltpipe import heads
from ltpipe.core.errors import ConfigError, DataError, WeightsError
from ltpipe.core.paths import atomic_target
from ltpipe.core.runtime import load_tensors
from ltpipe.features.encoder import TokenTap, class_text_embeddings, input_size
from ltpipe.finetune.modes import Mode, is_vit
from ltpipe.finetune.modes import rebuild as rebuild_mode

NO_GRADIENT_HEADS = ("knn", "ncm")  # fitted in one pass on features: nothing to back-propagate into
CHECKPOINT_FORMAT = "ltpipe-finetune-1"


class ImageEncoder(nn.Module):
    def __init__(self, visual: nn.Module, output: str, token_layer: str, prompts: Optional[nn.Module] = None):
        super().__init__()
        self.visual = visual
        self.prompts = prompts
        if prompts is not None:
            prompts.attach(visual)  # before the token tap: the tap must see the grid without prompts
        self.output = output
        self.token_layer = token_layer
        self._tap = TokenTap(visual, token_layer) if output == "tokens" else None

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Batch norms of frozen parts stay in eval mode: a frozen ResNet keeps its running statistics."""
        super().train(mode)
        if mode:
            for module in self.visual.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.visual(images)
        if self._tap is None:
            return pooled
        tokens, self._tap.tokens = self._tap.tokens, None
        return tokens


class FinetuneModel(nn.Module):
    def __init__(self, encoder: ImageEncoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))

    def trainable_names(self) -> List[str]:
        return [name for name, param in self.named_parameters() if param.requires_grad]

    def tuned_keys(self) -> set:
        """State keys fine-tuning can change: trainable parameters, the buffers of modules that
        own them (a trained batch norm's running statistics) and the head's whole state."""
        keys = set(self.trainable_names())
        for prefix, module in self.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                keys.update(f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False))
        return keys | {k for k in self.state_dict() if k.startswith("head.")}

    def tuned_state(self) -> Dict[str, torch.Tensor]:
        """What fine-tuning changed; the rest is the pretrained checkpoint."""
        keys = self.tuned_keys()
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k in keys}

    def load_tuned_state(self, state: Dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing_tuned = sorted(set(missing) & self.tuned_keys())
        if unexpected or missing_tuned:
            raise DataError(f"the saved fine-tuning state does not fit this model (unexpected keys "
                            f"{unexpected[:3]}, missing {missing_tuned[:3]}): it was made with other settings. "
                            "Delete it and re-run.")


@torch.no_grad()
def probe_shapes(visual: nn.Module, token_layer: str):
    """``(pooled width, token grid shape)`` from one forward pass on a blank image."""
    tap = TokenTap(visual, token_layer)
    was_training = visual.training
    try:
        visual.eval()
        device = next(visual.parameters()).device
        pooled = visual(torch.zeros(1, 3, input_size(visual), input_size(visual), device=device))
        return pooled.shape[-1], tuple(tap.tokens.shape[1:])
    finally:
        tap.remove()
        visual.train(was_training)


def freeze_unreached(visual: nn.Module, output: str, token_layer: str) -> List[str]:
    """Freeze encoder parameters after the point the head reads (they would get no gradient,
    which DistributedDataParallel rejects); return their names."""
    if output != "tokens":
        return []
    unreached = ["proj", "attn_pool", "attnpool"] + (["ln_post"] if token_layer == "pre_ln" else [])
    frozen = []
    for name, param in visual.named_parameters():
        if param.requires_grad and name.split(".")[0] in unreached:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def check_head(mode: Mode, head_name: str) -> None:
    """Refuse a head the mode cannot train, before any model is loaded."""
    heads.HEADS.get(head_name)
    if head_name in NO_GRADIENT_HEADS:
        raise ConfigError(f"head {head_name!r} is fitted in one pass on cached features and has no gradient to "
                          "fine-tune an encoder with. Use linear, cosine, decoder, cprfl or zeroshot.")
    if mode.text_prompts and head_name != "zeroshot":
        raise ConfigError(f"fine-tuning mode {mode.name!r} learns the text prompts of the zero-shot head; "
                          f"set `head: zeroshot` (now {head_name!r}).")


def build_model(clip_model: nn.Module, tokenizer, mode: Mode, head_name: str, head_options,
                class_prompts: Sequence[str], token_layer: str, templates: str, device: torch.device,
                precision: str) -> FinetuneModel:
    """The model ``mode`` fine-tunes: frozen text tower, encoder parameters set by the mode,
    the head built as the cached path builds it (from this encoder's shapes and class text)."""
    check_head(mode, head_name)
    clip_model.requires_grad_(False)
    visual = clip_model.visual
    prompts = mode.apply(visual)
    if mode.text_prompts:
        from ltpipe.finetune.coop import CoOpHead

        head = CoOpHead(clip_model, tokenizer, list(class_prompts), **mode.kwargs)
    else:
        text, _, _, logit_scale = class_text_embeddings(clip_model, tokenizer, list(class_prompts), templates,
                                                        device, precision)
        pooled_dim, token_shape = probe_shapes(visual, token_layer)
        ctx = heads.HeadContext(len(class_prompts), pooled_dim, token_shape, text, logit_scale,
                                tokens_have_cls=is_vit(visual))
        head = heads.build(head_name, head_options, ctx)
    frozen = freeze_unreached(visual, head.input, token_layer)
    if frozen:
        print(f"frozen, as the head reads the token grid before them: {', '.join(frozen)}")
    model = FinetuneModel(ImageEncoder(visual, head.input, token_layer, prompts), head).to(device)
    if not model.trainable_names():
        raise ConfigError(f"nothing to train: mode {mode.name!r} with head {head_name!r} leaves every parameter "
                          "frozen.")
    return model


def save_finetuned(path: Path, model: FinetuneModel, mode: Mode, head_name: str, weights_sha256: str,
                   run: Dict) -> None:
    """Only tensors and plain values (loadable with ``weights_only=True``); the frozen part of
    the encoder is the pretrained checkpoint named by its sha256."""
    head = model.head.to_zeroshot() if hasattr(model.head, "to_zeroshot") else model.head
    state = model.tuned_state()
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state.update({f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    payload = {"format": CHECKPOINT_FORMAT, "mode": mode.name, "mode_kwargs": mode.kwargs,
               "head": "zeroshot" if mode.text_prompts else head_name, "head_kwargs": head.kwargs,
               "output": model.encoder.output, "token_layer": model.encoder.token_layer,
               "weights_sha256": weights_sha256, "run": run, "state_dict": state}
    with atomic_target(path) as partial:
        torch.save(payload, partial)


def load_finetuned(path: Path, clip_model: nn.Module, weights_sha256: str) -> FinetuneModel:
    """Rebuild a fine-tuned model on ``clip_model`` (loaded from the same pretrained checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"fine-tuned model {path} not found. Run `dvc repro finetune`.")
    saved = load_tensors(path, "a fine-tuned model")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not an ltpipe fine-tuned model (format {saved.get('format')!r}).")
    if saved["weights_sha256"] != weights_sha256:
        raise WeightsError(f"{path} was fine-tuned from weights {saved['weights_sha256'][:12]}, not the loaded "
                           f"{weights_sha256[:12]}. Load the model it was made from (`model.arch`, "
                           "`model.pretrained`).")
    mode = rebuild_mode(saved["mode"], saved["mode_kwargs"])
    clip_model.requires_grad_(False)
    prompts = mode.apply(clip_model.visual)
    head = heads.rebuild(saved["head"], saved["head_kwargs"])
    model = FinetuneModel(ImageEncoder(clip_model.visual, saved["output"], saved["token_layer"], prompts), head)
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    missing_tuned = sorted(set(missing) & model.tuned_keys())
    if unexpected or missing_tuned:
        raise DataError(f"{path} does not fit the model it names (unexpected {unexpected[:3]}, missing "
                        f"{missing_tuned[:3]}): it is damaged or from another ltpipe version.")
    return model.eval()
