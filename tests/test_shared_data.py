"""Checks on the real published split lists and images in ../shared, when it exists.

A user's clone has no ../shared: these tests skip there, with the reason.
"""

import numpy as np
import pytest

from ltpipe.data.formats import read_classnames, read_list
from ltpipe.data.manifest import build
from ltpipe.data.scan import scan
from ltpipe.data.source import DatasetSource
from tests.conftest import REPO

SHARED = REPO.parent / "shared"
SPLITS = SHARED / "splits"
pytestmark = pytest.mark.skipif(not SPLITS.is_dir(), reason=f"{SHARED} (the project's shared real data) is absent")


def listed(name, folder, train, test, names, names_format, multilabel, val=None, expected=None):
    lists = {"train": folder / train, "val": folder / val if val else None, "test": folder / test}
    return build(DatasetSource(name, folder, lists, folder / names, multilabel, names_format, expected),
                 check_files=False)


def group_sizes(prepared):
    return prepared.classes["group"].value_counts().to_dict()


def test_coco_lt_sizes_and_groups():
    p = listed("coco_lt", SPLITS / "COCO_LT", "coco_lt_train.txt", "coco_lt_test.txt", "coco_labels.txt",
               "name_index", True, expected=80)
    assert len(p.split("train")) + len(p.split("val")) == 1909
    assert len(p.split("test")) == 5000
    assert (p.label_array("test").sum(axis=1) == 0).sum() == 48  # unlabelled test images: all negatives
    assert group_sizes(p) == {"head": 22, "medium": 33, "tail": 25}
    head = p.classes.query("group == 'head'")["index"].tolist()
    assert head == [0, 2, 24, 26, 39, 41, 42, 43, 44, 45, 56, 57, 58, 60, 62, 63, 67, 69, 71, 72, 73, 75]


def test_voc_lt_sizes_groups_and_prompts():
    p = listed("voc_lt", SPLITS / "VOC_LT", "voc_lt_train.txt", "voc_lt_test.txt", "voc_labels.txt",
               "name_index", True, expected=20)
    assert len(p.split("train")) + len(p.split("val")) == 1142
    assert len(p.split("test")) == 4952
    assert group_sizes(p) == {"head": 6, "medium": 6, "tail": 8}
    assert p.classes.query("group == 'head'")["index"].tolist() == [4, 6, 8, 10, 14, 15]
    assert p.classes["prompt"][10] == "dining table" and p.classes["prompt"][19] == "tv monitor"


def test_places_lt_sizes_and_groups():
    p = listed("places_lt", SPLITS / "Places_LT", "Places_LT_train.txt", "Places_LT_test.txt", "classnames.txt",
               "id_name", False, val="Places_LT_val.txt", expected=365)
    assert [len(p.split(s)) for s in ("train", "val", "test")] == [62500, 7300, 36500]
    assert group_sizes(p) == {"many": 131, "medium": 163, "few": 71}
    assert p.classes["train_count"].max() == 4980 and p.classes["train_count"].min() == 5
    assert p.classes["prompt"][1] == "airplane cabin"


def test_imagenet_lt_lists_and_curated_names():
    folder = SPLITS / "ImageNet_LT"
    val, test = read_list(folder / "ImageNet_LT_val.txt", False), read_list(folder / "ImageNet_LT_test.txt", False)
    assert (len(val), len(test)) == (20000, 50000)
    assert np.bincount([e[1][0] for e in test]).tolist() == [50] * 1000
    pairs = read_classnames(folder / "classnames.txt", "id_name")
    assert len(pairs) == 1000 and pairs[0] == ("n01440764", "tench")


def test_inat18_val_list_and_categories():
    folder = SPLITS / "iNaturalist18"
    val = read_list(folder / "iNaturalist18_val.txt", False)
    assert len(val) == 24426
    assert np.bincount([e[1][0] for e in val]).tolist() == [3] * 8142
    assert len(read_classnames(folder / "categories.json", "inat_json")) == 8142


CIFAR = SHARED / "datasets" / "cifar10-lt"


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"{CIFAR} is absent")
def test_prepare_on_the_real_cifar10_lt_jpegs():
    lists = {"train": CIFAR / "CIFAR10_LT_train.txt", "val": None, "test": CIFAR / "CIFAR10_LT_test.txt"}
    p = build(DatasetSource("custom", CIFAR / "images", lists, CIFAR / "classnames.txt", False))
    assert p.classes["list_count"].tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(p.split("train")) + len(p.split("val")) == 12406
    assert len(p.split("test")) == 10000
    assert p.report["validation"]["carved_from_train"] == len(p.split("val")) > 0
    assert group_sizes(p) == {"many": 8, "medium": 2}


COCO_MINI = SHARED / "datasets" / "coco-lt-mini"


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"{COCO_MINI} is absent")
def test_scan_real_coco_images():
    entries = read_list(COCO_MINI / "coco_lt_mini.txt", multilabel=True)
    result = scan(COCO_MINI / "images", [rel for rel, _ in entries], workers=2)
    assert len(entries) == 159 and not result.bad
    assert sum(result.modes.values()) == 159 and result.modes["RGB"] >= 150
