"""Benchmark: the feature store (issue 4).

1. Extraction throughput: the extract stage's path (DataLoader with workers, batches,
   inference mode) against a naive loop (one image at a time: open, preprocess,
   encode), same images and model, side by side; on the embedded default and on a
   sample of the real CIFAR-10-LT JPEGs in ../shared.
2. Bytes on disk per image for pooled and token features.
3. Time to draw a random minibatch of 256 token grids of ViT-B/32 shape (50 x 768,
   float16) from a cache whose pages are dropped from the page cache before every
   draw (posix_fadvise DONTNEED: a cache larger than memory, without writing 30 GB):
   memory map against h5py per-row reads, h5py fancy indexing and ltpipe's reader, whose
   first read of a row checks its CRC-32 (a later epoch does not), and the same bytes
   without checksums.
4. Loading pooled features (100k x 512) with and without checksum verification, against
   a plain h5py read of the same datasets.

Run: .venv/bin/python bench/features.py   (about two minutes on 2 cores)
     .venv/bin/python bench/features.py --reads   (parts 3 and 4 only)
     .venv/bin/python bench/features.py --arch ViT-B-32 --every 48
         (part 1 only, a real-size architecture, randomly initialised, on every 48th CIFAR image)
     Add --record to write the figures to this invocation's section of docs/results.md.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from ltpipe.data.manifest import build
from ltpipe.data.source import DatasetSource
from ltpipe.datasets.synthetic import SyntheticSpec, generate
from ltpipe.features import extract, models, store
from ltpipe.features.store import SplitFeatures

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-lt"


def naive_loop(model, preprocess, root, paths):
    start = time.perf_counter()
    with torch.inference_mode():
        for rel in paths:
            with Image.open(root / rel) as image:
                x = preprocess(image.convert("RGB")).unsqueeze(0)
            model.encode_image(x)
    return time.perf_counter() - start


def compare_extraction(label, prepared, weights, work, batch_size=64):
    model, preprocess, _ = models.load(weights, torch.device("cpu"))
    paths = prepared.split("train")["path"].tolist()
    naive = naive_loop(model, preprocess, prepared.root, paths)
    options = extract.ExtractOptions(batch_size=batch_size, workers=2, tokens=True)
    start = time.perf_counter()
    extract.extract_split(model, preprocess, prepared, "train", work / f"{label}.h5", options, torch.device("cpu"),
                          "fp32", {}, work / "partial")
    staged = time.perf_counter() - start
    n = len(paths)
    size_px = int(np.atleast_1d(model.visual.preprocess_cfg.get("size", 224))[0])
    print(f"extraction, {label} ({n:,} images, {weights.arch}, {size_px} px): naive loop {n / naive:,.0f} img/s, "
          f"extract stage {n / staged:,.0f} img/s (pooled + tokens, written to HDF5); ratio x{naive / staged:.2f}")
    with h5py.File(work / f"{label}.h5", "r") as fh:
        pooled = fh["pooled"].nbytes / n
        tokens = fh["tokens"].nbytes / n
    size = os.path.getsize(work / f"{label}.h5") / n
    print(f"bytes per image: pooled {pooled:,.0f} B {fh_shape(work / f'{label}.h5', 'pooled')}, "
          f"tokens {tokens:,.0f} B {fh_shape(work / f'{label}.h5', 'tokens')}, file {size:,.0f} B")
    return [(f"extraction, {label} ({n:,} images, {weights.arch}, {size_px} px, batch {batch_size}): extract stage "
             "vs a naive loop (open, preprocess, encode one image at a time)",
             f"{n / staged:,.0f} vs {n / naive:,.0f} img/s (x{naive / staged:.2f})"),
            (f"bytes on disk per image, {label}, {weights.arch}",
             f"pooled {pooled:,.0f} B {fh_shape(work / f'{label}.h5', 'pooled')}, tokens {tokens:,.0f} B "
             f"{fh_shape(work / f'{label}.h5', 'tokens')}, file {size:,.0f} B")]


def fh_shape(path, name):
    with h5py.File(path, "r") as fh:
        return f"{list(fh[name].shape[1:])} {fh[name].dtype}"


def drop_cache(path):
    with open(path, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def compare_token_reads(work, rows=8000, draws=20):
    path = work / "tokens.h5"
    rng = np.random.default_rng(0)
    write_cache(path, rng.standard_normal((rows, 4), dtype=np.float32), rng.standard_normal, (50, 768))
    unchecked = without_checksums(path, work / "tokens_unchecked.h5")
    os.sync()
    mb = os.path.getsize(path) / 2**20
    with h5py.File(path, "r") as fh:
        offset, shape, dtype = fh["tokens"].id.get_offset(), fh["tokens"].shape, fh["tokens"].dtype
    batches = [rng.choice(rows, 256, replace=False) for _ in range(draws)]

    def memmap(index):
        # A fresh mapping each draw: pages still mapped in this process would survive the cache drop.
        mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        out = np.array(mapped[np.sort(index)])
        del mapped
        return out

    row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize

    def pread_rows(index):
        out = np.empty((len(index),) + tuple(shape[1:]), dtype=dtype)
        view = out.reshape(len(index), -1).view(np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            for j, i in enumerate(np.sort(index)):
                view[j] = np.frombuffer(os.pread(fd, row_bytes, offset + int(i) * row_bytes), dtype=np.uint8)
        finally:
            os.close(fd)
        return out

    features = SplitFeatures(path)  # one reader, as training uses it; an open handle maps no pages
    plain = SplitFeatures(unchecked)  # the same bytes, no checksums

    def ltpipe_reader(index):
        features._verified[:] = False  # every row read for the first time: checked (CRC-32 per row)
        return features.tokens(np.sort(index))  # as the training loop asks: a sorted batch, float32 out

    def ltpipe_verified_before(index):
        features._verified[:] = True  # a later epoch: rows already checked
        return features.tokens(np.sort(index))

    def ltpipe_unchecked(index):
        return plain.tokens(np.sort(index))

    def per_row(index):
        with h5py.File(path, "r") as fh:
            return np.stack([fh["tokens"][int(i)] for i in np.sort(index)])

    def fancy(index):
        with h5py.File(path, "r") as fh:
            return fh["tokens"][np.sort(index)]

    timings = {}
    readers = (("memory map", memmap), ("pread per row", pread_rows), ("h5py per-row", per_row),
               ("h5py fancy index", fancy),
               ("ltpipe, 1st read (checked)", ltpipe_reader), ("ltpipe, later epoch", ltpipe_verified_before),
               ("ltpipe, no checksums", ltpipe_unchecked))
    for name, read in readers:
        cold = []
        for index in batches:
            drop_cache(path)
            drop_cache(unchecked)
            start = time.perf_counter()
            read(index)
            cold.append(time.perf_counter() - start)
        warm_start = time.perf_counter()
        for index in batches:
            read(index)
        timings[name] = (np.median(cold) * 1000, (time.perf_counter() - warm_start) / draws * 1000)
    features.close()
    plain.close()
    print(f"random minibatch of 256 token grids (50x768 fp16) from a {mb:,.0f} MiB contiguous cache, "
          f"median of {draws}:")
    base = timings["memory map"][0]
    for name, (cold, warm) in timings.items():
        print(f"  {name:27s} cold {cold:7.1f} ms  warm {warm:6.1f} ms  (cold vs memory map x{cold / base:.2f})")
    return [(f"random batch of 256 token grids (50x768 fp16) from a {mb:,.0f} MiB cache, pages dropped before each "
             f"draw, median of {draws}: {name}", f"{cold:.1f} ms cold / {warm:.1f} ms warm")
            for name, (cold, warm) in timings.items()]


def write_cache(path, pooled, token_source=None, token_shape=None):
    """A split file written the way extraction writes it (with checksums), tokens in blocks."""
    rows = len(pooled)
    writer = store.SplitWriter(path, pooled.shape[1], token_shape, np.zeros(rows, np.int64),
                               [f"train/{i // 1000:03d}/{i:06d}.jpg" for i in range(rows)], "float16", {})
    for start in range(0, rows, 1000):
        stop = min(rows, start + 1000)
        tokens = token_source((stop - start,) + token_shape, dtype=np.float32) if token_shape else None
        writer.write(start, pooled[start:stop], tokens)
    writer.commit()


def without_checksums(path, copy):
    """The same file without its checksums: what reading costs when nothing is verified."""
    shutil.copy(path, copy)
    with h5py.File(copy, "a") as fh:
        del fh.attrs[store.CHECKSUMS]
        if store.ROW_CHECKSUMS["tokens"] in fh:
            del fh[store.ROW_CHECKSUMS["tokens"]]
    return copy


def compare_pooled_loads(work, rows=100_000, dim=512, repeats=5):
    """Loading a split's pooled features (with labels and paths), with and without checksum
    verification, against a plain read of the same datasets (the hardware's limit)."""
    path = work / "pooled.h5"
    write_cache(path, np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32))
    unchecked = without_checksums(path, work / "pooled_unchecked.h5")
    os.sync()

    def plain_read():
        with h5py.File(path, "r") as fh:
            return fh["pooled"][()], fh["labels"][()], fh["paths"][()]

    def checksums_only():
        for values in plain_read():
            store.array_checksum(values)

    readers = (("plain h5py read", plain_read), ("plain read + CRC-32", checksums_only),
               ("SplitFeatures, checked", lambda: SplitFeatures(path)),
               ("SplitFeatures, no checksums", lambda: SplitFeatures(unchecked)))
    mb = rows * dim * 2 / 2**20
    print(f"loading pooled features, labels and paths ({rows:,} x {dim} fp16, {mb:,.0f} MiB), median of {repeats}:")
    measured = []
    for name, read in readers:
        cold, warm = [], []
        for _ in range(repeats):
            drop_cache(path)
            drop_cache(unchecked)
            start = time.perf_counter()
            read()
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            read()
            warm.append(time.perf_counter() - start)
        print(f"  {name:27s} cold {np.median(cold) * 1000:7.1f} ms  warm {np.median(warm) * 1000:7.1f} ms")
        measured.append((f"loading {rows:,} x {dim} pooled features with labels and paths, median of {repeats}: {name}",
                         f"{np.median(cold) * 1000:.1f} ms cold / {np.median(warm) * 1000:.1f} ms warm"))
    return measured


COCO_MINI = REPO.parent / "shared" / "datasets" / "coco-lt-mini"


def compare_draft(weights, work):
    """Draft-mode decoding on real COCO JPEGs (about 640x480), tiny model (64 px input)."""
    if not COCO_MINI.is_dir():
        print(f"draft mode: skipped, {COCO_MINI} is absent")
        return []
    model, preprocess, _ = models.load(weights, torch.device("cpu"))
    paths = [line.split()[0] for line in (COCO_MINI / "coco_lt_mini.txt").read_text().splitlines()]
    times = {}
    for draft in (False, True, False, True):  # alternate, keep the second of each
        files = extract.ImageFiles(COCO_MINI / "images", paths, preprocess, 64 if draft else None)
        options = extract.ExtractOptions(batch_size=64, workers=2, tokens=False, draft=draft)
        start = time.perf_counter()
        extract.extract_rows(model, files, f"coco-{draft}", COCO_MINI / "images", paths,
                             np.zeros(len(paths), np.int64), work / f"coco-{draft}.h5", options,
                             torch.device("cpu"), "fp32", {}, work / "partial")
        times[draft] = time.perf_counter() - start
    n = len(paths)
    print(f"draft mode, {n} real COCO JPEGs (~640x480) into a 64 px model: off {n / times[False]:,.0f} img/s, "
          f"on {n / times[True]:,.0f} img/s; ratio x{times[False] / times[True]:.2f}")
    return [(f"JPEG draft decoding, {n} real COCO images (~640x480) into the 64 px tiny model",
             f"{n / times[False]:,.0f} img/s off, {n / times[True]:,.0f} img/s on (x{times[False] / times[True]:.2f})")]


def cifar_sample(work, every):
    sample = work / "cifar_train.txt"
    lines = (CIFAR / "CIFAR10_LT_train.txt").read_text().splitlines()
    sample.write_text("\n".join(lines[::every]) + "\n")
    return build(DatasetSource("custom", CIFAR / "images",
                               {"train": sample, "val": None, "test": CIFAR / "CIFAR10_LT_test.txt"},
                               CIFAR / "classnames.txt", False))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ltpipe-tiny", help="open_clip architecture (random init)")
    parser.add_argument("--every", type=int, default=6, help="use every n-th CIFAR-10-LT training image")
    parser.add_argument("--reads", action="store_true", help="parts 3 and 4 only (reading the cache)")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    if args.record:
        options = "--reads" if args.reads else ""
        if args.arch != "ltpipe-tiny":
            options = f"--arch {args.arch} --every {args.every}"
        elif args.every != 6 and not args.reads:
            options = f"--every {args.every}"
        results.record(results.section_key(__file__, options), f"python bench/features.py {options}".strip(), rows)


def measure(args, work):
    """Run the parts ``args`` select; the rows measured, for docs/results.md."""
    if args.reads:
        return compare_token_reads(work) + compare_pooled_loads(work)
    weights = models.resolve(args.arch, None, work / "weights", 0)
    if args.arch != "ltpipe-tiny":
        if not CIFAR.is_dir():
            raise SystemExit(f"{CIFAR} is absent")
        return compare_extraction("CIFAR-10-LT sample", cifar_sample(work, args.every), weights, work, batch_size=32)
    lists = generate(SyntheticSpec(), work / "synthetic")
    synthetic = build(DatasetSource("synthetic", work / "synthetic",
                                    {s: work / "synthetic" / lists[s] for s in ("train", "val", "test")},
                                    work / "synthetic" / lists["classnames"], False))
    rows = compare_extraction("embedded default", synthetic, weights, work)
    if CIFAR.is_dir():
        # every 6th image: 2,068 of 12,406
        rows += compare_extraction("CIFAR-10-LT sample", cifar_sample(work, args.every), weights, work)
    else:
        print(f"CIFAR-10-LT: skipped, {CIFAR} is absent")
    return rows + compare_draft(weights, work) + compare_token_reads(work) + compare_pooled_loads(work)


if __name__ == "__main__":
    main()
