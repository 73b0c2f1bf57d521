"""CLIP models: the project's tiny config, weight resolution and loading.

``model.arch`` is any open_clip architecture name (``ViT-B-16``, ``RN50``, ...) or
one shipped here (``ltpipe-tiny``). ``model.pretrained`` is

* ``null``: random initialisation from ``model.init_seed``, written once to a
  checkpoint file by the ``weights`` stage so every later run reads the same
  weights (the embedded default; no download);
* an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...): taken from
  the local Hugging Face / open_clip cache, downloaded when there is a network;
* a path to a local checkpoint file (a state dict, as open_clip saves them).

Offline, a tag that is not cached fails at once with the fix (point
``model.pretrained`` at a local file) instead of open_clip's minute of retries.
"""

import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import open_clip
import torch

from ltpipe import paths
from ltpipe.config import Params
from ltpipe.errors import ConfigError, WeightsError

CONFIG_DIR = Path(__file__).parent / "model_configs"
PROJECT_ARCHS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
_registered = False


def register_project_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def check_arch(arch: str) -> str:
    register_project_configs()
    if arch not in open_clip.list_models():
        raise ConfigError(
            f"unknown model architecture {arch!r} (`model.arch`). Shipped with ltpipe: "
            f"{', '.join(PROJECT_ARCHS)}. open_clip architectures: {', '.join(open_clip.list_models())}."
        )
    return arch


PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass
class ResolvedWeights:
    """One checkpoint file, and how open_clip must build the model that reads it.

    ``quick_gelu`` and ``preprocess`` come from the pretrained tag's config: open_clip
    applies them only when given a tag, and we load tags from a resolved file path.
    """

    arch: str
    pretrained: Optional[str]
    checkpoint: str
    sha256: str
    init_seed: Optional[int] = None
    quick_gelu: bool = False
    preprocess: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ResolvedWeights":
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path} not found: the weights stage has not run. Run `dvc repro weights`.")
        return cls(**json.loads(path.read_text()))


def sha256_of(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def resolve(arch: str, pretrained: Optional[str], out_dir: Path, init_seed: int = 0) -> ResolvedWeights:
    """Find (or, for random init, create) the checkpoint for ``arch``/``pretrained``."""
    check_arch(arch)
    out_dir = Path(out_dir)
    if pretrained is None:
        checkpoint = out_dir / f"{arch}-seed{init_seed}.pt"
        _write_seeded_checkpoint(arch, init_seed, checkpoint)
        return ResolvedWeights(arch, None, str(checkpoint), sha256_of(checkpoint), init_seed)
    if os.path.isfile(pretrained):
        return ResolvedWeights(arch, pretrained, str(Path(pretrained).resolve()), sha256_of(Path(pretrained)))
    if _looks_like_path(pretrained):
        raise WeightsError(
            f"checkpoint file {pretrained!r} (`model.pretrained`) does not exist. Give the path of a "
            f"state-dict file for {arch}, an open_clip tag, or null for the seeded random init."
        )
    checkpoint = _download_tag(arch, pretrained)
    quick_gelu, preprocess = tag_settings(arch, pretrained)
    return ResolvedWeights(arch, pretrained, checkpoint, sha256_of(Path(checkpoint)), None, quick_gelu, preprocess)


def tag_settings(arch: str, tag: str):
    """The activation and preprocessing a pretrained tag was trained with."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    preprocess = {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in PREPROCESS_KEYS if k in cfg}
    return bool(cfg.get("quick_gelu", False)), preprocess


def _write_seeded_checkpoint(arch: str, seed: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(), _quiet_root_logger():
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    with paths.atomic_target(path) as partial:
        torch.save(model.state_dict(), partial)


@contextlib.contextmanager
def _quiet_root_logger():
    # open_clip warns "initialized randomly" on the root logger; here that is the point.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _offline_message(arch: str, tag: str, reason: str) -> str:
    return (
        f"pretrained weights {arch}/{tag} are not in the local cache and cannot be downloaded ({reason}). "
        f"Either run once on a machine with internet "
        f"(`python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"`) and copy "
        f"~/.cache/huggingface here, or download the checkpoint file and set "
        f"`model.pretrained: /path/to/{arch}-{tag}.bin` in params.yaml."
    )


def _download_tag(arch: str, tag: str) -> str:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ConfigError(
            f"{tag!r} is neither an open_clip pretrained tag for {arch} nor an existing file "
            f"(`model.pretrained`). Tags for {arch}: {', '.join(tags) if tags else 'none'}; or give a "
            "local checkpoint path, or null for the seeded random init."
        )
    if cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for name in candidates:
            try:
                return hf_hub_download(repo_id, name, local_files_only=True)
            except LocalEntryNotFoundError:
                continue
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise WeightsError(_offline_message(arch, tag, "HF_HUB_OFFLINE is set"))
        if not _reachable("huggingface.co"):
            raise WeightsError(_offline_message(arch, tag, "huggingface.co is not reachable"))
        last_error = None
        for name in candidates:
            try:
                return hf_hub_download(repo_id, name)
            except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
                last_error = exc
        raise WeightsError(_offline_message(arch, tag, f"download failed: {last_error}"))
    url = cfg.get("url")
    if url:
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return str(cached)
        host = url.split("/")[2]
        if not _reachable(host):
            raise WeightsError(_offline_message(arch, tag, f"{host} is not reachable"))
        return open_clip.pretrained.download_pretrained_from_url(url)
    raise WeightsError(f"open_clip has no download location for {arch}/{tag}; give a local checkpoint path.")


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load(weights: ResolvedWeights, device: torch.device):
    """Build the model with its checkpoint; return ``(model, preprocess, tokenizer)``."""
    register_project_configs()
    checkpoint = Path(weights.checkpoint)
    if not checkpoint.is_file():
        raise WeightsError(f"checkpoint {checkpoint} is gone. Re-run the weights stage: `dvc repro -f weights`.")
    if sha256_of(checkpoint) != weights.sha256:
        raise WeightsError(
            f"checkpoint {checkpoint} changed since the weights stage recorded it (sha256 differs). "
            "Re-run `dvc repro -f weights` so the features say which weights made them."
        )
    settings = weights.preprocess
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            weights.arch, pretrained=str(checkpoint), device=device, force_quick_gelu=weights.quick_gelu,
            image_mean=settings.get("mean"), image_std=settings.get("std"),
            image_interpolation=settings.get("interpolation"), image_resize_mode=settings.get("resize_mode"),
        )
    except Exception as exc:  # noqa: BLE001 - any failure here means "this file is not weights for arch"
        raise WeightsError(
            f"cannot load {checkpoint} as {weights.arch} weights ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}). "
            "Check `model.arch` matches the checkpoint (e.g. ViT-B-16-quickgelu for QuickGELU weights) and "
            "that the file is an open_clip state dict.") from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(weights.arch)


def run_stage(params: Params) -> ResolvedWeights:
    """The `weights` stage: resolve `model.arch` / `model.pretrained` to a checkpoint file."""
    model = params.sub("model")
    arch = check_arch(model.str("arch"))
    pretrained = model.optional_str("pretrained")
    seed = model.int("init_seed", minimum=0)
    resolved = resolve(arch, pretrained, paths.WEIGHTS_DIR, seed)
    resolved.save(paths.WEIGHTS_JSON)
    print(f"weights: {arch} / {pretrained or f'seeded random init ({seed})'} -> {resolved.checkpoint}")
    return resolved
