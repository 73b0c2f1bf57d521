"""`train.shuffle: blocks`: the sampler's draws re-ordered into windows of whole blocks, each block read
from disk once an epoch, with the same batches and values from memory, disk, read ahead or not."""

import numpy as np
import pytest
import torch

from ltpipe import heads
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.evaluation.inference import FeatureInput, ViewInput, predict
from ltpipe.features import token_reader
from ltpipe.features.store import SplitFeatures, SplitWriter
from ltpipe.features.token_reader import TokenRows
from ltpipe.training.loop import train
from ltpipe.training.samplers import SAMPLERS, block_order, block_rng, class_members, epoch_rng
from ltpipe.training.spec import TrainConfig
from ltpipe.training.trainer import batches_of

CPU = torch.device("cpu")
CLASSES = 3
ROWS = 60
BLOCK = dict(shuffle="blocks", block_rows=8, block_buffer=2)


def write_split(path, labels, shape=(5, 8), seed=0, views=1):
    rng = np.random.default_rng(seed)
    rows = len(labels)
    tokens = rng.standard_normal((rows,) + shape).astype("float16")
    tokens[:, :, 0] += labels[:, None].astype("float16")
    writer = SplitWriter(path, 4, shape, labels.astype(np.int64), [f"img{i}.png" for i in range(rows)], "float16",
                         {"views": views})
    writer.write(0, rng.standard_normal((rows, 4)), tokens)
    writer.commit()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    return (write_split(root / "train.h5", np.arange(ROWS) % CLASSES),
            write_split(root / "val.h5", np.arange(30) % CLASSES, seed=1))


@pytest.mark.parametrize("sampler", ["instance", "class_balanced", "sqrt"])
def test_block_order_keeps_the_draws_and_visits_whole_blocks_window_by_window(sampler):
    labels = np.arange(1000) // 100  # stored grouped by class
    members = class_members(labels, 10)
    order = SAMPLERS.get(sampler)(members, len(labels), 3, 1)
    shuffled = block_order(order, 16, 4, block_rng(3, 1))
    np.testing.assert_array_equal(np.sort(shuffled), np.sort(order))  # the same multiset of draws
    np.testing.assert_array_equal(shuffled, block_order(order, 16, 4, block_rng(3, 1)))
    assert not np.array_equal(shuffled, block_order(order, 16, 4, block_rng(3, 2)))
    assert not np.array_equal(shuffled, order)
    blocks = shuffled // 16
    first = {b: np.flatnonzero(blocks == b)[0] for b in np.unique(blocks)}
    visited = sorted(first, key=first.get)
    position = 0
    for start in range(0, len(visited), 4):  # each window of 4 visited blocks: one contiguous stretch
        window = visited[start:start + 4]
        size = int(np.isin(blocks, window).sum())
        assert set(blocks[position:position + size].tolist()) == set(window)
        position += size
    assert position == len(shuffled)


def test_a_window_mixes_its_blocks():
    order = np.arange(64)
    shuffled = block_order(order, 8, 4, np.random.default_rng(0))
    # Within a window of 4 blocks, rows of different blocks interleave (not block after block).
    assert np.count_nonzero(np.diff(shuffled[:32] // 8)) > 3


def fit_decoder(train_path, val_path, cache="disk", ahead=True, views=0, sampler="instance", batch_size=16,
                **options):
    torch.manual_seed(0)
    head = heads.rebuild("decoder", {"dim": 8, "num_classes": CLASSES, "depth": 1, "heads": 2})
    features = SplitFeatures(train_path)
    data = (ViewInput(features, "tokens", CPU, views, 0) if views else FeatureInput(features, "tokens", CPU))
    data.read_ahead = ahead
    val = FeatureInput(SplitFeatures(val_path), "tokens", CPU)
    cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=0.01, token_cache=cache, **options)
    result = train(head, torch.nn.CrossEntropyLoss(), SAMPLERS.get(sampler), data, val, val.labels, cfg, 0, False,
                   CLASSES, CPU)
    return result, predict(head, val)


def same_training(a, b):
    (first, first_logits), (second, second_logits) = a, b
    return (first.history == second.history and first.best_epoch == second.best_epoch
            and all(torch.equal(first.best_state[k], second.best_state[k]) for k in first.best_state)
            and np.array_equal(first_logits, second_logits))


def recorded_batches(monkeypatch, train_path, val_path, **options):
    seen = []
    real = FeatureInput.batch

    def batch(self, index, *args, **kwargs):
        if self.features.path == train_path:
            seen.append(np.asarray(index).copy())
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(FeatureInput, "batch", batch)
    fit_decoder(train_path, val_path, **options)
    monkeypatch.undo()
    return seen


def test_rows_shuffle_feeds_the_samplers_order_as_before(files, monkeypatch):
    train_path, val_path = files
    seen = recorded_batches(monkeypatch, train_path, val_path, block_rows=7, block_buffer=3)
    members = class_members(np.arange(ROWS) % CLASSES, CLASSES)
    expected = [np.sort(b) for epoch in (0, 1)
                for b in batches_of(SAMPLERS.get("instance")(members, ROWS, 0, epoch), 16, 0, 4)]
    assert len(seen) == len(expected) and all(np.array_equal(a, b) for a, b in zip(seen, expected))
    assert same_training(fit_decoder(*files), fit_decoder(*files, shuffle="rows", block_rows=7, block_buffer=3))


def test_blocks_train_identically_from_memory_and_disk_with_or_without_read_ahead(files, capsys):
    base = fit_decoder(*files, **BLOCK)
    assert "shuffle: blocks`: rows shuffled within windows of 8 x 2 = 16 rows" in capsys.readouterr().out
    for cache, ahead in [("disk", False), ("memory", True), ("memory", False)]:
        assert same_training(base, fit_decoder(*files, cache=cache, ahead=ahead, **BLOCK)), (cache, ahead)
    assert not same_training(base, fit_decoder(*files))  # the order did change


@pytest.mark.parametrize("sampler", ["instance", "class_balanced"])
def test_on_disk_each_block_is_read_once_an_epoch_whole(files, monkeypatch, sampler):
    train_path, val_path = files
    reads, plans = [], []
    real_read = TokenRows.read
    real_plan = token_reader.BlockReads.rows

    def read(self, rows, out):
        if self.path == train_path:
            reads.append(np.asarray(rows).copy())
        return real_read(self, rows, out)

    def rows(self, index, out):
        plans.append(self)
        return real_plan(self, index, out)

    monkeypatch.setattr(TokenRows, "read", read)
    monkeypatch.setattr(token_reader.BlockReads, "rows", rows)
    fit_decoder(train_path, val_path, sampler=sampler, **BLOCK)
    blocks = []
    for rows_read in reads:
        block = int(rows_read[0]) // 8
        np.testing.assert_array_equal(rows_read, np.arange(block * 8, min(block * 8 + 8, ROWS)))
        blocks.append(block)
    epochs = [blocks[:len(blocks) // 2], blocks[len(blocks) // 2:]]
    drawn = [np.unique(block_order(SAMPLERS.get(sampler)(class_members(np.arange(ROWS) % CLASSES, CLASSES), ROWS,
                                                         0, epoch), 8, 2, block_rng(0, epoch)) // 8)
             for epoch in (0, 1)]
    for epoch, read_blocks in enumerate(epochs):
        assert sorted(read_blocks) == drawn[epoch].tolist()  # every block drawn, read once
    for plan in set(plans):  # blocks held: at most max(2 x block_buffer, block_buffer + blocks of a batch)
        assert 0 < plan.most_held <= max(4, 2 + max(len(np.unique(index // 8)) for index in plan.batches))


def test_blocks_are_read_ahead_of_need_evenly_and_memory_stays_bounded():
    source = np.arange(64 * 3, dtype=np.float16).reshape(64, 3)
    order = block_order(np.random.default_rng(0).permutation(64), 4, 4, np.random.default_rng(1))
    batches = [np.sort(order[k:k + 4]) for k in range(0, 64, 4)]
    plan = token_reader.BlockReads(batches, 4, 4, 64, lambda rows, out: np.take(source, rows, axis=0,
                                                                                out=out[:len(rows)]),
                                   lambda rows: np.empty((rows, 3), dtype=np.float16))
    reads_per_batch = []
    for index in batches:
        before = plan.blocks_read
        np.testing.assert_array_equal(plan.rows(index, np.empty((8, 3), dtype=np.float16)), source[index])
        reads_per_batch.append(plan.blocks_read - before)
    # A window of 4 blocks is read over the previous window's 4 batches, one block each, not at its first batch.
    assert max(reads_per_batch[1:]) == 1
    assert plan.blocks_read == 16 and plan.most_held <= 8


def test_views_are_read_block_by_block_with_the_values_of_row_reads(tmp_path):
    views = 3
    path = write_split(tmp_path / "train_views.h5", np.repeat(np.arange(20) % CLASSES, views))
    blocky = ViewInput(SplitFeatures(path), "tokens", CPU, views, 0)
    plain = ViewInput(SplitFeatures(path), "tokens", CPU, views, 0)
    for data in (blocky, plain):
        data.set_epoch(1)
    order = block_order(epoch_rng(0, 1).permutation(20), 4, 2, block_rng(0, 1))
    indexes = [np.sort(b) for b in batches_of(order, 6, 0, 4)]
    reads = blocky.block_reads(indexes, 4, 2)
    for index in indexes:
        assert torch.equal(blocky.batch(index, reads=reads), plain.batch(index))
    assert reads.blocks_read == 5
    with pytest.raises(RuntimeError, match="out of order"):
        blocky.batch(indexes[0], reads=reads)
    assert FeatureInput(SplitFeatures(path, load_tokens=True), "tokens", CPU).block_reads(indexes, 4, 2) is None


def test_views_train_identically_from_memory_and_disk(tmp_path, files):
    path = write_split(tmp_path / "train_views.h5", np.repeat(np.arange(20) % CLASSES, 3))
    disk = fit_decoder(path, files[1], views=3, **BLOCK)
    assert same_training(disk, fit_decoder(path, files[1], cache="memory", views=3, **BLOCK))


def test_a_split_stored_by_class_gets_a_warning_naming_the_fix(tmp_path, files, capsys):
    grouped = write_split(tmp_path / "train.h5", np.arange(ROWS) // (ROWS // CLASSES))
    fit_decoder(grouped, files[1], batch_size=4, shuffle="blocks", block_rows=4, block_buffer=1)
    out = capsys.readouterr().out
    assert "WARNING: with `train.shuffle: blocks` a batch sees 1.0 classes" in out
    assert "Raise `train.block_buffer` (now 1) or lower `train.block_rows` (now 4)" in out
    fit_decoder(*files, **BLOCK)  # classes interleaved in the file: no warning
    assert "WARNING" not in capsys.readouterr().out


def test_block_rows_zero_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"`train.block_rows` must be at least 1, got 0"):
        TrainConfig.from_params(Params({"train": {"shuffle": "blocks", "block_rows": 0}}).sub("train"))
