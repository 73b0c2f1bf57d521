"""CLIP models: the project's tiny config, weight resolution and loading.

``model.arch`` is any open_clip architecture name (``ViT-B-16``, ``RN50``, ...) or
one shipped here (``ltpipe-tiny``). ``model.pretrained`` is

* ``null``: random initialisation from ``model.init_seed``, written once to a
  checkpoint file by the ``weights`` stage so every later run reads the same
  weights (the embedded default; no download);
* an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...): taken from
  the local Hugging Face / open_clip cache, downloaded when there is a network;
* a path to a local checkpoint file: a state dict saved with ``torch.save`` (zip or the
  old format), a ``.safetensors`` file, or a TorchScript archive (OpenAI's original
  ``ViT-B-32.pt``). A pickled model object is refused without unpickling it; see
  :func:`diagnose_checkpoint` for what each bad file is told.

Offline, a tag that is not cached fails at once with the fix (point
``model.pretrained`` at a local file) instead of open_clip's minute of retries.
"""

import contextlib
import hashlib
import json
import logging
import os
import socket
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import open_clip
import torch

from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, WeightsError
from ltpipe.features.checkpoint_files import file_problem, is_torchscript

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
        # atomic_target makes the folder: DVC deletes a stage's outputs before running it, so
        # data/weights/ is gone whatever the weights are (a tag or a file path writes nothing else there).
        with paths.atomic_target(Path(path)) as partial:
            partial.write_text(json.dumps(asdict(self), indent=2) + "\n")

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
        candidates = hub_filenames(filename)
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


def hub_filenames(filename: str) -> list:
    """The files of a hub repository that hold a tag's weights, in the order open_clip downloads them
    (``download_pretrained_from_hf``): the safetensors twin first. The default ``.bin``'s twin is
    ``open_clip_model.safetensors`` (not ``open_clip_pytorch_model.safetensors``); looking for the
    wrong name missed caches open_clip had filled and, offline, reported them as absent."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive")  # torch.load says it dispatches
            model, _, preprocess = open_clip.create_model_and_transforms(
                weights.arch, pretrained=str(checkpoint), device=device, force_quick_gelu=weights.quick_gelu,
                image_mean=settings.get("mean"), image_std=settings.get("std"),
                image_interpolation=settings.get("interpolation"), image_resize_mode=settings.get("resize_mode"),
                # torch.load hands a TorchScript archive (OpenAI's original ViT-B-32.pt is one) to torch.jit.load,
                # which reads TorchScript's own format and no Python pickle; weights_only=True refuses it.
                weights_only=not is_torchscript(checkpoint),
            )
    except Exception as exc:  # noqa: BLE001 - any failure here means "this file is not weights for arch"
        raise WeightsError(diagnose_checkpoint(checkpoint, weights.arch, exc)) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(weights.arch)


def _vit_shape(state: dict) -> Optional[dict]:
    """The open_clip config fields a ViT + transformer-text state dict fixes, as
    ``{"embed_dim": .., "vision_cfg": {..}, "text_cfg": {..}}``; ``None`` for another layout."""
    try:
        conv, grid = state["visual.conv1.weight"], state["visual.positional_embedding"]
        tokens, text_positions = state["token_embedding.weight"], state["positional_embedding"]

        def layers(prefix):
            return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

        return {"embed_dim": int(state["text_projection"].shape[1]),
                "vision_cfg": {"width": int(conv.shape[0]), "patch_size": int(conv.shape[-1]),
                               "layers": layers("visual.transformer.resblocks."),
                               "image_size": int(conv.shape[-1] * round((grid.shape[0] - 1) ** 0.5))},
                "text_cfg": {"width": int(tokens.shape[1]), "vocab_size": int(tokens.shape[0]),
                             "context_length": int(text_positions.shape[0]),
                             "layers": layers("transformer.resblocks.")}}
    except (KeyError, IndexError, AttributeError, TypeError):
        return None


def _archs_fitting(state: dict) -> list:
    shape = _vit_shape(state)
    if shape is None:
        return []
    register_project_configs()
    defaults = {"vision_cfg": {"width": 768, "patch_size": 16, "layers": 12, "image_size": 224},
                "text_cfg": {"width": 512, "vocab_size": 49408, "context_length": 77, "layers": 12}}
    fitting = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        if cfg.get("embed_dim") != shape["embed_dim"]:
            continue
        if all({**defaults[tower], **cfg.get(tower, {})}.get(k) == v
               for tower in ("vision_cfg", "text_cfg") for k, v in shape[tower].items()):
            fitting.append(name)
    return fitting


def _state_dict_mismatch(path: Path, arch: str) -> Optional[str]:
    """Why a readable state dict does not fit ``arch``: the first key whose shape differs, or the
    keys one side lacks, and the open_clip architectures whose shapes it fits."""
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = open_clip.factory.load_state_dict(str(path), weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: the caller says so with the loader's own words
        return None
    if not isinstance(state, dict) or not state:
        return None
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [k for k, v in state.items() if isinstance(v, dict)]
        state_path = path.with_name(f"{path.stem}_state.pt")
        return (f"it is a dict of {', '.join(map(str, list(state)[:6]))} (a training checkpoint?), not a state dict"
                + (f"; the weights are probably under {nested[0]!r}: save them with `python -c \"import torch; "
                   f"c = torch.load('{path}'); torch.save(c[{nested[0]!r}], '{state_path}')\"` and point "
                   "`model.pretrained` there" if nested else ""))
    with _quiet_root_logger():
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = next(((k, list(v.shape), list(expected[k].shape)) for k, v in state.items()
                   if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape)), None)
    if shapes is None and not missing and not unexpected:
        return None
    computed = {name for name, _ in model.named_buffers()} - set(expected)
    if shapes is None and not missing and set(unexpected) <= computed:
        # e.g. a TorchScript export of an open_clip model keeps `attn_mask`, which the model builds itself
        names = ", ".join(f"`{k}`" for k in unexpected)
        read = f"torch.jit.load('{path}').state_dict()" if is_torchscript(path) else f"torch.load('{path}')"
        return (f"it holds {names}, which {arch} computes itself rather than loading. Save the weights without "
                f"it: `python -c \"import torch; s = dict({read}); [s.pop(k) for k in {unexpected!r}]; "
                f"torch.save(s, '{path.with_name(path.stem + '_state.pt')}')\"` and point `model.pretrained` there")
    reasons = [f"`{shapes[0]}` is {shapes[1]} in the file but {shapes[2]} in {arch}" if shapes else "",
               f"it lacks {len(missing)} of {arch}'s {len(expected)} keys (first `{missing[0]}`)" if missing else "",
               f"it has {len(unexpected)} keys {arch} does not (first `{unexpected[0]}`)" if unexpected else ""]
    fitting = [name for name in _archs_fitting(state) if name != arch]
    hint = (f"Its shapes fit `model.arch` {', '.join(fitting[:6])}" if fitting else
            "Set `model.arch` to the architecture it was trained as (`python -c \"import open_clip; "
            "print(open_clip.list_models())\"` lists them)")
    what = "a state dict for another architecture" if shapes or missing else f"not a state dict of {arch} alone"
    return f"it is {what}: {'; '.join(r for r in reasons if r)}. {hint}"


def diagnose_checkpoint(path: Path, arch: str, error: BaseException) -> str:
    """One line naming what ``path`` is and how to fix it, after open_clip failed to load it."""
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        return problem
    mismatch = _state_dict_mismatch(path, arch)
    if mismatch is not None:
        return f"cannot load checkpoint {path} (`model.pretrained`) as {arch} weights: {mismatch}."
    what = (f"cannot be loaded as {arch} weights ({type(error).__name__}: {' '.join(str(error).split())[:200]}). "
            "If it is cut off or damaged, copy or download it again; if it is for another architecture, set "
            "`model.arch` to it (e.g. ViT-B-16-quickgelu for QuickGELU weights)")
    return f"checkpoint {path} (`model.pretrained`) {what}."


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
