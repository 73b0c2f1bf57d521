"""Single-label losses: logits ``[B, C]``, integer targets ``[B]``, scalar output.

Notation: ``n_c`` is the training count of class ``c``, ``N = sum_c n_c``, ``p_c = n_c / N``
the training prior, ``C`` the number of classes, ``B`` the batch size.

A class with no training image (``n_c = 0``) can never be a target, so it needs no
weight or margin. The formulas below would divide by zero or take ``log 0`` for it, so
every loss computes its class statistics over the classes that have training images
only and gives absent classes weight 0 / margin 0 (prior-adjusted losses give them an
adjusted logit of ``-inf``, as the formula says). With every class present this is
exactly the formula.

LDAM, GRW and LADE are in :mod:`ltpipe.losses.margins`.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.core.options import NoOptions, option
from ltpipe.losses import register

# --------------------------------------------------------------------------- helpers


def _counts(class_counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or np.any(counts < 0) or not np.any(counts > 0):
        raise ValueError(f"class counts must be a 1-D array of non-negative numbers, not all 0; got {counts}")
    return counts


def _log_prior(counts: np.ndarray) -> np.ndarray:
    """``log(n_c / N)``; ``-inf`` for a class without training images."""
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def _normalised(raw: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Weights that sum to the number of (present) classes; 0 for absent classes."""
    weights = np.where(present, raw, 0.0)
    return weights * (present.sum() / weights.sum())


def effective_number_weights(class_counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al. (CVPR 2019): ``w_c = (1 - beta) / (1 - beta^{n_c})``, the inverse of the
    effective number of samples ``E_n = (1 - beta^n) / (1 - beta)`` (their Proposition 1),
    normalised so ``sum_c w_c = C`` (as their code)."""
    counts = _counts(class_counts)
    present = counts > 0
    raw = np.ones_like(counts)
    raw[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    return _normalised(raw, present)


def _buffer(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- losses


class CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)


class BalancedSoftmax(nn.Module):
    """Balanced Softmax (Ren et al., NeurIPS 2020, Eq. 4): cross-entropy on
    ``z + log p``, with ``p_c = n_c / N`` the training class prior. Prediction uses the
    raw logits. Equal to the logit-adjusted loss with tau = 1 (Menon et al. 2021)."""

    def __init__(self, class_counts: np.ndarray):
        super().__init__()
        self.register_buffer("log_prior", _buffer(_log_prior(_counts(class_counts))))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), target)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. 4
    without the alpha balance): ``l_i = -(1 - p_{y_i})^gamma * log p_{y_i}``, batch mean,
    with ``p = softmax(z)``. ``gamma = 0`` is cross-entropy; a larger gamma down-weights
    well-classified (easy) examples.

    Deviations from Imbalance-VLM (``imblearn/algorithms/supervised/utils.py:12-18``):

    - ``log p_y`` comes from ``log_softmax`` and only the target column is used.
      Imbalance-VLM computed ``-sum_c onehot_c (1 - softmax_c)^gamma log(softmax_c)``:
      ``log(softmax)`` underflows to ``log 0 = -inf`` for far-below classes and
      ``0 * -inf`` is NaN (seen with 8,142 classes and a logit gap of 120 in fp32).
    - ``1 - p_y`` is computed as ``-expm1(log p_y)`` (accurate when ``p_y`` is near 1),
      floored at the smallest normal float so the gradient of ``(1 - p_y)^gamma`` stays
      finite for ``0 < gamma < 1`` when ``p_y`` rounds to 1 (the true gradient there is 0).
    - No alpha, as Imbalance-VLM (it used gamma = 2 fixed; here gamma is a parameter).
    """

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=-1).gather(1, target.view(-1, 1)).squeeze(1)
        if self.gamma == 0:
            return -log_p.mean()
        one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
        return -(one_minus_p.pow(self.gamma) * log_p).mean()


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with per-class weights, reduced as PyTorch's weighted mean
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (``F.cross_entropy(weight=w)``). Under that
    reduction a common factor of the weights cancels, so only their ratios matter."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.register_buffer("weight", _buffer(weights))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.weight.to(logits.dtype))


class InverseFrequencyCE(WeightedCrossEntropy):
    """Class-balanced re-weighting by inverse frequency, as Imbalance-VLM's ``cbw_loss``
    (``utils.py:20-23``): ``w_c = N / (C n_c) = 1 / (C p_c)``, and
    ``F.cross_entropy(z, y, weight=w)``: the weighted mean
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}``. (This is not Cui et al.'s effective-number
    weighting; that is the ``cb`` loss.) No deviation, except that a class without
    training images gets weight 0 instead of ``inf`` (it is never a target)."""

    def __init__(self, class_counts: np.ndarray):
        counts = _counts(class_counts)
        present = counts > 0
        weights = np.zeros_like(counts)
        weights[present] = counts.sum() / (len(counts) * counts[present])
        super().__init__(weights)


class ClassBalancedCE(nn.Module):
    """Class-balanced loss by the effective number of samples (Cui et al., "Class-Balanced
    Loss Based on Effective Number of Samples", CVPR 2019; the class-balanced softmax
    cross-entropy loss, weight ``1 / E_{n_y}``): ``w_c = (1 - beta) / (1 - beta^{n_c})``, normalised so that
    ``sum_c w_c = C``, and

        L = (1 / B) * sum_i w_{y_i} * CE(z_i, y_i)

    i.e. Cui et al.'s formulation (their code multiplies each sample's loss by its class
    weight and averages over the batch), **not** PyTorch's weighted mean
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}``: the loss scale depends on the batch's classes.
    ``beta = 0`` gives plain cross-entropy; ``beta -> 1`` approaches inverse frequency.

    Imbalance-VLM has no effective-number loss (its ``cbw_loss`` is inverse frequency,
    our ``cbw``).
    """

    def __init__(self, class_counts: np.ndarray, beta: float = 0.9999):
        super().__init__()
        self.beta = float(beta)
        self.register_buffer("weight", _buffer(effective_number_weights(class_counts, beta)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, target, reduction="none")
        return (self.weight.to(logits.dtype)[target] * per_sample).mean()


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment",
    ICLR 2021, Eq. 10): ``CE(z + tau * log p, y)`` with ``p_c = n_c / N``; prediction uses
    the raw logits. ``tau = 1`` is Balanced Softmax (``bsm``); ``tau = 0`` is CE.

    Imbalance-VLM only had ``balanced_softmax`` (tau fixed at 1, computed in float64);
    here tau is a parameter and the computation is in the logits' dtype.
    """

    def __init__(self, class_counts: np.ndarray, tau: float = 1.0):
        super().__init__()
        self.tau = float(tau)
        log_prior = _log_prior(_counts(class_counts))
        # tau * log 0 = -inf for an absent class, but 0 * -inf would be NaN: with tau = 0 nothing is adjusted.
        adjust = np.where(np.isfinite(log_prior), self.tau * log_prior, -np.inf if self.tau > 0 else 0.0)
        self.register_buffer("adjustment", _buffer(adjust))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.adjustment.to(logits.dtype), target)


# --------------------------------------------------------------------------- registry
# Options: one frozen dataclass per loss name (the only place its defaults and bounds live).


def _beta_below_one(value: float) -> Optional[str]:
    """``beta = 1`` makes ``1 - beta^n`` zero for every class."""
    if value < 1.0:
        return None
    return ("must be less than 1 (beta = 1 divides by 1 - 1^n = 0; 0.9999 is the usual value, 0 gives plain "
            "cross-entropy)")


@dataclass(frozen=True)
class FocalOptions:
    gamma: float = option(2.0, minimum=0.0, doc="focusing exponent; 0 is cross-entropy")
    alpha: Optional[float] = option(None, minimum=0.0, maximum=1.0,
                                    doc="multi-label only: weight of positives (negatives 1 - alpha); null: none")


@dataclass(frozen=True)
class ClassBalancedOptions:
    beta: float = option(0.9999, minimum=0.0, check=_beta_below_one, doc="effective-number beta, in [0, 1)")


@dataclass(frozen=True)
class LogitAdjustedOptions:
    tau: float = option(1.0, minimum=0.0, doc="scale of the log-prior adjustment (1: Balanced Softmax)")


@register("ce", "single")
def _ce(options: NoOptions, class_counts):
    """Cross-entropy."""
    return CrossEntropy()


@register("bsm", "single")
def _bsm(options: NoOptions, class_counts):
    """Balanced Softmax (Ren et al., NeurIPS 2020): cross-entropy on z + log prior."""
    return BalancedSoftmax(class_counts)


@register("focal", "single", FocalOptions)
def _focal(options: FocalOptions, class_counts):
    """Focal loss (Lin et al., ICCV 2017); multi-label: the sigmoid focal loss."""
    return FocalLoss(options.gamma)  # `alpha` belongs to the multi-label variant: one section serves both


@register("cbw", "single")
def _cbw(options: NoOptions, class_counts):
    """Inverse-frequency class weights (Imbalance-VLM's CBW)."""
    return InverseFrequencyCE(class_counts)


@register("cb", "single", ClassBalancedOptions)
def _cb(options: ClassBalancedOptions, class_counts):
    """Class-balanced cross-entropy by effective number (Cui et al., CVPR 2019)."""
    return ClassBalancedCE(class_counts, options.beta)


@register("la", "single", LogitAdjustedOptions)
def _la(options: LogitAdjustedOptions, class_counts):
    """Logit-adjusted loss (Menon et al., ICLR 2021)."""
    return LogitAdjustedLoss(class_counts, options.tau)
