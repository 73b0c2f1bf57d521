"""Multi-label losses and the one-name-two-tasks loss registry."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from ltpipe import losses
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.losses import multi, single

# A 2 x 3 batch: counts n_c of 6, 3 and 1 images among N = 8 training images.
LOGITS = [[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0]]
TARGET = [[1, 0, 1], [0, 1, 0]]
COUNTS = np.array([6.0, 3.0, 1.0])
N = 8

MULTI = losses.names_for("multi")


def z(values=LOGITS, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def y(values=TARGET):
    return torch.tensor(values, dtype=torch.float64)


def section(name, **values):
    return losses.LOSSES.parse(name, Params(values, prefix=f"losses.{name}"))


def build(name, counts=COUNTS, num_images=N, **values):
    return losses.build(name, "multi", section(name, **values) if values else None, counts, num_images)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def bce(v, t):
    """BCE-with-logits of one element, in plain Python."""
    return math.log1p(math.exp(-v)) if t == 1 else math.log1p(math.exp(v))


def elements(logits=LOGITS, target=TARGET):
    for row, labels in zip(logits, target):
        yield from zip(row, labels)


# --------------------------------------------------------------------------- registry


def test_names_per_task_and_their_union():
    # The papers' losses (CPRFL, DBL; Imbalance-VLM) are all there; more may be registered.
    assert {"asl", "bce", "cb_focal", "dbl", "focal", "mls"} <= set(losses.names_for("multi"))
    assert {"bsm", "cb", "cbw", "ce", "focal", "grw", "la", "lade", "ldam"} <= set(losses.names_for("single"))
    assert not set(losses.names_for("multi")) & {"ce", "lade"} and "asl" not in losses.names_for("single")
    assert losses.LOSSES.names() == sorted(set(losses.names_for("multi")) | set(losses.names_for("single")))
    assert "focal" in losses.LOSSES and "dbl" in losses.LOSSES and "focl" not in losses.LOSSES
    with pytest.raises(ValueError, match="task"):
        losses.names_for("both")


def test_one_name_builds_the_variant_of_the_task():
    assert losses.LOSSES.get("focal").tasks == ("single", "multi")
    assert losses.LOSSES.get("asl").tasks == ("multi",)
    assert losses.LOSSES.get("ce").tasks == ("single",)
    assert losses.check("focal", "single").task == "single"
    assert losses.check("focal", "multi").task == "multi"
    assert losses.check("focal", "single").factory is not losses.check("focal", "multi").factory
    assert isinstance(losses.build("focal", "single", None, COUNTS), single.FocalLoss)
    assert isinstance(losses.build("focal", "multi", None, COUNTS), multi.SigmoidFocalLoss)


def test_a_loss_of_the_other_task_is_refused_with_the_valid_names():
    single, multi = (re.escape(", ".join(losses.names_for(task))) for task in ("single", "multi"))
    with pytest.raises(ConfigError, match=r"loss 'asl' is for multi-label tasks, but this dataset is single-label\. "
                                          rf"Losses for it: {single}\."):
        losses.check("asl", "single")
    with pytest.raises(ConfigError, match=r"loss 'lade' is for single-label tasks, but this dataset is multi-label\. "
                                          rf"Losses for it: {multi}\."):
        losses.build("lade", "multi", None, COUNTS, N)
    with pytest.raises(ConfigError, match=r"unknown loss 'dlb'.*Valid names: "
                                          + re.escape(", ".join(losses.LOSSES.names()))):
        losses.check("dlb", "multi")


def test_a_task_variant_cannot_be_registered_twice():
    with pytest.raises(ValueError, match=r"loss 'bce': this loss has a multi-label variant already"):
        losses.register("bce", "multi")(lambda section, counts, num_images: None)
    with pytest.raises(ValueError, match=r"loss 'bce': a loss task is one of"):
        losses.register("bce", "both")(lambda section, counts, num_images: None)
    assert losses.LOSSES.get("bce").tasks == ("multi",)


def test_num_images_reaches_multi_label_factories_only():
    assert build("dbl", num_images=8).num_images == 8.0
    assert build("dbl", num_images=20).num_images == 20.0
    with pytest.raises(ValueError, match="number of training images"):
        losses.build("dbl", "multi", None, COUNTS)
    with pytest.raises(ValueError, match="number of training images"):
        build("dbl", num_images=5)  # fewer images than class 0 has
    # Single-label factories keep their two-argument call; num_images is not passed to them.
    assert isinstance(losses.build("ce", "single", None, COUNTS, num_images=10), single.CrossEntropy)


# --------------------------------------------------------------------------- bce, mls


def test_bce_and_mls_by_hand_and_equal():
    expected = sum(bce(v, t) for v, t in elements()) / 6
    assert build("bce")(z(), y()).item() == pytest.approx(expected, rel=1e-12)
    assert build("mls")(z(), y()).item() == pytest.approx(expected, rel=1e-12)
    logits = torch.randn(16, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    target = (torch.rand(16, 7, generator=torch.Generator().manual_seed(1)) < 0.3).to(torch.uint8)
    mls = build("mls")(logits, target)
    assert mls.item() == pytest.approx(build("bce")(logits, target).item(), rel=1e-12)
    assert mls.item() == pytest.approx(nn.MultiLabelSoftMarginLoss()(logits, target.double()).item(), rel=1e-12)


# --------------------------------------------------------------------------- focal


def hand_focal(gamma, alpha=None):
    total = 0.0
    for v, t in elements():
        p = sigmoid(v)
        p_t = p if t == 1 else 1 - p
        alpha_t = 1.0 if alpha is None else (alpha if t == 1 else 1 - alpha)
        total += -alpha_t * (1 - p_t) ** gamma * math.log(p_t)
    return total / 6


def test_focal_by_hand():
    assert build("focal")(z(), y()).item() == pytest.approx(hand_focal(2.0), rel=1e-12)
    assert build("focal", gamma=0.5)(z(), y()).item() == pytest.approx(hand_focal(0.5), rel=1e-12)
    assert build("focal", gamma=2.0, alpha=0.25)(z(), y()).item() == pytest.approx(hand_focal(2.0, 0.25), rel=1e-12)
    assert build("focal", alpha=None)(z(), y()).item() == pytest.approx(hand_focal(2.0), rel=1e-12)
    assert build("focal", gamma=0)(z(), y()).item() == pytest.approx(build("bce")(z(), y()).item(), rel=1e-12)
    # One element on a calculator: z = 2, y = 1: p = 0.880797, (1 - p)^2 = 0.014209, -log p = 0.126928.
    assert build("focal")(z([[2.0]]), y([[1]])).item() == pytest.approx(0.014209 * 0.126928, rel=1e-4)


def test_focal_matches_torchvision():
    ops = pytest.importorskip("torchvision.ops")
    logits = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    target = (torch.rand(8, 5, generator=torch.Generator().manual_seed(3)) < 0.4).double()
    for values, alpha in (({}, -1), ({"alpha": 0.25}, 0.25)):
        ours = build("focal", **values)(logits, target).item()
        theirs = ops.sigmoid_focal_loss(logits, target, alpha=alpha, gamma=2.0, reduction="mean").item()
        assert ours == pytest.approx(theirs, rel=1e-10)


def test_single_label_focal_ignores_the_multi_label_alpha():
    # params.yaml's `losses.focal` serves both variants: the single-label one reads `gamma` only.
    logits, target = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 1])
    shared = losses.build("focal", "single", section("focal", gamma=2.0, alpha=0.25), COUNTS)
    plain = losses.build("focal", "single", None, COUNTS)
    assert shared(logits, target).item() == pytest.approx(plain(logits, target).item(), rel=1e-7)
    assert losses.build("focal", "single", section("focal", gamma=2.0, alpha=None), COUNTS).gamma == 2.0


# --------------------------------------------------------------------------- asl


def hand_asl(logits=LOGITS, target=TARGET, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8, reduction="mean"):
    total = 0.0
    for v, t in elements(logits, target):
        p = sigmoid(v)
        if t == 1:
            total -= (1 - p) ** gamma_pos * math.log(max(p, eps))
        else:
            xs_neg = min(1 - p + clip, 1.0)
            total -= (1 - xs_neg) ** gamma_neg * math.log(max(xs_neg, eps))
    return total / (len(logits) * len(logits[0])) if reduction == "mean" else total


def test_asl_by_hand_for_both_reductions():
    assert build("asl")(z(), y()).item() == pytest.approx(hand_asl(), rel=1e-12)
    assert build("asl", reduction="sum")(z(), y()).item() == pytest.approx(hand_asl(reduction="sum"), rel=1e-12)
    assert build("asl", reduction="sum")(z(), y()).item() == pytest.approx(6 * build("asl")(z(), y()).item())
    values = {"gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.0}
    assert build("asl", **values)(z(), y()).item() == pytest.approx(hand_asl(**values), rel=1e-12)
    # gamma 0 and no clip: BCE.
    assert build("asl", gamma_neg=0, clip=0)(z(), y()).item() == pytest.approx(build("bce")(z(), y()).item())
    # A negative at z = 0 on a calculator: p = 0.5, xs_neg = 0.55, loss = -(0.45^4) log 0.55 = 0.024515.
    assert build("asl", reduction="sum")(z([[0.0]]), y([[0]])).item() == pytest.approx(0.024515, rel=1e-4)
    # A negative below the clip (p = 0.0474 < 0.05) costs nothing.
    assert build("asl")(z([[-3.0]]), y([[0]])).item() == 0.0


def test_asl_focusing_weight_carries_no_gradient():
    gamma_neg, clip, count = 4.0, 0.05, 6
    logits = z(requires_grad=True)
    build("asl")(logits, y()).backward()
    expected, with_weight_grad = [], []
    for v, t in elements():
        p = sigmoid(v)
        if t == 1:  # w = (1 - p)^0 = 1: d/dz -log p = -(1 - p)
            grad = full = -(1 - p)
        elif p > clip:  # w = (p - clip)^4 held constant: d/dz -w log(1 - p + clip) = w p (1 - p) / (1 - p + clip)
            w = (p - clip) ** gamma_neg
            grad = w * p * (1 - p) / (1 - p + clip)
            # Differentiating w as well adds -4 (p - clip)^3 p (1 - p) log(1 - p + clip).
            full = grad - gamma_neg * (p - clip) ** 3 * p * (1 - p) * math.log(1 - p + clip)
        else:
            grad = full = 0.0
        expected.append(grad / count)
        with_weight_grad.append(full / count)
    assert logits.grad.flatten().tolist() == pytest.approx(expected, rel=1e-10, abs=1e-15)
    assert logits.grad.flatten().tolist() != pytest.approx(with_weight_grad, rel=1e-3)


# --------------------------------------------------------------------------- cb_focal


def cb_weights(beta, counts=(6, 3, 1)):
    return [(1 - beta) / (1 - beta ** max(n, 1)) for n in counts]


def hand_cb_focal(beta=0.9, gamma=2.0, balance=2.0, loss_weight=10.0, counts=(6, 3, 1), logits=LOGITS,
                  target=TARGET):
    w = cb_weights(beta, counts)
    total = 0.0
    for row, labels in zip(logits, target):
        for c, (v, t) in enumerate(zip(row, labels)):
            b = bce(v, t)
            pt = math.exp(-b)
            total += loss_weight * balance * (1 - pt) ** gamma * w[c] * b
    return total / (len(logits) * len(logits[0]))


def test_cb_focal_by_hand():
    loss = build("cb_focal")
    # beta 0.9 on a calculator: 0.1 / (1 - 0.9^6) = 0.213420, 0.1 / (1 - 0.9^3) = 0.369004, 0.1 / 0.1 = 1;
    # not normalised.
    assert loss.weight.tolist() == pytest.approx([0.213420, 0.369004, 1.0], rel=1e-5)
    assert loss(z(), y()).item() == pytest.approx(hand_cb_focal(), rel=1e-6)
    values = {"beta": 0.5, "gamma": 1.0, "balance": 1.0, "loss_weight": 3.0}
    assert build("cb_focal", **values)(z(), y()).item() == pytest.approx(hand_cb_focal(**values), rel=1e-6)


def test_cb_focal_class_without_images_gets_the_weight_of_one_image():
    counts = np.array([6.0, 3.0, 0.0])
    loss = build("cb_focal", counts=counts)
    assert loss.weight[2].item() == 1.0
    assert loss(z(), y([[1, 0, 0], [0, 1, 0]])).item() == pytest.approx(
        hand_cb_focal(counts=(6, 3, 0), target=[[1, 0, 0], [0, 1, 0]]), rel=1e-6)


# --------------------------------------------------------------------------- dbl

COCO = multi.DB_PRESETS["coco"]
VOC = multi.DB_PRESETS["voc"]


def hand_dbl(logits=LOGITS, target=TARGET, counts=(6, 3, 1), num_images=N, neg_scale=2.0, init_bias=0.05,
             map_alpha=0.1, map_beta=10.0, map_gamma=0.2, focal=True, gamma=2.0, balance=2.0, loss_weight=1.0):
    """DBL's ResampleLoss('rebalance', focal, logit_reg), element by element."""
    total = 0.0
    for row, labels in zip(logits, target):
        repeat = sum(t / n for t, n in zip(labels, counts) if n > 0)
        for v, t, n in zip(row, labels, counts):
            if repeat > 0 and n > 0:
                w = sigmoid(map_beta * ((1 / n) / repeat - map_gamma)) + map_alpha
            else:  # no positive label in the image, or no training image of the class: the limit
                w = 1 + map_alpha
            nu = -math.log(num_images / n - 1) * init_bias / neg_scale if 0 < n < num_images else 0.0
            v = v + nu
            if t == 0:
                v, w = v * neg_scale, w / neg_scale
            b = bce(v, t)
            pt = math.exp(-b)
            total += loss_weight * (balance * (1 - pt) ** gamma * w * b if focal else w * b)
    return total / (len(logits) * len(logits[0]))


def test_dbl_by_hand():
    assert build("dbl")(z(), y()).item() == pytest.approx(hand_dbl(**COCO), rel=1e-6)
    assert build("dbl", preset="coco")(z(), y()).item() == pytest.approx(hand_dbl(**COCO), rel=1e-6)
    assert build("dbl", preset="voc")(z(), y()).item() == pytest.approx(hand_dbl(**VOC), rel=1e-6)
    assert build("dbl", focal=False, loss_weight=0.5)(z(), y()).item() == pytest.approx(
        hand_dbl(**COCO, focal=False, loss_weight=0.5), rel=1e-6)
    assert build("dbl", gamma=1.0, balance=1.0)(z(), y()).item() == pytest.approx(
        hand_dbl(**COCO, gamma=1.0, balance=1.0), rel=1e-6)
    assert build("dbl", preset="voc")(z(), y()).item() != pytest.approx(build("dbl")(z(), y()).item(), rel=1e-3)


def test_dbl_weights_and_bias_on_a_calculator():
    loss = build("dbl")
    # nu_c = -log(N / n_c - 1) * 0.05 / 2: n = 6: -log(1/3) * 0.025 = 0.027465; 3: -log(5/3) * 0.025 = -0.012770;
    # 1: -log 7 * 0.025 = -0.048648.
    assert loss.bias.tolist() == pytest.approx([0.027465, -0.012770, -0.048648], rel=1e-4)
    # Row [1, 0, 1]: repeat = 1/6 + 1 = 7/6, r = (1/n_c) / repeat = [1/7, 2/7, 6/7];
    # w = sigmoid(10 (r - 0.2)) + 0.1 = sigmoid([-0.5714, 0.8571, 6.5714]) + 0.1 = [0.360907, 0.702063, 0.998602] + 0.1.
    w = loss.rebalance_weight(y())
    assert w[0].tolist() == pytest.approx([0.460907, 0.802063, 1.098602], rel=1e-5)


def test_dbl_image_without_labels_and_odd_classes():
    # An all-negative row gets weight 1 + map_alpha everywhere; a class in every training image
    # (n = N) and a class in none (n = 0) get no bias, and the latter weight 1 + map_alpha.
    counts = (8, 3, 0)
    logits, target = [[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0], [0.3, -0.2, 1.0]], [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    loss = build("dbl", counts=np.array(counts, dtype=float))
    assert loss.bias[0].item() == 0.0 and loss.bias[2].item() == 0.0 and loss.bias[1].item() != 0.0
    w = loss.rebalance_weight(y(target))
    assert w[2].tolist() == pytest.approx([1.1, 1.1, 1.1]) and w[0, 2].item() == pytest.approx(1.1)
    logits_t = z(logits, requires_grad=True)
    value = loss(logits_t, y(target))
    value.backward()
    assert value.item() == pytest.approx(hand_dbl(logits, target, counts, **COCO), rel=1e-6)
    assert torch.isfinite(logits_t.grad).all()


def test_dbl_does_not_change_the_callers_logits():
    logits = z()
    build("dbl")(logits, y())
    assert logits.tolist() == LOGITS


def cprfl_scalar_focal(weights, logits=LOGITS, target=TARGET, gamma=2.0, balance=2.0, loss_weight=1.0):
    """CPRFL's copy: BCE reduced to its mean *before* the focal term (p_t is one scalar)."""
    flat = list(elements(logits, target))
    weighted = sum(w * bce(v, t) for w, (v, t) in zip(weights, flat)) / len(flat)
    pt = math.exp(-sum(bce(v, t) for v, t in flat) / len(flat))
    return loss_weight * balance * (1 - pt) ** gamma * weighted


def test_element_wise_focal_is_not_cprfls_scalar_focal():
    # cb_focal: weights w_c per column.
    w = cb_weights(0.9) * 2
    scalar = cprfl_scalar_focal(w, loss_weight=10.0)
    assert build("cb_focal")(z(), y()).item() == pytest.approx(hand_cb_focal(), rel=1e-6)
    assert build("cb_focal")(z(), y()).item() != pytest.approx(scalar, rel=1e-2)
    # dbl: CPRFL's version on the same regularised logits and weights.
    loss = build("dbl")
    logits, target = z(), y()
    shifted = logits + loss.bias.double()
    shifted = shifted * (1 - target) * 2.0 + shifted * target
    weight = loss.rebalance_weight(target)
    weight = weight / 2.0 * (1 - target) + weight * target
    scalar = cprfl_scalar_focal(weight.flatten().tolist(), shifted.tolist())
    ours = loss(logits, target).item()
    assert ours != pytest.approx(scalar, rel=1e-2)
    # ... and the element-wise formula on the same inputs is ours.
    elementwise = sum(2.0 * (1 - math.exp(-bce(v, t))) ** 2 * wt * bce(v, t)
                      for wt, (v, t) in zip(weight.flatten().tolist(), elements(shifted.tolist()))) / 6
    assert ours == pytest.approx(elementwise, rel=1e-6)


# --------------------------------------------------------------------------- every multi-label loss


@pytest.mark.parametrize("name", MULTI)
def test_every_loss_is_a_finite_differentiable_scalar(name):
    logits = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = (torch.rand(8, 3, generator=torch.Generator().manual_seed(1)) < 0.4).to(torch.uint8)
    loss = build(name)(logits, target)
    assert loss.shape == () and loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MULTI)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_and_an_all_negative_row_stay_finite(name, dtype):
    logits = torch.tensor([[100.0, -100.0, 100.0], [-100.0, 100.0, -100.0], [100.0, 100.0, -100.0]], dtype=dtype,
                          requires_grad=True)
    target = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.uint8)
    for values in ({}, {"gamma": 0.5}) if name in ("focal", "cb_focal", "dbl") else ({},):
        logits.grad = None
        loss = build(name, **values)(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), values


@pytest.mark.parametrize("name", MULTI)
def test_targets_of_any_dtype_give_the_same_loss(name):
    logits = z()
    values = {build(name)(logits, torch.tensor(TARGET, dtype=dtype)).item()
              for dtype in (torch.uint8, torch.bool, torch.float32, torch.float64, torch.int64)}
    assert len(values) == 1
    with pytest.raises(ValueError, match="shape"):
        build(name)(logits, torch.tensor(TARGET[0]))


@pytest.mark.parametrize("name", MULTI)
def test_the_loss_is_computed_in_the_logits_dtype(name):
    # float64 targets (as CPRFL's numpy labels) do not promote float32 logits.
    loss = build(name)(z().float(), y())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --------------------------------------------------------------------------- parameter validation


@pytest.mark.parametrize("name, values, message", [
    ("focal", {"gamma": -1}, r"`losses.focal.gamma` must be at least 0"),
    ("focal", {"alpha": 1.5}, r"`losses.focal.alpha` must be at most 1"),
    ("focal", {"alpha": "high"}, r"`losses.focal.alpha` must be a number"),
    ("asl", {"gamma_neg": -4}, r"`losses.asl.gamma_neg` must be at least 0"),
    ("asl", {"gamma_pos": -1}, r"`losses.asl.gamma_pos` must be at least 0"),
    ("asl", {"clip": 1.0}, r"`losses.asl.clip` must be less than 1"),
    ("asl", {"clip": -0.05}, r"`losses.asl.clip` must be at least 0"),
    ("asl", {"eps": 0}, r"`losses.asl.eps` must be greater than 0"),
    ("asl", {"eps": 1}, r"`losses.asl.eps` must be less than 1"),
    ("asl", {"reduction": "none"}, r"`losses.asl.reduction` is 'none'; valid values: mean, sum\."),
    ("cb_focal", {"beta": 1.0}, r"`losses.cb_focal.beta` must be less than 1"),
    ("cb_focal", {"gamma": -2}, r"`losses.cb_focal.gamma` must be at least 0"),
    ("cb_focal", {"balance": 0}, r"`losses.cb_focal.balance` must be greater than 0"),
    ("cb_focal", {"loss_weight": -10}, r"`losses.cb_focal.loss_weight` must be greater than 0"),
    ("dbl", {"preset": "lvis"}, r"`losses.dbl.preset` is 'lvis'; valid values: coco, voc\."),
    ("dbl", {"gamma": -2}, r"`losses.dbl.gamma` must be at least 0"),
    ("dbl", {"focal": "yes"}, r"`losses.dbl.focal` must be true or false"),
    ("dbl", {"balance": 0}, r"`losses.dbl.balance` must be greater than 0"),
    ("dbl", {"loss_weight": 0}, r"`losses.dbl.loss_weight` must be greater than 0"),
])
def test_bad_loss_parameters_are_clear_config_errors(name, values, message):
    with pytest.raises(ConfigError, match=message):
        build(name, **values)


def test_yaml_scientific_strings_are_numbers():
    # YAML 1.1 reads 1e-8 (no dot) as a string; Params accepts it.
    assert build("asl", eps="1e-8").eps == pytest.approx(1e-8)
