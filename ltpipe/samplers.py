"""Training samplers keyed by the names users type (`sampler:`).

A sampler yields one epoch of training indices from ``(seed, epoch)``, so data
order differs across seeds (Imbalance-VLM seeded by the epoch only, so its seeds
shared one data order) and is reproducible for a fixed seed.
"""

from typing import Callable, List

import numpy as np

from ltpipe.registry import Registry

Sampler = Callable[[List[np.ndarray], int, int, int], np.ndarray]
SAMPLERS: Registry[Sampler] = Registry("sampler", "sampler")


def class_members(labels: np.ndarray, num_classes: int) -> List[np.ndarray]:
    """Indices of the training images of each class (multi-label: every class an image has)."""
    if labels.ndim == 1:
        return [np.flatnonzero(labels == c) for c in range(num_classes)]
    return [np.flatnonzero(labels[:, c]) for c in range(num_classes)]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


@SAMPLERS.register("instance")
def instance(members: List[np.ndarray], num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Every training image once per epoch, in a random order."""
    return epoch_rng(seed, epoch).permutation(num_samples)


@SAMPLERS.register("class_balanced")
def class_balanced(members: List[np.ndarray], num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Class-balanced sampling *with replacement* (Kang et al., ICLR 2020): each draw
    picks a class uniformly, then one of its images uniformly. Imbalance-VLM drew
    without replacement, which caps a class at its own size and is not balanced."""
    rng = epoch_rng(seed, epoch)
    present = [m for m in members if len(m)]
    classes = rng.integers(0, len(present), size=num_samples)
    picks = rng.random(num_samples)
    sizes = np.array([len(m) for m in present])
    within = (picks * sizes[classes]).astype(np.int64)
    return np.array([present[c][i] for c, i in zip(classes, within)], dtype=np.int64)
