"""Stand-ins at the network boundary for the weights and data a real run names: checkpoint files in
every format `model.pretrained` accepts, a Hugging Face cache pre-filled as open_clip's download
leaves it (read with HF_HUB_OFFLINE=1, so the real tag lookup and load code runs), and a tiny tree in
a published benchmark's layout. Nothing here is committed weights: every state dict is a random init."""

import os
from pathlib import Path
from typing import Dict

import numpy as np
import open_clip
import safetensors.torch
import torch
from PIL import Image

from tests.test_weights_messages import FORMATS as _READ_FORMATS

# Every way to save a state dict that `model.pretrained` accepts (docs/parameters.md, ltpipe/features/models.py).
CHECKPOINT_FORMATS = {
    "state_dict": lambda state, path: torch.save(state, path),
    "ddp_prefix": lambda state, path: torch.save({f"module.{k}": v for k, v in state.items()}, path),
    **_READ_FORMATS,
}


def checkpoint_name(fmt: str) -> str:
    return f"{fmt}.safetensors" if fmt == "safetensors" else f"{fmt}.pt"


def random_state(arch: str, seed: int, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """A seeded random init of ``arch`` (open_clip's or ltpipe's), as a state dict of ``dtype``."""
    from ltpipe.features.models import _quiet_root_logger, register_project_configs

    register_project_configs()
    with torch.random.fork_rng(), _quiet_root_logger():  # open_clip warns that the init is random: it is meant
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}


def fill_hf_cache(hf_home: Path, arch: str, tag: str, state: Dict[str, torch.Tensor]) -> Path:
    """Put ``state`` where open_clip's download of ``arch``/``tag`` leaves it in a Hugging Face cache
    (``$HF_HOME/hub/models--ORG--NAME/snapshots/REV/FILE``, ``refs/main`` naming REV), as the
    safetensors file open_clip prefers; return the file."""
    from ltpipe.features.models import hub_filenames

    repo_id, filename = os.path.split(open_clip.get_pretrained_cfg(arch, tag)["hf_hub"])
    name = hub_filenames(filename)[0]
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    target = repo / "snapshots" / revision / name
    target.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(target))
    return target


def hub_env(hf_home: Path) -> Dict[str, str]:
    """The environment of a machine with that cache and no network to the hub."""
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


VOC_CLASSES = ("aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
               "pottedplant sheep sofa train tvmonitor").split()


def write_voc_lt(root: Path, train_images: int = 24, test_images: int = 12, seed: int = 0) -> Path:
    """A tiny tree in VOC-LT's layout (Wu et al. 2020): ``voc_lt_{train,test}.txt`` of ``path label ...``
    and ``voc_labels.txt`` of ``name index``; every class has a training image, images are 64 px."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "voc_labels.txt").write_text("".join(f"{name} {i}\n" for i, name in enumerate(VOC_CLASSES)))
    for split, count in (("train", train_images), ("test", test_images)):
        lines = []
        for i in range(count):
            labels = sorted({i % len(VOC_CLASSES), *rng.integers(0, len(VOC_CLASSES), rng.integers(0, 3)).tolist()})
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            rel = f"images/{split}_{i:03d}.jpg"
            Image.fromarray(pixels).save(root / rel, quality=90)
            lines.append(" ".join([rel, *map(str, labels)]) + "\n")
        (root / f"voc_lt_{split}.txt").write_text("".join(lines))
    return root
