import math

import numpy as np
import pytest

from ltpipe.training.samplers import SAMPLERS, class_members, class_weighted_draw

LABELS = np.repeat(np.arange(4), [400, 100, 20, 5])


def test_instance_is_a_seeded_permutation():
    members = class_members(LABELS, 4)
    a = SAMPLERS.get("instance")(members, len(LABELS), 0, 0)
    assert sorted(a) == list(range(len(LABELS)))
    assert np.array_equal(a, SAMPLERS.get("instance")(members, len(LABELS), 0, 0))
    assert not np.array_equal(a, SAMPLERS.get("instance")(members, len(LABELS), 1, 0))
    assert not np.array_equal(a, SAMPLERS.get("instance")(members, len(LABELS), 0, 1))


def test_class_balanced_draws_classes_uniformly_with_replacement():
    members = class_members(LABELS, 4)
    draws = np.concatenate([SAMPLERS.get("class_balanced")(members, len(LABELS), 0, e) for e in range(20)])
    counts = np.bincount(LABELS[draws], minlength=4)
    expected = len(draws) / 4
    # 20 epochs x 525 draws: each class within 5 % of a quarter (binomial sd ~ 1 %).
    assert np.all(np.abs(counts - expected) < 0.05 * expected), counts
    # The 5-image class is drawn far more often than it has images: with replacement.
    one_epoch = SAMPLERS.get("class_balanced")(members, len(LABELS), 0, 0)
    assert (LABELS[one_epoch] == 3).sum() > 5 * 10


def test_multilabel_class_members():
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=np.uint8)
    members = class_members(labels, 3)
    assert [list(m) for m in members] == [[0, 2], [1], [0, 1]]


def loop_class_balanced(members, num_samples, seed, epoch):
    """The class_balanced sampler as it was before the shared helper (one Python step per draw)."""
    rng = np.random.default_rng([seed, epoch])
    present = [m for m in members if len(m)]
    classes = rng.integers(0, len(present), size=num_samples)
    picks = rng.random(num_samples)
    sizes = np.array([len(m) for m in present])
    within = (picks * sizes[classes]).astype(np.int64)
    return np.array([present[c][i] for c, i in zip(classes, within)], dtype=np.int64)


def test_class_balanced_keeps_its_exact_draws():
    # Earlier runs keep their data order: same indices as the per-sample loop, for any (seed, epoch).
    members = class_members(LABELS, 4)
    for seed, epoch in ((0, 0), (1, 0), (0, 3), (7, 11)):
        new = SAMPLERS.get("class_balanced")(members, len(LABELS), seed, epoch)
        assert new.dtype == np.int64
        assert np.array_equal(new, loop_class_balanced(members, len(LABELS), seed, epoch))
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=np.uint8)
    ml_members = class_members(labels, 3)
    assert np.array_equal(SAMPLERS.get("class_balanced")(ml_members, 50, 2, 1),
                          loop_class_balanced(ml_members, 50, 2, 1))


def within_binomial(counts, probs, draws, sds=5.0):
    """Every count within `sds` binomial standard deviations sqrt(n p (1 - p)) of n p."""
    expected = draws * np.asarray(probs)
    sd = np.sqrt(draws * np.asarray(probs) * (1 - np.asarray(probs)))
    return np.all(np.abs(counts - expected) < sds * sd), (counts, expected, sd)


def test_sqrt_draws_classes_by_square_root_frequency():
    members = class_members(LABELS, 4)
    draws = np.concatenate([SAMPLERS.get("sqrt")(members, len(LABELS), 0, e) for e in range(40)])
    counts = np.bincount(LABELS[draws], minlength=4)
    # sqrt([400, 100, 20, 5]) = [20, 10, 4.472, 2.236], sum 36.708.
    probs = np.array([20, 10, math.sqrt(20), math.sqrt(5)]) / (30 + math.sqrt(20) + math.sqrt(5))
    assert probs == pytest.approx([0.5448, 0.2724, 0.1218, 0.0609], abs=1e-4)
    # 40 epochs x 525 = 21,000 draws: binomial sd 72, 64, 47 and 35 draws; 5 sd can only fail by a bug.
    ok, detail = within_binomial(counts, probs, len(draws))
    assert ok, detail
    # Not the instance (76 / 19 / 4 / 1 %) nor the class-balanced (25 % each) distribution.
    assert counts[0] < 0.6 * len(draws) and counts[3] > 0.05 * len(draws)


def test_sqrt_draws_images_uniformly_within_a_class_with_replacement():
    members = class_members(LABELS, 4)
    draws = np.concatenate([SAMPLERS.get("sqrt")(members, len(LABELS), 1, e) for e in range(40)])
    tail = draws[LABELS[draws] == 3]
    # The 5-image class is drawn ~32 times per epoch, more than it has images: with replacement.
    assert len(tail) > 40 * 5 * 4
    per_image = np.bincount(tail - members[3][0], minlength=5)
    ok, detail = within_binomial(per_image, [0.2] * 5, len(tail))
    assert ok, detail


def test_sqrt_is_seeded_by_seed_and_epoch():
    members = class_members(LABELS, 4)
    sqrt = SAMPLERS.get("sqrt")
    a = sqrt(members, len(LABELS), 0, 0)
    assert a.dtype == np.int64 and len(a) == len(LABELS)
    assert np.array_equal(a, sqrt(members, len(LABELS), 0, 0))
    assert not np.array_equal(a, sqrt(members, len(LABELS), 1, 0))
    assert not np.array_equal(a, sqrt(members, len(LABELS), 0, 1))


def test_sqrt_multilabel_draws_a_class_then_one_of_its_images():
    # Class 0: images 0, 1; class 1: image 1 only; class 2: images 2, 3, 4, 5, 6, 7, 8, 9 (n = 2, 1, 8).
    labels = np.zeros((10, 3), dtype=np.uint8)
    labels[[0, 1], 0] = 1
    labels[1, 1] = 1
    labels[2:, 2] = 1
    members = class_members(labels, 3)
    draws = np.concatenate([SAMPLERS.get("sqrt")(members, 1000, 0, e) for e in range(20)])
    # P(class) = sqrt(n) / (sqrt 2 + 1 + sqrt 8); an image's frequency sums P(class) / n over its classes.
    total = math.sqrt(2) + 1 + math.sqrt(8)
    p_class = [math.sqrt(2) / total, 1 / total, math.sqrt(8) / total]
    p_image = [p_class[0] / 2, p_class[0] / 2 + p_class[1]] + [p_class[2] / 8] * 8
    ok, detail = within_binomial(np.bincount(draws, minlength=10), p_image, len(draws))
    assert ok, detail


def test_class_weighted_draw_skips_empty_classes_at_inat_scale():
    # iNaturalist 2018 scale: 437,513 images over 8,142 long-tailed classes.
    rng = np.random.default_rng(0)
    weights = np.arange(1, 8143) ** -0.75
    labels = rng.choice(8142, size=437_513, p=weights / weights.sum())
    members = class_members(labels, 8143)  # one extra class without images
    draws = SAMPLERS.get("sqrt")(members, len(labels), 0, 0)
    balanced = SAMPLERS.get("class_balanced")(members, len(labels), 0, 0)
    assert len(draws) == len(balanced) == len(labels) and draws.max() < len(labels)
    # ~54 balanced draws a class: every class with images is drawn (an empty class taking a share
    # would crash or mislabel draws instead).
    assert (np.bincount(labels[balanced], minlength=8142) > 0).all()
    assert np.array_equal(np.sort(np.concatenate(members)), np.arange(len(labels)))
    assert [len(m) for m in members] == list(np.bincount(labels, minlength=8143))
    with pytest.raises(ValueError, match="no class has a training image"):
        class_weighted_draw([np.array([], dtype=np.int64)], 3, 0, 0, 0.5)


def test_class_members_match_a_per_class_scan():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, size=200)
    assert all(np.array_equal(m, np.flatnonzero(labels == c)) for c, m in enumerate(class_members(labels, 8)))
    multi = rng.random((50, 6)) < 0.3
    assert all(np.array_equal(m, np.flatnonzero(multi[:, c])) for c, m in enumerate(class_members(multi, 6)))
