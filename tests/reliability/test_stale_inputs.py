"""Reliability: images changed in place after prepare (issue 15, item 1).

Faults, each injected on real files of a small listed dataset:

* ``rewritten_size_and_mtime_kept``: new bytes of the same length written into the same
  inode, then the old mtime put back with ``os.utime`` (what a careless copy tool or a
  restore does). Only the ctime betrays it.
* ``replaced_by_rename``: a new file renamed over the old path (a new inode).
* ``touched_same_bytes``: the mtime changes, the bytes do not: no false alarm.

For each: prepare's recorded hash follows the bytes, with its stat cache warm (not fooled,
and really used: unchanged files are not re-read); extraction refuses a file changed after
prepare, naming it and the fix, even under ``on_bad_image: skip``; and an interrupted
extraction resumed after prepare re-ran recomputes instead of reusing shards of the old
pixels. The end-to-end check through ``dvc repro`` is ``test_dvc_repro_sees_it`` (slow).
"""

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ltpipe.core.errors import DataError, user_message
from ltpipe.data import fingerprint
from ltpipe.data.manifest import build
from ltpipe.data.source import DatasetSource
from ltpipe.features import extract
from ltpipe.features.store import SplitFeatures

FAULTS = ["rewritten_size_and_mtime_kept", "replaced_by_rename", "touched_same_bytes"]
CHANGED = "train/img_2.png"
TRAIN = [(f"train/img_{i}.png", i % 2) for i in range(8)]


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8))


def _dataset(root: Path) -> DatasetSource:
    for sub in ("train", "val", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lists, seed = {}, 0
    for split, entries in (("train", TRAIN), ("val", [("val/v0.png", 0), ("val/v1.png", 1)]),
                           ("test", [("test/t0.png", 0), ("test/t1.png", 1)])):
        for rel, _ in entries:
            seed += 1
            _picture(seed).save(root / rel, compress_level=0)  # uncompressed: equal sizes
        lists[split] = root / f"{split}.txt"
        lists[split].write_text("".join(f"{rel} {label}\n" for rel, label in entries))
    (root / "classnames.txt").write_text("cat\ndog\n")
    return DatasetSource("custom", root, lists, root / "classnames.txt", False)


def inject(fault: str, path: Path) -> None:
    """Change ``path`` as the fault says (new pixels of the same byte length, except when touched)."""
    before = path.stat()
    time.sleep(0.02)  # past the filesystem's coarse clock tick, as any real later edit is
    if fault == "touched_same_bytes":
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        return
    new = path.with_name("new.png")
    _picture(999).save(new, compress_level=0)
    assert new.stat().st_size == before.st_size
    if fault == "replaced_by_rename":
        os.replace(new, path)
        return
    data = new.read_bytes()
    new.unlink()
    with open(path, "r+b") as fh:  # the same inode
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


@pytest.fixture
def settled(monkeypatch):
    """Cache even files written a moment ago (the racy-file guard would otherwise skip them all)."""
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)


@pytest.mark.parametrize("fault", FAULTS, ids=FAULTS)
def test_prepare_hash_follows_bytes(fault, tmp_path, settled):
    source = _dataset(tmp_path / "data")
    cache = tmp_path / "partial" / "prepare-hashes.sqlite"
    first = build(source, hash_cache=cache)
    assert first.hash_stats.read == 12
    again = build(source, hash_cache=cache)
    assert again.hash_stats.read == 0, "the stat cache was not used"
    assert again.manifest.equals(first.manifest)
    inject(fault, source.root / CHANGED)
    after = build(source, hash_cache=cache)
    assert after.hash_stats.read == 1, "only the changed file must be re-read"
    row = after.manifest.index[after.manifest["path"] == CHANGED][0]
    assert after.manifest.at[row, "sha256"] == hashlib.sha256((source.root / CHANGED).read_bytes()).hexdigest()
    changed = after.manifest.at[row, "sha256"] != first.manifest.at[row, "sha256"]
    assert changed == (fault != "touched_same_bytes")
    others = after.manifest.drop(index=row)
    assert others.equals(first.manifest.drop(index=row))


def test_racy_file_is_not_cached(tmp_path):
    """A file changed less than RACY_SECONDS before it is hashed is read again next time."""
    source = _dataset(tmp_path / "data")
    cache = tmp_path / "prepare-hashes.sqlite"
    build(source, hash_cache=cache)
    assert build(source, hash_cache=cache).hash_stats.read == 12


@pytest.fixture(scope="module")
def clip(tiny_weights):
    from ltpipe.features import models
    return models.load(tiny_weights, torch.device("cpu"))[:2]


def _extract(clip, prepared, out: Path, work: Path, skip: bool = False, checkpoint_every: int = 4) -> dict:
    options = extract.ExtractOptions(batch_size=4, workers=0, checkpoint_every=checkpoint_every,
                                     on_bad_image="skip" if skip else "fail")
    model, preprocess = clip
    return extract.extract_split(model, preprocess, prepared, "train", out, options, torch.device("cpu"), "fp32",
                                 {}, work)


@pytest.mark.parametrize("fault", FAULTS, ids=FAULTS)
def test_extract_refuses_a_file_changed_after_prepare(fault, tmp_path, clip):
    source = _dataset(tmp_path / "data")
    prepared = build(source)
    inject(fault, source.root / CHANGED)
    out = tmp_path / "features" / "train.h5"
    if fault == "touched_same_bytes":
        assert _extract(clip, prepared, out, tmp_path / "partial")["skipped_images"] == 0
        return
    for skip in (False, True):
        with pytest.raises(DataError) as caught:
            _extract(clip, prepared, out, tmp_path / "partial", skip=skip)
        message = user_message(caught.value)
        assert str(source.root / CHANGED) in message and "changed since prepare" in message, message
        assert "Run `dvc repro` again" in message, message
        assert not out.exists()
    # Fine-tuning reads its images through the same constructor.
    with pytest.raises(DataError, match="changed since prepare"):
        extract.ImageFiles.of_split(prepared, "train", None).load(2)


@pytest.mark.parametrize("fault", FAULTS, ids=FAULTS)
def test_resume_after_change_recomputes(fault, tmp_path, clip, monkeypatch):
    """Shards made, then the run dies; an image of a finished shard changes; prepare re-runs:
    the resumed extraction must not reuse the old shard, and equals a clean run on the new files."""
    source = _dataset(tmp_path / "data")
    work = tmp_path / "partial"
    out = tmp_path / "features" / "train.h5"
    saved = extract._save_shard
    calls = []

    def dies_after_first_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")
        return saved(*args, **kwargs)

    monkeypatch.setattr(extract, "_save_shard", dies_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        _extract(clip, build(source), out, work)
    monkeypatch.setattr(extract, "_save_shard", saved)
    assert len(list(work.glob("*/*.npz"))) == 1
    inject(fault, source.root / CHANGED)  # CHANGED is row 2: inside the finished first shard
    report = _extract(clip, build(source), out, work)
    if fault == "touched_same_bytes":
        assert report["resumed_images"] == 4
    else:
        assert report["resumed_images"] == 0, "resumed from shards of the old pixels"
    clean = tmp_path / "clean" / "train.h5"
    _extract(clip, build(source), clean, tmp_path / "clean_partial")
    np.testing.assert_array_equal(SplitFeatures(out).pooled, SplitFeatures(clean).pooled)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["rewritten_size_and_mtime_kept"], ids=["plain_dvc_repro_sees_it"])
def test_dvc_repro_sees_it(fault, tmp_path):
    """Through DVC, images outside the repository: after an in-place change, a plain `dvc repro` re-runs
    prepare and extraction (the `inputs` stage's fingerprint changed), and the features and metrics change.
    Before the `inputs` stage it ran nothing: DVC does not see files outside the repository. The other
    faults and edits through DVC: tests/test_input_edits.py."""
    from tests import dvc_repo

    source = _dataset(tmp_path / "images")
    repo = dvc_repo.make(tmp_path / "repo", dict(dvc_repo.SMALL, extract=dict(workers=0, checkpoint_every=4)))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"] = "custom"
    params["datasets"]["custom"].update(root=str(source.root), train_list=str(source.lists["train"]),
                                        val_list=str(source.lists["val"]), test_list=str(source.lists["test"]),
                                        classnames=str(source.classnames))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_repo.run(repo, "dvc", "repro", "zeroshot")
    before = {name: (repo / name).read_bytes() for name in ("data/features/train.h5", "metrics/zeroshot.json")}
    for rel in [rel for rel, _ in TRAIN[:4]] + ["test/t0.png", "test/t1.png"]:  # zeroshot scores the test split
        inject(fault, source.root / rel)
    ran = dvc_repo.stages_run(dvc_repo.run(repo, "dvc", "repro", "zeroshot").stdout)
    assert sorted(ran) == ["extract", "prepare", "zeroshot"], ran
    train = SplitFeatures(repo / "data/features/train.h5")
    assert (repo / "data/features/train.h5").read_bytes() != before["data/features/train.h5"]
    assert train.paths[:4] == [rel for rel, _ in TRAIN[:4]]
    assert (repo / "metrics/zeroshot.json").read_bytes() != before["metrics/zeroshot.json"]


# The stat cache only saves time: whatever goes wrong with it, prepare hashes without it (one
# WARNING), and the hashes are the same. An image that cannot be read is one DataError naming it.
def cache_parent_is_a_file(tmp_path):
    (tmp_path / "partial").write_text("not a folder")
    return tmp_path / "partial" / "prepare-hashes.sqlite"


def cache_is_not_a_database(tmp_path):
    cache = tmp_path / "prepare-hashes.sqlite"
    cache.write_bytes(b"\x00garbage" * 512)
    return cache


def cache_is_a_folder(tmp_path):
    (tmp_path / "prepare-hashes.sqlite").mkdir()
    return tmp_path / "prepare-hashes.sqlite"


CACHE_FAULTS = {f.__name__: f for f in (cache_parent_is_a_file, cache_is_not_a_database, cache_is_a_folder)}


@pytest.mark.parametrize("fault", list(CACHE_FAULTS), ids=list(CACHE_FAULTS))
def test_a_broken_stat_cache_never_stops_prepare(fault, tmp_path, capsys):
    source = _dataset(tmp_path / "data")
    rels = sorted(str(p.relative_to(source.root)) for p in source.root.rglob("*.png"))
    expected = [hashlib.sha256((source.root / rel).read_bytes()).hexdigest() for rel in rels]
    hashes, stats = fingerprint.hash_files(source.root, rels, CACHE_FAULTS[fault](tmp_path))
    assert hashes == expected and stats.read == len(rels)
    out = capsys.readouterr().out
    assert (fault == "cache_is_not_a_database") == ("WARNING" not in out), out  # a damaged cache is replaced


def test_an_image_that_cannot_be_read_is_named(tmp_path):
    source = _dataset(tmp_path / "data")
    with pytest.raises(DataError, match=r"cannot read image .*gone\.png to record its content hash"):
        fingerprint.hash_files(source.root, ["gone.png"], None)


def _listing_digest(root: Path, rels: list) -> str:
    lines = "".join(f"{rel}\t{hashlib.sha256((root / rel).read_bytes()).hexdigest()}\n" for rel in rels)
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("fault", FAULTS, ids=FAULTS)
def test_a_recorded_listing_follows_bytes(fault, tmp_path, settled):
    """The inputs stage's whole-list shortcut (FileHasher.listing): reused only while no file's stat
    changed, so an in-place rewrite with size and mtime restored still changes the digest."""
    source = _dataset(tmp_path / "data")
    cache = tmp_path / "cache.sqlite"
    rels = [rel for rel, _ in TRAIN]

    def listing():
        with fingerprint.FileHasher(cache) as hasher:
            digest, unreadable, stats = hasher.listing(source.root, rels)
        assert unreadable == 0
        assert digest == _listing_digest(source.root, rels)
        return digest, stats.read

    first, read = listing()
    assert read == len(rels)
    assert listing() == (first, 0)
    inject(fault, source.root / CHANGED)
    after, read = listing()
    assert read == 1, "only the changed file must be re-read"
    assert (after != first) == (fault != "touched_same_bytes")
    if fault == "touched_same_bytes":  # its mtime is a second ahead: racy, so hashed again once it passes
        time.sleep(max(0.0, (source.root / CHANGED).stat().st_mtime - time.time()))
        assert listing() == (after, 1)
    assert listing() == (after, 0)


def test_a_listing_with_a_racy_or_missing_file_is_not_recorded(tmp_path, monkeypatch):
    source = _dataset(tmp_path / "data")
    cache = tmp_path / "cache.sqlite"
    rels = [rel for rel, _ in TRAIN]
    for _ in range(2):  # files written just now are racy: hashed again, never served from a record
        with fingerprint.FileHasher(cache) as hasher:
            assert hasher.listing(source.root, rels)[2].read == len(rels)
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.0)
    missing = rels + ["train/gone.png"]
    for _ in range(2):
        with fingerprint.FileHasher(cache) as hasher:
            digest, unreadable, _ = hasher.listing(source.root, missing)
        assert unreadable == 1
    (source.root / "train/gone.png").write_bytes(b"now here")
    with fingerprint.FileHasher(cache) as hasher:
        assert hasher.listing(source.root, missing)[:2] == (_listing_digest(source.root, missing), 0)
