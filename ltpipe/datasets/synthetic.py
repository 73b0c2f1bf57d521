"""The embedded default dataset: coloured, patterned shapes drawn from a seed.

Everything is generated deterministically: the same parameters give the same
pixels. Class names are natural language ("red circle", "blue striped
triangle") so they work as CLIP text prompts. The training split is long-tailed
with the exponential profile of Cao et al. (LDAM-DRW, 2019),
``n_c = int(n_max * (1/IF) ** (c / (C - 1)))``; validation and test are balanced.

The multi-label variant draws several objects per image: every class ``c`` is the
primary object of ``n_c`` training images, and each image gets extra objects
drawn from the same long-tailed distribution, so label frequencies are long-tailed
and labels co-occur, as in COCO-LT.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ltpipe.core.options import check, option

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
PATTERNS = ("plain", "striped", "dotted")
MAX_CLASSES = len(SHAPES) * len(COLORS) * len(PATTERNS)
SPLITS = ("train", "val", "test")
# Independent of the dataset seed, so a class count always names the same classes.
_CLASS_ORDER_SEED = 20230401


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`generate` draws; the defaults are dataset `synthetic`'s (`synthetic_ml` changes some)."""

    classes: int = option(24, minimum=2, maximum=MAX_CLASSES, doc="shape x colour x pattern combinations")
    imbalance: float = option(100.0, minimum=1, doc="n_max / n_min of the training split")
    max_per_class: int = option(300, minimum=1, doc="training images of the most frequent class")
    val_per_class: int = option(10, minimum=0, doc="0: no validation list (as COCO-LT; `prepare.val_fraction`)")
    test_per_class: int = option(30, minimum=1)
    image_size: int = option(64, minimum=16, doc="pixels")
    seed: int = option(0, minimum=0)
    multilabel: bool = option(False, doc="several objects per image")
    max_objects: int = option(3, minimum=1, doc="multi-label: objects per image at most")

    def validate(self) -> None:
        """Refuse values outside the bounds declared above (a spec built in code, not read from params.yaml)."""
        check(self, "synthetic spec")


def class_names(num_classes: int) -> List[str]:
    combos = list(itertools.product(PATTERNS, COLORS, SHAPES))
    order = np.random.default_rng(_CLASS_ORDER_SEED).permutation(len(combos))
    names = []
    for i in order[:num_classes]:
        pattern, color, shape = combos[i]
        names.append(f"{color} {shape}" if pattern == "plain" else f"{color} {pattern} {shape}")
    return names


def long_tailed_counts(n_max: int, num_classes: int, imbalance: float) -> List[int]:
    """Per-class counts of the exponential profile (LDAM-DRW's CIFAR-LT rule)."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * (1.0 / imbalance) ** (c / (num_classes - 1)))) for c in range(num_classes)]


def _parse(name: str) -> Tuple[str, str, str]:
    parts = name.split()
    if len(parts) == 2:
        return parts[0], "plain", parts[1]
    return parts[0], parts[1], parts[2]


def _shape_mask(shape: str, size: int, rotation: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, r = size / 2, size / 2 - 1
    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        return mask
    if shape == "square":
        corners = [(-r * 0.8, -r * 0.8), (r * 0.8, -r * 0.8), (r * 0.8, r * 0.8), (-r * 0.8, r * 0.8)]
    elif shape == "diamond":
        corners = [(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)]
    elif shape == "triangle":
        corners = [(r * np.cos(a), r * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    else:  # star
        corners = [
            ((r if k % 2 == 0 else r * 0.45) * np.cos(a), (r if k % 2 == 0 else r * 0.45) * np.sin(a))
            for k, a in enumerate(np.deg2rad(np.arange(-90, 270, 36)))
        ]
    cos, sin = np.cos(rotation), np.sin(rotation)
    points = [(c + x * cos - y * sin, c + x * sin + y * cos) for x, y in corners]
    draw.polygon(points, fill=255)
    return mask


def _pattern_fill(pattern: str, color: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    fill = np.empty((size, size, 3), dtype=np.float32)
    fill[:] = color
    if pattern != "plain":
        yy, xx = np.mgrid[0:size, 0:size]
        period = max(4, size // 5)
        if pattern == "striped":
            on = ((xx + yy + rng.integers(period)) // (period // 2)) % 2 == 0
        else:
            on = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.2) ** 2
        fill[on] = 255.0
    return Image.fromarray(fill.clip(0, 255).astype(np.uint8))


def render(objects: Sequence[str], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``objects`` (class names) on a noisy pale background."""
    background = rng.integers(170, 240, size=3).astype(np.float32)
    pixels = background + rng.normal(0, 8, size=(image_size, image_size, 3))
    canvas = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    scale = 1.0 if len(objects) == 1 else 0.6
    for name in objects:
        color_name, pattern, shape = _parse(name)
        size = int(image_size * scale * rng.uniform(0.5, 0.85))
        size = max(8, min(size, image_size))
        color = np.asarray(COLORS[color_name], dtype=np.float32) + rng.normal(0, 12, size=3)
        mask = _shape_mask(shape, size, rng.uniform(0, 2 * np.pi))
        x, y = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
        canvas.paste(_pattern_fill(pattern, color, size, rng), (x, y), mask)
    return canvas


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _write(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=92)


def generate(spec: SyntheticSpec, out_dir: Path) -> dict:
    """Write images, list files and class names under ``out_dir``.

    Returns the paths of the written lists, relative to ``out_dir``:
    ``{"train": "train.txt", "val": ..., "test": ..., "classnames": "classnames.txt"}``.
    Lines read ``relative/path label`` (single-label, like ImageNet-LT) or
    ``relative/path l1 l2 ...`` (multi-label, like COCO-LT).
    """
    spec.validate()
    out_dir = Path(out_dir)
    names = class_names(spec.classes)
    train_counts = long_tailed_counts(spec.max_per_class, spec.classes, spec.imbalance)
    prior = np.asarray(train_counts, dtype=np.float64)
    prior /= prior.sum()

    lists = {}
    for split in SPLITS:
        if split == "val" and not spec.val_per_class:
            continue
        if split == "train":
            primaries = [c for c, n in enumerate(train_counts) for _ in range(n)]
        else:
            per_class = spec.val_per_class if split == "val" else spec.test_per_class
            primaries = [c for c in range(spec.classes) for _ in range(per_class)]
        lines = []
        for index, primary in enumerate(primaries):
            rng = _image_rng(spec.seed, split, index)
            labels = [primary]
            if spec.multilabel:
                extra = int(rng.integers(0, spec.max_objects))
                # Train extras follow the long tail; evaluation extras are uniform.
                p = prior if split == "train" else None
                for c in rng.choice(spec.classes, size=extra, p=p):
                    if int(c) not in labels:
                        labels.append(int(c))
                rel = f"images/{split}/{index:05d}.jpg"
            else:
                rel = f"images/{split}/{primary:03d}/{index:05d}.jpg"
            _write(render([names[c] for c in labels], spec.image_size, rng), out_dir / rel)
            lines.append(" ".join([rel] + [str(c) for c in sorted(labels)]))
        (out_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")
        lists[split] = f"{split}.txt"
    (out_dir / "classnames.txt").write_text("\n".join(names) + "\n")
    lists["classnames"] = "classnames.txt"
    return lists
