"""Single-label losses: logits ``[B, C]``, integer targets ``[B]``, scalar output.

Notation: ``n_c`` is the training count of class ``c``, ``N = sum_c n_c``, ``p_c = n_c / N``
the training prior, ``C`` the number of classes, ``B`` the batch size.

A class with no training image (``n_c = 0``) can never be a target, so it needs no
weight or margin. The formulas below would divide by zero or take ``log 0`` for it, so
every loss computes its class statistics over the classes that have training images
only and gives absent classes weight 0 / margin 0 (prior-adjusted losses give them an
adjusted logit of ``-inf``, as the formula says). With every class present this is
exactly the formula.

Losses whose behaviour changes during training expose ``set_progress(step, total_steps)``;
the training loop calls it, when present, before every optimiser step (0-based), so a
schedule means the same with `train.epochs` and with `train.iterations`.
Losses meant for a normalised (cosine) classifier expose ``head_scale``, the fixed
scale ``s`` of ``logits = s * cos`` that the training code gives that head.
"""

import math
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.config import Params
from ltpipe.errors import ConfigError
from ltpipe.losses import register

# --------------------------------------------------------------------------- helpers


def _key(section: Optional[Params], name: str) -> str:
    prefix = section.prefix if section is not None else ""
    return f"{prefix}.{name}" if prefix else name


def _float(section: Optional[Params], name: str, default: float, **limits) -> float:
    """``section.float(name, **limits)``, or the default when the section is absent."""
    return default if section is None else section.float(name, default=default, **limits)


def _bool(section: Optional[Params], name: str, default: bool) -> bool:
    return default if section is None else section.bool(name, default=default)


def _beta(section: Optional[Params], name: str, default: float) -> float:
    """A class-balancing ``beta`` in [0, 1). ``beta = 1`` makes ``1 - beta^n`` zero for every class."""
    beta = _float(section, name, default, minimum=0.0)
    if beta >= 1.0:
        raise ConfigError(f"`{_key(section, name)}` must be less than 1 (beta = 1 divides by 1 - 1^n = 0; "
                          f"0.9999 is the usual value, 0 gives plain cross-entropy), got {beta}.")
    return beta


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


class LDAMLoss(nn.Module):
    """LDAM with deferred re-weighting (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019: the LDAM loss with margins
    ``Delta_j = C / n_j^{1/4}``, and deferred re-weighting, Sec. 3.3 / Algorithm 1).

    Margins ``m_c = C_m / n_c^{1/4}``, with ``C_m`` chosen so that the largest margin is
    ``max_m``. The loss expects the logits of a *normalised* (cosine) classifier,
    ``z = s * cos``, whose scale the training code fixes to ``s`` (read from
    ``head_scale``). Cao et al. subtract the margin from the cosine and then scale by s
    (``CE(s * (cos - m_y * onehot(y)), y)``); on ``z = s * cos`` that is

        L = CE(z - s * m_y * onehot(y), y, weight=w)

    DRW: until step ``round(drw_start * total_steps)`` the weight is ``None`` (plain LDAM);
    from then on ``w_c = (1 - beta) / (1 - beta^{n_c})`` normalised to sum to ``C``
    (Cui et al.'s effective number, as Cao et al.'s code), with PyTorch's weighted mean
    ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` as in Cao et al.'s code. The training loop must
    call ``set_progress(step, total_steps)`` before every step. Cao et al. start DRW at
    epoch 160 of 200, hence ``drw_start = 0.8``; counting steps rather than epochs gives
    the same switch point with whole epochs, and a correct one with `train.iterations` or
    very few epochs (an epoch count would round 0.8 x 2 epochs to "never").

    Deviations from Imbalance-VLM's ``ldam_loss`` (``utils.py:63-73``): it declared
    ``s = 30`` but never used it and trained a plain ``nn.Linear`` (unnormalised logits),
    had no DRW schedule, and built the margin with a uint8 mask and
    ``torch.cuda.DoubleTensor`` (CUDA only, float64 logits). Here the scale is applied
    through the cosine head, DRW is on by default, and everything runs on any device in
    the logits' dtype.
    """

    head_scale: float = 30.0

    def __init__(self, class_counts: np.ndarray, max_m: float = 0.5, s: float = 30.0, drw: bool = True,
                 drw_start: float = 0.8, drw_beta: float = 0.9999):
        super().__init__()
        counts = _counts(class_counts)
        present = counts > 0
        margins = np.zeros_like(counts)
        margins[present] = counts[present] ** -0.25
        margins *= max_m / margins.max()
        self.max_m = float(max_m)
        self.head_scale = float(s)
        self.drw = bool(drw)
        self.drw_start = float(drw_start)
        self.drw_beta = float(drw_beta)
        self.register_buffer("margins", _buffer(margins))
        self.register_buffer("drw_weight", _buffer(effective_number_weights(counts, drw_beta)))
        # Before the first set_progress call, the state of step 0.
        self.drw_active = self.drw and self.drw_start == 0

    def drw_step(self, total_steps: int) -> int:
        """The first (0-based) step with re-weighting."""
        return round(self.drw_start * total_steps)

    def set_progress(self, step: int, total_steps: int) -> None:
        if total_steps < 1 or not 0 <= step:
            raise ValueError(f"set_progress needs 0 <= step and total_steps >= 1, got {step}, {total_steps}")
        self.drw_active = self.drw and step >= self.drw_step(total_steps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        shift = (self.head_scale * self.margins.to(logits.dtype))[target]
        adjusted = logits.scatter_add(1, target.view(-1, 1), -shift.view(-1, 1))
        weight = self.drw_weight.to(logits.dtype) if self.drw_active else None
        return F.cross_entropy(adjusted, target, weight=weight)


class GeneralizedReweightCE(WeightedCrossEntropy):
    """Generalised re-weighting (Zhang et al., "Distribution Alignment: A Unified Framework
    for Long-tail Visual Recognition" (DisAlign), CVPR 2021, its generalized re-weighting):
    ``w_c = C * p_c^{-rho} / sum_k p_k^{-rho}``, with PyTorch's weighted-mean
    cross-entropy ``sum_i w_{y_i} l_i / sum_i w_{y_i}``, as Imbalance-VLM's ``grw_loss``
    (``utils.py:25-31``; ``rho`` is its ``exp_scale``, 1.2). ``rho = 0`` is CE, ``rho = 1``
    inverse frequency. No deviation, except that the sum runs over the classes with
    training images (an absent class would make it infinite) and absent classes get
    weight 0."""

    def __init__(self, class_counts: np.ndarray, rho: float = 1.2):
        counts = _counts(class_counts)
        present = counts > 0
        prior = counts / counts.sum()
        raw = np.ones_like(counts)
        raw[present] = prior[present] ** -float(rho)
        super().__init__(_normalised(raw, present))
        self.rho = float(rho)


class LADELoss(nn.Module):
    """LADE (Hong et al., "Disentangling Label Distribution for Long-tailed Visual
    Recognition", CVPR 2021: the LADE loss, i.e. the prior-adjusted CE plus the
    regularised estimation loss), as the reference code (hyperconnect/LADE,
    ``PriorCELoss`` + ``LADELoss``):

        L = CE(z + log p, y) + lambda_e * R(z)

    with the regulariser on the **raw** logits ``z``: for every class c,

        first_c  = (1 / (b_c + 1e-8)) * sum_{i: y_i = c} z_ic       (0 if c is not in the batch)
        second_c = logsumexp_i(z_ic - log p_c + log(1 / C)) - log B
        estim_c  = first_c - second_c - lambda_r * second_c^2
        R        = -sum_c p_c * estim_c

    ``b_c`` is the number of class-c samples in the batch; ``estim_c`` is the ReMINE
    lower bound (MINE with the regulariser ``lambda_r * second^2``) of the class-c
    log-likelihood ratio under a uniform target prior.

    Deviations:

    - from Imbalance-VLM (``utils.py:33-59``): it fed the prior-adjusted logits
      ``z + log p`` to the regulariser; the reference ``LADELoss`` takes the raw
      ``y_pred``, as here.
    - from the reference code: ``log p_c`` and ``log(1/C)`` are exact, where the reference
      adds 1e-9 inside each log; and classes without training images (``p_c = 0``, weight
      0 in R) are left out of R instead of entering with ``log(0 + 1e-9)``. Both change R
      by a negligible amount or not at all.
    """

    def __init__(self, class_counts: np.ndarray, lambda_e: float = 0.1, lambda_r: float = 0.1):
        super().__init__()
        counts = _counts(class_counts)
        present = counts > 0
        self.lambda_e = float(lambda_e)
        self.lambda_r = float(lambda_r)
        log_prior = _log_prior(counts)
        self.register_buffer("log_prior", _buffer(log_prior))
        self.register_buffer("prior", _buffer(counts / counts.sum()))
        self.register_buffer("present", torch.as_tensor(present))
        # z_ic - log p_c + log(1/C); 0 for an absent class, which R leaves out.
        self.register_buffer("balance_shift", _buffer(np.where(present, -log_prior - math.log(len(counts)), 0.0)))

    def regulariser(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch, num_classes = logits.shape
        onehot = F.one_hot(target, num_classes).to(logits.dtype)
        first = (onehot * logits).sum(0) / (onehot.sum(0) + 1e-8)
        second = torch.logsumexp(logits + self.balance_shift.to(logits.dtype), dim=0) - math.log(batch)
        estim = first - second - self.lambda_r * second.square()
        return -(self.prior.to(logits.dtype) * estim)[self.present].sum()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits + self.log_prior.to(logits.dtype), target)
        if self.lambda_e == 0:
            return ce
        return ce + self.lambda_e * self.regulariser(logits, target)


# --------------------------------------------------------------------------- registry


@register("ce", "single")
def _ce(section, class_counts):
    return CrossEntropy()


@register("bsm", "single")
def _bsm(section, class_counts):
    return BalancedSoftmax(class_counts)


@register("focal", "single")
def _focal(section, class_counts):
    return FocalLoss(_float(section, "gamma", 2.0, minimum=0.0))


@register("cbw", "single")
def _cbw(section, class_counts):
    return InverseFrequencyCE(class_counts)


@register("cb", "single")
def _cb(section, class_counts):
    return ClassBalancedCE(class_counts, _beta(section, "beta", 0.9999))


@register("la", "single")
def _la(section, class_counts):
    return LogitAdjustedLoss(class_counts, _float(section, "tau", 1.0, minimum=0.0))


@register("ldam", "single")
def _ldam(section, class_counts):
    return LDAMLoss(
        class_counts,
        max_m=_float(section, "max_m", 0.5, minimum=0.0, exclusive_minimum=True),
        s=_float(section, "s", 30.0, minimum=0.0, exclusive_minimum=True),
        drw=_bool(section, "drw", True),
        drw_start=_float(section, "drw_start", 0.8, minimum=0.0, maximum=1.0),
        drw_beta=_beta(section, "drw_beta", 0.9999),
    )


@register("grw", "single")
def _grw(section, class_counts):
    return GeneralizedReweightCE(class_counts, _float(section, "rho", 1.2, minimum=0.0))


@register("lade", "single")
def _lade(section, class_counts):
    return LADELoss(class_counts, _float(section, "lambda_e", 0.1, minimum=0.0),
                    _float(section, "lambda_r", 0.1, minimum=0.0))
