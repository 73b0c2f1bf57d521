import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ltpipe import losses
from ltpipe.errors import ConfigError

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
TARGET = torch.tensor([0, 1])
COUNTS = np.array([60.0, 30.0, 10.0])


def hand_ce(logits, target):
    total = 0.0
    for row, y in zip(logits.tolist(), target.tolist()):
        total += -(row[y] - math.log(sum(math.exp(v) for v in row)))
    return total / len(target)


def test_ce_by_hand():
    loss = losses.build("ce", "single", None, COUNTS)(LOGITS, TARGET)
    assert loss.item() == pytest.approx(hand_ce(LOGITS, TARGET), rel=1e-6)


def test_balanced_softmax_by_hand():
    # Ren et al. 2020: CE on z + log(n_c / N). Prior here: 0.6, 0.3, 0.1.
    adjusted = LOGITS + torch.log(torch.tensor([0.6, 0.3, 0.1]))
    loss = losses.build("bsm", "single", None, COUNTS)(LOGITS, TARGET)
    assert loss.item() == pytest.approx(hand_ce(adjusted, TARGET), rel=1e-6)
    # Row 1 by hand: z + log p = [2 + ln .6, .5 + ln .3, -1 + ln .1], target 0.
    row = [2 + math.log(0.6), 0.5 + math.log(0.3), -1 + math.log(0.1)]
    first = -(row[0] - math.log(sum(math.exp(v) for v in row)))
    single = losses.build("bsm", "single", None, COUNTS)(LOGITS[:1], TARGET[:1])
    assert single.item() == pytest.approx(first, rel=1e-6)


def test_balanced_softmax_pushes_tail_logits_up():
    logits = torch.zeros(1, 3, requires_grad=True)
    losses.build("bsm", "single", None, COUNTS)(logits, torch.tensor([2])).backward()
    ce_logits = torch.zeros(1, 3, requires_grad=True)
    F.cross_entropy(ce_logits, torch.tensor([2])).backward()
    # The rare target class gets a larger push than under plain CE.
    assert logits.grad[0, 2] < ce_logits.grad[0, 2] < 0


def test_bce_by_hand():
    logits = torch.tensor([[1.0, -2.0]])
    target = torch.tensor([[1, 0]])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 - 1 / (1 + math.exp(2.0)))) / 2
    assert losses.build("bce", "multi", None, COUNTS[:2])(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_loss_for_the_wrong_task_is_refused():
    with pytest.raises(ConfigError, match=r"loss 'ce' is for single-label tasks.*Losses for it: bce"):
        losses.check("ce", "multi")


def test_unknown_loss_lists_names():
    with pytest.raises(ConfigError, match=r"unknown loss 'focl'.*Valid names: bce, bsm, ce"):
        losses.check("focl", "single")
