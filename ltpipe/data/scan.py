"""Decode every image once, to find unreadable or truncated files before extraction.

Run only when asked (``prepare.scan_images: true``): decoding costs far more than
the existence check every prepare does. Decodes with extraction's own decoder
(:mod:`ltpipe.data.images`), so an image the scan accepts, extraction accepts. Records
each image's colour mode (every mode but RGB is converted at extraction) and counts
multi-frame files (only their first frame is used).
"""

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ltpipe.core.errors import user_message
from ltpipe.data import images

# Decode at most this size: libjpeg's DCT scaling still reads (and checks) the whole stream.
_DRAFT_SIZE = 64


def check_image(path: str) -> Tuple[Optional[str], int, Optional[str]]:
    """``(mode, frames, None)`` for a usable image, ``(None, 0, reason)`` otherwise."""
    try:
        decoded = images.decode_rgb(images.read_bytes(path), path, _DRAFT_SIZE)
        return decoded.mode, decoded.frames, None
    except Exception as exc:  # noqa: BLE001 - any decode failure makes the image unusable
        return None, 0, f"{type(exc).__name__}: {user_message(exc)}"


def _check_chunk(paths: Sequence[str]) -> List[Tuple[Optional[str], int, Optional[str]]]:
    return [check_image(p) for p in paths]


@dataclass
class ScanResult:
    modes: Counter = field(default_factory=Counter)
    bad: Dict[str, str] = field(default_factory=dict)  # relative path -> reason
    multi_frame: List[str] = field(default_factory=list)  # relative paths of files with more than one frame

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
    for rel, (mode, frames, error) in zip(rel_paths, outcomes):
        if error is None:
            result.modes[mode] += 1
            if frames > 1:
                result.multi_frame.append(rel)
        else:
            result.bad[rel] = error
    return result
