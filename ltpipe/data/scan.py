"""Decode every image once, to find unreadable or truncated files before extraction.

Run only when asked (``prepare.scan_images: true``): decoding costs far more than
the existence check every prepare does. Records each image's colour mode, since
grey, CMYK and palette images are converted to RGB at extraction.
"""

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

# Decode at most this size: libjpeg's DCT scaling still reads (and checks) the whole stream.
_DRAFT_SIZE = (64, 64)


def check_image(path: str) -> Tuple[Optional[str], Optional[str]]:
    """``(mode, None)`` for a readable image, ``(None, reason)`` otherwise."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            if image.format == "JPEG":
                image.draft("RGB", _DRAFT_SIZE)
            image.load()
        return mode, None
    except Exception as exc:  # noqa: BLE001 - any decode failure makes the image unusable
        return None, f"{type(exc).__name__}: {exc}"


def _check_chunk(paths: Sequence[str]) -> List[Tuple[Optional[str], Optional[str]]]:
    return [check_image(p) for p in paths]


@dataclass
class ScanResult:
    modes: Counter = field(default_factory=Counter)
    bad: Dict[str, str] = field(default_factory=dict)  # relative path -> reason

    @property
    def converted(self) -> int:
        return sum(n for mode, n in self.modes.items() if mode != "RGB")


def scan(root: Path, rel_paths: Sequence[str], workers: int = 2, chunk: int = 512) -> ScanResult:
    result = ScanResult()
    full = [os.path.join(root, p) for p in rel_paths]
    chunks = [full[i:i + chunk] for i in range(0, len(full), chunk)]
    if workers > 0 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            outcomes = [o for part in pool.map(_check_chunk, chunks) for o in part]
    else:
        outcomes = [o for part in map(_check_chunk, chunks) for o in part]
    for rel, (mode, error) in zip(rel_paths, outcomes):
        if error is None:
            result.modes[mode] += 1
        else:
            result.bad[rel] = error
    return result
