"""Benchmark: intra-op threads for a training step, on an idle machine and beside another busy process.

One training step (forward, cross-entropy, backward, AdamW) of heads of several sizes: linear
classifiers on pooled features (batch x width x classes multiply-adds, the measure
``ltpipe.core.runtime.choose_threads`` decides by) and the two token-grid heads. Each is timed
with one thread and with torch's default, the default with OpenMP's own waiting (threads spin
before they sleep), with a short spin (``GOMP_SPINCOUNT=3000``) and with ``OMP_WAIT_POLICY=PASSIVE``, first on an
idle machine, then beside another process running a two-thread matmul loop (another experiment,
a test run, ``dvc queue start -j 2``). Each configuration runs in its own process: OpenMP reads its
wait policy once, when torch loads it.

Run: .venv/bin/python bench/threads.py [--record]   (about 4 minutes; --record: write the figures to
     docs/results.md)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

try:  # `python bench/<name>.py` puts bench/ on sys.path, `python -m bench.<name>` the repository
    import results
except ImportError:
    from bench import results

BATCH = 128
# (name, width, classes) of the pooled cases: 0.07M to 0.53G multiply-adds a step.
POOLED = [("linear 512 -> 1", 512, 1), ("linear 512 -> 100", 512, 100), ("linear 512 -> 1000", 512, 1000),
          ("linear 512 -> 2000", 512, 2000), ("linear 512 -> 4000", 512, 4000), ("linear 768 -> 8142", 768, 8142)]
TOKENS = ["CPRFL (dim 128), 50x768", "decoder (depth 1), 50x768"]
BUSY = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n")


def build(case: str):
    import torch

    from ltpipe.heads.cprfl import CPRFLHead
    from ltpipe.heads.decoder import DecoderHead

    torch.manual_seed(0)
    for name, width, classes in POOLED:
        if name == case:
            return torch.nn.Linear(width, classes), torch.randn(BATCH, width), torch.randint(0, classes, (BATCH,))
    x, y = torch.randn(BATCH, 50, 768), torch.randint(0, 100, (BATCH,))
    if case.startswith("CPRFL"):
        return CPRFLHead(768, 512, 100, 128, 4, 32, 128, 0.0, 0.5, 256, 0.0), x, y
    return DecoderHead(768, 100, 1, 4, 0.5, False), x, y


def step_time(model, x, y, seconds: float) -> float:
    """Median milliseconds of a training step of ``model`` on the batch ``(x, y)``."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def worker(threads: int, seconds: float) -> None:
    """Milliseconds per step of every case, as JSON on stdout (runs in its own process)."""
    import torch

    torch.set_num_threads(threads)
    print(json.dumps({case: step_time(*build(case), seconds) for case in [name for name, _, _ in POOLED] + TOKENS}))


def measure(threads: int, wait: str, seconds: float) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if wait == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif wait == "short":
        env["GOMP_SPINCOUNT"] = "3000"  # GNU OpenMP (torch's Linux wheels): spin ~1 us, not ~0.3 ms, then sleep
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--seconds", str(seconds)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="timed steps per case and configuration")
    parser.add_argument("--record", action="store_true", help="write the figures to docs/results.md")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.seconds)
    import torch

    default = torch.get_num_threads()
    configs = [(1, "passive", "1 thread"), (default, "spin", f"{default}, spinning"),
               (default, "short", f"{default}, short spin"), (default, "passive", f"{default}, passive")]
    columns = {}
    for load in ("idle", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
        try:
            if busy:
                time.sleep(2)  # the loop is running
            for threads, wait, label in configs:
                columns[f"{load}: {label}"] = measure(threads, wait, args.seconds)
                print(f"{load}, {label} done", flush=True)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    header = ("step (batch 128)", "MMAC") + tuple(columns)
    macs = {name: BATCH * width * classes / 1e6 for name, width, classes in POOLED}
    rows = [(case, f"{macs[case]:.3g}" if case in macs else "",
             *(f"{column[case]:.2f} ms" for column in columns.values()))
            for case in [name for name, _, _ in POOLED] + TOKENS]
    width = max(len(row[0]) for row in rows)
    for row in [header] + rows:
        print(f"{row[0]:<{width}}  {row[1]:>6}  " + "  ".join(f"{cell:>18}" for cell in row[2:]))
    if args.record:
        results.record(results.section_key(__file__), "python bench/threads.py", rows, header=header,
                       note="Median step time; each configuration in its own process. busy: beside a process "
                            "running a two-thread 1024x1024 matmul loop. MMAC: millions of multiply-adds of the "
                            "classifier's matmul per step, the size `model.threads: auto` decides by.")


if __name__ == "__main__":
    main()
