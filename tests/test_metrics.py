import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, log_loss, top_k_accuracy_score

from ltpipe.evaluation import metrics

rng = np.random.default_rng(0)
C = 7
LABELS = rng.integers(0, C, size=300)
LOGITS = rng.normal(size=(300, C)) + 2.0 * np.eye(C)[LABELS] * rng.random((300, 1))
GROUPS = np.array(["many", "many", "medium", "medium", "medium", "few", "few"])


def test_single_label_metrics_match_sklearn():
    result, per_class = metrics.single_label(LOGITS, LABELS, GROUPS)
    pred = LOGITS.argmax(1)
    probs = np.exp(LOGITS - LOGITS.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert result["top1"] == pytest.approx((pred == LABELS).mean())
    assert result["top5"] == pytest.approx(top_k_accuracy_score(LABELS, LOGITS, k=5))
    assert result["balanced_acc"] == pytest.approx(balanced_accuracy_score(LABELS, pred))
    assert result["macro_f1"] == pytest.approx(f1_score(LABELS, pred, average="macro"))
    assert result["nll"] == pytest.approx(log_loss(LABELS, probs), rel=1e-6)
    recall = [(pred[LABELS == c] == c).mean() for c in range(C)]
    np.testing.assert_allclose(per_class, recall)
    assert result["many"] == pytest.approx(np.mean(recall[:2]))
    assert result["medium"] == pytest.approx(np.mean(recall[2:5]))
    assert result["few"] == pytest.approx(np.mean(recall[5:]))


def test_ece_by_hand():
    # Two bins used: confidences 0.9 (2 samples, 1 right) and 0.6 (2 samples, both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_empty_group_is_none():
    result, _ = metrics.single_label(LOGITS, LABELS, np.array(["many"] * C))
    assert result["few"] is None and result["medium"] is None


def test_multilabel_map_matches_sklearn_with_ties_and_empty_classes():
    targets = (rng.random((200, 5)) < 0.3).astype(np.uint8)
    targets[:, 4] = 0  # no positive: left out of the mean
    scores = np.round(rng.normal(size=(200, 5)) + targets, 1)  # rounding creates ties
    groups = np.array(["head", "head", "medium", "tail", "tail"])
    result, ap = metrics.multi_label(scores, targets, groups)
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(4)]
    np.testing.assert_allclose(ap[:4], expected)
    assert np.isnan(ap[4])
    assert result["mAP"] == pytest.approx(np.mean(expected))
    assert result["mAP_head"] == pytest.approx(np.mean(expected[:2]))
    assert result["mAP_medium"] == pytest.approx(expected[2])
    assert result["mAP_tail"] == pytest.approx(expected[3])


def test_class_precision_recall_leave_out_classes_without_positives():
    targets = np.array([[1, 0], [1, 0]])
    logits = np.array([[5.0, -5.0], [5.0, -5.0]])  # class 0 perfect; class 1 has no positive
    result, _ = metrics.multi_label(logits, targets, np.array(["head", "tail"]))
    assert result["CF1"] == pytest.approx(1.0)


def test_cf1_of1_by_hand():
    targets = np.array([[1, 0], [1, 1], [0, 1]])
    logits = np.array([[5.0, 5.0], [-5.0, 5.0], [-5.0, -5.0]])  # predictions [[1,1],[0,1],[0,0]]
    result, _ = metrics.multi_label(logits, targets, np.array(["head", "tail"]))
    # class 0: tp 1, fp 0, fn 1 -> P 1, R .5 ; class 1: tp 1, fp 1, fn 1 -> P .5, R .5
    cp, cr = (1 + 0.5) / 2, 0.5
    op, orr = 2 / 3, 2 / 4
    assert result["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert result["OF1"] == pytest.approx(2 * op * orr / (op + orr))


def test_per_class_table():
    classes = pd.DataFrame({"index": range(C), "name": list("abcdefg"), "train_count": range(C, 0, -1),
                            "group": GROUPS})
    result, table = metrics.evaluate(LOGITS, LABELS, classes, multilabel=False)
    assert list(table.columns) == ["index", "name", "train_count", "test_count", "group", "score"]
    assert table["test_count"].sum() == len(LABELS)


def test_reliability_table_by_hand_and_ece_from_it():
    from ltpipe.evaluation.metrics import reliability

    confidence = np.array([0.95, 0.91, 0.55, 0.52, 0.30])
    correct = np.array([1, 0, 1, 1, 0])
    table = reliability(confidence, correct, bins=10)  # bins (0.9, 1], (0.5, 0.6], (0.2, 0.3]
    assert table["bin_upper"].round(6).tolist() == [0.3, 0.6, 1.0]
    assert table["count"].tolist() == [1, 2, 2]
    np.testing.assert_allclose(table["confidence"], [0.30, 0.535, 0.93])
    np.testing.assert_allclose(table["accuracy"], [0.0, 1.0, 0.5])
    # ECE = sum_b n_b/N |acc_b - conf_b| = (0.30 + 2 * 0.465 + 2 * 0.43) / 5
    from ltpipe.evaluation.metrics import expected_calibration_error
    probs = np.stack([confidence, 1 - confidence], axis=1)  # confidence >= 0.5 except the last row
    labels = np.where(correct == 1, probs.argmax(1), 1 - probs.argmax(1))
    expected = sum(abs(((probs.argmax(1) == labels)[m]).mean() - probs.max(1)[m].mean()) * m.sum()
                   for m in ((probs.max(1) > lo) & (probs.max(1) <= lo + 1 / 15)
                             for lo in np.linspace(0, 1, 16)[:-1]) if m.any()) / 5
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_multilabel_reliability_pools_every_image_and_class():
    from ltpipe.evaluation.metrics import reliability_table

    logits = np.array([[3.0, -3.0], [0.0, 2.0]])
    table = reliability_table(logits, np.array([[1, 0], [1, 1]]), multilabel=True, bins=4)
    assert table["count"].sum() == 4
    low = table[table["bin_upper"] == 0.25].iloc[0]  # sigmoid(-3) = 0.047, the absent class
    assert low["count"] == 1 and low["accuracy"] == 0.0


def test_confusion_rows_name_classes_and_stay_empty_when_unreadable():
    from ltpipe.evaluation.metrics import confusion_rows

    rows = confusion_rows(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]), ["cat", "dog"], False)
    assert rows.to_dict("list") == {"actual": ["dog", "dog"], "predicted": ["dog", "cat"]}
    assert confusion_rows(np.zeros((1, 101)), np.array([0]), [str(i) for i in range(101)], False).empty
    assert confusion_rows(np.zeros((1, 2)), np.array([[1, 0]]), ["a", "b"], True).empty


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(20))
def test_balanced_accuracy_is_sklearns_to_the_bit(seed):
    """Training's selection score is computed without scikit-learn (bench/gpu.py runs without it): it must be
    scikit-learn's number bit for bit, or recorded metrics and model selection would move."""
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 300))
    labels = rng.integers(0, num_classes, int(rng.integers(1, 3000)))
    # Some predictions right, some wrong, some naming classes absent from the labels.
    pred = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, num_classes + 3, len(labels)))
    expected = balanced_accuracy_score(labels, pred)
    assert metrics.balanced_accuracy(labels, pred) == expected
    assert metrics.selection_score(np.eye(num_classes + 3)[pred], labels, multilabel=False) == expected

