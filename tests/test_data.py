import hashlib

import numpy as np
import pytest

from ltpipe.data.manifest import DatasetSource, build, group_of, load, save
from ltpipe.data.synthetic import SyntheticSpec, class_names, generate, long_tailed_counts
from ltpipe.errors import DataError
from tests.conftest import TINY, make_source


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_long_tailed_counts_follow_the_ldam_rule():
    counts = long_tailed_counts(5000, 10, 100)
    # The published CIFAR-10-LT (IF 100) class sizes.
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_generation_is_deterministic_and_seeded(tmp_path):
    spec = SyntheticSpec(**TINY)
    generate(spec, tmp_path / "a")
    generate(spec, tmp_path / "b")
    generate(SyntheticSpec(**dict(TINY, seed=1)), tmp_path / "c")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_single_label_splits(tiny_prepared):
    classes = tiny_prepared.classes
    assert list(classes["train_count"]) == long_tailed_counts(40, 6, 10)
    assert (tiny_prepared.split("val").groupby("labels").size() == TINY["val_per_class"]).all()
    assert (tiny_prepared.split("test").groupby("labels").size() == TINY["test_per_class"]).all()
    assert list(classes["name"]) == class_names(6)
    assert all(1 < len(name.split()) <= 3 for name in classes["prompt"])


def test_default_dataset_has_every_group():
    counts = long_tailed_counts(300, 24, 100)
    groups = {group_of(n, multilabel=False) for n in counts}
    assert groups == {"many", "medium", "few"}


def test_multilabel_variant_is_long_tailed(tmp_path):
    source = make_source(tmp_path, multilabel=True, classes=8, max_per_class=60)
    prepared = build(source)
    labels = prepared.label_array("train")
    assert labels.shape[1] == 8
    assert labels.sum(axis=1).max() > 1, "some images must hold several objects"
    freq = labels.sum(axis=0)
    assert freq[0] > 5 * freq[-1], f"label frequencies should be long-tailed, got {freq}"
    assert (freq > 0).all()


@pytest.mark.parametrize("count,multilabel,group", [
    (101, False, "many"), (100, False, "medium"), (20, False, "medium"), (19, False, "few"),
    (100, True, "head"), (99, True, "medium"), (20, True, "medium"), (19, True, "tail"),
])
def test_group_thresholds(count, multilabel, group):
    assert group_of(count, multilabel) == group


def test_manifest_round_trip(tmp_path, tiny_prepared):
    save(tiny_prepared, tmp_path)
    loaded = load(tmp_path)
    assert loaded.manifest.equals(tiny_prepared.manifest)
    assert np.array_equal(loaded.label_array("train"), tiny_prepared.label_array("train"))
    assert list(loaded.classes["group"]) == list(tiny_prepared.classes["group"])


def _lists(tmp_path, train, test=None, names=("cat", "dog")):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    for rel in ["a.jpg", "b.jpg", "c.jpg"]:
        (root / rel).write_bytes(b"x")
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "val.txt").write_text("a.jpg 0\n")
    (tmp_path / "test.txt").write_text(test or "b.jpg 1\n")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    return DatasetSource("custom", root, {s: tmp_path / f"{s}.txt" for s in ("train", "val", "test")},
                         tmp_path / "names.txt", False)


def test_label_out_of_range_names_file_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"label 5 of b.jpg is out of range.*names 2 classes"):
        build(_lists(tmp_path, "a.jpg 0\nb.jpg 5\n"))


def test_missing_images_are_counted_and_named(tmp_path):
    with pytest.raises(DataError, match=r"2 image\(s\) listed are missing under .*root \(first: nope1.jpg"):
        build(_lists(tmp_path, "a.jpg 0\nnope1.jpg 1\nnope2.jpg 1\n"))


def test_missing_images_skipped_on_request_are_reported(tmp_path):
    from ltpipe.data.manifest import PrepareOptions

    prepared = build(_lists(tmp_path, "a.jpg 0\nnope1.jpg 1\nc.jpg 1\n"), PrepareOptions(on_bad_image="skip"))
    assert prepared.split("train")["path"].tolist() == ["a.jpg", "c.jpg"]
    assert prepared.report["missing_skipped"] == ["nope1.jpg"]


def test_class_without_training_image(tmp_path):
    with pytest.raises(DataError, match=r"1 class\(es\).*no training image: 1 \(dog\)"):
        build(_lists(tmp_path, "a.jpg 0\nc.jpg 0\n"))


def test_single_label_line_with_two_labels(tmp_path):
    with pytest.raises(DataError, match=r"train.txt:1: a single-label list needs exactly one label"):
        build(_lists(tmp_path, "a.jpg 0 1\n"))


def test_numeric_class_names_stay_text(tmp_path):
    source = _lists(tmp_path, "a.jpg 0\nc.jpg 1\n", names=("1", "2"))
    prepared = build(source)
    save(prepared, tmp_path / "out")
    loaded = load(tmp_path / "out")
    assert loaded.classes["name"].tolist() == ["1", "2"] and loaded.classes["prompt"].tolist() == ["1", "2"]
