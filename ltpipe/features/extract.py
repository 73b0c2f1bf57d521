"""Image and text feature extraction with open_clip into the HDF5 cache (stages `extract` and `text`).

Every split is extracted in checkpointed shards (a killed run resumes from the shards it
finished) and assembled into one file by :mod:`ltpipe.features.store`; with
``extract.views``, augmented views of the training images too. What is read from the
towers (token grids, text embeddings) is in :mod:`ltpipe.features.encoder`.
"""

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import ltpipe
from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.errors import DataError, DiskFullError
from ltpipe.core.runtime import (
    autocast,
    data_loader_kwargs,
    read_threads,
    resolve_device,
    resolve_precision,
    use_threads,
)
from ltpipe.data import manifest
from ltpipe.data.manifest import Prepared
from ltpipe.features import models, store
from ltpipe.features.encoder import TokenTap, class_text_embeddings, input_size, preprocess_attrs
from ltpipe.features.extract_options import ExtractOptions, options_from_params
from ltpipe.features.image_files import ImageFiles


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)):
    """``(top, left, h, w)`` by torchvision's RandomResizedCrop algorithm, drawn from ``rng``."""
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class AugmentedViews(Dataset):
    """``views`` augmented copies of each image: random resized crop (area share
    ``min_scale``-1; Imbalance-VLM trains with 0.08) and horizontal flip, at the model's
    input size and normalisation. Item ``j`` is view ``j % views`` of image ``j // views``; its
    randomness comes from ``(seed, image, view)`` alone, so it does not depend on
    batch size, workers or resumption."""

    def __init__(self, files: ImageFiles, views: int, size: int, mean, std, seed: int, min_scale: float = 0.08):
        self.files = files
        self.min_scale = min_scale
        self.views = views
        self.size = size
        self.mean = list(mean)
        self.std = list(std)
        self.seed = seed

    @classmethod
    def for_encoder(cls, files: ImageFiles, views: int, visual, seed: int, min_scale: float) -> "AugmentedViews":
        """Views at ``visual``'s input size and normalisation."""
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        return cls(files, views, input_size(visual), cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3), seed,
                   min_scale)

    def __len__(self) -> int:
        return len(self.files) * self.views

    def __getitem__(self, index: int):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image_index, view = divmod(index, self.views)
        image, error = self.files.load(image_index)
        rng = np.random.default_rng([self.seed, image_index, view])
        top, left, h, w = random_resized_crop_box(rng, image.width, image.height, scale=(self.min_scale, 1.0))
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size],
                                interpolation=InterpolationMode.BICUBIC, antialias=True)
        if rng.random() < 0.5:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), index, error


@dataclass(frozen=True)
class Workers:
    """This process's place among the extraction processes (``torchrun``), or alone."""

    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def shard_size(options: ExtractOptions) -> int:
    """Images a checkpoint shard holds: whole batches, so batch boundaries never move."""
    return max(1, options.checkpoint_every // options.batch_size) * options.batch_size


def content_hashes(dataset: Dataset) -> Optional[List[str]]:
    """The content hashes of the image files behind ``dataset`` (``ImageFiles`` or views of them)."""
    files = dataset.files if isinstance(dataset, AugmentedViews) else dataset
    return getattr(files, "hashes", None)


def work_fingerprint(split: str, root: Path, paths: Sequence[str], base_attrs: Dict, options: ExtractOptions,
                     precision: str, device: torch.device, hashes: Optional[Sequence[str]] = None) -> str:
    """What the shards of a split depend on: resuming never mixes in shards of other inputs,
    including other contents at the same paths (``hashes``: prepare's, one per image file)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "split": split, "root": str(root), "attrs": base_attrs, "batch_size": options.batch_size,
        "tokens": options.tokens, "token_layer": options.token_layer, "dtype": options.dtype,
        "shard": shard_size(options), "precision": precision, "device": device.type, "draft": options.draft,
    }, sort_keys=True, default=str).encode())
    for path in paths:
        digest.update(path.encode() + b"\n")
    for content in hashes or ():
        digest.update(content.encode() + b"\n")
    return digest.hexdigest()[:16]


def _save_shard(path: Path, pooled: np.ndarray, tokens: Optional[np.ndarray], bad_rows: np.ndarray,
                bad_errors: np.ndarray) -> None:
    arrays = {"pooled": pooled, "bad_rows": bad_rows, "bad_errors": bad_errors}
    if tokens is not None:
        arrays["tokens"] = tokens
    needed = sum(a.nbytes for a in arrays.values())
    try:
        with paths.atomic_target(path, needed=needed) as partial, open(partial, "wb") as fh:
            np.savez(fh, **arrays)
    except DiskFullError:
        # Counted only when it is said: listing the folder at every save would cost O(shards^2).
        finished = len(list(path.parent.glob("*.npz")))
        if not finished:
            raise
        raise paths.disk_full_error(path, needed, f"The {finished} shard(s) finished before it in {path.parent} are "
                                    "kept: the re-run resumes from them.") from None


def _extract_shard(model, tap: Optional["TokenTap"], dataset: Dataset, rows: range, options: ExtractOptions,
                   device: torch.device, precision: str, progress) -> tuple:
    """Features of ``rows``, and the rows whose image was unreadable (skipped) with why."""
    loader = DataLoader(Subset(dataset, rows), batch_size=options.batch_size, shuffle=False,
                        **data_loader_kwargs(device, options.workers))
    dtype = store.DTYPES[options.dtype]
    pooled_parts, token_parts, bad_rows, bad_errors = [], [], [], []
    for images, index, errors in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device, precision):
            pooled = model.encode_image(images)
        pooled_parts.append(pooled.float().cpu().numpy().astype(dtype))
        if tap is not None:
            token_parts.append(tap.tokens.float().cpu().numpy().astype(dtype))
        for row, error in zip(index.tolist(), errors):
            if error:
                bad_rows.append(row)
                bad_errors.append(error)
        progress.update(len(images))
    return (np.concatenate(pooled_parts), (np.concatenate(token_parts) if tap is not None else None),
            np.asarray(bad_rows, dtype=np.int64), np.asarray(bad_errors, dtype=str))


def extract_split(model, preprocess, prepared: Prepared, split: str, out_path: Path, options: ExtractOptions,
                  device: torch.device, precision: str, base_attrs: Dict, work_root: Path,
                  workers: Workers = Workers()) -> Dict:
    """Extract one split of the manifest (see :func:`extract_rows`)."""
    dataset = ImageFiles.of_split(prepared, split, preprocess, _draft_size(model, options),
                                  options.on_bad_image == "skip")
    paths: List[str] = dataset.paths
    return extract_rows(model, dataset, split, prepared.root, paths, prepared.label_array(split), out_path,
                        options, device, precision, dict(base_attrs, split=split), work_root, workers)


def extract_rows(model, dataset: Dataset, name: str, root: Path, paths: List[str], labels: np.ndarray,
                 out_path: Path, options: ExtractOptions, device: torch.device, precision: str, attrs: Dict,
                 work_root: Path, workers: Workers = Workers()) -> Dict:
    """Extract ``dataset`` (one row per item) in checkpointed shards, then assemble the
    HDF5 file in one pass.

    Shards are saved atomically under ``work_root``; a killed run resumes from the
    shards it finished, and the assembled file is byte-identical to an uninterrupted
    run's. Under ``torchrun`` each process takes every ``world``-th shard and rank 0
    assembles.
    """
    if not paths:
        return _write_empty(out_path, labels, attrs, options, model, workers)
    per_shard = shard_size(options)
    num_shards = max(1, math.ceil(len(paths) / per_shard))
    fingerprint = work_fingerprint(name, root, paths, attrs, options, precision, device, content_hashes(dataset))
    work = Path(work_root) / f"{name}-{fingerprint}"
    work.mkdir(parents=True, exist_ok=True)
    shard_path = [work / f"{k:05d}.npz" for k in range(num_shards)]
    mine = [k for k in range(num_shards) if k % workers.world == workers.rank]
    todo = [k for k in mine if not shard_path[k].exists()]
    resumed = sum(min(per_shard, len(paths) - k * per_shard) for k in mine if k not in todo)
    tap = TokenTap(model.visual, options.token_layer) if options.tokens else None
    started = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(total=sum(min(per_shard, len(paths) - k * per_shard) for k in mine),
                                          initial=resumed, desc=f"extract {name}", unit="img",
                                          mininterval=2.0, disable=workers.rank > 0) as progress:
            for k in todo:
                block = range(k * per_shard, min((k + 1) * per_shard, len(paths)))
                _save_shard(shard_path[k], *_extract_shard(model, tap, dataset, block, options, device, precision,
                                                           progress))
    finally:
        if tap is not None:
            tap.remove()
    seconds = time.perf_counter() - started
    workers.barrier()
    skipped: List[str] = []
    if workers.rank == 0:
        skipped = _assemble(shard_path, per_shard, out_path, labels, paths, options,
                            dict(attrs, token_layer=_token_layer_attr(model.visual, options)))
        shutil.rmtree(work, ignore_errors=True)
    workers.barrier()
    computed = len(paths) - resumed if workers.world == 1 else None
    return {"images": len(paths), "resumed_images": resumed, "seconds": round(seconds, 3),
            "images_per_second": round((computed or len(paths)) / max(seconds, 1e-9), 1),
            "skipped_images": len(skipped), "skipped": skipped[:20]}


def _write_empty(out_path: Path, labels: np.ndarray, attrs: Dict, options: ExtractOptions, model,
                 workers: Workers) -> Dict:
    """A split without images (no validation split: `prepare.val_fraction: 0`): a file of zero rows with
    the train split's feature shapes, extracted before it, so every reader opens it as any other split."""
    if workers.rank == 0:
        import h5py  # as store does

        with h5py.File(out_path.parent / "train.h5", "r") as train:
            pooled_dim = train["pooled"].shape[1]
            token_shape = train["tokens"].shape[1:] if "tokens" in train else None
        store.SplitWriter(out_path, pooled_dim, token_shape, labels, [], options.dtype,
                          dict(attrs, token_layer=_token_layer_attr(model.visual, options))).commit()
    workers.barrier()
    return {"images": 0, "resumed_images": 0, "seconds": 0.0, "images_per_second": 0.0, "skipped_images": 0,
            "skipped": []}


def _draft_size(model, options: ExtractOptions) -> Optional[int]:
    return input_size(model.visual) if options.draft else None


def extract_views(model, prepared: Prepared, out_path: Path, options: ExtractOptions, device: torch.device,
                  precision: str, base_attrs: Dict, work_root: Path, workers: Workers = Workers()) -> Dict:
    """``options.views`` augmented views of every training image, as rows ``i * K + v``."""
    files = ImageFiles.of_split(prepared, "train", None, _draft_size(model, options), options.on_bad_image == "skip")
    paths: List[str] = files.paths
    views = AugmentedViews.for_encoder(files, options.views, model.visual, options.view_seed, options.view_min_scale)
    k = options.views
    return extract_rows(model, views, "train_views", prepared.root, [p for p in paths for _ in range(k)],
                        np.repeat(prepared.label_array("train"), k, axis=0), out_path, options, device, precision,
                        dict(base_attrs, split="train", views=k, view_seed=options.view_seed,
                             augmentation=f"random_resized_crop({options.view_min_scale}-1)+hflip"),
                        work_root, workers)


def _token_layer_attr(visual, options: ExtractOptions) -> str:
    if not options.tokens:
        return "none"
    return options.token_layer if hasattr(visual, "transformer") else "resnet_layer4"


def _skipped_rows(shards: List[Path], paths: List[str], options: ExtractOptions, name: str):
    """Rows whose image was unreadable, with the reason; under ``fail`` there must be none."""
    rows, errors = [], []
    for shard in shards:
        with np.load(shard) as data:
            if "bad_rows" in data:
                rows.extend(data["bad_rows"].tolist())
                errors.extend(data["bad_errors"].tolist())
    if rows and options.on_bad_image == "fail":
        # Shards saved under `skip`, resumed under `fail`: the user asked to be told.
        listed = "; ".join(f"{paths[r]} ({e})" for r, e in list(zip(rows, errors))[:5])
        raise DataError(f"{len(rows)} unreadable image(s) in {name}: {listed}. Replace or remove them, or set "
                        "`extract.on_bad_image: skip`.")
    if len(rows) == len(paths):
        raise DataError(f"every image of {name} is unreadable (first: {paths[0]}: {errors[0]}). "
                        "Check the dataset `root` and the files.")
    return rows, errors


def _assemble(shards: List[Path], per_shard: int, out_path: Path, labels: np.ndarray, paths: List[str],
              options: ExtractOptions, attrs: Dict) -> List[str]:
    """Write the split file from its shards, leaving out skipped rows; return their paths."""
    bad_rows, bad_errors = _skipped_rows(shards, paths, options, out_path.stem)
    keep = np.ones(len(paths), dtype=bool)
    keep[bad_rows] = False
    kept_paths = [p for p, k in zip(paths, keep) if k]
    skipped = [(paths[r], e) for r, e in zip(bad_rows, bad_errors)]
    writer = None
    cursor = 0
    try:
        for k, shard in enumerate(shards):
            with np.load(shard) as data:
                pooled = data["pooled"]
                tokens = data["tokens"] if "tokens" in data else None
            if writer is None:
                kept = (f"The {len(shards)} finished shard(s) in {shard.parent} are kept: the re-run assembles "
                        "the file from them without extracting again.")
                writer = store.SplitWriter(out_path, pooled.shape[1], tokens.shape[1:] if tokens is not None else None,
                                           labels[keep], kept_paths, options.dtype, attrs, skipped, kept)
            shard_keep = keep[k * per_shard:k * per_shard + len(pooled)]
            pooled = pooled[shard_keep]
            tokens = tokens[shard_keep] if tokens is not None else None
            writer.write(cursor, pooled, tokens)
            cursor += len(pooled)
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return [p for p, _ in skipped]


def extract_text(model, tokenizer, prompts: Sequence[str], template_set: str, out_path: Path,
                 device: torch.device, precision: str, base_attrs: Dict) -> None:
    mean, per_template, texts, logit_scale = class_text_embeddings(model, tokenizer, prompts, template_set, device,
                                                                   precision)
    store.write_text(out_path, mean, per_template, texts, prompts,
                     dict(base_attrs, templates=template_set, logit_scale=logit_scale))


def feature_attrs(weights: models.ResolvedWeights, prepared: Prepared, model) -> Dict:
    """What every feature file records of the model and data it was computed from."""
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return dict(
        arch=weights.arch, pretrained=weights.pretrained or "", weights_sha256=weights.sha256,
        dataset=prepared.name, task=prepared.task, num_classes=prepared.num_classes,
        ltpipe_version=ltpipe.__version__, **preprocess_attrs(cfg),
    )


def run(prepared: Prepared, weights: models.ResolvedWeights, options: ExtractOptions, out_dir: Path,
        device: torch.device, precision: str, work_root: Optional[Path] = None,
        workers: Workers = Workers()) -> Dict:
    """Extract the image features of every split (the class text embeddings: :func:`run_text`). Shards
    go to ``work_root`` (default: ``partial/`` beside ``out_dir``), which must outlive a failed run."""
    options.validate()
    out_dir = Path(out_dir)
    work_root = Path(work_root) if work_root is not None else out_dir.parent / "partial"
    model, preprocess, _ = models.load(weights, device)
    base_attrs = feature_attrs(weights, prepared, model)
    report = {}
    for split in ("train", "val", "test"):
        report[split] = extract_split(model, preprocess, prepared, split, out_dir / f"{split}.h5",
                                      options, device, precision, base_attrs, work_root, workers)
    if options.views > 0:
        report["train_views"] = extract_views(model, prepared, out_dir / "train_views.h5", options, device,
                                              precision, base_attrs, work_root, workers)
    return report


def run_text(prepared: Prepared, weights: models.ResolvedWeights, templates: str, out_path: Path,
             device: torch.device, precision: str) -> None:
    """The text embedding of every class prompt of ``prepared`` under the template set ``templates``."""
    model, _, tokenizer = models.load(weights, device)
    extract_text(model, tokenizer, prepared.classes["prompt"].tolist(), templates, out_path, device, precision,
                 feature_attrs(weights, prepared, model))


def distributed_workers(device_name: str):
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group, one device per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers(), resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Workers(torch.distributed.get_rank(), world), device


def run_stage(params: Params) -> Dict:
    """The `extract` stage: the image features of every split."""
    options = options_from_params(params)  # all of `extract`, so a bad `extract.templates` is refused here too
    precision_name = params.str("model.precision")
    weights = models.ResolvedWeights.load(paths.WEIGHTS_JSON)
    # Not classes.csv: new class names must re-encode no image (dvc.yaml lists what extract reads).
    prepared = manifest.load(paths.PREPARED_DIR, tables=("manifest",))
    workers, device = distributed_workers(params.str("model.device"))
    precision = resolve_precision(precision_name, device)
    threads = use_threads(read_threads(params), None, "the image encoder")
    report = run(prepared, weights, options, paths.FEATURES_DIR, device, precision, paths.PARTIAL_DIR, workers)
    for row in report.values():
        row["threads"] = threads
    if workers.world > 1:
        torch.distributed.destroy_process_group()
    if workers.rank > 0:
        return report
    with paths.atomic_target(paths.EXTRACT_REPORT, kept="The feature files are complete in "
                             f"{paths.FEATURES_DIR}.") as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    for split, row in report.items():
        print(f"extract {split}: {row['images']} images in {row['seconds']:.1f}s ({row['images_per_second']} img/s)")
        if row["skipped_images"]:
            print(f"WARNING: {row['skipped_images']} unreadable image(s) of {split} were left out "
                  f"(extract.on_bad_image: skip), e.g. {', '.join(row['skipped'][:3])}. All are listed in "
                  f"{paths.FEATURES_DIR / (split + '.h5')} (datasets `skipped_paths`, `skipped_errors`) "
                  f"and in {paths.EXTRACT_REPORT}.")
    return report


def run_text_stage(params: Params) -> None:
    """The `text` stage: the class text embeddings (`extract.templates`), apart from the image features so
    that new class names or templates re-encode no image."""
    templates = options_from_params(params).templates  # the whole section checked, as extract does
    weights = models.ResolvedWeights.load(paths.WEIGHTS_JSON)
    prepared = manifest.load(paths.PREPARED_DIR, tables=("classes",))
    device = resolve_device(params.str("model.device"))
    precision = resolve_precision(params.str("model.precision"), device)
    use_threads(read_threads(params), None, "the text encoder")
    started = time.perf_counter()
    run_text(prepared, weights, templates, paths.TEXT_FEATURES, device, precision)
    print(f"text: {prepared.num_classes} class prompts x template set {templates!r} in "
          f"{time.perf_counter() - started:.1f}s -> {paths.TEXT_FEATURES}")
