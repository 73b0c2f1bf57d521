"""Benchmark: the CPRFL head (issue 6).

Forward + backward time and peak memory of the CPRFL head, batch 32, for 80 classes
(COCO-LT) and 1,000 classes on a 14x14 grid (197 tokens of a ViT-B/16, width 768),
computing only the prompt rows of the VSI layer (what ltpipe does) against the whole
layer over all tokens (what the official code does), side by side in one run; the
outputs are checked equal. Default head sizes (dim 128) and the paper's (dim 2048,
8 heads of 512, FFN 2048). Each configuration runs in its own process so peak memory
is its own.

Run: .venv/bin/python bench/cprfl.py [--record]   (about 5 minutes on 2 cores; --record: write the figures to
     docs/results.md)
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from ltpipe.heads.cprfl import CPRFLHead

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

TOKENS, WIDTH, TEXT, BATCH = 197, 768, 512, 32
SIZES = {"default": dict(dim=128, heads=4, head_dim=32, ffn=128),
         "paper": dict(dim=2048, heads=8, head_dim=512, ffn=2048)}


def one(classes: int, size: str, mode: str, repeats: int) -> dict:
    torch.manual_seed(0)
    head = CPRFLHead(WIDTH, TEXT, classes, dropout=0.0, **SIZES[size])
    head.text.normal_()
    if mode == "full":
        head.vsi.forward = head.vsi.forward_full
    tokens = torch.randn(BATCH, TOKENS, WIDTH)
    target = (torch.rand(BATCH, classes) < 0.05).float()

    def step():
        head.zero_grad(set_to_none=True)
        logits = head(tokens)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
        return logits.detach()

    logits = step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "checksum": float(logits.double().sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4)
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one:
        classes, size, mode, repeats = args.one
        print(json.dumps(one(int(classes), size, mode, int(repeats))))
        return
    print(f"CPRFL head, forward + backward, batch {BATCH}, {TOKENS} tokens of width {WIDTH} (ViT-B/16 14x14 grid)")
    measured = []
    for size, classes, repeats in (("default", 80, 5), ("default", 1000, 3), ("paper", 80, 2), ("paper", 1000, 1)):
        rows = {}
        for mode in ("prompt-only", "full"):
            out = subprocess.run([sys.executable, __file__, "--one", str(classes), size, mode, str(repeats)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"  {size} {classes} {mode}: FAILED {out.stderr[-500:]}")
                measured.append((f"{size} size, {classes:,} classes, {mode}", "FAILED"))
                break
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        if len(rows) < 2:
            continue
        p, f = rows["prompt-only"], rows["full"]
        same = abs(p["checksum"] - f["checksum"]) <= 1e-3 * max(1.0, abs(f["checksum"]))
        print(f"  {size:7s} ({SIZES[size]['dim']:4d}-d) {classes:5,d} classes: prompt-only {p['seconds']:6.2f} s, "
              f"peak {p['peak_gib']:.2f} GiB; full layer {f['seconds']:6.2f} s, peak {f['peak_gib']:.2f} GiB; "
              f"x{f['seconds'] / p['seconds']:.2f} faster; same logits: {same}")
        measured.append((f"CPRFL head, forward + backward, batch {BATCH}, {TOKENS} tokens of width {WIDTH}: "
                         f"{size} size (dim {SIZES[size]['dim']}), {classes:,} classes; prompt rows only (ltpipe) "
                         "vs the whole layer (official code)", f"{p['seconds']:.2f} vs {f['seconds']:.2f} s "
                         f"(x{f['seconds'] / p['seconds']:.1f}), peak {p['peak_gib']:.2f} vs {f['peak_gib']:.2f} GiB; "
                         f"logits equal: {same}"))
    if args.record:
        results.record(results.section_key(__file__), "python bench/cprfl.py", measured)


if __name__ == "__main__":
    main()
