"""Image and text feature extraction with open_clip into the HDF5 cache.

One forward pass per batch yields both the pooled embedding (after the
projection) and the token grid, read by a forward hook:

* ViT: the transformer's output, CLS + patch tokens, taken before the final
  LayerNorm (``token_layer: pre_ln``, what Imbalance-VLM's decoder reads; Wang
  et al. 2023, Sec. 3) or after it (``post_ln``, what open_clip's
  ``output_tokens`` returns, but that drops the CLS token, so we keep it).
* ResNet (``ModifiedResNet``): the last stage's spatial grid before attention
  pooling, flattened to ``[H*W, C]``; ``token_layer`` does not apply.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import ltpipe
from ltpipe import paths
from ltpipe.config import Params
from ltpipe.data import manifest
from ltpipe.data.manifest import Prepared
from ltpipe.errors import ConfigError, DataError
from ltpipe.features import models, store
from ltpipe.runtime import autocast, data_loader_kwargs, resolve_device, resolve_precision

TOKEN_LAYERS = ("pre_ln", "post_ln")
TEMPLATE_SETS = ("single", "imagenet80")
SINGLE_TEMPLATE = "a photo of a {}."


@dataclass
class ExtractOptions:
    batch_size: int = 64
    workers: int = 2
    tokens: bool = True
    token_layer: str = "pre_ln"
    templates: str = "single"
    dtype: str = "float16"

    def validate(self) -> None:
        if self.token_layer not in TOKEN_LAYERS:
            raise ConfigError(f"`extract.token_layer` is {self.token_layer!r}; valid: {', '.join(TOKEN_LAYERS)}.")
        if self.templates not in TEMPLATE_SETS:
            raise ConfigError(f"`extract.templates` is {self.templates!r}; valid: {', '.join(TEMPLATE_SETS)}.")
        if self.dtype not in store.DTYPES:
            raise ConfigError(f"`extract.dtype` is {self.dtype!r}; valid: {', '.join(store.DTYPES)}.")


class ImageFiles(Dataset):
    def __init__(self, root: Path, paths: Sequence[str], transform):
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read image {path}: {exc}. Replace or remove the file, then re-run extraction."
            ) from None
        return self.transform(image), index


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


def extract_split(model, preprocess, prepared: Prepared, split: str, out_path: Path, options: ExtractOptions,
                  device: torch.device, precision: str, base_attrs: Dict) -> Dict:
    rows = prepared.split(split)
    paths: List[str] = rows["path"].tolist()
    labels = prepared.label_array(split)
    dataset = ImageFiles(prepared.root, paths, preprocess)
    loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False,
                        **data_loader_kwargs(device, options.workers))
    tap = TokenTap(model.visual, options.token_layer) if options.tokens else None
    writer = None
    started = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), desc=f"extract {split}", unit="img",
                                          mininterval=2.0) as progress:
            for images, index in loader:
                images = images.to(device, non_blocking=True)
                with autocast(device, precision):
                    pooled = model.encode_image(images)
                pooled_np = pooled.float().cpu().numpy()
                tokens_np = tap.tokens.float().cpu().numpy() if tap is not None else None
                if writer is None:
                    attrs = dict(base_attrs, split=split,
                                 token_layer=(options.token_layer if tap and tap.kind == "vit" else
                                              ("resnet_layer4" if tap else "none")))
                    writer = store.SplitWriter(
                        out_path, len(dataset), pooled_np.shape[1],
                        tokens_np.shape[1:] if tokens_np is not None else None,
                        labels.shape[1:], labels.dtype, options.dtype, attrs)
                idx = index.numpy()
                start = int(idx[0])
                writer.write(start, pooled_np, tokens_np, labels[idx], [paths[i] for i in idx])
                progress.update(len(idx))
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if tap is not None:
            tap.remove()
    seconds = time.perf_counter() - started
    return {"images": len(dataset), "seconds": round(seconds, 3),
            "images_per_second": round(len(dataset) / max(seconds, 1e-9), 1)}


def templates_for(name: str) -> List:
    if name == "single":
        return [SINGLE_TEMPLATE.format]
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return list(OPENAI_IMAGENET_TEMPLATES)


def extract_text(model, tokenizer, prompts: Sequence[str], template_set: str, out_path: Path,
                 device: torch.device, precision: str, base_attrs: Dict) -> None:
    """Class-name embeddings: each template encoded and L2-normalised, averaged, normalised again
    (CLIP's zero-shot classifier, Radford et al. 2021, Sec. 3.1.4)."""
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
    store.write_text(out_path, mean.cpu().numpy(), per_template.cpu().numpy(), texts, prompts,
                     dict(base_attrs, templates=template_set, logit_scale=logit_scale))


def run(prepared: Prepared, weights: models.ResolvedWeights, options: ExtractOptions, out_dir: Path,
        device: torch.device, precision: str) -> Dict:
    options.validate()
    out_dir = Path(out_dir)
    model, preprocess, tokenizer = models.load(weights, device)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    base_attrs = dict(
        arch=weights.arch, pretrained=weights.pretrained or "", weights_sha256=weights.sha256,
        dataset=prepared.name, task=prepared.task, num_classes=prepared.num_classes,
        ltpipe_version=ltpipe.__version__, **preprocess_attrs(cfg),
    )
    report = {}
    for split in ("train", "val", "test"):
        report[split] = extract_split(model, preprocess, prepared, split, out_dir / f"{split}.h5",
                                      options, device, precision, base_attrs)
    extract_text(model, tokenizer, prepared.classes["prompt"].tolist(), options.templates,
                 out_dir / "text.h5", device, precision, base_attrs)
    return report


def options_from_params(params: Params) -> ExtractOptions:
    section = params.sub("extract")
    options = ExtractOptions(
        batch_size=section.int("batch_size", minimum=1),
        workers=section.int("workers", minimum=0),
        tokens=section.bool("tokens"),
        token_layer=section.str("token_layer", choices=TOKEN_LAYERS),
        templates=section.str("templates", choices=TEMPLATE_SETS),
        dtype=section.str("dtype", choices=tuple(store.DTYPES)),
    )
    options.validate()
    return options


def run_stage(params: Params) -> Dict:
    """The `extract` stage: image features of every split and class-name text embeddings."""
    options = options_from_params(params)
    device = resolve_device(params.str("model.device"))
    precision = resolve_precision(params.str("model.precision"), device)
    weights = models.ResolvedWeights.load(paths.WEIGHTS_JSON)
    prepared = manifest.load(paths.PREPARED_DIR)
    report = run(prepared, weights, options, paths.FEATURES_DIR, device, precision)
    paths.EXTRACT_REPORT.parent.mkdir(parents=True, exist_ok=True)
    paths.EXTRACT_REPORT.write_text(json.dumps(report, indent=2) + "\n")
    for split, row in report.items():
        print(f"extract {split}: {row['images']} images in {row['seconds']:.1f}s ({row['images_per_second']} img/s)")
    return report
