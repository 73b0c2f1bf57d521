"""Training samplers keyed by the names users type (`sampler:`).

A sampler yields one epoch of training indices from ``(seed, epoch)``, so data
order differs across seeds (Imbalance-VLM seeded by the epoch only, so its seeds
shared one data order) and is reproducible for a fixed seed.
"""

from typing import Callable, List

import numpy as np

from ltpipe.core.registry import Registry

Sampler = Callable[[List[np.ndarray], int, int, int], np.ndarray]
SAMPLERS: Registry[Sampler] = Registry("sampler", "sampler")


def class_members(labels: np.ndarray, num_classes: int) -> List[np.ndarray]:
    """Indices of the training images of each class (multi-label: every class an image has),
    each in increasing order."""
    if labels.ndim == 1:
        # One stable sort instead of one pass over the labels per class (8,142 classes on iNat).
        valid = np.flatnonzero((labels >= 0) & (labels < num_classes))
        valid_labels = labels[valid].astype(np.int64)
        order = valid[np.argsort(valid_labels, kind="stable")]
        counts = np.bincount(valid_labels, minlength=num_classes)
        return np.split(order, np.cumsum(counts)[:-1]) if num_classes else []
    classes, images = np.nonzero(np.asarray(labels)[:, :num_classes].T)
    counts = np.bincount(classes, minlength=num_classes)
    return np.split(images, np.cumsum(counts)[:-1]) if num_classes else []


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def class_weighted_draw(members: List[np.ndarray], num_samples: int, seed: int, epoch: int,
                        exponent: float) -> np.ndarray:
    """``num_samples`` draws *with replacement*: each picks class c with probability
    ``n_c^exponent / sum_k n_k^exponent`` (``n_c = len(members[c])``; classes without
    images are never picked), then one of its images uniformly.

    exponent 0 is class-balanced, 1/2 square-root sampling, 1 (for multi-label,
    approximately) instance sampling with replacement. Vectorised: one class draw, one
    uniform draw and one gather for the whole epoch.
    """
    rng = epoch_rng(seed, epoch)
    present = [m for m in members if len(m)]
    if not present:
        raise ValueError("no class has a training image to sample")
    sizes = np.array([len(m) for m in present], dtype=np.int64)
    if exponent == 0:
        # The uniform case draws class indices directly; kept so that earlier class_balanced runs
        # keep their exact data order.
        classes = rng.integers(0, len(present), size=num_samples)
    else:
        cdf = np.cumsum(sizes.astype(np.float64) ** exponent)
        cdf /= cdf[-1]
        classes = np.minimum(np.searchsorted(cdf, rng.random(num_samples), side="right"), len(present) - 1)
    picks = rng.random(num_samples)
    within = (picks * sizes[classes]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.concatenate(present).astype(np.int64, copy=False)[starts[classes] + within]


@SAMPLERS.register("instance")
def instance(members: List[np.ndarray], num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Every training image once per epoch, in a random order."""
    return epoch_rng(seed, epoch).permutation(num_samples)


@SAMPLERS.register("class_balanced")
def class_balanced(members: List[np.ndarray], num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Class-balanced sampling *with replacement* (Kang et al., ICLR 2020): each draw
    picks a class uniformly, then one of its images uniformly. Imbalance-VLM drew
    without replacement, which caps a class at its own size and is not balanced."""
    return class_weighted_draw(members, num_samples, seed, epoch, exponent=0.0)


@SAMPLERS.register("sqrt")
def sqrt(members: List[np.ndarray], num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Square-root sampling (Mahajan et al., ECCV 2018; Kang et al., ICLR 2020, Sec. 3):
    each draw picks class c with probability ``sqrt(n_c) / sum_k sqrt(n_k)``, then one of
    its images uniformly, with replacement. Multi-label: ``n_c`` counts every image that
    has class c, and the image is drawn from those. Imbalance-VLM has no such sampler."""
    return class_weighted_draw(members, num_samples, seed, epoch, exponent=0.5)


# ---------------------------------------------------------------- block-shuffled epochs (`train.shuffle: blocks`)

# The third key of the generator that orders blocks: a stream apart from the sampler's ([seed, epoch])
# and the augmented views' ([seed, epoch, 7]), so `shuffle: rows` draws exactly what it drew before.
BLOCK_STREAM = 2


def block_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, BLOCK_STREAM])


def block_order(order: np.ndarray, block_rows: int, block_buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The rows of ``order`` (one epoch of a sampler, repeats allowed) re-ordered for reading a file
    in whole blocks: rows are grouped by their block (``row // block_rows``), the blocks drawn are
    visited in a random order, and the rows of each window of ``block_buffer`` consecutive visited
    blocks are shuffled together. The multiset of rows is exactly ``order``'s; only the order changes,
    and every block's rows fall in one window, so a block is needed during one stretch of the epoch."""
    order = np.asarray(order, dtype=np.int64)
    blocks, block_of_row = np.unique(order // block_rows, return_inverse=True)
    visit = np.empty(len(blocks), dtype=np.int64)
    visit[rng.permutation(len(blocks))] = np.arange(len(blocks))  # visit[b]: when block b is visited
    window = visit[block_of_row.reshape(-1)] // block_buffer
    return order[np.lexsort((rng.random(len(order)), window))]


def classes_per_batch(labels: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Mean number of distinct classes in the full batches of ``order`` (multi-label: classes present)."""
    full = len(order) // batch_size
    if full == 0:
        return 0.0
    batches = np.asarray(order[:full * batch_size]).reshape(full, batch_size)
    if labels.ndim == 1:
        ranked = np.sort(labels[batches], axis=1)
        return float(np.mean(1 + np.count_nonzero(np.diff(ranked, axis=1), axis=1)))
    return float(np.mean([np.count_nonzero(np.asarray(labels[batch]).any(axis=0)) for batch in batches]))
