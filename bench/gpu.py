"""Benchmark: extraction and token-head training on the machine at hand, CUDA or CPU (issue 17).

One command for a GPU owner; the same script runs at small size on a CPU in the test suite
(tests/test_gpu_bench.py), so it never rots. It needs only torch, torchvision, h5py, numpy and
open_clip_torch (with their own dependencies): nothing on its import path loads pandas, scipy,
scikit-learn, faiss, DVC or dvclive.

1. Builds the encoder ``--arch`` (random init unless ``--pretrained`` gives an open_clip tag or a
   checkpoint file), with the weights stage's code (``ltpipe.features.models``).
2. Draws ``--count`` images of ``--classes`` classes with the embedded dataset's renderer (or
   takes the images under ``--images DIR``: one class per sub-folder) and extracts their pooled
   features and token grids with the extract stage's code (``ltpipe.features.extract``: bf16
   autocast on CUDA, DataLoader workers, pinned memory), plus a validation split of
   ``--val`` images and the class text embeddings.
3. Trains the decoder and CPRFL heads on the cache with the training code
   (``ltpipe.training.loop.train``, cross-entropy, instance sampling) for ``--steps`` steps each,
   once with the token grids read from the file (``token_cache: disk``) and once held in memory
   (``SplitFeatures(load_tokens=True)``, ``token_cache: memory``).

Prints images/s of extraction, steps/s of each head from disk and from memory (a step's time
includes its share of the validation passes ``train`` makes, one per epoch over ``--val`` images)
and the memory peak of each phase: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak
resident set size on a CPU (it only grows, so later phases show the largest so far).

Run: python -m bench.gpu --arch ViT-B-16 [--pretrained openai] [--record]
     (from the repository root; without options: the tiny test encoder on 4,096 images;
     --record: write the figures to docs/results.md)
"""

import argparse
import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from ltpipe import heads, losses
from ltpipe.core.runtime import resolve_device, resolve_precision, seed_everything
from ltpipe.datasets import synthetic
from ltpipe.evaluation.inference import FeatureInput
from ltpipe.features import models
from ltpipe.features.encoder import input_size
from ltpipe.features.extract import extract_rows, extract_text
from ltpipe.features.extract_options import ExtractOptions
from ltpipe.features.image_files import ImageFiles
from ltpipe.features.store import SplitFeatures, TextFeatures
from ltpipe.training.loop import train
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import TrainConfig

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HEADS = ("decoder", "cprfl")
CACHES = {"disk": "on disk", "memory": "in memory"}


def draw_images(out_dir: Path, count: int, classes: int, size: int, seed: int) -> Tuple[List[str], np.ndarray]:
    """``count`` JPEGs of the embedded dataset's shapes, classes in turn; their paths and labels."""
    names = synthetic.class_names(classes)
    paths, labels = [], np.arange(count, dtype=np.int64) % classes
    for i, label in enumerate(labels):
        path = f"{i:06d}.jpg"
        synthetic.render([names[label]], size, np.random.default_rng([seed, i])).save(out_dir / path, quality=92)
        paths.append(path)
    return paths, labels


def given_images(root: Path) -> Tuple[List[str], np.ndarray, List[str]]:
    """The images under ``root``, labelled by their first-level sub-folder (one class each)."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        sys.exit(f"no {'/'.join(IMAGE_SUFFIXES)} files under {root}")
    folders = sorted({f.split("/")[0] if "/" in f else "." for f in files})
    labels = np.asarray([folders.index(f.split("/")[0] if "/" in f else ".") for f in files], dtype=np.int64)
    return files, labels, folders


def memory_peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def train_head(name: str, cache: str, work: Path, text: TextFeatures, cfg: TrainConfig, device: torch.device,
               seed: int) -> float:
    """Steps per second of ``loss ce`` training of head ``name`` with the token grids ``cache``
    (``disk``: read from the file; ``memory``: loaded when the file is opened)."""
    train_feats = SplitFeatures(work / "train.h5", load_tokens=cache == "memory")
    val_feats = SplitFeatures(work / "val.h5")
    num_classes = len(text.embeddings)
    ctx = heads.HeadContext(num_classes, train_feats.pooled.shape[1], train_feats.token_shape, text.embeddings,
                            text.logit_scale,
                            tokens_have_cls=str(train_feats.attrs.get("token_layer")) in ("pre_ln", "post_ln"))
    seed_everything(seed)
    head = heads.build(name, None, ctx)
    counts = np.bincount(train_feats.labels, minlength=num_classes)
    loss_fn = losses.build("ce", "single", None, counts, len(train_feats.labels))
    train_input = FeatureInput(train_feats, head.input, device)
    val_input = FeatureInput(val_feats, head.input, device)
    reset_peak(device)
    started = time.perf_counter()
    train(head, loss_fn, SAMPLERS.get("instance"), train_input, val_input, val_feats.labels,
          dataclasses.replace(cfg, token_cache=cache), seed, False, num_classes, device, desc=f"{name} {cache}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return cfg.iterations / (time.perf_counter() - started)


def main():
    extract_defaults, train_defaults = ExtractOptions(), TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ltpipe-tiny", help="open_clip architecture (ViT-B-16, ViT-L-14, ...)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file (default: random init)")
    parser.add_argument("--images", type=Path, default=None, help="extract these images (one class per sub-folder) "
                        "instead of drawn ones")
    parser.add_argument("--count", type=int, default=4096, help="images drawn for the training split")
    parser.add_argument("--val", type=int, default=256, help="images drawn for the validation split")
    parser.add_argument("--classes", type=int, default=50, help=f"classes drawn (at most {synthetic.MAX_CLASSES})")
    parser.add_argument("--batch-size", type=int, default=extract_defaults.batch_size, help="extraction batch")
    parser.add_argument("--workers", type=int, default=extract_defaults.workers, help="extraction DataLoader workers")
    parser.add_argument("--train-batch", type=int, default=train_defaults.batch_size)
    parser.add_argument("--steps", type=int, default=50, help="training steps per head and cache")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    parser.add_argument("--work", type=Path, default=None, help="folder for images and caches (default: a "
                        "temporary one, removed at the end)")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    if args.images is None and not 1 < args.classes <= synthetic.MAX_CLASSES:
        parser.error(f"--classes must be between 2 and {synthetic.MAX_CLASSES}")

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    work = Path(tempfile.mkdtemp(prefix="ltpipe-gpu-bench-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def report(what: str, result: str) -> None:
        print(f"{what}: {result}", flush=True)
        rows.append((what, result))

    try:
        weights = models.resolve(args.arch, args.pretrained, work / "weights")
        model, preprocess, tokenizer = models.load(weights, device)
        print(f"{args.arch} ({args.pretrained or 'random init'}) on {device}, {precision}; work folder {work}")
        if args.images is not None:
            root = args.images
            files, labels, class_names = given_images(root)
            val_rows = np.arange(len(files)) % 8 == 0  # every 8th image validates
            splits = {"train": ([f for f, v in zip(files, val_rows) if not v], labels[~val_rows]),
                      "val": ([f for f, v in zip(files, val_rows) if v], labels[val_rows])}
        else:
            root = work / "images"
            root.mkdir(exist_ok=True)
            class_names = synthetic.class_names(args.classes)
            size = input_size(model.visual)
            started = time.perf_counter()
            train_files, train_labels = draw_images(root, args.count, args.classes, size, seed=0)
            val_dir = root / "val"
            val_dir.mkdir(exist_ok=True)
            val_files, val_labels = draw_images(val_dir, args.val, args.classes, size, seed=1)
            splits = {"train": (train_files, train_labels), "val": ([f"val/{f}" for f in val_files], val_labels)}
            print(f"drew {args.count + args.val} images of {size}x{size} in {time.perf_counter() - started:.1f}s")

        options = ExtractOptions(batch_size=args.batch_size, workers=args.workers)
        options.validate()
        attrs = dict(arch=weights.arch, pretrained=weights.pretrained or "", weights_sha256=weights.sha256)
        for split, (files, labels) in splits.items():
            reset_peak(device)
            dataset = ImageFiles(root, files, preprocess)
            row = extract_rows(model, dataset, split, root, files, labels, work / f"{split}.h5", options, device,
                               precision, dict(attrs, split=split), work / "partial")
            if split == "train":
                report(f"extract ({row['images']} images, batch {options.batch_size}, {options.workers} workers)",
                       f"{row['images_per_second']} images/s, peak {memory_peak(device)}")
        extract_text(model, tokenizer, class_names, options.templates, work / "text.h5", device, precision, attrs)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

        text = TextFeatures(work / "text.h5")
        grid = SplitFeatures(work / "train.h5").token_shape
        # No warm-up of the learning rate: the schedule does not change a step's cost, and --steps may be
        # shorter than the default warm-up epoch.
        cfg = TrainConfig(batch_size=args.train_batch, iterations=args.steps, warmup_epochs=0.0)
        for name in HEADS:
            # Untimed: the first steps of a head pay one-time costs (allocator, kernel selection, threads).
            train_head(name, "memory", work, text, dataclasses.replace(cfg, iterations=2), device, seed=0)
            for cache, where in CACHES.items():
                steps = train_head(name, cache, work, text, cfg, device, seed=0)
                report(f"train {name}, token grids {grid[0]}x{grid[1]} {where} ({args.steps} steps, batch "
                       f"{args.train_batch})", f"{steps:.2f} steps/s, peak {memory_peak(device)}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.record:
        command = " ".join(["python -m bench.gpu", *(a for a in sys.argv[1:] if a != "--record")])
        results.record(results.section_key(__file__), command, rows)


if __name__ == "__main__":
    main()
