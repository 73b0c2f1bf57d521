import numpy as np

from ltpipe.samplers import SAMPLERS, class_members

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
