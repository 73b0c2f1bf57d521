"""Device, precision and seeding: one place, so CPU and CUDA share every code path."""

import contextlib
import os
import random

import numpy as np
import torch

from ltpipe.core.errors import ConfigError, DataError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
