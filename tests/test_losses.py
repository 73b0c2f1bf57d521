import math
import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ltpipe import losses
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError

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
    with pytest.raises(ConfigError,
                       match=r"loss 'ce' is for single-label tasks.*Losses for it: asl, bce, cb_focal, dbl, focal, "
                             r"mls\."):
        losses.check("ce", "multi")


def test_unknown_loss_lists_names():
    with pytest.raises(ConfigError, match=r"unknown loss 'focl'.*Valid names: "
                                          + re.escape(", ".join(losses.LOSSES.names())) + r"\."):
        losses.check("focl", "single")


# --------------------------------------------------------------------------- helpers for the losses below

SINGLE = losses.names_for("single")


def section(name, **values):
    return losses.LOSSES.parse(name, Params(values, prefix=f"losses.{name}"))


def build(name, counts=COUNTS, **values):
    return losses.build(name, "single", section(name, **values) if values else None, counts)


def row_ce(row, y):
    """-log softmax(row)[y], in plain Python."""
    return -(row[y] - math.log(sum(math.exp(v) for v in row)))


def rows(logits=LOGITS, target=TARGET):
    return list(zip(logits.tolist(), target.tolist()))


# --------------------------------------------------------------------------- every single-label loss


def test_the_papers_single_label_losses_are_registered():
    # Imbalance-VLM's losses and the project's additions; more may be registered.
    assert {"bsm", "cb", "cbw", "ce", "focal", "grw", "la", "lade", "ldam"} <= set(SINGLE)


@pytest.mark.parametrize("name", SINGLE)
def test_every_loss_is_a_finite_differentiable_scalar(name):
    logits = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])
    loss = build(name)(logits, target)
    assert loss.shape == () and loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", SINGLE)
def test_a_class_without_training_images_is_handled(name):
    # A class with n_c = 0 is never a target; it must not turn weights, margins or priors into inf/NaN.
    counts = np.array([60.0, 30.0, 0.0])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]], requires_grad=True)
    loss = build(name, counts)(logits, torch.tensor([0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", SINGLE)
def test_only_ldam_has_a_progress_hook_and_a_head_scale(name):
    loss = build(name)
    assert hasattr(loss, "set_progress") == (name == "ldam")
    assert hasattr(loss, "head_scale") == (name == "ldam")


# --------------------------------------------------------------------------- focal


def test_focal_by_hand():
    expected = {2.0: 0.0, 0.5: 0.0}
    for gamma in expected:
        for row, y in rows():
            p = math.exp(row[y]) / sum(math.exp(v) for v in row)
            expected[gamma] += -((1 - p) ** gamma) * math.log(p) / 2
    assert build("focal")(LOGITS, TARGET).item() == pytest.approx(expected[2.0], rel=1e-6)
    assert build("focal", gamma=0.5)(LOGITS, TARGET).item() == pytest.approx(expected[0.5], rel=1e-6)


def test_focal_with_gamma_0_is_cross_entropy():
    assert build("focal", gamma=0)(LOGITS, TARGET).item() == pytest.approx(hand_ce(LOGITS, TARGET), rel=1e-6)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_focal_stays_finite_with_8142_classes_and_a_gap_of_120(gamma):
    # Imbalance-VLM's log(softmax) gives NaN here (0 * log 0 for the far-below classes).
    logits = torch.zeros(2, 8142)
    logits[0, 5] = 120.0  # target 5: an easy example, p_y rounds to 1 in fp32
    logits[1, 7] = 120.0  # target 0: a hard one, log p_y = -120
    logits.requires_grad_(True)
    target = torch.tensor([5, 0])
    loss = build("focal", gamma=gamma)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # The hard row alone: (1 - p)^gamma ~ 1 and -log p = 120 (+ log 8142 e^-120, invisible), halved by the mean.
    assert loss.item() == pytest.approx(120 / 2, rel=1e-5)
    with torch.no_grad():  # the Imbalance-VLM formula, for contrast
        prob = torch.softmax(logits, dim=-1)
        old = -(F.one_hot(target, 8142) * (1 - prob) ** gamma * torch.log(prob)).sum(1).mean()
    assert torch.isnan(old)


def test_focal_down_weights_easy_examples():
    # Gradient on the target logit relative to CE's: far smaller for an easy example than for a hard one.
    def target_grad(loss_fn, row):
        logits = torch.tensor([row], requires_grad=True)
        loss_fn(logits, torch.tensor([0])).backward()
        return logits.grad[0, 0].item()

    focal = build("focal")
    ce = losses.build("ce", "single", None, COUNTS)
    easy, hard = [4.0, 0.0, 0.0], [-2.0, 0.0, 0.0]
    easy_ratio = target_grad(focal, easy) / target_grad(ce, easy)
    hard_ratio = target_grad(focal, hard) / target_grad(ce, hard)
    assert 0 < easy_ratio < 0.01 and hard_ratio > 0.7
    # By hand for the easy row: p = e^4 / (e^4 + 2) and dp/dz_y = p (1 - p), so
    # d/dz_y [-(1-p)^2 log p] = 2 p (1-p)^2 log p - (1-p)^3.
    p = math.exp(4) / (math.exp(4) + 2)
    closed = -(1 - p) ** 3 + 2 * p * (1 - p) ** 2 * math.log(p)
    assert target_grad(focal, easy) == pytest.approx(closed, rel=1e-5)


# --------------------------------------------------------------------------- cbw


def test_cbw_by_hand():
    # w_c = N / (C n_c) = 100 / (3 * [60, 30, 10]); weighted mean over the batch (targets 0 and 1).
    w = [100 / 180, 100 / 90, 100 / 30]
    (r0, y0), (r1, y1) = rows()
    expected = (w[y0] * row_ce(r0, y0) + w[y1] * row_ce(r1, y1)) / (w[y0] + w[y1])
    assert build("cbw")(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- cb


def cb_weights(beta, counts=(60, 30, 10)):
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    return [len(raw) * r / sum(raw) for r in raw]


def test_cb_by_hand():
    for values, beta in (({}, 0.9999), ({"beta": 0.99}, 0.99)):
        w = cb_weights(beta)
        # Cui et al.: mean over the batch of w_{y_i} * l_i (not divided by the sum of the weights).
        expected = sum(w[y] * row_ce(r, y) for r, y in rows()) / 2
        loss = build("cb", **values)
        assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
        assert loss.weight.sum().item() == pytest.approx(3, rel=1e-6)
    # beta = 0.99 on a calculator: raw weights 0.01 / (1 - 0.99^n) = 0.022084, 0.038416, 0.104579.
    assert cb_weights(0.99) == pytest.approx([3 * v / (0.022084 + 0.038416 + 0.104579)
                                              for v in (0.022084, 0.038416, 0.104579)], rel=1e-4)


def test_cb_is_not_the_weighted_mean_and_beta_0_is_ce():
    w = cb_weights(0.99)
    weighted_mean = sum(w[y] * row_ce(r, y) for r, y in rows()) / sum(w[y] for _, y in rows())
    assert build("cb", beta=0.99)(LOGITS, TARGET).item() != pytest.approx(weighted_mean, rel=1e-3)
    assert build("cb", beta=0.0)(LOGITS, TARGET).item() == pytest.approx(hand_ce(LOGITS, TARGET), rel=1e-6)


# --------------------------------------------------------------------------- la


def test_la_by_hand_and_tau_1_is_balanced_softmax():
    log_p = [math.log(0.6), math.log(0.3), math.log(0.1)]
    expected = sum(row_ce([z + 0.5 * lp for z, lp in zip(r, log_p)], y) for r, y in rows()) / 2
    assert build("la", tau=0.5)(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    bsm = losses.build("bsm", "single", None, COUNTS)(LOGITS, TARGET).item()
    assert build("la")(LOGITS, TARGET).item() == pytest.approx(bsm, rel=1e-6)
    assert build("la", tau=1.0)(LOGITS, TARGET).item() == pytest.approx(bsm, rel=1e-6)
    assert build("la", tau=0)(LOGITS, TARGET).item() == pytest.approx(hand_ce(LOGITS, TARGET), rel=1e-6)


# --------------------------------------------------------------------------- ldam


def ldam_margins(max_m, counts=(60, 30, 10)):
    raw = [n ** -0.25 for n in counts]
    return [max_m * r / max(raw) for r in raw]


def test_ldam_by_hand():
    # Cosine logits z = s * cos; the margin is subtracted from the target cosine: z_y - s * m_y.
    for values, s, max_m in (({}, 30.0, 0.5), ({"s": 2.0, "max_m": 0.4}, 2.0, 0.4)):
        m = ldam_margins(max_m)
        assert m[2] == pytest.approx(max_m)  # the rarest class has the largest margin
        expected = 0.0
        for r, y in rows():
            shifted = [z - (s * m[c] if c == y else 0.0) for c, z in enumerate(r)]
            expected += row_ce(shifted, y) / 2
        loss = build("ldam", **values)
        assert loss.head_scale == s and isinstance(loss.head_scale, float)
        assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_ldam_without_scale_is_imbalance_vlms_margin_on_raw_logits():
    # Imbalance-VLM's ldam_loss (utils.py:63-73): CE(z - m_y * onehot(y), y) on plain linear logits,
    # s declared but unused, no DRW; `s: null, drw: false` is that loss.
    m = ldam_margins(0.5)
    expected = sum(row_ce([z - (m[c] if c == y else 0.0) for c, z in enumerate(r)], y) / 2 for r, y in rows())
    loss = build("ldam", s=None, drw=False)
    assert loss.head_scale is None
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_ldam_drw_schedule_and_weights_by_hand():
    loss = build("ldam", s=2.0, max_m=0.4, drw_beta=0.99)
    m = ldam_margins(0.4)
    w = cb_weights(0.99)
    terms = []
    for r, y in rows():
        terms.append(row_ce([z - (2.0 * m[c] if c == y else 0.0) for c, z in enumerate(r)], y))
    plain = sum(terms) / 2
    # Cao et al.'s code: F.cross_entropy(weight=w), the weighted mean.
    reweighted = sum(w[y] * t for (_, y), t in zip(rows(), terms)) / sum(w[y] for _, y in rows())
    # drw_start 0.8 of 10 steps: steps 0..7 plain, 8 and 9 re-weighted.
    seen = []
    for step in range(10):
        loss.set_progress(step, 10)
        seen.append(loss(LOGITS, TARGET).item())
    assert seen[:8] == pytest.approx([plain] * 8, rel=1e-6)
    assert seen[8:] == pytest.approx([reweighted] * 2, rel=1e-6)
    # Two epochs of 13 steps: re-weighting starts at step 21 (round(0.8 * 26)), inside epoch 2.
    loss.set_progress(20, 26)
    assert loss(LOGITS, TARGET).item() == pytest.approx(plain, rel=1e-6)
    loss.set_progress(21, 26)
    assert loss(LOGITS, TARGET).item() == pytest.approx(reweighted, rel=1e-6)
    assert reweighted != pytest.approx(plain, rel=1e-3)
    # drw: false never re-weights; drw_start: 0 re-weights from the start.
    off = build("ldam", s=2.0, max_m=0.4, drw=False)
    off.set_progress(9, 10)
    assert off(LOGITS, TARGET).item() == pytest.approx(plain, rel=1e-6)
    early = build("ldam", s=2.0, max_m=0.4, drw_beta=0.99, drw_start=0.0)
    assert early(LOGITS, TARGET).item() == pytest.approx(reweighted, rel=1e-6)
    early.set_progress(0, 10)
    assert early(LOGITS, TARGET).item() == pytest.approx(reweighted, rel=1e-6)


def test_ldam_margin_raises_the_target_loss_and_its_push():
    # At equal logits the margin makes the target look worse than under CE, so its loss and its
    # gradient towards the target are larger, the more so for rarer classes.
    def loss_and_grad(loss_fn, y):
        logits = torch.zeros(1, 3, requires_grad=True)
        loss = loss_fn(logits, torch.tensor([y]))
        loss.backward()
        return loss.item(), logits.grad[0, y].item()

    ldam = build("ldam", s=10.0)
    ce = losses.build("ce", "single", None, COUNTS)
    ce_loss, ce_grad = loss_and_grad(ce, 0)
    assert ce_loss == pytest.approx(math.log(3))
    head_loss, head_grad = loss_and_grad(ldam, 0)
    tail_loss, tail_grad = loss_and_grad(ldam, 2)
    assert ce_loss < head_loss < tail_loss
    assert tail_grad < head_grad < ce_grad < 0
    # By hand for the tail class: logits [0, 0, -10 * 0.5]; p_y = e^-5 / (e^-5 + 2); dL/dz_y = p_y - 1.
    p = math.exp(-5) / (math.exp(-5) + 2)
    assert tail_loss == pytest.approx(-math.log(p), rel=1e-6)
    assert tail_grad == pytest.approx(p - 1, rel=1e-6)


# --------------------------------------------------------------------------- grw


def test_grw_by_hand():
    for values, rho in (({}, 1.2), ({"rho": 0.5}, 0.5)):
        raw = [p ** -rho for p in (0.6, 0.3, 0.1)]
        w = [3 * r / sum(raw) for r in raw]
        expected = sum(w[y] * row_ce(r, y) for r, y in rows()) / sum(w[y] for _, y in rows())
        loss = build("grw", **values)
        assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
        assert loss.weight.tolist() == pytest.approx(w, rel=1e-6)
    assert build("grw", rho=0)(LOGITS, TARGET).item() == pytest.approx(hand_ce(LOGITS, TARGET), rel=1e-6)


# --------------------------------------------------------------------------- lade


def hand_lade(logits, target, prior, lambda_e, lambda_r, reg_logits=None):
    """The reference LADE loss written out with loops: CE(z + log p) + lambda_e * R(z), R on the raw z
    (or on ``reg_logits``, to reproduce Imbalance-VLM)."""
    batch, classes = len(logits), len(prior)
    ce = sum(row_ce([z + math.log(p) for z, p in zip(r, prior)], y) for r, y in zip(logits, target)) / batch
    reg_logits = logits if reg_logits is None else reg_logits
    reg = 0.0
    for c in range(classes):
        members = [r[c] for r, y in zip(reg_logits, target) if y == c]
        first = sum(members) / (len(members) + 1e-8)
        spread = [r[c] - math.log(prior[c]) + math.log(1 / classes) for r in reg_logits]
        top = max(spread)
        second = top + math.log(sum(math.exp(v - top) for v in spread)) - math.log(batch)
        reg -= prior[c] * (first - second - lambda_r * second ** 2)
    return ce + lambda_e * reg


def test_lade_by_hand():
    # Three samples, class 2 absent from the batch (its first term is 0).
    logits = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.5, -0.5, 0.25]]
    target = [0, 1, 0]
    prior = [0.6, 0.3, 0.1]
    z, y = torch.tensor(logits), torch.tensor(target)
    for values, lambda_e, lambda_r in (({}, 0.1, 0.1), ({"lambda_e": 0.5, "lambda_r": 0.01}, 0.5, 0.01)):
        expected = hand_lade(logits, target, prior, lambda_e, lambda_r)
        assert build("lade", **values)(z, y).item() == pytest.approx(expected, rel=1e-6)
    # Imbalance-VLM fed z + log p to the regulariser: a different value.
    adjusted = [[v + math.log(p) for v, p in zip(r, prior)] for r in logits]
    wrong = hand_lade(logits, target, prior, 0.1, 0.1, reg_logits=adjusted)
    assert build("lade")(z, y).item() != pytest.approx(wrong, rel=1e-4)


def test_lade_without_the_regulariser_is_balanced_softmax():
    bsm = losses.build("bsm", "single", None, COUNTS)(LOGITS, TARGET).item()
    assert build("lade", lambda_e=0)(LOGITS, TARGET).item() == pytest.approx(bsm, rel=1e-6)


# --------------------------------------------------------------------------- parameter validation


@pytest.mark.parametrize("name, values, message", [
    ("focal", {"gamma": -1}, r"`losses.focal.gamma` must be at least 0"),
    ("focal", {"gamma": "two"}, r"`losses.focal.gamma` must be a number"),
    ("cb", {"beta": 1.0}, r"`losses.cb.beta` must be less than 1"),
    ("cb", {"beta": -0.1}, r"`losses.cb.beta` must be at least 0"),
    ("la", {"tau": -1}, r"`losses.la.tau` must be at least 0"),
    ("ldam", {"max_m": 0}, r"`losses.ldam.max_m` must be greater than 0"),
    ("ldam", {"s": -30}, r"`losses.ldam.s` must be greater than 0"),
    ("ldam", {"drw": "yes"}, r"`losses.ldam.drw` must be true or false"),
    ("ldam", {"drw_start": 1.5}, r"`losses.ldam.drw_start` must be at most 1"),
    ("ldam", {"drw_beta": 1}, r"`losses.ldam.drw_beta` must be less than 1"),
    ("grw", {"rho": -0.5}, r"`losses.grw.rho` must be at least 0"),
    ("lade", {"lambda_e": -1}, r"`losses.lade.lambda_e` must be at least 0"),
    ("lade", {"lambda_r": float("nan")}, r"`losses.lade.lambda_r` must be a finite number"),
])
def test_bad_loss_parameters_are_clear_config_errors(name, values, message):
    with pytest.raises(ConfigError, match=message):
        build(name, **values)


def test_loss_parameters_accept_yaml_scientific_strings():
    # YAML 1.1 reads 1e-4 (no dot) as a string; Params accepts it.
    assert build("cb", beta="9.999e-1").beta == pytest.approx(0.9999)
