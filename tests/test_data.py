import hashlib
from pathlib import Path

import numpy as np
import pytest

from ltpipe.core.errors import DataError
from ltpipe.data.manifest import build, group_of, load, save
from ltpipe.data.source import DatasetSource
from ltpipe.datasets.synthetic import SyntheticSpec, class_names, generate, long_tailed_counts
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
    from ltpipe.data.source import PrepareOptions

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


# ---------------------------------------------------------------- issue 15: carve, dropped classes, prompts, params


def _single(counts):
    return [(f"{c}/{i}.jpg", (c,)) for c, n in enumerate(counts) for i in range(n)]


def _per_class(entries, num_classes):
    return np.bincount([labels[0] for _, labels in entries], minlength=num_classes).tolist()


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.25, 0.5])
@pytest.mark.parametrize("counts", [[4] * 30, [3] * 50, [120, 40, 12, 6, 3, 2, 2], [9, 7, 5, 5, 3, 2]],
                         ids=["30x4", "50x3", "long_tail", "small_tail"])
def test_single_label_carve_is_proportional(counts, fraction):
    """round(fraction * N) images (half up), each class giving floor or ceil of its share
    fraction * n_c; the classes rounded up are those with the largest remainders."""
    from ltpipe.data.validation_split import carve_validation

    rest, val = carve_validation(_single(counts), len(counts), fraction, 0, multilabel=False)
    taken = _per_class(val, len(counts))
    assert len(val) == int(np.floor(fraction * sum(counts) + 0.5))
    assert all(int(np.floor(fraction * n + 1e-9)) <= t <= int(np.floor(fraction * n + 1e-9)) + 1 and t < n
               for n, t in zip(counts, taken)), taken
    assert len(rest) + len(val) == sum(counts) and not {p for p, _ in rest} & {p for p, _ in val}


def test_single_label_carve_by_hand():
    from ltpipe.data.validation_split import carve_validation

    # 0.1 * 155 = 15.5 -> 16; shares 10, 4, 1, 0.4, 0.1: the one left over goes to the class of 4.
    _, val = carve_validation(_single([100, 40, 10, 4, 1]), 5, 0.1, 0, False)
    assert _per_class(val, 5) == [10, 4, 1, 1, 0]
    # 1000 classes of 4 images: per-class rounding carved none; 0.1 * 4000 = 400, one from 400 classes.
    _, val = carve_validation(_single([4] * 1000), 1000, 0.1, 0, False)
    assert sorted(set(_per_class(val, 1000))) == [0, 1] and len(val) == 400


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5])
def test_multilabel_carve_on_small_data_is_proportional(tmp_path_factory, fraction):
    """The issue's case: about 100 multi-label training images, where fractions 0.1, 0.2 and 0.25
    carved 0, 8 and 41 (40 %)."""
    from ltpipe.data.formats import read_list
    from ltpipe.data.validation_split import carve_validation

    source = make_source(tmp_path_factory.mktemp("ml"), multilabel=True, classes=8, max_per_class=30, imbalance=10)
    train = read_list(source.lists["train"], True)
    rest, val = carve_validation(train, 8, fraction, 0, multilabel=True)
    assert len(val) == int(np.floor(fraction * len(train) + 0.5)), (len(val), len(train))
    left = np.zeros(8, int)
    for _, labels in rest:
        left[list(labels)] += 1
    assert (left > 0).all(), "a class lost its last training image"


def test_carve_is_determined_by_the_seed():
    from ltpipe.data.validation_split import carve_validation

    train = _single([9, 7, 5, 5, 3, 2])
    assert carve_validation(train, 6, 0.2, 3, False) == carve_validation(train, 6, 0.2, 3, False)
    assert carve_validation(train, 6, 0.2, 3, False)[1] != carve_validation(train, 6, 0.2, 4, False)[1]


def test_carve_is_reported(tmp_path):
    from ltpipe.data.source import PrepareOptions

    source = _lists(tmp_path, "a.jpg 0\n")
    root = source.root
    lines = []
    for c, n in enumerate([12, 3]):
        for i in range(n):
            (root / f"{c}_{i}.jpg").write_bytes(b"x")
            lines.append(f"{c}_{i}.jpg {c}\n")
    (tmp_path / "train.txt").write_text("".join(lines))
    source.lists["val"] = None
    prepared = build(source, PrepareOptions(val_fraction=0.2, split_seed=1))
    # 0.2 * 15 = 3: shares 2.4 and 0.6 -> 2 + 1 (largest remainder).
    assert prepared.report["validation"] == {
        "carved_from_train": 3, "fraction": 0.2, "achieved_fraction": 0.2, "train_list_images": 15, "seed": 1,
        "classes_without_validation": []}
    assert prepared.split("val")["labels"].tolist().count("1") == 1


def test_multilabel_classes_without_training_are_dropped_on_request(tmp_path):
    from ltpipe.data.source import PrepareOptions

    root = tmp_path / "root"
    root.mkdir()
    train = ["t0.jpg 0 2", "t1.jpg 0", "t2.jpg 2 4", "t3.jpg 4"]  # classes 1 and 3: no training image
    test = ["s0.jpg 1", "s1.jpg 0 1 3", "s2.jpg 2 3 4", "s3.jpg"]
    val = ["v0.jpg 3 4"]
    for name, lines in (("train", train), ("test", test), ("val", val)):
        for line in lines:
            (root / line.split()[0]).write_bytes(line.encode())
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\nfish\nfrog\n")
    source = DatasetSource("custom", root, {s: tmp_path / f"{s}.txt" for s in ("train", "val", "test")},
                           tmp_path / "names.txt", True)
    with pytest.raises(DataError, match=r"2 class\(es\).*1 \(dog\), 3 \(fish\).*drop_classes_without_training"):
        build(source)
    prepared = build(source, PrepareOptions(drop_classes_without_training=True))
    assert prepared.classes["name"].tolist() == ["cat", "bird", "frog"]
    assert prepared.classes["index"].tolist() == [0, 1, 2]
    # Old labels 0, 2, 4 become 0, 1, 2; labels of dogs and fish are gone.
    assert prepared.split("train")["labels"].tolist() == ["0 1", "0", "1 2", "2"]
    assert prepared.split("test")["labels"].tolist() == ["", "0", "1 2", ""]
    assert prepared.split("val")["labels"].tolist() == ["2"]
    assert prepared.report["dropped_classes"] == [
        {"id": "dog", "name": "dog", "train_images": 0, "test_images": 2, "val_images": 0},
        {"id": "fish", "name": "fish", "train_images": 0, "test_images": 2, "val_images": 1}]
    save(prepared, tmp_path / "out")
    loaded = load(tmp_path / "out")
    assert loaded.num_classes == 3 and loaded.label_array("test").tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 1],
                                                                                [0, 0, 0]]


def test_single_label_class_without_training_is_refused_even_with_the_drop_option(tmp_path):
    from ltpipe.data.source import PrepareOptions

    with pytest.raises(DataError, match=r"1 \(dog\).*multi-label data only"):
        build(_lists(tmp_path, "a.jpg 0\nc.jpg 0\n"), PrepareOptions(drop_classes_without_training=True))


def test_imagenet_lt_prepares_with_clips_curated_names():
    """Raw synset names repeat ('crane', 'maillot'): the curated list replaces them. CLIP's curated
    list itself repeats two ('missile', 'sunglasses'): kept as published (zero-shot parity) and
    returned to be warned about; any other repeat is refused."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from ltpipe.data.formats import check_distinct_prompts, curated_prompts

    ids = [f"n{i:08d}" for i in range(1000)]
    raw = [f"synset {i}" for i in range(1000)]
    raw[134] = raw[517] = "crane"
    raw[638] = raw[639] = "maillot"
    with pytest.raises(DataError, match=r"classes 134 .* and 517 .*'crane'"):
        check_distinct_prompts(Path("raw.txt"), ["a"] * 1000, raw, raw)
    prompts = curated_prompts(ids, raw)
    assert prompts == list(IMAGENET_CLASSNAMES)
    repeats = check_distinct_prompts(Path("classnames.txt"), ids, raw, prompts)
    assert [(r["prompt"], r["classes"]) for r in repeats] == [("missile", [657, 744]), ("sunglasses", [836, 837])]


def test_prepare_defaults_in_params_yaml_match_the_options():
    import dataclasses

    import yaml

    from ltpipe.data.source import PrepareOptions
    from tests.conftest import REPO

    written = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]
    defaults = {f.name: f.default for f in dataclasses.fields(PrepareOptions)}
    assert {k: written[k] for k in ("allow_links_outside_root", "drop_classes_without_training")} == \
        {k: defaults[k] for k in ("allow_links_outside_root", "drop_classes_without_training")}


def test_list_written_with_backslashes_prepares(tmp_path):
    """Windows-written lists (`imgs\\a.jpg`) are normalised before any check, the wrong-root sample included."""
    source = _lists(tmp_path, "imgs\\c.jpg 0\nimgs\\d.jpg 1\n", test="imgs\\e.jpg 1\n")
    (source.root / "imgs").mkdir()
    for name in ("c.jpg", "d.jpg", "e.jpg"):
        (source.root / "imgs" / name).write_bytes(b"x")
    (tmp_path / "val.txt").write_text("imgs\\f.jpg 0\n")
    (source.root / "imgs" / "f.jpg").write_bytes(b"x")
    prepared = build(source)
    assert prepared.split("train")["path"].tolist() == ["imgs/c.jpg", "imgs/d.jpg"]
