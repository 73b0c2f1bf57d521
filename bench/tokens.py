"""Benchmark: reading cached token grids (issue 17).

Builds temporary cache files (the extract stage's writer) of ``--rows`` grids of 50x768 and
``--large-rows`` grids of 197x768 (float16: ViT-B/32 and ViT-B/16 at 224 px), then, side by side
in one run on the same rows:

1. A random batch of 256 sorted rows, page-cached ("warm") and with the file's pages dropped
   before every draw ("cold": ``posix_fadvise(DONTNEED)``, a cache larger than memory):
   the path before issue 17 (h5py fancy indexing, then float32 on the CPU), the reader
   (``SplitFeatures.token_rows`` into a reused float16 buffer, rows already verified as in any
   epoch after the first), the reader with the float32 cast the training feed does on a CPU
   (``FeatureInput.batch(reuse=True)``), and plain ``os.preadv`` of each row into a
   preallocated float16 buffer.
   Goal: reader <= 2x preadv.
2. A sequential pass over the split (what prediction and stage 2's representations read: slices
   of 1024 rows) through a fresh reader, which checks every row's CRC-32 on this first read, and
   through one whose rows are verified, against a raw sequential read of the same bytes in the
   same slices. Goal: >= 0.5x of the raw bandwidth.
3. Training steps fed as the training loop feeds them (``FeatureInput.batch`` into reused buffers, the
   next batch read ahead in a thread, the one after it advised to the kernel: ``read_ahead(advise=)``),
   from disk and from memory, against the same steps on batches already in memory as float32 tensors,
   torch on one thread: a small CPRFL head (dim 16) on the 50x768 file and a one-block decoder on a file
   of 50x64 grids (a decoder is as wide as its grids), each with compute per step comparable to a
   batch's read on 2 cores; and a depth-0 decoder on 50x768 (no compute: the feed's own cost shows).
   Goal: disk <= 1.1x in memory (the read hidden). Cold: the file's pages dropped before each pass,
   with and without the advice.
4. ``train.shuffle: blocks`` (default ``block_rows`` 256, ``block_buffer`` 8) on the same files, cold:
   the same heads' steps on batches of ``samplers.block_order`` read in whole blocks
   (``FeatureInput.block_reads``), against the row-random batches of 3; and one epoch's reads alone
   (every row once, no training), row-random batches against blocks: time, bytes and system calls.

Run: .venv/bin/python bench/tokens.py   (about 3 minutes on 2 cores; ~790 MB in a temporary directory)
     Add --record to write the figures to docs/results.md.
"""

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from ltpipe.evaluation.inference import FeatureInput
from ltpipe.features.store import SplitFeatures, SplitWriter
from ltpipe.features.token_reader import read_ahead
from ltpipe.training.samplers import block_order

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

BATCH = 256
SLICE = 1024  # rows per read of a sequential pass (predict's batch)
PASSES = 5  # timed passes per way of feeding a head (a step here varies by ~10% from pass to pass)
BLOCK_ROWS, BLOCK_BUFFER = 256, 8  # `train.block_rows`, `train.block_buffer` defaults


def build(path: Path, rows: int, shape: tuple) -> Path:
    rng = np.random.default_rng(0)
    writer = SplitWriter(path, 8, shape, np.zeros(rows, dtype=np.int64), [f"{i}.png" for i in range(rows)],
                         "float16", {})
    for start in range(0, rows, 256):
        stop = min(start + 256, rows)
        writer.write(start, np.zeros((stop - start, 8)),
                     rng.standard_normal((stop - start,) + shape, dtype=np.float32).astype(np.float16))
    writer.commit()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # clean pages: DONTNEED can then drop them
    os.close(fd)
    return path


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def layout(path: Path):
    with h5py.File(path, "r") as fh:
        tokens = fh["tokens"]
        assert tokens.chunks is None and tokens.compression is None
        return tokens.id.get_offset(), int(np.prod(tokens.shape[1:])) * tokens.dtype.itemsize


def random_batches(path: Path, draws: int, cold: bool) -> dict:
    """Median milliseconds of each way to read the same ``draws`` random sorted batches."""
    rows = SplitFeatures.read_labels(path).shape[0]
    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(rows, BATCH, replace=False)) for _ in range(draws)]
    offset, row_bytes = layout(path)
    fh = h5py.File(path, "r")
    features = SplitFeatures(path)
    features.token_rows(np.arange(rows))  # verified, as in every epoch after the first
    buffer = features.token_buffer(BATCH)
    data = FeatureInput(SplitFeatures(path), "tokens", torch.device("cpu"))
    data.features.token_rows(np.arange(rows))
    fd = os.open(path, os.O_RDONLY)
    plain = features.token_buffer(BATCH)

    def preadv(index):
        for i, row in enumerate(index.tolist()):
            os.preadv(fd, [plain[i]], offset + row * row_bytes)

    ways = {"old": lambda index: fh["tokens"][index].astype(np.float32),
            "reader": lambda index: features.token_rows(index, buffer),
            "reader_fp32": lambda index: data.batch(index, reuse=True),
            "preadv": preadv}
    times = {name: [] for name in ways}
    for index in batches:
        for name, way in ways.items():  # interleaved: machine noise falls on every way alike
            if cold:
                drop(path)
            start = time.perf_counter()
            way(index)
            times[name].append(time.perf_counter() - start)
    os.close(fd)
    fh.close()
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def sequential(path: Path, cold: bool, repeats: int = 3) -> dict:
    """Best GB/s of a sequential pass: fresh reader (CRC-32 checked), verified reader, raw read."""
    rows = SplitFeatures.read_labels(path).shape[0]
    offset, row_bytes = layout(path)
    total = rows * row_bytes
    best = {"fresh": 0.0, "verified": 0.0, "raw": 0.0}
    verified = SplitFeatures(path)
    buffer = verified.token_buffer(SLICE)
    verified.token_rows(np.arange(rows))
    raw = memoryview(buffer.reshape(-1).view(np.uint8))
    for _ in range(repeats):
        for name in best:
            if cold:
                drop(path)
            start = time.perf_counter()
            if name == "raw":
                fd = os.open(path, os.O_RDONLY)
                for first in range(0, rows, SLICE):
                    count = min(SLICE, rows - first) * row_bytes
                    done = 0
                    while done < count:
                        done += os.preadv(fd, [raw[done:count]], offset + first * row_bytes + done)
                os.close(fd)
            else:
                features = SplitFeatures(path) if name == "fresh" else verified
                for first in range(0, rows, SLICE):
                    features.token_rows(np.arange(first, min(first + SLICE, rows)), buffer)
            best[name] = max(best[name], total / (time.perf_counter() - start) / 1e9)
    return best


def step_times(heads: list, draws: int) -> dict:
    """Median milliseconds per training step of each ``(name, path, make)`` of ``heads``: the head
    ``make()`` trained on the grids of ``path``, fed as the training loop feeds them (the next batch
    read ahead, the one after it advised to the kernel), against the same steps on batches already in
    memory as float32."""
    times = {}
    # One intra-op thread: the reader's thread has the other core, as the host has while a GPU computes.
    # With two, on this 2-vCPU machine a CPRFL step took 250-430 ms instead of ~55 ms whenever no other
    # thread kept the cores busy (torch's workers waking from idle), which no read can be compared to.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, path, make in heads:
        rows = SplitFeatures.read_labels(path).shape[0]
        rng = np.random.default_rng(2)
        batches = [np.sort(rng.choice(rows, BATCH, replace=False)) for _ in range(draws)]
        labels = torch.from_numpy(rng.integers(0, 100, BATCH))
        cpu = torch.device("cpu")
        disk = FeatureInput(SplitFeatures(path), "tokens", cpu)
        disk.features.token_rows(np.arange(rows))  # rows verified: an epoch after the first
        memory = FeatureInput(SplitFeatures(path, load_tokens=True), "tokens", cpu)
        ready = [memory.batch(index) for index in batches]
        blocks = block_batches(rows, draws, rng)
        assert len(blocks) == len(batches), f"{rows} rows hold fewer than {draws} full batches"
        feeds = {"ready": functools.partial(iter, ready), "memory": cached_feed(memory, batches, True),
                 "disk": cached_feed(disk, batches, True), "disk_inline": cached_feed(disk, batches, False),
                 "blocks": cached_feed(disk, blocks, True, in_blocks=True)}
        torch.manual_seed(0)
        model = make()
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        timed_pass(model, optimizer, labels, feeds["ready"], len(batches))  # warm-up: allocator, kernels
        figures = {way: [] for way in list(feeds) + ["disk_cold", "blocks_cold", "disk_cold_unadvised"]}
        for _ in range(PASSES):  # every way once a round: machine noise falls on all alike
            for way, feed in feeds.items():
                figures[way].append(timed_pass(model, optimizer, labels, feed, len(batches)))
            cold = {"disk_cold": feeds["disk"], "blocks_cold": feeds["blocks"],
                    "disk_cold_unadvised": cached_feed(disk, batches, True, advise=False)}
            for way, feed in cold.items():
                drop(path)
                figures[way].append(timed_pass(model, optimizer, labels, feed, len(batches)))
        times[name] = {way: statistics.median(values) for way, values in figures.items()}
        memory.features.close()
        disk.features.close()
    torch.set_num_threads(threads)
    return times


def step_heads(wide: Path, narrow: Path) -> list:
    """The heads whose steps are timed: ``(name, grids, make)``. A small CPRFL head and a one-block
    decoder on grids of width 64 (a decoder's width is the grid's) have compute per step comparable to
    a batch's read here, as a full-size head's on a GPU; the depth-0 decoder has none, so what is left
    is the feed's own cost (on a CPU, the float16 -> float32 cast a GPU does on the device)."""
    from ltpipe.heads.cprfl import CPRFLHead
    from ltpipe.heads.decoder import DecoderHead

    return [("CPRFL (dim 16), 50x768", wide, lambda: CPRFLHead(768, 512, 100, 16, 2, 8, 16, 0.0, 0.5, 256, 0.0)),
            ("decoder (depth 1), 50x64", narrow, lambda: DecoderHead(64, 100, 1, 4, 0.5, False)),
            ("decoder (depth 0), 50x768", wide, lambda: DecoderHead(768, 100, 0, 4, 0.5, False))]


def block_batches(rows: int, count: int, rng: np.random.Generator, full: bool = True) -> list:
    """The first ``count`` sorted batches of an epoch under `shuffle: blocks` (instance sampler); with
    ``full``, only batches of ``BATCH`` rows (a training step's labels have that length)."""
    order = block_order(rng.permutation(rows), BLOCK_ROWS, BLOCK_BUFFER, rng)
    available = rows // BATCH if full else -(-rows // BATCH)
    return [np.sort(order[k * BATCH:(k + 1) * BATCH]) for k in range(min(count, available))]


def cached_feed(data: FeatureInput, batches: list, ahead: bool, in_blocks: bool = False, advise: bool = True):
    """The training loop's feed: rows read into reused buffers, the next batch read ahead or not (and,
    with ``advise``, the one after it advised to the kernel); with ``in_blocks``, read in whole blocks (a
    new plan each pass, as each epoch has)."""
    def feed():
        reads = data.block_reads(batches, BLOCK_ROWS, BLOCK_BUFFER) if in_blocks else None
        load = functools.partial(data.batch, reuse=True, reads=reads)
        hint = data.advise if reads is None and advise else None  # as the training loop
        return (x for _, x in read_ahead(load, batches, enabled=ahead, advise=hint))
    return feed


def epoch_reads(path: Path, repeats: int = 3) -> dict:
    """One epoch's reads, cold, no training: row-random sorted batches against `shuffle: blocks`
    batches read in whole blocks. Best time of ``repeats``, with the bytes and system calls read."""
    rows = SplitFeatures.read_labels(path).shape[0]
    _, row_bytes = layout(path)
    rng = np.random.default_rng(3)
    order = rng.permutation(rows)
    plans = {"rows": [np.sort(order[k:k + BATCH]) for k in range(0, rows, BATCH)],
             "blocks": block_batches(rows, rows, rng, full=False)}
    data = FeatureInput(SplitFeatures(path), "tokens", torch.device("cpu"))
    data.features.token_rows(np.arange(rows))  # rows verified: an epoch after the first
    figures = {}
    for name, batches in plans.items():
        best = float("inf")
        for _ in range(repeats):
            drop(path)
            reads = data.block_reads(batches, BLOCK_ROWS, BLOCK_BUFFER) if name == "blocks" else None
            start = time.perf_counter()
            for index in batches:
                data.batch(index, reuse=True, reads=reads)
            best = min(best, time.perf_counter() - start)
        if name == "blocks":
            blocks = np.unique(np.concatenate(batches) // BLOCK_ROWS)
            assert reads.blocks_read == len(blocks)  # each block once
            calls = reads.blocks_read
            nbytes = int(np.sum(np.minimum((blocks + 1) * BLOCK_ROWS, rows) - blocks * BLOCK_ROWS)) * row_bytes
        else:
            calls = sum(1 + int(np.count_nonzero(np.diff(index) != 1)) for index in batches)
            nbytes = sum(len(index) for index in batches) * row_bytes
        figures[name] = {"ms": 1000 * best, "bytes": nbytes, "calls": calls}
    return figures


def timed_pass(model, optimizer, labels, feed, steps: int) -> float:
    """Milliseconds per step of a pass over ``feed``."""
    start = time.perf_counter()
    for x in feed():
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return 1000 * (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="grids of 50x768")
    parser.add_argument("--large-rows", type=int, default=1500, help="grids of 197x768")
    parser.add_argument("--draws", type=int, default=15, help="random batches per way, warm and cold each")
    parser.add_argument("--steps", type=int, default=15, help="training steps per timed pass")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args(argv)
    columns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows, shape in [(args.rows, (50, 768)), (args.large_rows, (197, 768))]:
            name = f"{shape[0]}x{shape[1]}"
            path = build(Path(tmp) / f"{name}.h5", rows, shape)
            column = {"size": f"{rows} rows, {rows * np.prod(shape) * 2 / 1e6:.0f} MB"}
            for temperature in ("warm", "cold"):
                column[temperature] = random_batches(path, args.draws, temperature == "cold")
                column[f"seq_{temperature}"] = sequential(path, temperature == "cold")
            if shape == (50, 768):
                narrow = build(Path(tmp) / "50x64.h5", args.rows, (50, 64))
                steps = step_times(step_heads(path, narrow), args.steps)
                narrow.unlink()
                epoch = epoch_reads(path)
            columns[name] = column
            path.unlink()
            print(f"{name} done", flush=True)
    rows = table(columns) + step_table(steps, len(columns)) + epoch_table(epoch, len(columns))
    width = max(len(row[0]) for row in rows)
    header = ("what",) + tuple(columns)
    for row in [header] + rows:
        print(f"{row[0]:<{width}}  " + "  ".join(f"{cell:>22}" for cell in row[1:]))
    if args.record:
        results.record(results.section_key(__file__), "python bench/tokens.py", rows, header=header,
                       note=f"Batches of {BATCH} sorted random rows, median of {args.draws} draws; sequential "
                            f"passes in slices of {SLICE} rows, best of 3; training steps: median of {PASSES} "
                            f"passes of {args.steps} steps, torch on 1 thread; cold: the file's pages dropped "
                            f"before each pass.")


def table(columns: dict) -> list:
    """Rows of the figures: one column per grid shape."""
    def row(label, cell):
        return [label] + [cell(column) for column in columns.values()]

    rows = [row("cache file", lambda c: c["size"])]
    for t in ("warm", "cold"):
        rows += [
            row(f"random batch, {t}: before issue 17 (h5py fancy index + float32)",
                lambda c, t=t: f"{c[t]['old']:.1f} ms"),
            row(f"random batch, {t}: reader (float16, reused buffer)", lambda c, t=t: f"{c[t]['reader']:.1f} ms"),
            row(f"random batch, {t}: reader + float32 cast (training feed on a CPU)",
                lambda c, t=t: f"{c[t]['reader_fp32']:.1f} ms"),
            row(f"random batch, {t}: plain os.preadv per row (float16)", lambda c, t=t: f"{c[t]['preadv']:.1f} ms"),
            row(f"random batch, {t}: reader / preadv (goal <= 2)",
                lambda c, t=t: f"{c[t]['reader'] / c[t]['preadv']:.2f}x"),
            row(f"random batch, {t}: before / reader", lambda c, t=t: f"{c[t]['old'] / c[t]['reader']:.1f}x"),
        ]
    for t in ("warm", "cold"):
        k = f"seq_{t}"
        rows += [
            row(f"sequential pass, {t}: reader, first read (CRC-32 checked)",
                lambda c, k=k: f"{c[k]['fresh']:.2f} GB/s"),
            row(f"sequential pass, {t}: reader, rows verified", lambda c, k=k: f"{c[k]['verified']:.2f} GB/s"),
            row(f"sequential pass, {t}: raw preadv of the same bytes", lambda c, k=k: f"{c[k]['raw']:.2f} GB/s"),
            row(f"sequential pass, {t}: reader / raw, first read; verified (goal >= 0.5)",
                lambda c, k=k: f"{c[k]['fresh'] / c[k]['raw']:.2f}x; {c[k]['verified'] / c[k]['raw']:.2f}x"),
        ]
    return rows


def step_table(times: dict, width: int) -> list:
    """Rows of the step times (50x768 only: the other columns are left empty)."""
    pad = [""] * (width - 1)
    rows = []
    labels = {"ready": "batches already in memory (float32 tensors)",
              "memory": "`token_cache: memory`, read ahead",
              "disk": "`token_cache: disk`, read ahead, warm",
              "disk_inline": "`token_cache: disk`, read in the step, warm",
              "disk_cold": "`token_cache: disk`, read ahead, cold",
              "disk_cold_unadvised": "`token_cache: disk`, read ahead, cold, no advice to the kernel"}
    for name, figures in times.items():
        for way, label in labels.items():
            rows.append([f"training step, {name}: {label}", f"{figures[way]:.1f} ms"] + pad)
        ratios = f"{figures['disk'] / figures['ready']:.2f}x; {figures['disk_cold'] / figures['ready']:.2f}x"
        goal = " (goal <= 1.1)" if "depth 0" not in name else " (no compute to hide the feed)"
        rows.append([f"training step, {name}: disk read ahead (warm; cold) / in memory{goal}", ratios] + pad)
    for name, figures in times.items():
        rows += [
            [f"training step, {name}: `shuffle: blocks`, disk, read ahead, warm", f"{figures['blocks']:.1f} ms"] + pad,
            [f"training step, {name}: `shuffle: blocks`, disk, read ahead, cold",
             f"{figures['blocks_cold']:.1f} ms"] + pad,
            [f"training step, {name}: cold, blocks / row-random; blocks / in memory",
             f"{figures['blocks_cold'] / figures['disk_cold']:.2f}x; {figures['blocks_cold'] / figures['ready']:.2f}x"]
            + pad,
        ]
    return rows


def epoch_table(figures: dict, width: int) -> list:
    """Rows of one epoch's cold reads (50x768 only)."""
    pad = [""] * (width - 1)
    rows = []
    labels = {"rows": "row-random batches", "blocks": f"`shuffle: blocks` ({BLOCK_ROWS} x {BLOCK_BUFFER})"}
    for name, label in labels.items():
        f = figures[name]
        rows.append([f"epoch's reads, cold, {label}: time; MB; reads",
                     f"{f['ms']:.0f} ms; {f['bytes'] / 1e6:.0f} MB; {f['calls']}"] + pad)
    rows.append(["epoch's reads, cold: blocks / row-random (time)",
                 f"{figures['blocks']['ms'] / figures['rows']['ms']:.2f}x"] + pad)
    return rows


if __name__ == "__main__":
    main()
