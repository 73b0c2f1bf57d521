"""Single-label losses with per-class margins, a re-weighting schedule or a regulariser: LDAM
with deferred re-weighting (Cao et al. 2019), generalised re-weighting (GRW, Zhang et al. 2021)
and LADE (Hong et al. 2021). Inputs, outputs and notation as in :mod:`ltpipe.losses.single`,
whose class-count helpers they share; a class without training images gets weight 0 / margin 0
here too.

Losses whose behaviour changes during training expose ``set_progress(step, total_steps)``;
the training loop calls it, when present, before every optimiser step (0-based), so a
schedule means the same with `train.epochs` and with `train.iterations`.
Losses meant for a normalised (cosine) classifier expose ``head_scale``, the fixed
scale ``s`` of ``logits = s * cos`` that the training code gives that head.
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.core.options import option
from ltpipe.losses import register
from ltpipe.losses.single import (
    WeightedCrossEntropy,
    _beta_below_one,
    _buffer,
    _counts,
    _log_prior,
    _normalised,
    effective_number_weights,
)

# --------------------------------------------------------------------------- losses


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
    the logits' dtype. ``s = None`` is Imbalance-VLM's variant (its presets set it, with
    ``drw: false``): the margin ``m_y`` itself is subtracted from the raw logits of any
    head, ``CE(z - m_y * onehot(y), y)``, and no head scale is fixed.
    """

    head_scale: Optional[float] = 30.0

    def __init__(self, class_counts: np.ndarray, max_m: float = 0.5, s: Optional[float] = 30.0, drw: bool = True,
                 drw_start: float = 0.8, drw_beta: float = 0.9999):
        super().__init__()
        counts = _counts(class_counts)
        present = counts > 0
        margins = np.zeros_like(counts)
        margins[present] = counts[present] ** -0.25
        margins *= max_m / margins.max()
        self.max_m = float(max_m)
        self.head_scale = None if s is None else float(s)
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
        margins = self.margins.to(logits.dtype)
        shift = (margins if self.head_scale is None else self.head_scale * margins)[target]
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
# Options: one frozen dataclass per loss name (the only place its defaults and bounds live).


@dataclass(frozen=True)
class LDAMOptions:
    max_m: float = option(0.5, above=0.0, doc="margin of the rarest class")
    s: Optional[float] = option(30.0, above=0.0, doc="fixed scale of the cosine head; null: margins on the raw logits "
                                                    "of any head, no scale (Imbalance-VLM's variant)")
    drw: bool = option(True, doc="deferred re-weighting from drw_start")
    drw_start: float = option(0.8, minimum=0.0, maximum=1.0, doc="share of the steps before re-weighting")
    drw_beta: float = option(0.9999, minimum=0.0, check=_beta_below_one, doc="effective-number beta of DRW")


@dataclass(frozen=True)
class GRWOptions:
    rho: float = option(1.2, minimum=0.0, doc="exponent of the inverse-frequency weights")


@dataclass(frozen=True)
class LADEOptions:
    lambda_e: float = option(0.1, minimum=0.0, doc="weight of the regularised estimation loss R")
    lambda_r: float = option(0.1, minimum=0.0, doc="ReMINE regulariser inside R (lambda_r * second^2)")


@register("ldam", "single", LDAMOptions, needs_fixed_scale=True)
def _ldam(options: LDAMOptions, class_counts):
    """LDAM with deferred re-weighting (Cao et al., NeurIPS 2019); needs the cosine head (any head with ``s: null``)."""
    return LDAMLoss(class_counts, max_m=options.max_m, s=options.s, drw=options.drw, drw_start=options.drw_start,
                    drw_beta=options.drw_beta)


@register("grw", "single", GRWOptions)
def _grw(options: GRWOptions, class_counts):
    """Generalised re-weighting (Zhang et al., CVPR 2021)."""
    return GeneralizedReweightCE(class_counts, options.rho)


@register("lade", "single", LADEOptions)
def _lade(options: LADEOptions, class_counts):
    """LADE (Hong et al., CVPR 2021)."""
    return LADELoss(class_counts, options.lambda_e, options.lambda_r)
