"""Augmented training views cached at extraction (`extract.views`)."""

import hashlib

import h5py
import numpy as np
import torch

from ltpipe.evaluation.inference import ViewInput
from ltpipe.features import extract
from ltpipe.features.store import SplitFeatures


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_crop_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for width, height in [(64, 64), (300, 40), (40, 300), (1, 1)]:
        for _ in range(200):
            top, left, h, w = extract.random_resized_crop_box(rng, width, height)
            assert 0 <= top and 0 <= left and 0 < h and 0 < w
            assert top + h <= height and left + w <= width
    for _ in range(200):  # the smallest crop honours the scale bound (up to rounding)
        top, left, h, w = extract.random_resized_crop_box(rng, 64, 64, scale=(0.5, 1.0))
        assert h * w >= 0.5 * 64 * 64 * 0.9


def test_views_are_seeded_per_image_and_view(tiny_prepared):
    files = extract.ImageFiles(tiny_prepared.root, tiny_prepared.split("train")["path"].tolist(), None)
    views = extract.AugmentedViews(files, 3, 64, (0.5,) * 3, (0.5,) * 3, seed=0)
    assert len(views) == 3 * len(files)
    a, _, _ = views[4]
    b, _, _ = views[4]
    torch.testing.assert_close(a, b)  # the same item is the same crop, whenever it is asked for
    assert a.shape == (3, 64, 64)
    assert not torch.equal(views[3][0], views[4][0])  # views of one image differ
    other_seed = extract.AugmentedViews(files, 3, 64, (0.5,) * 3, (0.5,) * 3, seed=1)
    assert not torch.equal(other_seed[4][0], a)


def test_views_file_layout_and_determinism(tmp_path, tiny_prepared, tiny_weights, tiny_features):
    def run(workers, out):
        options = extract.ExtractOptions(batch_size=16, workers=workers, views=2, checkpoint_every=32)
        return extract.run(tiny_prepared, tiny_weights, options, out, torch.device("cpu"), "fp32",
                           tmp_path / f"partial-{workers}")

    report = run(0, tmp_path / "a")
    run(2, tmp_path / "b")  # worker processes draw the same crops
    assert sha(tmp_path / "a/train_views.h5") == sha(tmp_path / "b/train_views.h5")
    for name in ("train.h5", "val.h5", "test.h5"):  # the clean splits are untouched by views
        assert sha(tmp_path / "a" / name) == sha(tiny_features / name)
    n = len(tiny_prepared.split("train"))
    assert report["train_views"]["images"] == 2 * n
    with h5py.File(tmp_path / "a/train_views.h5", "r") as fh, h5py.File(tiny_features / "train.h5", "r") as clean:
        assert fh["pooled"].shape == (2 * n, clean["pooled"].shape[1])
        assert fh["tokens"].shape[1:] == clean["tokens"].shape[1:]
        assert np.array_equal(fh["labels"][::2], clean["labels"][:]) and np.array_equal(fh["labels"][1::2],
                                                                                          clean["labels"][:])
        assert int(fh.attrs["views"]) == 2
        assert not np.array_equal(fh["pooled"][0], clean["pooled"][0])


def test_view_input_draws_one_view_per_image_per_epoch(tmp_path, tiny_prepared, tiny_weights):
    options = extract.ExtractOptions(batch_size=16, workers=0, views=3, tokens=False)
    extract.run(tiny_prepared, tiny_weights, options, tmp_path, torch.device("cpu"), "fp32", tmp_path / "p")
    views = SplitFeatures(tmp_path / "train_views.h5")
    data = ViewInput(views, "pooled", torch.device("cpu"), 3, seed=0)
    assert len(data) == len(tiny_prepared.split("train"))
    assert np.array_equal(data.labels, tiny_prepared.label_array("train"))
    index = np.arange(len(data))
    data.set_epoch(0)
    first = data._choice.copy()
    np.testing.assert_array_equal(data.batch(index).numpy(), views.pooled[index * 3 + first])
    data.set_epoch(1)
    assert not np.array_equal(first, data._choice)
    assert set(np.unique(np.concatenate([first, data._choice]))) == {0, 1, 2}
