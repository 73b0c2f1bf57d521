"""Benchmark: end-to-end fine-tuning modes (issue 8), on the embedded default.

1. Each mode (full, partial, bitfit, vpt, coop) in its own process on the tiny model
   and the embedded default dataset (1,630 training images): one epoch of fine-tuning
   (global batch 32, 2 DataLoader workers, validation included), timed; steps and images
   per second, trainable parameters, and the process's peak resident memory above the
   built model (on CUDA: peak allocated memory).
2. The cached path for the same epochs: one extraction pass (train + val, no grad),
   then a cosine head trained for ``--epochs`` epochs on the cache, against
   ``--epochs`` epochs of each fine-tuning mode (its measured epoch x epochs); the ratio.

Run: .venv/bin/python bench/finetune.py   (about 3 minutes on 2 cores)
     Add --record to write the figures to this invocation's section of docs/results.md.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "partial", "bitfit", "vpt", "coop")
BATCH = 32


def setup(work: Path):
    from ltpipe.data.manifest import build, save
    from ltpipe.data.source import DatasetSource
    from ltpipe.datasets.synthetic import SyntheticSpec, generate
    from ltpipe.features import models

    weights = models.resolve("ltpipe-tiny", None, work / "weights", 0)
    weights.save(work / "weights.json")
    lists = generate(SyntheticSpec(), work / "synthetic")
    prepared = build(DatasetSource("synthetic", work / "synthetic",
                                   {s: work / "synthetic" / lists[s] for s in ("train", "val", "test")},
                                   work / "synthetic" / lists["classnames"], False))
    save(prepared, work / "prepared")
    return weights, prepared


def load(work: Path):
    from ltpipe.data import manifest
    from ltpipe.features import models

    return models.ResolvedWeights.load(work / "weights.json"), manifest.load(work / "prepared")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_mode(mode_name: str, work: Path) -> dict:
    from ltpipe import losses
    from ltpipe.core.runtime import resolve_device, resolve_precision, seed_everything
    from ltpipe.evaluation import metrics
    from ltpipe.features import models
    from ltpipe.features.extract import Workers
    from ltpipe.features.image_files import ImageFiles
    from ltpipe.finetune import model as ft_model
    from ltpipe.finetune import modes
    from ltpipe.finetune.run import predict_images
    from ltpipe.finetune.train import FinetuneConfig, finetune
    from ltpipe.training.loop import class_counts
    from ltpipe.training.samplers import SAMPLERS

    weights, prepared = load(work)
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    seed_everything(0)
    clip_model, preprocess, tokenizer = models.load(weights, device)
    head = "zeroshot" if mode_name == "coop" else "cosine"
    model = ft_model.build_model(clip_model, tokenizer, modes.build(mode_name, None), head, None,
                                 prepared.classes["prompt"].tolist(), "pre_ln", "single", device, precision)
    del clip_model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    labels = prepared.label_array("train")
    loss_fn = losses.build("ce", "single", None, class_counts(labels, prepared.num_classes), len(labels))
    files = ImageFiles(prepared.root, prepared.split("train")["path"].tolist(), None)
    val = ImageFiles(prepared.root, prepared.split("val")["path"].tolist(), preprocess)
    val_labels = prepared.label_array("val")
    cfg = FinetuneConfig(epochs=1, batch_size=BATCH, micro_batch=BATCH, workers=2, warmup_epochs=0,
                         checkpoint_every=10**9)

    def validate(m):
        logits = predict_images(m, val, BATCH, device, precision, Workers(), 2)
        return metrics.selection_score(logits, val_labels, False)

    summary = finetune(model, loss_fn, SAMPLERS.get("instance"), files, labels, prepared.num_classes, cfg, 0,
                       device, precision, Workers(), work / f"state-{mode_name}", validate=validate)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    return {"mode": mode_name, "device": str(device), "trainable": sum(p.numel() for p in model.parameters()
                                                                        if p.requires_grad),
            "steps": summary["steps"], "epoch_seconds": summary["seconds"],
            "steps_per_second": summary["steps_per_second"],
            "images_per_second": round(summary["steps"] * BATCH / summary["seconds"], 1),
            "peak_mib_above_model": round(peak - base, 1), "memory": "cuda allocated" if device.type == "cuda"
            else "resident (ru_maxrss)"}


def cached_path(work: Path, epochs: int) -> dict:
    from ltpipe import heads, losses
    from ltpipe.evaluation.inference import FeatureInput
    from ltpipe.features import extract, models
    from ltpipe.features.store import SplitFeatures
    from ltpipe.training.loop import train
    from ltpipe.training.samplers import SAMPLERS
    from ltpipe.training.spec import TrainConfig

    cpu = torch.device("cpu")
    weights, prepared = load(work)
    model, preprocess, _ = models.load(weights, cpu)
    start = time.perf_counter()
    options = extract.ExtractOptions(batch_size=64, workers=2, tokens=False)
    for split in ("train", "val"):
        extract.extract_split(model, preprocess, prepared, split, work / f"{split}.h5", options, cpu, "fp32", {},
                              work / "partial")
    extraction = time.perf_counter() - start
    train_feats, val_feats = SplitFeatures(work / "train.h5"), SplitFeatures(work / "val.h5")
    counts = prepared.classes["train_count"].to_numpy()
    torch.manual_seed(0)
    head = heads.rebuild("cosine", {"in_dim": train_feats.pooled.shape[1], "num_classes": len(counts)})
    start = time.perf_counter()
    train(head, losses.build("ce", "single", None, counts), SAMPLERS.get("instance"),
          FeatureInput(train_feats, "pooled", cpu), FeatureInput(val_feats, "pooled", cpu), val_feats.labels,
          TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.02), 0, False, len(counts), cpu)
    return {"extraction_seconds": round(extraction, 2), "training_seconds": round(time.perf_counter() - start, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--epochs", type=int, default=10, help="epochs compared in part 2")
    parser.add_argument("--one")
    parser.add_argument("--work")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(one_mode(args.one, Path(args.work))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, prepared = setup(work)
        n = int((prepared.manifest["split"] == "train").sum())
        print(f"fine-tuning ltpipe-tiny on the embedded default ({n:,} training images), global batch {BATCH}, "
              "one epoch per mode (validation included):")
        rows = []
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--work", str(work)], cwd=REPO,
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {mode:8s} {row['trainable']:>10,} trainable  {row['steps_per_second']:6.2f} steps/s  "
                  f"{row['images_per_second']:7.1f} img/s  epoch {row['epoch_seconds']:6.1f} s  "
                  f"peak memory +{row['peak_mib_above_model']:.0f} MiB ({row['memory']})")
        cached = cached_path(work, args.epochs)
        total = cached["extraction_seconds"] + cached["training_seconds"]
        print(f"cached path, {args.epochs} epochs: extraction {cached['extraction_seconds']:.1f} s (once) + "
              f"cosine head {cached['training_seconds']:.1f} s = {total:.1f} s")
        for row in rows:
            tuned = row["epoch_seconds"] * args.epochs
            print(f"  {row['mode']:8s} {args.epochs} epochs {tuned:7.1f} s: x{tuned / total:.1f} the cached path "
                  f"(x{tuned / cached['training_seconds']:.0f} its training alone)")
    if args.record:
        measured = [(f"fine-tuning `{row['mode']}`, one epoch of the embedded default ({n:,} images, global batch "
                     f"{BATCH}, 2 DataLoader workers, validation included), tiny model, one process per mode; peak "
                     f"memory above the built model ({row['memory']})",
                     f"{row['steps_per_second']:.2f} steps/s ({row['images_per_second']:.0f} img/s), "
                     f"+{row['peak_mib_above_model']:.0f} MiB, {row['trainable']:,} trainable parameters")
                    for row in rows]
        fine_tuned = ", ".join(f"{row['mode']} {row['epoch_seconds'] * args.epochs:.0f} s "
                               f"(x{row['epoch_seconds'] * args.epochs / total:.1f})" for row in rows)
        measured.append((f"{args.epochs} epochs: the cached path (one extraction pass of train + val, "
                         f"{cached['extraction_seconds']:.1f} s, then a cosine head, "
                         f"{cached['training_seconds']:.1f} s) vs fine-tuning", fine_tuned))
        options = " ".join(([f"--modes {args.modes}"] if args.modes != parser.get_default("modes") else [])
                           + ([f"--epochs {args.epochs}"] if args.epochs != parser.get_default("epochs") else []))
        results.record(results.section_key(__file__, options), f"python bench/finetune.py {options}".strip(),
                       measured)


if __name__ == "__main__":
    main()
