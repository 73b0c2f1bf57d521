"""Multi-label losses: logits ``[B, C]``, multi-hot targets ``[B, C]``, scalar output.

Notation: ``z`` the logits, ``y`` the multi-hot targets (cast to the logits' dtype: they
may arrive as uint8, bool or float64), ``p = sigmoid(z)``, ``n_c`` the number of training
images having class ``c`` (``labels.sum(0)``), ``N`` the number of training images
(``n_c <= N``; ``sum_c n_c`` is larger than ``N`` when images have several labels).

Every loss is computed element-wise over ``B x C`` and reduced once, at the end (mean over
``B x C`` unless its docstring says otherwise). In particular the focal terms of the
Distribution-Balanced family modulate each element's BCE by its own ``p_t``: CPRFL's copy
of DBL's ``ResampleLoss`` (``src/loss_functions/dbl.py``) reduced the BCE to a scalar
before the focal term, so its "focal" factor was one number for the whole batch.

A class without training images (``n_c = 0``) is never a positive in training, but its
negatives are still trained; the class-frequency formulas below divide by ``n_c`` or take
``log 0`` for it, and each loss says what it does instead.
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.core.options import NoOptions, option
from ltpipe.losses import register
from ltpipe.losses.single import FocalOptions, _buffer, _counts

# --------------------------------------------------------------------------- helpers


def _targets(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.shape != logits.shape:
        raise ValueError(f"multi-label targets must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    return target.to(logits.dtype)


def _one_minus_pt(bce: torch.Tensor) -> torch.Tensor:
    """``1 - p_t = 1 - exp(-BCE)``, as DBL's ``pt = exp(-BCE)``, computed as ``-expm1(-BCE)``
    (accurate when ``p_t`` is near 1) and floored at the smallest normal float, so the gradient
    of ``(1 - p_t)^gamma`` stays finite for ``0 < gamma < 1`` when ``p_t`` rounds to 1."""
    return (-torch.expm1(-bce)).clamp_min(torch.finfo(bce.dtype).tiny)


def _dbl_focal(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gamma: float,
               balance: float) -> torch.Tensor:
    """DBL's focal branch, element-wise: ``balance * (1 - p_t)^gamma * weight * BCE``, with
    ``BCE = BCE-with-logits(z, y)`` per element (``reduction='none'``) and ``p_t = exp(-BCE)``."""
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return balance * _one_minus_pt(bce).pow(gamma) * weight * bce


# --------------------------------------------------------------------------- losses


class BinaryCrossEntropy(nn.Module):
    """Element-wise binary cross-entropy with logits, averaged over ``B x C``
    (``nn.BCEWithLogitsLoss()``, CPRFL's ``bce``)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, _targets(logits, target))


class MultiLabelSoftMargin(nn.Module):
    """``nn.MultiLabelSoftMarginLoss()`` (CPRFL's ``mls``):
    ``l_i = -(1/C) sum_c [y_ic log sigmoid(z_ic) + (1 - y_ic) log sigmoid(-z_ic)]``, mean over
    the batch. The mean over classes then over images is the mean over ``B x C``, so this is
    numerically the same loss as ``bce``; it is here because CPRFL lists it."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.multilabel_soft_margin_loss(logits, _targets(logits, target))


class SigmoidFocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
    Eq. 5; Eq. 4 when ``alpha`` is null), element-wise over the ``B x C`` binary problems:

        l_ic = -alpha_t (1 - p_t)^gamma log p_t,    p_t = p if y = 1 else 1 - p,
        alpha_t = alpha if y = 1 else 1 - alpha (1 when alpha is null),

    mean over ``B x C``. ``log p_t`` and ``(1 - p_t)^gamma = exp(gamma log(1 - p_t))`` come
    from ``log_sigmoid`` (``log p = logsigmoid(z)``, ``log(1 - p) = logsigmoid(-z)``), so
    both stay finite, with finite gradients, for any logit. ``gamma = 0`` without alpha is
    ``bce``. Lin et al. use ``alpha = 0.25`` with ``gamma = 2`` for detection; here alpha is
    off by default (the DB-family losses below have their own re-weighting).

    Written as ``y * l(y=1) + (1 - y) * l(y=0)``, which for multi-hot targets is the formula
    above (and torchvision's ``sigmoid_focal_loss``). CPRFL's ``FL`` option (DBL's
    ``ResampleLoss`` with ``reweight_func=None`` and a ``logit_reg``) does not run: it
    divides the ``None`` weight by ``neg_scale`` (``src/loss_functions/dbl.py:398-406``).
    """

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = None):
        super().__init__()
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = _targets(logits, target)
        log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p, log(1 - p)
        pos = -torch.exp(self.gamma * log_q) * log_p  # -(1 - p)^gamma log p
        neg = -torch.exp(self.gamma * log_p) * log_q  # -p^gamma log(1 - p)
        if self.alpha is not None:
            pos, neg = self.alpha * pos, (1.0 - self.alpha) * neg
        return (y * pos + (1.0 - y) * neg).mean()


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss (Ridnik, Ben-Baruch et al., "Asymmetric Loss For Multi-Label
    Classification", ICCV 2021: asymmetric focusing with ``gamma_pos``/``gamma_neg`` and
    asymmetric probability shifting ``p_m = max(p - m, 0)`` of the negatives, ``m = clip``),
    exactly as CPRFL's ``AsymmetricLossOptimized(gamma_neg=4, gamma_pos=0, clip=0.05,
    eps=1e-8, disable_torch_grad_focal_loss=True)``:

        p      = sigmoid(z)
        xs_neg = min(1 - p + clip, 1)                       (= 1 - p_m; clip = 0: 1 - p)
        L      = y log(max(p, eps)) + (1 - y) log(max(xs_neg, eps))
        w      = (1 - p y - xs_neg (1 - y)) ^ (gamma_pos y + gamma_neg (1 - y))
        loss   = -reduce(L * w)

    The focusing weight ``w`` (``(1 - p)^gamma_pos`` for positives, ``p_m^gamma_neg`` for
    negatives) is computed without gradient, as ``disable_torch_grad_focal_loss=True``: it
    scales each element's gradient but is not differentiated itself. ``reduction``: ``mean``
    over ``B x C`` (CPRFL, and LMPT's identical ``asl.py``) or ``sum`` (the original ASL
    code, which returns ``-loss.sum()``); under Adam the two differ by a constant factor
    (``B x C``), which still changes the balance against weight decay and Adam's eps.

    No deviation: as the reference, ``max(p, eps)`` also cuts the gradient of a positive whose
    ``p`` is below ``eps`` (``z < -18.4``), and the loss is computed in the logits' dtype
    (CPRFL's targets were float64, so its loss ran in float64).
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)
        self.eps = float(eps)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = _targets(logits, target)
        p = torch.sigmoid(logits)
        xs_neg = 1.0 - p
        if self.clip > 0:
            xs_neg = (xs_neg + self.clip).clamp(max=1.0)
        loss = y * torch.log(p.clamp(min=self.eps)) + (1.0 - y) * torch.log(xs_neg.clamp(min=self.eps))
        if self.gamma_pos > 0 or self.gamma_neg > 0:
            with torch.no_grad():
                weight = torch.pow(1.0 - p * y - xs_neg * (1.0 - y),
                                   self.gamma_pos * y + self.gamma_neg * (1.0 - y))
            loss = loss * weight
        return -(loss.mean() if self.reduction == "mean" else loss.sum())


class ClassBalancedFocal(nn.Module):
    """Class-balanced focal loss, the "CB Focal" baseline of Wu et al. ("Distribution-Balanced
    Loss for Multi-Label Classification in Long-Tailed Datasets", ECCV 2020), after Cui et al.
    (CVPR 2019), as DBL's ``ResampleLoss(use_sigmoid=True, reweight_func='CB',
    CB_loss=dict(CB_beta=0.9, CB_mode='by_class'), focal=dict(focal=True, balance_param=2.0,
    gamma=2), loss_weight=10.0)``:

        w_c   = (1 - beta) / (1 - beta^{n_c})               (not normalised, as DBL)
        b_ic  = BCE-with-logits(z_ic, y_ic)                  (element-wise)
        p_t   = exp(-b_ic)
        l_ic  = loss_weight * balance * (1 - p_t)^gamma * w_c * b_ic

    mean over ``B x C``. The weight is per class and applies to positives and negatives alike.

    Deviations:

    - from CPRFL's ``CBloss``: no negative-tolerant logit regularisation (CPRFL passed DB's
      ``logit_reg``, which belongs to DB, to its CB loss as well), and element-wise focal
      terms (its ``binary_cross_entropy`` reduced the BCE to a scalar first).
    - from DBL: a class without training images gets the weight of a class with one image
      (``w_c = 1``, the largest weight; DBL's ``1 - beta^0 = 0`` would make it ``inf``).
    """

    def __init__(self, class_counts: np.ndarray, beta: float = 0.9, gamma: float = 2.0, balance: float = 2.0,
                 loss_weight: float = 10.0):
        super().__init__()
        counts = _counts(class_counts)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.balance = float(balance)
        self.loss_weight = float(loss_weight)
        weight = (1.0 - self.beta) / (1.0 - np.power(self.beta, np.maximum(counts, 1.0)))
        self.register_buffer("weight", _buffer(weight))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = _targets(logits, target)
        loss = _dbl_focal(logits, y, self.weight.to(logits.dtype), self.gamma, self.balance)
        return self.loss_weight * loss.mean()


# DBL's published values: configs/{coco,voc}/LT_resnet50_pfc_DB.py (logit_reg, map_param).
DB_PRESETS = {
    "coco": {"neg_scale": 2.0, "init_bias": 0.05, "map_alpha": 0.1, "map_beta": 10.0, "map_gamma": 0.2},
    "voc": {"neg_scale": 5.0, "init_bias": 0.05, "map_alpha": 0.1, "map_beta": 10.0, "map_gamma": 0.3},
}


class DistributionBalancedLoss(nn.Module):
    """Distribution-Balanced loss (Wu et al., "Distribution-Balanced Loss for Multi-Label
    Classification in Long-Tailed Datasets", ECCV 2020): re-balanced weighting and
    negative-tolerant regularisation (their Sec. 3), on DBL's focal BCE, as DBL's original
    ``ResampleLoss(use_sigmoid=True, reweight_func='rebalance', focal=dict(focal=True,
    balance_param=2.0, gamma=2), logit_reg=dict(neg_scale, init_bias), map_param=dict(alpha,
    beta, gamma), loss_weight=1.0)`` (``mllt/models/losses/resample_loss.py``):

    Re-balanced weight (``r_ik = P^C / P^I`` and its smoothing ``r^ = alpha + sigmoid(beta (r -
    mu))``, DBL's ``rebalance_weight``), the same for positives and negatives of an image::

        repeat_i = sum_c y_ic / n_c
        w_ic     = sigmoid(map_beta * ((1 / n_c) / repeat_i - map_gamma)) + map_alpha

    Negative-tolerant regularisation (DBL's ``logit_reg_functions``), with
    ``lambda = neg_scale`` and ``kappa = init_bias``::

        nu_c  = -log(N / n_c - 1) * init_bias / neg_scale     (DBL's self.init_bias)
        z'    = z + nu_c
        z''   = neg_scale * z'  for negatives,  z'  for positives
        w'    = w / neg_scale   for negatives,  w   for positives

    so a negative's loss is ``(w / lambda) log(1 + exp(lambda z'))``. Then, element-wise
    (``reduction='none'``, as DBL's ``cross_entropy_loss.py``)::

        b_ic = BCE-with-logits(z''_ic, y_ic),  p_t = exp(-b_ic)
        l_ic = loss_weight * balance * (1 - p_t)^gamma * w'_ic * b_ic     (focal: true)
        l_ic = loss_weight * w'_ic * b_ic                                  (focal: false)

    mean over ``B x C``. ``N`` is DBL's ``train_num`` (the number of training images; DBL
    reads it and ``n_c`` from its ``class_freq.pkl``, here they come from the training labels).
    The bias is divided by ``neg_scale``, as DBL's code (its published ``init_bias`` values
    go with that division): a negative's logit becomes
    ``neg_scale * z - init_bias * log(N / n_c - 1)``, a positive's ``z + nu_c``.

    Cases the formulas leave undefined, which DBL's code turns into ``inf``/``NaN``:

    - an image with no positive label (``repeat_i = 0``; COCO-LT's test split has 48): its
      weights are ``1 + map_alpha``, the limit of the formula as ``repeat_i -> 0`` (an image
      whose labels are all very frequent), and what DBL's code gives there (``1/n_c / 0 =
      inf``, ``sigmoid(inf) = 1``); such an image is never over-sampled by a class-aware
      sampler, so nothing is down-weighted.
    - a class without training images (``n_c = 0``): weight ``1 + map_alpha``, the limit as
      ``n_c -> 0`` (DBL: ``1/0`` in ``freq_inv`` and ``0 * inf = NaN`` in the repeat rate),
      and no bias (``log(N/0 - 1)`` is infinite).
    - a class in every training image (``n_c = N``): no bias (``log(0)``).

    Deviations from DBL's code, besides those cases: the logits are not modified in place
    (DBL's ``logits += self.init_bias`` changes the caller's tensor), and nothing is
    hard-wired to CUDA. From CPRFL's copy: element-wise focal terms (see the module
    docstring).
    """

    def __init__(self, class_counts: np.ndarray, num_images: float, neg_scale: float = 2.0, init_bias: float = 0.05,
                 map_alpha: float = 0.1, map_beta: float = 10.0, map_gamma: float = 0.2, focal: bool = True,
                 gamma: float = 2.0, balance: float = 2.0, loss_weight: float = 1.0):
        super().__init__()
        counts = _counts(class_counts)
        if num_images is None or not math.isfinite(num_images) or num_images < counts.max():
            raise ValueError(f"the DB loss needs the number of training images N >= every class count "
                             f"({counts.max():g}), got {num_images}")
        total = float(num_images)
        self.neg_scale = float(neg_scale)
        self.init_bias = float(init_bias)
        self.map_alpha = float(map_alpha)
        self.map_beta = float(map_beta)
        self.map_gamma = float(map_gamma)
        self.focal = bool(focal)
        self.gamma = float(gamma)
        self.balance = float(balance)
        self.loss_weight = float(loss_weight)
        present = counts > 0
        biased = present & (counts < total)
        freq_inv = np.zeros_like(counts)
        freq_inv[present] = 1.0 / counts[present]
        bias = np.zeros_like(counts)
        bias[biased] = -np.log(total / counts[biased] - 1.0) * self.init_bias / self.neg_scale
        self.num_images = total
        self.register_buffer("freq_inv", _buffer(freq_inv))
        self.register_buffer("present", torch.as_tensor(present))
        self.register_buffer("bias", _buffer(bias))

    def rebalance_weight(self, y: torch.Tensor) -> torch.Tensor:
        """``w_ic`` before the regularisation (``1 + map_alpha`` where undefined, see above)."""
        freq_inv = self.freq_inv.to(y.dtype)
        repeat = y @ freq_inv  # [B]
        labelled = repeat > 0
        pos_weight = freq_inv.unsqueeze(0) / torch.where(labelled, repeat, torch.ones_like(repeat)).unsqueeze(1)
        mapped = torch.sigmoid(self.map_beta * (pos_weight - self.map_gamma))
        defined = labelled.unsqueeze(1) & self.present.unsqueeze(0)
        return torch.where(defined, mapped, torch.ones_like(mapped)) + self.map_alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = _targets(logits, target)
        weight = self.rebalance_weight(y)
        shifted = logits + self.bias.to(logits.dtype)
        neg = 1.0 - y
        shifted = shifted * neg * self.neg_scale + shifted * y
        weight = weight / self.neg_scale * neg + weight * y
        if self.focal:
            loss = _dbl_focal(shifted, y, weight, self.gamma, self.balance)
        else:
            loss = weight * F.binary_cross_entropy_with_logits(shifted, y, reduction="none")
        return self.loss_weight * loss.mean()


# --------------------------------------------------------------------------- registry
# Multi-label factories: factory(options, class_counts, num_images).


def _below_one(why: str):
    def check(value: float) -> Optional[str]:
        return None if value < 1.0 else f"must be less than 1 ({why})"

    return check


@dataclass(frozen=True)
class ASLOptions:
    gamma_pos: float = option(0.0, minimum=0.0, doc="focusing exponent of the positives")
    gamma_neg: float = option(4.0, minimum=0.0, doc="focusing exponent of the negatives")
    clip: float = option(0.05, minimum=0.0, check=_below_one("it is the probability margin of the negatives; "
                                                                 "0 disables it"),
                         doc="probability shifting of the negatives, in [0, 1); 0: off")
    eps: float = option(1e-8, above=0.0, check=_below_one("it is the floor of the probabilities inside the logs"),
                        doc="floor of the probabilities inside the logs")
    reduction: str = option("mean", choices=("mean", "sum"), doc="mean over B x C (CPRFL) or sum (original ASL)")


@dataclass(frozen=True)
class ClassBalancedFocalOptions:
    beta: float = option(0.9, minimum=0.0, check=_below_one("beta = 1 divides by 1 - 1^n = 0; DBL uses 0.9"),
                         doc="effective-number beta, in [0, 1)")
    gamma: float = option(2.0, minimum=0.0, doc="focusing exponent")
    balance: float = option(2.0, above=0.0, doc="DBL's balance_param")
    loss_weight: float = option(10.0, above=0.0, doc="DBL's loss_weight for the CB baseline")


@dataclass(frozen=True)
class DistributionBalancedOptions:
    preset: str = option("coco", choices=tuple(DB_PRESETS),
                         doc="DBL's published neg_scale / init_bias / map_* for COCO-LT or VOC-LT")
    focal: bool = option(True, doc="the focal variant")
    gamma: float = option(2.0, minimum=0.0, doc="focusing exponent")
    balance: float = option(2.0, above=0.0, doc="DBL's balance_param")
    loss_weight: float = option(1.0, above=0.0, doc="DBL's loss_weight (its no-focal variant used 0.5)")


@register("bce", "multi")
def _bce(options: NoOptions, class_counts, num_images):
    """Binary cross-entropy per class."""
    return BinaryCrossEntropy()


@register("mls", "multi")
def _mls(options: NoOptions, class_counts, num_images):
    """nn.MultiLabelSoftMarginLoss, numerically equal to bce (CPRFL lists it)."""
    return MultiLabelSoftMargin()


@register("focal", "multi", FocalOptions)
def _focal(options: FocalOptions, class_counts, num_images):
    return SigmoidFocalLoss(options.gamma, options.alpha)


@register("asl", "multi", ASLOptions)
def _asl(options: ASLOptions, class_counts, num_images):
    """Asymmetric Loss (Ridnik et al., ICCV 2021), CPRFL's loss."""
    return AsymmetricLoss(gamma_pos=options.gamma_pos, gamma_neg=options.gamma_neg, clip=options.clip,
                          eps=options.eps, reduction=options.reduction)


@register("cb_focal", "multi", ClassBalancedFocalOptions)
def _cb_focal(options: ClassBalancedFocalOptions, class_counts, num_images):
    """Class-balanced focal loss, DBL's CB baseline (Wu et al., ECCV 2020)."""
    return ClassBalancedFocal(class_counts, beta=options.beta, gamma=options.gamma, balance=options.balance,
                              loss_weight=options.loss_weight)


@register("dbl", "multi", DistributionBalancedOptions)
def _dbl(options: DistributionBalancedOptions, class_counts, num_images):
    """Distribution-Balanced loss (Wu et al., ECCV 2020)."""
    return DistributionBalancedLoss(class_counts, num_images, **DB_PRESETS[options.preset], focal=options.focal,
                                    gamma=options.gamma, balance=options.balance, loss_weight=options.loss_weight)
