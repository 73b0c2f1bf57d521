"""What content hashes cost: prepare's hashing (with and without its stat cache) and
extraction's check, next to reading and decoding the same JPEGs.

    python -m bench.fingerprint [--images 2000] [--dir /tmp/ltpipe-bench-fingerprint] [--record]

Generates ``--images`` JPEGs of a realistic size (500 x 375, ~100 KB, like ImageNet's) once,
then prints, in one run: each hashlib algorithm's throughput on those bytes; prepare's hashing
against a plain read of the same files, with the page cache cold (pages dropped with
``posix_fadvise(DONTNEED)``) and warm; a re-run with the stat cache warm; and extraction's
per-image hash against decoding the same bytes to RGB. ``--record`` writes the figures to
docs/results.md.
"""

import argparse
import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ltpipe.data import fingerprint, images

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

ALGORITHMS = ("md5", "sha1", "sha256", "blake2b")


def make_jpegs(root: Path, count: int) -> list:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rels = [f"img_{i:05d}.jpg" for i in range(count)]
    for rel in rels:
        if not (root / rel).exists():
            coarse = rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)
            picture = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)).astype(np.int16)
            picture += rng.integers(-12, 13, picture.shape, dtype=np.int16)  # texture, as in photographs
            Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(root / rel, quality=90)
    return rels


def drop_page_cache(root: Path, rels) -> None:
    for rel in rels:
        fd = os.open(root / rel, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(func) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ltpipe-bench-fingerprint")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    root = args.dir / "images"
    rels = make_jpegs(root, args.images)
    blobs = [(root / rel).read_bytes() for rel in rels]
    total = sum(len(b) for b in blobs)
    print(f"{len(rels)} JPEGs, 500 x 375, mean {total / len(rels) / 1e3:.0f} KB ({total / 1e6:.0f} MB)")

    print("\nhash throughput on these bytes (in memory):")
    throughput = {}
    for name in ALGORITHMS:
        seconds = timed(lambda name=name: [hashlib.new(name, b).digest() for b in blobs])
        throughput[name] = total / seconds / 1e6
        print(f"  {name:8s} {throughput[name]:7.0f} MB/s")

    def plain_read():
        for rel in rels:
            images.read_bytes(root / rel)

    fingerprint.RACY_SECONDS = 0.0  # the files were just written; cache them anyway
    cache = args.dir / "prepare-hashes.sqlite"
    rows = []
    for page_cache in ("cold", "warm"):
        if page_cache == "cold":
            drop_page_cache(root, rels)
        read_s = timed(plain_read)
        if page_cache == "cold":
            drop_page_cache(root, rels)
        cache.unlink(missing_ok=True)
        hash_s = timed(lambda: fingerprint.hash_files(root, rels, cache))
        rows.append((page_cache, read_s, hash_s))
    rerun_s = timed(lambda: fingerprint.hash_files(root, rels, cache))
    print(f"\nprepare's hashing of {len(rels)} files vs a plain read of the same files:")
    print(f"  {'page cache':10s} {'read':>9s} {'read+hash':>10s} {'ratio':>6s} {'files/s':>8s}")
    for page_cache, read_s, hash_s in rows:
        print(f"  {page_cache:10s} {read_s:8.2f}s {hash_s:9.2f}s {hash_s / read_s:5.2f}x {len(rels) / hash_s:8.0f}")
    print(f"  re-run, stat cache warm: {rerun_s:.3f}s ({len(rels) / rerun_s:,.0f} files/s; "
          f"{rerun_s / rows[1][2]:.2f}x the warm hashing run)")

    hash_s = timed(lambda: [images.content_hash(b) for b in blobs])
    decode_s = timed(lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs])
    print(f"\nextraction, per image: {images.HASH_NAME} {hash_s / len(blobs) * 1e3:.2f} ms, decode to RGB "
          f"{decode_s / len(blobs) * 1e3:.2f} ms: the check adds {hash_s / decode_s:.1%} to decoding "
          "(before the model's resize and forward pass)")
    if args.record:
        jpegs = f"{len(rels):,} JPEGs (500x375, {total / len(rels) / 1e3:.0f} KB)"
        measured = [(f"hash throughput on {jpegs}, in memory",
                     ", ".join(f"{name} {mb_s:,.0f} MB/s" for name, mb_s in throughput.items()))]
        measured += [(f"prepare hashing vs plain read of {jpegs}, page cache {page_cache}",
                      f"{hash_s:.2f} s vs {read_s:.2f} s ({hash_s / read_s:.2f}x), {len(rels) / hash_s:,.0f} files/s")
                     for page_cache, read_s, hash_s in rows]
        measured.append(("prepare re-run, stat cache warm", f"{rerun_s:.3f} s ({len(rels) / rerun_s:,.0f} files/s; "
                                                            f"{rerun_s / rows[1][2]:.2f}x the warm hashing run)"))
        measured.append(("extraction's check per image", f"{images.HASH_NAME} {hash_s / len(blobs) * 1e3:.2f} ms vs "
                         f"decode {decode_s / len(blobs) * 1e3:.2f} ms: +{hash_s / decode_s:.1%} of decoding"))
        options = f"--images {args.images}" if args.images != parser.get_default("images") else ""
        results.record(results.section_key("fingerprint.py", options), f"python -m bench.fingerprint {options}".strip(),
                       measured)


if __name__ == "__main__":
    main()
