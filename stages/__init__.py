"""DVC stage scripts: each parses params.yaml and calls one function of the `ltpipe` package."""

import os

# Before torch loads OpenMP, which reads its settings once: GNU OpenMP's threads (torch's Linux wheels)
# spin ~3,000 rounds, not ~300,000, before they sleep while waiting for work. Beside another busy
# process on 2 cores, the long spin made a two-thread training step up to 30x slower; the short one
# costs little on an idle machine (bench/threads.py). A wait policy or spin count the user set is kept.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"
