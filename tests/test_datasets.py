"""Every dataset name on tiny generated trees in its published format, and each bad input."""

import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, DataError
from ltpipe.data.formats import curated_prompts, read_classnames
from ltpipe.data.manifest import build
from ltpipe.data.source import DatasetSource, PrepareOptions
from ltpipe.data.validation_split import carve_validation
from ltpipe.datasets import cifar
from ltpipe.datasets.prepare import prepare
from ltpipe.datasets.registry import BENCHMARKS, DATASETS

PREPARE = {"scan_images": False, "on_bad_image": "fail", "workers": 0, "val_fraction": 0.1, "split_seed": 0}


def params(dataset, section, **prepare_overrides):
    return Params({"dataset": dataset, "datasets": {dataset: section}, "prepare": dict(PREPARE, **prepare_overrides)})


def counts_for(num_classes):
    """Long-tailed: class 0 has 120 images, falling to 2 by class 20 (keeps 8,142-class trees small)."""
    return [max(2, int(120 * (2 / 120) ** (min(c, 20) / 20))) for c in range(num_classes)]


def write_names(path, fmt, num_classes):
    if fmt == "id_name":
        path.write_text("".join(f"n{c:08d} class_{c}\n" for c in range(num_classes)))
    elif fmt == "name_index":
        path.write_text("".join(f"class_{c} {c}\n" for c in range(num_classes)))
    elif fmt == "inat_json":
        path.write_text(json.dumps([{"id": c, "name": f"Species {c}", "kingdom": "Plantae"}
                                    for c in range(num_classes)]))
    else:
        path.write_text("".join(f"class_{c}\n" for c in range(num_classes)))


def make_tree(root, num_classes, multilabel, with_val, names_file, names_format, lists):
    """Placeholder files (existence is what prepare checks unless it scans) and published-format lists."""
    root.mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "val": [], "test": []}
    for c, n in enumerate(counts_for(num_classes)):
        for i in range(n):
            rel = f"train/{c}/{i}.jpg"
            extra = f" {c + 1}" if multilabel and i % 3 == 0 and c + 1 < num_classes else ""
            lines["train"].append(f"{rel} {c}{extra}")
        lines["test"].append(f"test/{c}.jpg {c}")
        lines["val"].append(f"val/{c}.jpg {c}")
    if multilabel:
        lines["test"].append("test/unlabelled.jpg")  # negative for every class, as in COCO-LT
    for split, split_lines in lines.items():
        if split == "val" and not with_val:
            continue
        for line in split_lines:
            path = root / line.split()[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        (root / lists[split]).write_text("\n".join(split_lines) + "\n")
    write_names(root / names_file, names_format, num_classes)


# The files of each benchmark's published layout, written here independently of the registry's defaults.
DEFAULT_LISTS = {
    "imagenet_lt": ("ImageNet_LT_{}.txt", "classnames.txt"),
    "places_lt": ("Places_LT_{}.txt", "classnames.txt"),
    "inat18": ("iNaturalist18_{}.txt", "categories.json"),
    "coco_lt": ("coco_lt_{}.txt", "coco_labels.txt"),
    "voc_lt": ("voc_lt_{}.txt", "voc_labels.txt"),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_in_its_published_format(tmp_path, name):
    spec = BENCHMARKS[name]
    pattern, names_file = DEFAULT_LISTS[name]
    with_val = name in ("imagenet_lt", "places_lt")
    lists = {s: pattern.format(s) for s in ("train", "val", "test")}
    if name == "inat18":
        lists["test"] = "iNaturalist18_val.txt"  # iNat-2018's val list is the test set
    make_tree(tmp_path / "root", spec.classes, spec.multilabel, with_val, names_file, spec.names_format, lists)
    # Only `root`: the default list and class-name files must be the published layout's.
    prepared = prepare(params(name, {"root": str(tmp_path / "root")}), tmp_path / "out")
    assert prepared.num_classes == spec.classes
    assert prepared.multilabel == spec.multilabel
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert ("validation" in report) == (not with_val)
    assert set(prepared.split("val")["path"]).isdisjoint(prepared.split("test")["path"])
    assert set(prepared.split("val")["path"]).isdisjoint(prepared.split("train")["path"])
    assert (prepared.classes["train_count"] > 0).all()
    # Groups follow the published list, before carving: class 0 (120 images) is head/many.
    assert prepared.classes["group"][0] == ("head" if spec.multilabel else "many")
    assert prepared.classes["list_count"][0] == 120
    if spec.multilabel:
        labels = prepared.label_array("test")
        assert labels.shape == (spec.classes + 1, spec.classes) and labels[-1].sum() == 0


def test_imagenet_prompts_are_clips_curated_names():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    ids = [f"n{i:08d}" for i in range(1000)]
    assert curated_prompts(ids, [f"x{i}" for i in range(1000)]) == list(IMAGENET_CLASSNAMES)
    assert curated_prompts(["a", "b"], ["traffic_light", "diningtable"]) == ["traffic light", "dining table"]


def test_class_name_formats(tmp_path):
    (tmp_path / "a.txt").write_text("n01440764 tench\nn01443537 great white shark\n")
    assert read_classnames(tmp_path / "a.txt", "id_name") == [("n01440764", "tench"),
                                                                ("n01443537", "great white shark")]
    (tmp_path / "b.txt").write_text("person 0\ntraffic light 1 \n")
    assert read_classnames(tmp_path / "b.txt", "name_index") == [("person", "person"),
                                                                  ("traffic light", "traffic light")]
    (tmp_path / "c.txt").write_text("person 0\ncar 2\n")
    with pytest.raises(DataError, match=r"c.txt:2: class 'car' has index 2, but its line gives index 1"):
        read_classnames(tmp_path / "c.txt", "name_index")
    (tmp_path / "d.json").write_text('[{"id": 0, "name": "A"}, {"id": 2, "name": "B"}]')
    with pytest.raises(DataError, match="ids must be 0..1 without gaps"):
        read_classnames(tmp_path / "d.json", "inat_json")
    (tmp_path / "e.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="is not an iNaturalist categories.json"):
        read_classnames(tmp_path / "e.json", "inat_json")


# ---------------------------------------------------------------- bad inputs
def small_source(tmp_path, train="a.jpg 0\nb.jpg 1\n", test="c.jpg 1\n", val="d.jpg 0\n", names="cat\ndog\n",
                 expected=None):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    for rel in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (root / rel).write_bytes(b"x")
    files = {"train": train, "test": test, "val": val}
    lists = {}
    for split, text in files.items():
        if text is not None:
            (tmp_path / f"{split}.txt").write_text(text)
        lists[split] = tmp_path / f"{split}.txt" if text is not None else None
    (tmp_path / "names.txt").write_text(names)
    return DatasetSource("custom", root, lists, tmp_path / "names.txt", False, "plain", expected)


@pytest.mark.parametrize("train,message", [
    ("a.jpg 0\n../../etc/passwd 1\n", r"1 path\(s\) leave the dataset root \(../../etc/passwd\)"),
    ("/etc/passwd 0\nb.jpg 1\n", r"leave the dataset root \(/etc/passwd\)"),
    ("a.jpg 0\nb.jpg 1\na.jpg 0\n", r"1 path\(s\) listed twice \(a.jpg\)"),
    ("a.jpg 0\nb.jpg 1\nc.jpg 1\n", r"1 image\(s\) are in both the train and the test list .*\(c.jpg\)"),
    ("a.jpg 0\nb.jpg 2\n", r"label 2 of b.jpg is out of range.*class count disagrees with the names file"),
    ("a.jpg 0\nb.jpg zero\n", r"train.txt:2: labels must be integers"),
    ("", r"train.txt is empty"),
])
def test_bad_lists(tmp_path, train, message):
    with pytest.raises(DataError, match=message):
        build(small_source(tmp_path, train=train))


def test_names_file_with_the_wrong_class_count(tmp_path):
    with pytest.raises(DataError, match=r"names 2 classes, but custom has 80"):
        build(small_source(tmp_path, expected=80))


def test_missing_root(tmp_path):
    source = small_source(tmp_path)
    source.root = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"image root .*nowhere does not exist"):
        build(source)


def test_missing_list_file(tmp_path):
    source = small_source(tmp_path)
    source.lists["test"] = tmp_path / "gone.txt"
    with pytest.raises(DataError, match=r"list file .*gone.txt not found"):
        build(source)


def test_unset_root_is_a_config_error(tmp_path):
    section = {"root": None, "train_list": "t.txt", "val_list": None, "test_list": "x.txt", "classnames": "c.txt"}
    with pytest.raises(ConfigError, match=r"`datasets.places_lt.root` is not set"):
        prepare(params("places_lt", section), tmp_path)


def test_a_benchmark_without_its_section_asks_for_the_root(tmp_path):
    bare = Params({"dataset": "imagenet_lt", "datasets": {}, "prepare": PREPARE})
    with pytest.raises(ConfigError, match=r"`datasets.imagenet_lt.root` is not set"):
        prepare(bare, tmp_path)


def test_unknown_dataset_lists_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown dataset 'imagenet'.*Valid names: "
                                          + re.escape(", ".join(DATASETS.names())) + r"\."):
        prepare(params("imagenet", {}), tmp_path)


# ---------------------------------------------------------------- images: scan, modes, skips
def image_tree(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "rgb.jpg")
    Image.fromarray(pixels).convert("L").save(root / "grey.jpg")
    Image.fromarray(pixels).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(pixels).convert("P").save(root / "palette.png", transparency=0)
    Image.fromarray(pixels).save(root / "test.jpg")
    good = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image")
    train = "rgb.jpg 0\ngrey.jpg 0\ncmyk.jpg 1\npalette.png 1\ntruncated.jpg 0\nempty.jpg 1\ntext.jpg 0\n"
    for name, text in {"train": train, "test": "test.jpg 0\n", "val": "rgb_val.jpg 1\n"}.items():
        (tmp_path / f"{name}.txt").write_text(text)
    Image.fromarray(pixels).save(root / "rgb_val.jpg")
    (tmp_path / "names.txt").write_text("a\nb\n")
    return DatasetSource("custom", root, {s: tmp_path / f"{s}.txt" for s in ("train", "val", "test")},
                         tmp_path / "names.txt", False)


def test_scan_fails_naming_the_first_bad_image(tmp_path):
    with pytest.raises(DataError, match=r"3 image\(s\) under .* cannot be decoded \(first: empty.jpg: .*"
                                        r"prepare.on_bad_image: skip"):
        build(image_tree(tmp_path), PrepareOptions(scan_images=True, workers=0))


def test_scan_skips_and_reports_bad_images_and_modes(tmp_path):
    prepared = build(image_tree(tmp_path), PrepareOptions(scan_images=True, on_bad_image="skip", workers=2))
    assert sorted(prepared.split("train")["path"]) == ["cmyk.jpg", "grey.jpg", "palette.png", "rgb.jpg"]
    scan = prepared.report["scan"]
    assert sorted(scan["bad"]) == ["empty.jpg", "text.jpg", "truncated.jpg"]
    assert scan["modes"] == {"CMYK": 1, "L": 1, "P": 1, "RGB": 3}
    assert scan["converted_to_rgb"] == 3


def test_without_scan_bad_images_are_not_decoded(tmp_path):
    prepared = build(image_tree(tmp_path))
    assert len(prepared.split("train")) == 7 and "scan" not in prepared.report


# ---------------------------------------------------------------- validation carving
def test_carved_validation_is_stratified_and_never_empties_a_class():
    counts = [100, 40, 10, 4, 1]
    train = [(f"{c}/{i}.jpg", (c,)) for c, n in enumerate(counts) for i in range(n)]
    rest, val = carve_validation(train, 5, 0.1, 0, multilabel=False)
    val_counts = np.bincount([labels[0] for _, labels in val], minlength=5)
    assert list(val_counts) == [10, 4, 1, 1, 0]  # round(0.1 * 155) = 16; the extra goes to the largest remainder (0.4)
    assert len(rest) + len(val) == len(train) and not set(rest) & set(val)
    assert carve_validation(train, 5, 0.1, 0, False) == (rest, val)
    assert carve_validation(train, 5, 0.1, 1, False)[1] != val


def test_carved_multilabel_validation_keeps_every_label_in_train():
    train = [(f"{i}.jpg", (0, 1)) for i in range(30)] + [("rare.jpg", (1, 2))] + \
            [(f"r{i}.jpg", (2,)) for i in range(9)]
    rest, val = carve_validation(train, 3, 0.5, 0, multilabel=True)
    remaining = np.zeros(3, int)
    for _, labels in rest:
        remaining[list(labels)] += 1
    assert (remaining > 0).all() and len(val) > 0


# ---------------------------------------------------------------- CIFAR-LT from the python archive
def fake_cifar(root, num_classes=10, per_class=20, test_per_class=3):
    folder = root / cifar.ARCHIVES[num_classes]["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    spec = cifar.ARCHIVES[num_classes]

    def batch(n_per_class):
        labels = np.tile(np.arange(num_classes), n_per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
        return {b"data": data, spec["labels_key"]: labels.tolist(), b"batch_label": b"x"}

    train = batch(per_class)
    parts = spec["train"]
    for i, name in enumerate(parts):  # split like the real archive's data_batch_1..5
        sl = slice(i * len(train[b"data"]) // len(parts), (i + 1) * len(train[b"data"]) // len(parts))
        part = {b"data": train[b"data"][sl], spec["labels_key"]: train[spec["labels_key"]][sl]}
        (folder / name).write_bytes(pickle.dumps(part, protocol=2))
    (folder / spec["test"][0]).write_bytes(pickle.dumps(batch(test_per_class), protocol=2))
    names = [f"class{c}".encode() for c in range(num_classes)]
    (folder / spec["meta"]).write_bytes(pickle.dumps({spec["names_key"]: names}, protocol=2))
    return train


def test_cifar10_lt_follows_the_ldam_rule(tmp_path):
    train = fake_cifar(tmp_path / "cifar")
    section = {"root": str(tmp_path / "cifar"), "imbalance": 10, "seed": 0}
    prepared = prepare(params("cifar10_lt", section), tmp_path / "out")
    labels = np.asarray(train[b"labels"])
    expected_counts = [int(20 * 0.1 ** (c / 9)) for c in range(10)]
    listed = prepared.classes["list_count"].tolist()
    assert listed == expected_counts
    # The kept images are those of LDAM-DRW's rule: RandomState(0), shuffle each class in label order.
    rng = np.random.RandomState(0)
    expected = set()
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        expected |= {int(i) for i in idx[: expected_counts[c]]}
    kept = {int(p.split("/")[-1][:-4]) for p in prepared.manifest.query("split != 'test'")["path"]}
    assert kept == expected
    assert (np.bincount(prepared.label_array("test")) == 3).all()  # test stays balanced
    assert len(prepared.split("val")) > 0
    image = Image.open(tmp_path / "out" / prepared.split("test")["path"][0])
    assert image.size == (32, 32) and image.mode == "RGB"


def test_cifar_archive_that_would_run_code_is_refused(tmp_path):
    fake_cifar(tmp_path / "cifar")
    evil = pickle.dumps({b"data": __import__("os").system}, protocol=2)  # a reference to os.system
    (tmp_path / "cifar/cifar-10-batches-py/data_batch_1").write_bytes(evil)
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.system"):
        cifar.load_archive(tmp_path / "cifar", 10)


def test_cifar_missing_archive(tmp_path):
    with pytest.raises(DataError, match=r"cifar-100-python not found. Set `datasets.cifar100_lt.root`"):
        prepare(params("cifar100_lt", {"root": str(tmp_path), "imbalance": 100, "seed": 0}), tmp_path / "o")


def test_every_registered_dataset_is_tested_here():
    assert set(DATASETS.names()) == set(BENCHMARKS) | {"synthetic", "synthetic_ml", "custom", "cifar10_lt",
                                                       "cifar100_lt"}
