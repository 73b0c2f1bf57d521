"""Reliability (issue 15, item 2): silent corruption of the feature cache.

Bytes inside a real cache file are changed in place with its size and modification time
kept (what bit rot or a bad copy leaves, and what `dvc status` cannot see). The reader that
loads the damaged part must raise a DataError naming the file, the dataset (and the row,
for token grids) and the fix, and `python -m ltpipe.features.verify` must exit 1 naming the
file. Where a dataset's bytes are comes from HDF5 itself (``dataset.id.get_offset()``) or,
for strings kept in HDF5's global heap, from finding their bytes in the file.
"""

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from ltpipe.core.config import Params
from ltpipe.core.errors import DataError
from ltpipe.data.manifest import build, save
from ltpipe.evaluation.inference import FeatureInput, ViewInput
from ltpipe.features import extract, store, verify
from ltpipe.training import loop as training
from tests.conftest import make_source
from tests.dvc_repo import small_params

FIX = "dvc checkout --relink"


@pytest.fixture(scope="module")
def mini(tmp_path_factory, tiny_weights):
    """A complete cache (splits with token grids, 2 augmented views per training image, text) of 3 classes."""
    root = tmp_path_factory.mktemp("integrity")
    prepared = build(make_source(root / "images", classes=3, max_per_class=8, imbalance=2, val_per_class=2,
                                 test_per_class=2))
    options = extract.ExtractOptions(batch_size=8, workers=0, views=2)
    extract.run(prepared, tiny_weights, options, root / "features", torch.device("cpu"), "fp32", root / "partial")
    extract.run_text(prepared, tiny_weights, options.templates, root / "features" / "text.h5", torch.device("cpu"),
                     "fp32")
    return prepared, root / "features"


def keep_stat(path: Path):
    """Run the damage, then restore size and mtime as bit rot would leave them."""
    class Kept:
        def __enter__(self):
            self.stat = path.stat()

        def __exit__(self, *exc):
            os.utime(path, ns=(self.stat.st_atime_ns, self.stat.st_mtime_ns))
            after = path.stat()
            assert (after.st_size, after.st_mtime_ns) == (self.stat.st_size, self.stat.st_mtime_ns)

    return Kept()


def flip(path: Path, offset: int, count: int = 2) -> None:
    with keep_stat(path), open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in data))


def data_offset(path: Path, name: str, row: int = 0) -> int:
    """Where row ``row`` of dataset ``name`` starts in the file."""
    with h5py.File(path, "r") as fh:
        dataset = fh[name]
        return dataset.id.get_offset() + row * int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize


def find_once(path: Path, needle: bytes) -> int:
    data = path.read_bytes()
    assert data.count(needle) == 1, needle
    return data.index(needle)


# Each case: the file, how it is damaged, the reader that must refuse, what the message names.
def damage_pooled(path):
    flip(path, data_offset(path, "pooled", row=3) + 6)


def damage_middle_token_row(path):
    with h5py.File(path, "r") as fh:
        middle = len(fh["tokens"]) // 2
        row_bytes = int(np.prod(fh["tokens"].shape[1:])) * fh["tokens"].dtype.itemsize
    flip(path, data_offset(path, "tokens", row=middle) + row_bytes // 2)
    return middle


def damage_labels(path):
    flip(path, data_offset(path, "labels", row=2), count=1)


def damage_path_string(path):
    """One character of an image path, in HDF5's global heap: a valid-looking other path."""
    with h5py.File(path, "r") as fh:
        name = fh["paths"][len(fh["paths"]) // 2]
    flip(path, find_once(path, name) + len(name) - 5, count=1)


def damage_path_references(path):
    """The dataset's own bytes: references into the global heap."""
    flip(path, data_offset(path, "paths", row=1) + 2, count=2)


def damage_token_checksums(path):
    flip(path, data_offset(path, "tokens_crc32", row=1), count=2)


def damage_attribute(path):
    """The token layer recorded for the grids (an attribute, in the object header)."""
    flip(path, find_once(path, b"pre_ln") + 4, count=1)


def damage_text_embeddings(path):
    flip(path, data_offset(path, "embeddings", row=1) + 8)


def damage_view_token_row(path):
    return damage_middle_token_row(path)


def read_split(path):
    return store.SplitFeatures(path)


def read_tokens_batch(path, row):
    """As training reads token grids: a sorted batch, through FeatureInput; lazily verified."""
    features = store.SplitFeatures(path)
    data = FeatureInput(features, "tokens", torch.device("cpu"))
    if row > 0:
        data.batch(np.arange(0, row))  # rows before the damage read fine
    data.batch(np.arange(0, len(features)))


def read_all_tokens(path, row):
    store.SplitFeatures(path, load_tokens=True)


def read_views(path, row):
    features = store.SplitFeatures(path)
    data = ViewInput(features, "tokens", torch.device("cpu"), views=2, seed=0)
    for epoch in range(4):  # a view is drawn per image and epoch: read every view of every image
        data.set_epoch(epoch)
        data.batch(np.arange(len(data)))
    features.tokens(np.arange(len(features)))


CASES = {
    "train_pooled_bytes": ("train.h5", damage_pooled, read_split, ["`pooled`"]),
    "train_tokens_middle_row": ("train.h5", damage_middle_token_row, read_tokens_batch, ["`tokens`", "row {row}"]),
    "train_tokens_middle_row_load_all": ("train.h5", damage_middle_token_row, read_all_tokens,
                                         ["`tokens`", "row {row}"]),
    "train_labels_bytes": ("train.h5", damage_labels, lambda p: store.SplitFeatures.read_labels(p), ["`labels`"]),
    "test_path_string": ("test.h5", damage_path_string, read_split, ["`paths`"]),
    "val_path_heap_references": ("val.h5", damage_path_references, read_split, ["`paths`"]),
    "train_token_row_checksums": ("train.h5", damage_token_checksums, read_split, ["`tokens_crc32`"]),
    "train_attribute_token_layer": ("train.h5", damage_attribute, read_split, ["attributes"]),
    "text_embeddings_bytes": ("text.h5", damage_text_embeddings, lambda p: store.TextFeatures(p), ["`embeddings`"]),
    "views_tokens_middle_row": ("train_views.h5", damage_view_token_row, read_views, ["`tokens`", "row {row}"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_damaged_cache_is_refused_naming_file_dataset_and_fix(case, mini, tmp_path, capsys):
    name, damage, read, named = CASES[case]
    path = tmp_path / name
    shutil.copy2(mini[1] / name, path)
    row = damage(path)
    with pytest.raises(DataError) as caught:
        read(path, row) if row is not None else read(path)
    message = str(caught.value)
    for part in [str(path), "damaged", FIX, "dvc repro -f extract"] + [n.format(row=row) for n in named]:
        assert part in message, (part, message)
    assert verify.main([str(path)]) == 1
    assert str(path) in capsys.readouterr().err


def test_undamaged_cache_passes_every_reader_and_verify(mini, capsys):
    _, features = mini
    for split in ("train", "val", "test"):
        loaded = store.SplitFeatures(features / f"{split}.h5")
        assert np.array_equal(loaded.tokens(np.arange(len(loaded))),
                              store.SplitFeatures(features / f"{split}.h5", load_tokens=True).tokens(
                                  np.arange(len(loaded))))
        assert loaded._verified.all()  # every row checked once, on first read
    read_views(features / "train_views.h5", 0)
    store.TextFeatures(features / "text.h5")
    files = sorted(features.glob("*.h5"))
    assert verify.main([str(p) for p in files]) == 0
    out = capsys.readouterr()
    assert out.out.count("ok ") == len(files) == 5 and "WARNING" not in out.out + out.err


def test_token_rows_are_verified_once_per_reader(mini, tmp_path, monkeypatch):
    path = tmp_path / "train.h5"
    shutil.copy2(mini[1] / "train.h5", path)
    features = store.SplitFeatures(path)
    checked = []
    real = store.row_checksums
    monkeypatch.setattr(store, "row_checksums", lambda rows: checked.append(len(rows)) or real(rows))
    for _ in range(3):  # three epochs over two overlapping batches
        features.tokens(np.arange(0, 6))
        features.tokens(np.arange(4, 10))
    assert checked == [6, 4]


def test_cache_without_checksums_is_read_with_a_warning_and_fails_verify(mini, tmp_path, capsys):
    """A file written before checksums existed (or by hand): readable, but says it cannot be checked."""
    path = tmp_path / "train.h5"
    shutil.copy2(mini[1] / "train.h5", path)
    with h5py.File(path, "a") as fh:
        del fh.attrs[store.CHECKSUMS]
        del fh["tokens_crc32"]
    features = store.SplitFeatures(path)
    features.tokens(np.arange(len(features)))
    out = capsys.readouterr().out
    assert f"WARNING: feature cache {path} carries no checksums" in out and "dvc repro -f extract" in out
    assert verify.main([str(path)]) == 1
    assert "carries no checksums" in capsys.readouterr().err


def test_training_stage_refuses_a_damaged_cache(mini, tmp_path, monkeypatch):
    prepared, features = mini
    ws = tmp_path / "ws"
    shutil.copytree(features, ws / "data/features", ignore=shutil.ignore_patterns("text.h5"))
    (ws / "data/text").mkdir()
    shutil.copy2(features / "text.h5", ws / "data/text/text.h5")
    save(prepared, ws / "data/prepared")
    monkeypatch.chdir(ws)
    Path("params.yaml").write_text(yaml.safe_dump(small_params(), sort_keys=False))
    damage_pooled(Path("data/features/train.h5"))
    with pytest.raises(DataError, match=r"data/features/train.h5 is damaged: dataset `pooled`.*--relink"):
        training.run_stage(Params.load())
    assert not Path("data/models").exists()
