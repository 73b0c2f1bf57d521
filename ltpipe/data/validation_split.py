"""A validation split carved from the training list, when a dataset publishes none."""

from typing import Dict, List, Tuple

import numpy as np

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, DataError
from ltpipe.data.checks import class_counts
from ltpipe.data.formats import Entry
from ltpipe.data.source import DatasetSource, PrepareOptions


def carve_validation(train: List[Entry], num_classes: int, fraction: float, seed: int,
                     multilabel: bool) -> Tuple[List[Entry], List[Entry]]:
    """A stratified validation split of ``round(fraction * N)`` images taken from train
    (fewer only where taking more would empty a class's training set).

    Each image belongs to the stratum of its rarest label (single-label: its class; multi-label
    images without labels form one stratum). The total is shared among the strata in proportion
    to their sizes by the largest-remainder method (ties: the rarer stratum, then a seeded draw),
    so the outcome stays proportional when strata are smaller than ``1 / fraction``, where
    rounding each stratum's share on its own carved nothing. Strata are then served rarest first,
    as in iterative stratification (Sechidis et al., ECML-PKDD 2011), each image in a seeded
    random order and skipped when it holds the last training image of one of its labels; a
    share a stratum cannot give passes to the next ones.
    """
    del multilabel  # one rule for both: a single-label image's rarest label is its class
    counts = class_counts(train, num_classes)
    strata: Dict[int, List[int]] = {}
    for i, (_, labels) in enumerate(train):
        key = min(labels, key=lambda c: (counts[c], c)) if labels else -1
        strata.setdefault(key, []).append(i)
    keys = sorted(strata, key=lambda k: (len(strata[k]), k))  # rarest first
    rng = np.random.default_rng(seed)
    sizes = np.array([len(strata[k]) for k in keys])
    quotas = fraction * sizes
    shares = np.floor(quotas).astype(np.int64)
    remainders = np.round(quotas - shares, 9)  # equal sizes must tie despite float noise
    draw = rng.permutation(len(keys))
    by_remainder = sorted(range(len(keys)), key=lambda j: (-remainders[j], sizes[j], draw[j]))
    target = int(np.floor(fraction * len(train) + 0.5))
    shares[by_remainder[:max(0, target - int(shares.sum()))]] += 1

    remaining = counts.copy()
    chosen = np.zeros(len(train), dtype=bool)
    orders = {key: rng.permutation(strata[key]) for key in keys}

    def take(i: int) -> bool:
        labels = set(train[i][1])
        if chosen[i] or not all(remaining[c] > 1 for c in labels):
            return False
        chosen[i] = True
        for c in labels:
            remaining[c] -= 1
        return True

    owed = 0
    for key, share in zip(keys, shares):
        share += owed
        for i in orders[key]:
            if share == 0:
                break
            share -= take(int(i))
        owed = share
    for key in keys:  # what the last strata could not give, from any stratum that still can
        for i in orders[key]:
            if owed == 0:
                break
            owed -= take(int(i))
    return ([e for i, e in enumerate(train) if not chosen[i]], [e for i, e in enumerate(train) if chosen[i]])


def carve_report(entries: Dict[str, List[Entry]], list_counts: np.ndarray, names: List[str],
                  options: PrepareOptions, source: DatasetSource) -> dict:
    carved, listed = len(entries["val"]), int(len(entries["val"]) + len(entries["train"]))
    if not carved:
        raise DataError(
            f"no validation image could be carved from {source.name}'s train list ({listed} images, "
            f"`prepare.val_fraction` {options.val_fraction}): "
            + ("every class has a single training image. " if (list_counts <= 1).all() else
               f"{options.val_fraction} of {listed} rounds to 0. ")
            + "Give a `val_list`, or raise `prepare.val_fraction`.")
    without = np.flatnonzero(class_counts(entries["val"], len(names)) == 0)
    return {"carved_from_train": carved, "fraction": options.val_fraction,
            "achieved_fraction": round(carved / listed, 4), "train_list_images": listed, "seed": options.split_seed,
            "classes_without_validation": [int(i) for i in without]}



# Choices that decide on the validation split, refused where there is none. The train and evaluate stages
# refuse them with these messages; prepare refuses the main experiment's too, before any image is encoded
# (an extraction takes hours on a benchmark), reading them to validate only.
POSTHOC_WITHOUT_VALIDATION = (
    "`evaluate.posthoc: logit_adjust` chooses its tau on the validation split, and there is none "
    "(`prepare.val_fraction: 0`): set `evaluate.posthoc: none`, or carve a validation split with "
    "`prepare.val_fraction` > 0.")


def select_without_validation(key: str, why: str) -> ConfigError:
    """The refusal of ``{key}.select: best_val`` when there is no validation split (``why``)."""
    return ConfigError(f"there is no validation split ({why}), so `{key}.select: best_val` has nothing to "
                       f"choose on: set `{key}.select: last` (keep the last model, as the papers do on lists "
                       "without validation), or carve one with `prepare.val_fraction` > 0.")


def check_choices_without_validation(params: Params, why: str) -> None:
    """Refuse the main experiment's choices that need a validation split, when the prepared data has none."""
    if params.str("train.select") == "best_val":
        raise select_without_validation("train", why)
    if params.str("evaluate.posthoc") == "logit_adjust":
        raise ConfigError(POSTHOC_WITHOUT_VALIDATION)
