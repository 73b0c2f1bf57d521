"""Token grids read by file offset, from RAM or disk, a batch ahead of training: the same rows as h5py's."""

import os
import shutil
import threading

import h5py
import numpy as np
import pytest
import torch

from ltpipe import heads
from ltpipe.core.errors import DataError
from ltpipe.evaluation import inference
from ltpipe.evaluation.inference import FeatureInput, predict
from ltpipe.features import store
from ltpipe.features.store import SplitFeatures, SplitWriter
from ltpipe.features.token_reader import TokenRows, choose_token_cache, read_ahead
from ltpipe.training.loop import train
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import TrainConfig

CPU = torch.device("cpu")
CLASSES = 3


def write_split(path, rows=60, shape=(5, 8), seed=0, dtype="float16"):
    """A split file with token grids whose class shows in the tokens (so a head learns something)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % CLASSES
    tokens = rng.standard_normal((rows,) + shape).astype(dtype)
    tokens[:, :, 0] += labels[:, None].astype(dtype)
    writer = SplitWriter(path, 4, shape, labels.astype(np.int64), [f"img{i}.png" for i in range(rows)], dtype,
                         {"views": 1})
    writer.write(0, rng.standard_normal((rows, 4)), tokens)
    writer.commit()
    return path


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("tokens") / "train.h5")


def h5py_rows(path, index):
    """The rows as h5py reads them (sorted unique selection, then in the order asked)."""
    unique, inverse = np.unique(index, return_inverse=True)
    with h5py.File(path, "r") as fh:
        return fh["tokens"][unique][inverse]


INDEX_SETS = {
    "first and last": [0, 59],
    "one row": [17],
    "contiguous runs": [3, 4, 5, 6, 20, 21, 40, 41, 42, 59],
    "whole split": list(range(60)),
    "unsorted with repeats": [9, 2, 9, 59, 0, 2, 31],
    "random": np.random.default_rng(1).integers(0, 60, 40).tolist(),
}


@pytest.mark.parametrize("name", sorted(INDEX_SETS))
def test_reader_returns_h5py_rows_exactly(split, name):
    index = np.asarray(INDEX_SETS[name])
    expected = h5py_rows(split, index)
    features = SplitFeatures(split)
    reused = features.token_buffer(64)
    got = features.token_rows(index, reused)
    assert got.dtype == np.float16 and np.shares_memory(got, reused)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(features.tokens(index), expected.astype(np.float32))
    batch = FeatureInput(SplitFeatures(split), "tokens", CPU).batch(index)
    assert batch.dtype == torch.float32
    assert torch.equal(batch, torch.from_numpy(expected.astype(np.float32)))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_batch_is_never_overwritten_by_later_reads(tmp_path, dtype):
    """Only the training feed's ``reuse=True`` batches live in reused buffers (two: training, read ahead)."""
    data = FeatureInput(SplitFeatures(write_split(tmp_path / "train.h5", dtype=dtype)), "tokens", CPU)
    first = data.batch(np.arange(0, 8))
    kept = first.clone()
    for start in (8, 16, 24):
        data.batch(np.arange(start, start + 8))
    assert torch.equal(first, kept)
    shared = data.batch(np.arange(0, 8), reuse=True)
    ahead = data.batch(np.arange(8, 16), reuse=True)
    assert torch.equal(shared, kept) and not torch.equal(ahead, kept)


def test_reader_reads_by_offset_and_falls_back_to_h5py_on_a_chunked_dataset(split, tmp_path):
    assert TokenRows(split).by_offset
    chunked = tmp_path / "chunked.h5"
    with h5py.File(split, "r") as src, h5py.File(chunked, "w") as dst:
        dst.create_dataset("tokens", data=src["tokens"][()], chunks=(4, 5, 8), compression="gzip")
    rows = TokenRows(chunked)
    assert not rows.by_offset
    index = np.asarray([0, 1, 2, 30, 59])
    np.testing.assert_array_equal(rows.read(index, rows.buffer(8)), h5py_rows(split, index))


def test_memory_mode_equals_disk_mode_and_says_why(split, capsys, monkeypatch):
    disk, memory = FeatureInput(SplitFeatures(split), "tokens", CPU), FeatureInput(SplitFeatures(split), "tokens", CPU)
    disk.use_token_cache("disk")
    memory.use_token_cache("memory")
    assert not disk.features.tokens_in_memory and memory.features.tokens_in_memory
    for index in INDEX_SETS.values():
        assert torch.equal(disk.batch(np.asarray(index)), memory.batch(np.asarray(index)))
    assert "train.h5: read from disk, `token_cache: disk`" in capsys.readouterr().out
    size = SplitFeatures(split).token_bytes
    for available, where in [(2 * size, "in memory"), (2 * size - 2, "read from disk")]:
        monkeypatch.setattr(inference, "available_memory", lambda available=available: available)
        data = FeatureInput(SplitFeatures(split), "tokens", CPU)
        data.use_token_cache("auto")
        data.use_token_cache("auto")  # decided once
        out = capsys.readouterr().out
        assert out.count("token grids") == 1 and f"train.h5: {where}, `token_cache: auto`" in out
        assert data.features.tokens_in_memory == (where == "in memory")


def test_auto_streams_when_memory_is_unknown():
    assert choose_token_cache("auto", 10, None)[0] is False
    assert choose_token_cache("memory", 10**15, 1)[0] is True


def fit_decoder(path, val_path, read_ahead_on, cache):
    torch.manual_seed(0)
    head = heads.rebuild("decoder", {"dim": 8, "num_classes": CLASSES, "depth": 1, "heads": 2})
    data = FeatureInput(SplitFeatures(path), "tokens", CPU)
    data.read_ahead = read_ahead_on
    val = FeatureInput(SplitFeatures(val_path), "tokens", CPU)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01, token_cache=cache)
    result = train(head, torch.nn.CrossEntropyLoss(), SAMPLERS.get("instance"), data, val, val.labels, cfg, 0,
                   False, CLASSES, CPU)
    return result, predict(head, val)


def test_read_ahead_and_memory_train_exactly_as_reading_in_step(split, tmp_path):
    val = write_split(tmp_path / "val.h5", rows=30, seed=1)
    runs = [fit_decoder(split, val, on, cache) for on, cache in [(False, "disk"), (True, "disk"), (True, "memory")]]
    (base, base_logits), *others = runs
    for result, logits in others:
        assert result.history == base.history and result.best_epoch == base.best_epoch
        assert all(torch.equal(result.best_state[k], base.best_state[k]) for k in base.best_state)
        np.testing.assert_array_equal(logits, base_logits)


def test_a_damaged_row_read_ahead_raises_in_the_trainer_naming_the_file(split, tmp_path, monkeypatch):
    path = shutil.copy2(split, tmp_path / "train.h5")
    with h5py.File(path, "r") as fh:
        offset = fh["tokens"].id.get_offset() + 41 * 5 * 8 * 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x5a\x5a")
    threads = []
    real = store.check_rows
    monkeypatch.setattr(store, "check_rows", lambda *a, **k: threads.append(threading.current_thread().name)
                        or real(*a, **k))
    with pytest.raises(DataError, match=rf"{path}.*dataset `tokens`, row 41 \(image img41.png\)"):
        fit_decoder(path, split, read_ahead_on=True, cache="disk")
    assert any(name.startswith("ltpipe-read-ahead") for name in threads)


def test_read_ahead_keeps_order_and_raises_where_the_failure_is():
    def load(item):
        if item == 3:
            raise DataError("row 3 is damaged")
        return item * 10

    got = []
    with pytest.raises(DataError, match="row 3"):
        for item, value in read_ahead(load, range(6)):
            got.append((item, value))
    assert got == [(0, 0), (1, 10), (2, 20)]
    early = read_ahead(load, range(6))
    assert next(early) == (0, 0)
    early.close()  # a consumer that stops early: the pending read is awaited, no thread left behind
    assert not any(t.name.startswith("ltpipe-read-ahead") for t in threading.enumerate())


def test_read_ahead_advises_each_item_once_a_load_before_it():
    events = []
    lock = threading.Lock()

    def record(kind):
        def call(item):
            with lock:
                events.append(f"{kind}{item}")
            return item
        return call

    assert [value for _, value in read_ahead(record("load"), range(4), advise=record("advise"))] == [0, 1, 2, 3]
    # The next item is advised before the current one loads: its reads run while this one's do.
    assert events == ["advise0", "advise1", "load0", "advise2", "load1", "advise3", "load2", "load3"]
    events.clear()
    assert list(read_ahead(record("load"), range(2), enabled=False, advise=record("advise"))) == [(0, 0), (1, 1)]
    assert events == ["load0", "load1"]  # read in the step: nothing ahead to advise


def test_advice_names_each_run_of_rows_and_only_for_offset_reads(split, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    rows = TokenRows(split)
    rows.advise(np.asarray([1, 2, 3, 7, 59]))
    start, b, soon = rows.offset, rows.row_bytes, os.POSIX_FADV_WILLNEED
    assert calls == [(start + 1 * b, 3 * b, soon), (start + 7 * b, b, soon), (start + 59 * b, b, soon)]
    calls.clear()
    data = FeatureInput(SplitFeatures(split), "tokens", CPU)
    data.advise(np.arange(10, 20))
    assert calls == [(rows.offset + 10 * b, 10 * b, soon)]
    calls.clear()
    data.use_token_cache("memory")
    data.advise(np.arange(4))  # grids in memory: nothing to read
    chunked = tmp_path / "chunked.h5"
    with h5py.File(split, "r") as src, h5py.File(chunked, "w") as dst:
        dst.create_dataset("tokens", data=src["tokens"][()], chunks=(4, 5, 8))
    TokenRows(chunked).advise(np.arange(4))  # read through h5py: no offsets to advise
    assert calls == []

    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    rows.advise(np.arange(4))  # advice only: the read reports what is wrong with the file
    np.testing.assert_array_equal(rows.read(np.arange(4), rows.buffer(4)), h5py_rows(split, np.arange(4)))


def test_row_checksums_in_threads_equal_one_crc_per_row(monkeypatch):
    """zlib's CRC-32 (no zlib-ng installed: the GPU bench's bare machine) checks many rows in threads."""
    import threading
    import zlib

    from ltpipe.features import checksums

    rows = np.random.default_rng(0).standard_normal((97, 40, 96)).astype(np.float16)  # 7.5 KB rows, 0.7 MB
    expected = np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.uint32)
    names = []
    monkeypatch.setattr(checksums, "FAST_CRC32", False)
    monkeypatch.setattr(checksums, "crc32", lambda data: names.append(threading.current_thread().name)
                        or zlib.crc32(data))
    np.testing.assert_array_equal(checksums.row_checksums(rows), expected)  # under the threshold: in this thread
    assert set(names) == {threading.current_thread().name}
    names.clear()
    monkeypatch.setattr(checksums, "PARALLEL_ROW_BYTES", 1)
    np.testing.assert_array_equal(checksums.row_checksums(rows), expected)
    assert len(names) == 97
    if checksums._row_pool()[1] > 1:
        assert all(name.startswith("ltpipe-crc") for name in names)  # in the pool's threads
    np.testing.assert_array_equal(checksums.row_checksums(rows[:1]), expected[:1])
    assert len(checksums.row_checksums(rows[:0])) == 0


def test_the_fast_crc32_is_zlibs_function():
    """zlib-ng's CRC-32, where installed, gives zlib's values: feature files and their recorded checksums
    do not depend on which one wrote or reads them."""
    import zlib

    from ltpipe.features import checksums

    assert checksums.FAST_CRC32  # zlib-ng is a dependency (requirements.txt)
    rng = np.random.default_rng(1)
    for size in (0, 1, 15, 16, 63, 64, 65, 4095, 70001, 1 << 20):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        for start in (0, 12345, 0xFFFFFFFF):
            assert checksums.crc32(data, start) == zlib.crc32(data, start), (size, start)
        assert checksums.crc32(data[1:]) == zlib.crc32(data[1:].tobytes())  # unaligned
    rows = rng.standard_normal((64, 50, 96)).astype(np.float16)
    np.testing.assert_array_equal(checksums.row_checksums(rows), [zlib.crc32(row.tobytes()) for row in rows])
