"""Device, precision and seeding: one place, so CPU and CUDA share every code path."""

import contextlib
import os
import random
from typing import Optional, Tuple

import numpy as np
import torch

from ltpipe.core.errors import ConfigError, DataError
from ltpipe.core.params_layout import DEVICES, PRECISIONS, threads_problem


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"`model.device` is {name!r}; valid values: auto, cpu, cuda, cuda:N.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`model.device` is {name!r} but CUDA is not available here; set it to auto or cpu.")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is fp32 on CPU (bf16 autocast measured 3x slower on a 2-core CPU) and bf16 on CUDA."""
    if name not in PRECISIONS:
        raise ConfigError(f"`model.precision` is {name!r}; valid values: {', '.join(PRECISIONS)}.")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# A step below this many multiply-adds (batch x feature width x classes, a head on pooled features)
# runs on one thread: there a second thread gained little on an idle machine and lost beside a busy
# process (bench/threads.py, docs/design.md#threads).
SMALL_STEP = 1 << 26
_TORCH_DEFAULT_THREADS = []  # torch's own choice (OMP_NUM_THREADS, physical cores), read before any change


def parse_threads(value, key: str = "model.threads"):
    """``auto`` or a positive thread count."""
    if threads_problem(value):
        raise ConfigError(f"`{key}` is {value!r}; valid values: auto, or a number of threads >= 1.")
    return value


def read_threads(params) -> "str | int":
    """``model.threads`` of a stage's params (:class:`ltpipe.core.config.Params`), checked."""
    return parse_threads(params.raw("model.threads"))


def choose_threads(setting, step_macs: Optional[int], work: str) -> Tuple[int, str]:
    """The intra-op thread count for ``work`` and why. ``step_macs``: multiply-adds of one step (one
    batch of a head on pooled features, one chunk of a prediction pass); None for work that is large by
    nature (an image encoder, token grids). The choice depends on the work and on torch's default for
    the machine, never on the machine's momentary load: a thread count can change float results (the
    order of a sum), and the same params must give the same metrics."""
    if not _TORCH_DEFAULT_THREADS:
        _TORCH_DEFAULT_THREADS.append(torch.get_num_threads())
    default = _TORCH_DEFAULT_THREADS[0]
    if setting != "auto":
        return setting, f"`model.threads: {setting}`"
    if step_macs is not None and step_macs < SMALL_STEP:
        return 1, f"`model.threads: auto`: {work} is {step_macs / 1e6:.3g}M multiply-adds a step, too few to share"
    size = "" if step_macs is None else f", {step_macs / 1e6:.3g}M multiply-adds a step"
    return default, f"`model.threads: auto`: torch's default for {work}{size}"


def use_threads(setting, step_macs: Optional[int], work: str) -> int:
    """Set and print the thread count for ``work`` (:func:`choose_threads`); returns it, for the metrics."""
    count, reason = choose_threads(setting, step_macs, work)
    torch.set_num_threads(count)
    print(f"threads: {count} ({reason})")
    return count


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_tensors(path, what: str, mmap: bool = False):
    """``torch.load`` of a file ltpipe wrote: tensors and plain values only (``weights_only=True``),
    so loading never runs code from the file. Anything else is refused with the fix."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} ({what}) holds Python objects, not only tensors and plain values; ltpipe never "
                        f"unpickles code ({' '.join(str(exc).split())[:160]}). Delete it and re-run the stage "
                        "that writes it.") from None
    except (RuntimeError, EOFError, OSError) as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        raise DataError(f"{path} ({what}) is damaged and cannot be read ({reason}). Delete it and re-run the "
                        "stage that writes it.") from None


def data_loader_kwargs(device: torch.device, workers: int) -> dict:
    kwargs = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs["persistent_workers"] = False
        kwargs["prefetch_factor"] = 4
    return kwargs
