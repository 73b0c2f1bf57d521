import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ltpipe import heads
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, DataError
from ltpipe.evaluation.zeroshot import zeroshot_logits
from ltpipe.training import checkpoint

EPS = 1e-8
DIM, CLASSES = 16, 7


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(seed, n, multilabel=False, classes=CLASSES, dim=DIM):
    rng = np.random.default_rng(seed)
    pooled = (rng.standard_normal((n, dim)) * rng.uniform(0.5, 3.0, (n, 1))).astype(np.float32)
    if multilabel:
        labels = (rng.random((n, classes)) < 0.3).astype(np.uint8)
    else:
        labels = rng.integers(0, classes, n).astype(np.int64)
    return pooled, labels


def _queries(seed, bank, k, count=60, margin=1e-3):
    """Random queries whose k-th and (k+1)-th nearest bank items are at least `margin` apart
    in cosine similarity, so float32 faiss and the float64 reference pick the same neighbours."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((4 * count, bank.shape[1])).astype(np.float32)
    if k < len(bank):
        s = np.sort(_unit(q.astype(np.float64)) @ _unit(bank.astype(np.float64)).T, axis=1)[:, ::-1]
        q = q[s[:, k - 1] - s[:, k] > margin]
    assert len(q) >= count
    return q[:count]


def knn_reference(bank, labels, queries, k, temperature, num_classes):
    """Brute force in float64: full similarity matrix, argsort, explicit loop over the neighbours."""
    sims = _unit(queries.astype(np.float64)) @ _unit(bank.astype(np.float64)).T
    k = min(k, len(bank))
    multilabel = labels.ndim == 2
    out = np.zeros((len(queries), num_classes))
    for i in range(len(queries)):
        order = np.argsort(-sims[i])[:k]
        top = sims[i, order].max()
        votes = np.zeros(num_classes)
        total = 0.0
        for j in order:
            w = np.exp((sims[i, j] - top) / temperature)
            total += w
            if multilabel:
                votes += w * labels[j]
            else:
                votes[labels[j]] += w
        p = votes / total
        out[i] = np.log(p + EPS) - np.log(1 - p + EPS) if multilabel else np.log(p + EPS)
    return out


def ncm_reference(bank, labels, queries, scale, num_classes):
    feats = _unit(bank.astype(np.float64))
    means = np.zeros((num_classes, bank.shape[1]))
    for c in range(num_classes):
        members = labels[:, c] == 1 if labels.ndim == 2 else labels == c
        means[c] = feats[members].mean(axis=0)
    return scale * _unit(queries.astype(np.float64)) @ _unit(means).T


def _fitted(name, kwargs, pooled, labels):
    head = heads.rebuild(name, kwargs)
    head.fit(pooled, labels)
    return head.eval()


def _logits(head, queries):
    with torch.inference_mode():
        return head(torch.from_numpy(queries)).numpy()


def test_heads_are_registered():
    assert {"knn", "ncm", "zeroshot"} <= set(heads.HEADS.names())


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("k,temperature", [(1, 0.07), (10, 0.07), (25, 0.5)])
def test_knn_matches_brute_force(multilabel, k, temperature):
    bank, labels = _data(0, 300, multilabel)
    queries = _queries(1, bank, k)
    head = _fitted("knn", {"in_dim": DIM, "num_classes": CLASSES, "k": k, "temperature": temperature},
                   bank, labels)
    logits = _logits(head, queries)
    assert logits.dtype == np.float32 and logits.shape == (len(queries), CLASSES)
    np.testing.assert_allclose(logits, knn_reference(bank, labels, queries, k, temperature, CLASSES),
                               rtol=1e-4, atol=1e-4)
    # small batches take faiss's non-BLAS path; same neighbours, same logits
    np.testing.assert_allclose(_logits(head, queries[:3]), logits[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_logits(head, queries), logits)  # deterministic


def test_knn_small_temperature_does_not_overflow():
    bank, labels = _data(2, 100)
    queries = _queries(3, bank, 10)
    head = _fitted("knn", {"in_dim": DIM, "num_classes": CLASSES, "temperature": 1e-3}, bank, labels)
    logits = _logits(head, queries)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, knn_reference(bank, labels, queries, 10, 1e-3, CLASSES), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("multilabel", [False, True])
def test_knn_k_larger_than_bank_and_absent_class(multilabel):
    bank, labels = _data(4, 5, multilabel)
    absent = CLASSES - 1
    if multilabel:
        labels[:, absent] = 0
        labels[:, 0] = 1
    else:
        labels[:] = np.array([0, 1, 2, 1, 0])
    queries = _queries(5, bank, 5, count=8)
    head = _fitted("knn", {"in_dim": DIM, "num_classes": CLASSES, "k": 50}, bank, labels)
    logits = _logits(head, queries)
    np.testing.assert_allclose(logits, knn_reference(bank, labels, queries, 5, 0.07, CLASSES), rtol=1e-4, atol=1e-4)
    expected_absent = np.log(EPS) - np.log(1 + EPS) if multilabel else np.log(EPS)
    np.testing.assert_allclose(logits[:, absent], expected_absent, rtol=1e-6)
    if multilabel:  # every neighbour has class 0: p = 1
        np.testing.assert_allclose(logits[:, 0], np.log(1 + EPS) - np.log(EPS), rtol=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
def test_ncm_matches_brute_force(multilabel):
    bank, labels = _data(6, 200, multilabel)
    if multilabel:
        labels[np.arange(CLASSES), np.arange(CLASSES)] = 1  # every class has an image
    queries = _queries(7, bank, 1, count=40)
    for count in (40, 3):  # BLAS and non-BLAS faiss paths
        head = _fitted("ncm", {"in_dim": DIM, "num_classes": CLASSES, "scale": 12.0}, bank, labels)
        logits = _logits(head, queries[:count])
        assert logits.dtype == np.float32
        np.testing.assert_allclose(logits, ncm_reference(bank, labels, queries[:count], 12.0, CLASSES),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
def test_ncm_class_without_image_is_an_error(multilabel):
    bank, labels = _data(8, 50, multilabel)
    if multilabel:
        labels[:, 3] = 0
    else:
        labels[labels == 3] = 2
    head = heads.rebuild("ncm", {"in_dim": DIM, "num_classes": CLASSES})
    with pytest.raises(DataError, match=r"1 class\(es\) have no training image.*class index 3\)"):
        head.fit(bank, labels)


def test_unfitted_heads_refuse_to_predict():
    for name in ("knn", "ncm"):
        head = heads.rebuild(name, {"in_dim": DIM, "num_classes": CLASSES})
        with pytest.raises(RuntimeError, match="fit"):
            head(torch.randn(2, DIM))


def test_fit_validates_inputs():
    head = heads.rebuild("knn", {"in_dim": DIM, "num_classes": CLASSES})
    bank, labels = _data(9, 20)
    with pytest.raises(DataError, match="16-wide"):
        head.fit(bank[:, :8], labels)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 7\)"):
        head.fit(bank, labels + CLASSES)
    with pytest.raises(DataError, match="20 training features but 19 labels"):
        head.fit(bank, labels[:19])


@pytest.mark.parametrize("name,multilabel", [("knn", False), ("knn", True), ("ncm", False), ("ncm", True)])
def test_checkpoint_round_trip(tmp_path, name, multilabel):
    bank, labels = _data(10, 120, multilabel)
    if multilabel:
        labels[np.arange(CLASSES), np.arange(CLASSES)] = 1
    section = Params({"k": 7, "temperature": 0.1} if name == "knn" else {"scale": 20.0}, prefix=f"heads.{name}")
    head = heads.build(name, heads.HEADS.parse(name, section), heads.HeadContext(CLASSES, DIM, None))
    assert not [p for p in head.parameters() if p.requires_grad]
    head.fit(bank, labels)
    queries = _queries(11, bank, 7, count=30)
    expected = _logits(head.eval(), queries)
    run = {"head": name, "loss": "none", "sampler": "none", "stage2": "none", "seed": 0}
    checkpoint.save_checkpoint(tmp_path / "h.pt", head, name, run)
    loaded, loaded_run = checkpoint.load_checkpoint(tmp_path / "h.pt")
    assert loaded_run == run and loaded.kwargs == head.kwargs and loaded.input == "pooled"
    np.testing.assert_array_equal(_logits(loaded, queries), expected)


def test_refit_and_load_state_dict_reset_the_index():
    bank, labels = _data(12, 80)
    other, other_labels = _data(13, 80)
    queries = _queries(14, bank, 10, count=10)
    kwargs = {"in_dim": DIM, "num_classes": CLASSES}
    for name in ("knn", "ncm"):
        head = _fitted(name, kwargs, bank, labels)
        first = _logits(head, queries)
        head.fit(other, other_labels)  # the index of the first bank must not survive
        refit = _logits(head, queries)
        np.testing.assert_array_equal(refit, _logits(_fitted(name, kwargs, other, other_labels), queries))
        assert not np.allclose(refit, first)
        head.load_state_dict(_fitted(name, kwargs, bank, labels).state_dict())  # same shapes, other content
        np.testing.assert_array_equal(_logits(head, queries), first)


def test_fitted_heads_deep_copy_and_keep_working():
    bank, labels = _data(15, 50)
    queries = _queries(16, bank, 10, count=5)
    for name in ("knn", "ncm"):
        head = _fitted(name, {"in_dim": DIM, "num_classes": CLASSES}, bank, labels)
        expected = _logits(head, queries)  # the cached index now exists
        np.testing.assert_array_equal(_logits(copy.deepcopy(head), queries), expected)


def test_params_defaults_and_validation():
    ctx = heads.HeadContext(CLASSES, DIM, None)
    knn = heads.build("knn", None, ctx)
    assert knn.kwargs == {"in_dim": DIM, "num_classes": CLASSES, "k": 10, "temperature": 0.07,
                          "bank_size": 0, "multilabel": False}
    assert heads.build("ncm", None, ctx).kwargs == {"in_dim": DIM, "num_classes": CLASSES, "scale": 16.0}
    with pytest.raises(ConfigError, match="heads.knn.k"):
        heads.build("knn", heads.HEADS.parse("knn", Params({"k": 0}, prefix="heads.knn")), ctx)
    with pytest.raises(ConfigError, match="heads.knn.temperature"):
        heads.build("knn", heads.HEADS.parse("knn", Params({"temperature": 0}, prefix="heads.knn")), ctx)
    with pytest.raises(ConfigError, match="heads.ncm.scale"):
        heads.build("ncm", heads.HEADS.parse("ncm", Params({"scale": -1}, prefix="heads.ncm")), ctx)


def test_zeroshot_head_is_the_zero_shot_classifier(tmp_path):
    rng = np.random.default_rng(17)
    text = SimpleNamespace(embeddings=_unit(rng.standard_normal((CLASSES, DIM))).astype(np.float32),
                           logit_scale=42.5)
    pooled = rng.standard_normal((20, DIM)).astype(np.float32)
    ctx = heads.HeadContext(CLASSES, DIM, None, text.embeddings, text.logit_scale)
    head = heads.build("zeroshot", None, ctx).eval()
    assert not [p for p in head.parameters() if p.requires_grad] and not hasattr(head, "fit")
    logits = _logits(head, pooled)
    np.testing.assert_allclose(logits, zeroshot_logits(pooled, text), rtol=1e-5, atol=1e-4)
    checkpoint.save_checkpoint(tmp_path / "z.pt", head, "zeroshot", {"head": "zeroshot"})
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "z.pt")
    np.testing.assert_array_equal(_logits(loaded, pooled), logits)


def test_zeroshot_needs_matching_text_embeddings():
    with pytest.raises(ConfigError, match=r"text embeddings.*dvc repro text"):
        heads.build("zeroshot", None, heads.HeadContext(CLASSES, DIM, None))
    wrong = np.ones((CLASSES, DIM + 1), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"17\).*16 wide.*dvc repro extract"):
        heads.build("zeroshot", None, heads.HeadContext(CLASSES, DIM, None, wrong))


def test_nan_queries_are_an_error_not_a_wrong_neighbour():
    bank, labels = _data(18, 30)
    query = torch.randn(3, DIM)
    query[1, 0] = float("nan")
    for name in ("knn", "ncm"):
        head = _fitted(name, {"in_dim": DIM, "num_classes": CLASSES}, bank, labels)
        with pytest.raises(DataError, match="NaN"):
            head(query)
