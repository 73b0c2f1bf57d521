"""Benchmark: heads on cached features (issue 5).

1. Scale: every head on 8,142 classes (iNaturalist-2018 scale) with realistic
   feature shapes: 437,513 training images with 512-d pooled features (ViT-B
   projection width) held in memory, and for the decoder a 16,384-row token cache
   of ViT-B/32 shape (50 x 768, float16) read from HDF5. Each head runs in its own
   process; it reports seconds per training step (batch 256) and per epoch
   (1,709 steps, extrapolated from the steps timed), fit and predict times for
   the non-parametric heads, and the process's peak resident memory.
2. Cached features against recomputing the frozen encoder at every step (what
   Imbalance-VLM does): same tiny model, same generated data, same cosine head,
   loss and epochs; both timed in this run, and the ratio.

Run: .venv/bin/python bench/heads.py            (about 10 minutes on 2 cores)
     .venv/bin/python bench/heads.py --part 2   (cached vs recompute only)
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

import h5py
import numpy as np
import torch

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

REPO = Path(__file__).resolve().parents[1]
CLASSES, TRAIN, DIM, BATCH = 8142, 437_513, 512, 256
TOKEN_ROWS, TOKENS, WIDTH = 16_384, 50, 768
STEPS = {"linear": 40, "cosine": 40, "decoder": 12}


def inat_like_labels(rng):
    """8,142 classes, 437,513 images, most frequent 1,000, least 2 (iNat-2018's extremes)."""
    counts = np.maximum(2, np.round(1000 * (2 / 1000) ** (np.arange(CLASSES) / (CLASSES - 1)))).astype(np.int64)
    scale = TRAIN / counts.sum()
    counts = np.maximum(2, np.floor(counts * scale)).astype(np.int64)
    counts[0] += TRAIN - counts.sum()
    return rng.permutation(np.repeat(np.arange(CLASSES), counts))


def write_cache(path: Path, rows: int, tokens: bool, rng) -> None:
    labels = inat_like_labels(rng)[:rows] if rows == TRAIN else rng.integers(0, CLASSES, rows)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("pooled", data=rng.standard_normal((rows, DIM), dtype=np.float32).astype(np.float16))
        if tokens:
            grid = fh.create_dataset("tokens", shape=(rows, TOKENS, WIDTH), dtype=np.float16)
            for start in range(0, rows, 2048):
                stop = min(rows, start + 2048)
                grid[start:stop] = rng.standard_normal((stop - start, TOKENS, WIDTH), dtype=np.float32)
        fh.create_dataset("labels", data=labels.astype(np.int64))
        fh.create_dataset("paths", data=[f"{i}.jpg" for i in range(rows)], dtype=h5py.string_dtype())
        fh.attrs.update({"complete": True, "num_classes": CLASSES, "dataset": "bench", "token_layer": "pre_ln"})


def one_head(name: str, work: Path) -> dict:
    """Run in a fresh process: time one head, report its peak memory."""
    from ltpipe import heads, losses
    from ltpipe.evaluation.inference import FeatureInput, predict
    from ltpipe.features.store import SplitFeatures
    from ltpipe.training.loop import train
    from ltpipe.training.samplers import SAMPLERS
    from ltpipe.training.spec import TrainConfig

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    feats = SplitFeatures(work / ("tokens.h5" if name == "decoder" else "pooled.h5"))
    val = SplitFeatures(work / ("val_tokens.h5" if name == "decoder" else "val.h5"))
    text = np.random.default_rng(1).standard_normal((CLASSES, DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    ctx = heads.HeadContext(CLASSES, DIM, feats.token_shape, text, 100.0)
    head = heads.build(name, None, ctx)
    out = {"head": name, "train_rows": len(feats)}
    if any(p.requires_grad for p in head.parameters()):
        kind = head.input
        steps = STEPS[name]
        counts = np.bincount(feats.labels, minlength=CLASSES)
        loss = losses.build("ce", "single", None, np.maximum(counts, 1))
        cfg = TrainConfig(epochs=1, batch_size=BATCH, iterations=steps, warmup_epochs=0, lr=1e-3)
        start = time.perf_counter()
        train(head, loss, SAMPLERS.get("instance"), FeatureInput(feats, kind, cpu), FeatureInput(val, kind, cpu),
              val.labels, cfg, 0, False, CLASSES, cpu)
        seconds = time.perf_counter() - start
        out["seconds_per_step"] = seconds / steps
        out["seconds_per_epoch"] = seconds / steps * int(np.ceil(TRAIN / BATCH))
    else:
        start = time.perf_counter()
        if hasattr(head, "fit"):
            head.fit(feats.pooled, feats.labels)
        out["fit_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        predict(head, FeatureInput(val, "pooled", cpu))
        out["predict_seconds"] = time.perf_counter() - start
        out["predict_rows"] = len(val)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def part_scale(work: Path, names) -> list:
    rng = np.random.default_rng(0)
    write_cache(work / "pooled.h5", TRAIN, False, rng)
    write_cache(work / "tokens.h5", TOKEN_ROWS, True, rng)
    write_cache(work / "val.h5", 24_426, False, rng)  # iNat-2018 val size
    write_cache(work / "val_tokens.h5", 2048, True, rng)
    print(f"8,142 classes; {TRAIN:,} training rows of {DIM}-d pooled features (float32 in memory); decoder: "
          f"{TOKEN_ROWS:,} rows of {TOKENS}x{WIDTH} float16 tokens on disk; batch {BATCH}")
    scale = f"{CLASSES:,} classes, {TRAIN:,} training rows, batch {BATCH}, one process per head"
    rows = []
    for name in names:
        result = subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work)],
                                capture_output=True, text=True, cwd=REPO)
        if result.returncode:
            print(f"{name}: FAILED\n{result.stderr[-2000:]}")
            rows.append((f"{name}, {scale}", "FAILED"))
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        if "seconds_per_step" in row:
            print(f"  {name:8s} {row['seconds_per_step'] * 1000:7.0f} ms/step, {row['seconds_per_epoch'] / 60:6.1f} "
                  f"min/epoch of {TRAIN:,} images; peak memory {row['peak_rss_gib']:.2f} GiB")
            rows.append((f"{name}, {scale}", f"{row['seconds_per_step'] * 1000:.0f} ms/step "
                         f"({row['seconds_per_epoch'] / 60:.1f} min/epoch), peak {row['peak_rss_gib']:.2f} GiB"))
        else:
            print(f"  {name:8s} fit {row['fit_seconds']:6.1f} s, predict {row['predict_rows']:,} images "
                  f"{row['predict_seconds']:6.1f} s; peak memory {row['peak_rss_gib']:.2f} GiB")
            rows.append((f"{name}, {scale}", f"fits in {row['fit_seconds']:.1f} s, predicts {row['predict_rows']:,} "
                         f"in {row['predict_seconds']:.1f} s, peak {row['peak_rss_gib']:.2f} GiB"))
    return rows


def part_recompute(work: Path, epochs: int = 10) -> list:
    from torch.utils.data import DataLoader

    from ltpipe import heads, losses
    from ltpipe.core.runtime import data_loader_kwargs
    from ltpipe.data.manifest import build
    from ltpipe.data.source import DatasetSource
    from ltpipe.datasets.synthetic import SyntheticSpec, generate
    from ltpipe.evaluation.inference import FeatureInput
    from ltpipe.features import extract, models
    from ltpipe.features.store import SplitFeatures
    from ltpipe.training.loop import make_optimizer, train
    from ltpipe.training.samplers import SAMPLERS, class_members
    from ltpipe.training.spec import TrainConfig

    cpu = torch.device("cpu")
    weights = models.resolve("ltpipe-tiny", None, work / "weights", 0)
    lists = generate(SyntheticSpec(), work / "synthetic")
    prepared = build(DatasetSource("synthetic", work / "synthetic",
                                   {s: work / "synthetic" / lists[s] for s in ("train", "val", "test")},
                                   work / "synthetic" / lists["classnames"], False))
    model, preprocess, _ = models.load(weights, cpu)
    counts = prepared.classes["train_count"].to_numpy()
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.02, warmup_epochs=1)

    # Cached: extract once (train + val), then train on the cache.
    start = time.perf_counter()
    options = extract.ExtractOptions(batch_size=64, workers=2, tokens=False)
    for split in ("train", "val"):
        extract.extract_split(model, preprocess, prepared, split, work / f"{split}.h5", options, cpu, "fp32", {},
                              work / "partial")
    extraction = time.perf_counter() - start
    train_feats, val_feats = SplitFeatures(work / "train.h5"), SplitFeatures(work / "val.h5")
    torch.manual_seed(0)
    head = heads.rebuild("cosine", {"in_dim": train_feats.pooled.shape[1], "num_classes": len(counts)})
    start = time.perf_counter()
    train(head, losses.build("ce", "single", None, counts), SAMPLERS.get("instance"),
          FeatureInput(train_feats, "pooled", cpu), FeatureInput(val_feats, "pooled", cpu), val_feats.labels,
          cfg, 0, False, len(counts), cpu)
    cached = time.perf_counter() - start

    # Recomputed: every step decodes, preprocesses and encodes its images again (frozen encoder).
    paths = prepared.split("train")["path"].tolist()
    labels = prepared.label_array("train")
    files = extract.ImageFiles(prepared.root, paths, preprocess)
    torch.manual_seed(0)
    head = heads.rebuild("cosine", {"in_dim": train_feats.pooled.shape[1], "num_classes": len(counts)})
    optimizer = make_optimizer(head, cfg)
    loss_fn = losses.build("ce", "single", None, counts)
    members = class_members(labels, len(counts))
    start = time.perf_counter()
    for epoch in range(epochs):
        order = SAMPLERS.get("instance")(members, len(paths), 0, epoch)
        batches = [np.sort(order[i:i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
        loader = DataLoader(files, batch_sampler=batches, **data_loader_kwargs(cpu, 2))
        for images, index, _ in loader:
            with torch.no_grad():
                features = model.encode_image(images)
            loss = loss_fn(head(features), torch.from_numpy(labels[index.numpy()]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # the validation pass recomputes too
            val_loader = DataLoader(extract.ImageFiles(prepared.root, prepared.split("val")["path"].tolist(),
                                                       preprocess), batch_size=128, **data_loader_kwargs(cpu, 2))
            for images, _, _ in val_loader:
                head(model.encode_image(images))
    recomputed = time.perf_counter() - start
    n = len(paths)
    print(f"cached vs recomputed, {epochs} epochs of a cosine head on the embedded default ({n:,} training images, "
          f"ltpipe-tiny): recomputing the encoder {recomputed:.1f} s; cached {cached:.2f} s of training "
          f"(x{recomputed / cached:,.0f}), {cached + extraction:.1f} s with the one-off extraction "
          f"(x{recomputed / (cached + extraction):.1f})")
    return [(f"cached features vs recomputing the frozen encoder every step, {epochs} epochs of a cosine head on the "
             "embedded default, tiny model", f"recompute {recomputed:.1f} s; cached {cached:.2f} s of training "
             f"(x{recomputed / cached:,.0f}), {cached + extraction:.1f} s including the one-off extraction "
             f"(x{recomputed / (cached + extraction):.1f})")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", type=int, choices=(1, 2))
    parser.add_argument("--heads", default="linear,cosine,decoder,zeroshot,knn,ncm", help="part 1: which heads")
    parser.add_argument("--one")
    parser.add_argument("--work")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(one_head(args.one, Path(args.work))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in (None, 2):
            rows += part_recompute(Path(tmp) / "recompute")
        if args.part in (None, 1):
            (Path(tmp) / "scale").mkdir()
            rows += part_scale(Path(tmp) / "scale", args.heads.split(","))
    if args.record:
        options = " ".join(([f"--part {args.part}"] if args.part else [])
                           + ([f"--heads {args.heads}"] if args.heads != parser.get_default("heads") else []))
        results.record(results.section_key(__file__, options), f"python bench/heads.py {options}".strip(), rows)


if __name__ == "__main__":
    main()
