"""Two-stage methods (`stage2:`): adjust the classifier of a trained stage-1 head.

The stage-1 head's representation ``h = head.features(x)`` is frozen, computed once
for every cached training and validation row, and only the parameters a method
names are trained on it, with the method's loss and sampler
(`stage2_methods.<name>`) and the stage-1 `train` settings (Imbalance-VLM trains
stage 2 with the stage-1 optimiser and schedule). The result is a
:class:`TwoStageHead` that predicts from raw cached features.

Fixes over Imbalance-VLM's code (Wang et al., IJCV 2023): cRT re-initialises the
classifier (theirs kept the stage-1 one for CLIP models); MARC's weight norms are a
buffer saved with the model (theirs were recomputed from a random classifier when
loading); tau-normalisation, absent there, is added with tau chosen on validation.
"""

import copy
from dataclasses import dataclass, make_dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe import losses
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.core.options import option
from ltpipe.core.registry import Registry
from ltpipe.evaluation import metrics
from ltpipe.evaluation.inference import FeatureInput, predict
from ltpipe.heads import HEADS
from ltpipe.training.samplers import SAMPLERS


class TwoStageHead(nn.Module):
    """A stage-1 head whose logits come from a stage-2 ``adjuster(h, head)``."""

    def __init__(self, head: nn.Module, adjuster: nn.Module):
        super().__init__()
        self.head = head
        self.adjuster = adjuster
        self.input = head.input
        self.kwargs = head.kwargs  # what rebuilds the stage-1 head; the method's name is saved beside it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adjuster(self.head.features(x), self.head)


class OnRepresentation(nn.Module):
    """What stage 2 trains: the adjuster on precomputed ``h``, the stage-1 head frozen."""

    def __init__(self, head: nn.Module, adjuster: nn.Module):
        super().__init__()
        self.head = head
        self.adjuster = adjuster

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adjuster(h, self.head)


def classifier_weight(head: nn.Module) -> torch.Tensor:
    """``W`` with ``z = W h (+ b)`` for the head's classifier."""
    classifier = head.classifier
    if hasattr(classifier, "effective_weight"):
        return classifier.effective_weight()
    return classifier.weight


class CRT(nn.Module):
    """Classifier re-training (Kang et al., ICLR 2020, Sec. 4): a freshly initialised
    classifier of the stage-1 kind on the frozen representation, class-balanced sampling."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.classifier = head.make_classifier()

    def forward(self, h, head):
        return self.classifier(h)


class LWS(nn.Module):
    """Learnable weight scaling (Kang et al. 2020): ``z' = s ⊙ (W h + b)``, ``s`` init 1."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.scales = nn.Parameter(torch.ones(head.kwargs["num_classes"]))

    def forward(self, h, head):
        return self.scales * head.classifier(h)


class TauNorm(nn.Module):
    """tau-normalised classifier (Kang et al., ICLR 2020, Sec. 4, Eq. 3): ``z_c = w_c.h / ||w_c||^tau + b_c``.
    No training: tau is picked on the validation split.

    The bias is kept as stage 1 learned it. Kang et al.'s ``tau_norm.py`` loads the classifier's
    bias and never uses it (its logits are ``h @ (w_c / ||w_c||^tau)``), which the paper justifies
    by the bias's negligible effect on their ResNeXt features. Here it is not negligible: on
    L2-normalised CLIP features ``|w_c.h| <= ||w_c||``, so the bias carries much of what a linear
    head learned (dropping it took test top-1 from 0.262 to 0.172 on a real long-tailed dataset).
    Keeping it makes tau = 0 the stage-1 head exactly, so the tau chosen on validation never
    scores below stage 1 there.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        if not isinstance(head.classifier, nn.Linear):
            raise ConfigError("`stage2: tau_norm` needs a classifier with free weight norms (head linear or "
                              "decoder); a cosine head's weights are normalised already.")
        self.register_buffer("tau", torch.tensor(1.0))

    def forward(self, h, head):
        weight = head.classifier.weight
        # norm ** 0 is exactly 1, so tau = 0 computes the very op of the stage-1 nn.Linear.
        return F.linear(h, weight / weight.norm(dim=1, keepdim=True).pow(self.tau), head.classifier.bias)


class DisAlign(nn.Module):
    """Distribution alignment (Zhang et al., CVPR 2021, Eq. 3-4): ``sigma = sigmoid(v.h + c)``,
    ``z' = (1 + sigma alpha) ⊙ z + sigma beta``, alpha init 1, beta init 0, ``v`` init 0.1 (their
    code; Imbalance-VLM kept PyTorch's default init)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        num_classes = head.kwargs["num_classes"]
        self.confidence = nn.Linear(classifier_weight(head).shape[1], 1)
        nn.init.constant_(self.confidence.weight, 0.1)
        # 1-D, so weight decay (matrices only) leaves them alone, as LWS's scales.
        self.alpha = nn.Parameter(torch.ones(num_classes))
        self.beta = nn.Parameter(torch.zeros(num_classes))

    def forward(self, h, head):
        sigma = torch.sigmoid(self.confidence(h))
        return (1 + sigma * self.alpha) * head.classifier(h) + sigma * self.beta


class MARC(nn.Module):
    """Margin calibration (Wang et al. 2021, Eq. 6): ``z' = a ⊙ z + b ⊙ ||w_c||``, a init 1,
    b init 0. The stage-1 weight norms are a buffer, so they survive save and load."""

    def __init__(self, head: nn.Module):
        super().__init__()
        num_classes = head.kwargs["num_classes"]
        self.a = nn.Parameter(torch.ones(num_classes))  # 1-D: exempt from weight decay
        self.b = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("weight_norm", classifier_weight(head).detach().norm(dim=1).clone())

    def forward(self, h, head):
        return self.a * head.classifier(h) + self.b * self.weight_norm


def _trained_options(loss: str, sampler: str) -> type:
    """The options of a method that trains: its loss and sampler (the optimiser and schedule are `train`'s)."""
    return make_dataclass("Stage2Options", [
        ("loss", str, option(loss, doc="loss of the stage-2 training (a loss name)")),
        ("sampler", str, option(sampler, doc="sampler of the stage-2 training (a sampler name)"))], frozen=True)


STAGE2: Registry = Registry("stage-2 method", "stage2", section="stage2_methods")
# per_class_monotone: a positive rescaling (plus a constant) of each class's logit: it cannot reorder the
# images within a class, so per-class AP, hence mAP, the multi-label validation score, cannot change.
STAGE2.register("crt", _trained_options("ce", "class_balanced"), trains=True, per_class_monotone=False)(CRT)
STAGE2.register("lws", _trained_options("ce", "class_balanced"), trains=True, per_class_monotone=True)(LWS)
STAGE2.register("tau_norm", trains=False, per_class_monotone=True)(TauNorm)
STAGE2.register("disalign", _trained_options("grw", "instance"), trains=True, per_class_monotone=False)(DisAlign)
STAGE2.register("marc", _trained_options("grw", "instance"), trains=True, per_class_monotone=True)(MARC)
NAMES = ("none",) + tuple(STAGE2.names())
# A stage-2 loss named for single-label data and its one obvious multi-label counterpart
# (softmax cross-entropy -> per-class sigmoid cross-entropy). Re-weighting losses (grw) have none.
MULTI_LABEL_COUNTERPART = {"ce": "bce"}


def check_head(name: str, head_name: str) -> None:
    if not HEADS.capability(head_name, "adjustable_classifier"):
        raise ConfigError(f"`stage2: {name}` adjusts a trained classifier; head {head_name} has none. "
                          f"Use head {' or '.join(HEADS.names(adjustable_classifier=True))}, or `stage2: none`.")


def rebuild(name: str, head: nn.Module) -> TwoStageHead:
    """An untrained two-stage model of the right shapes, for loading a checkpoint into."""
    return TwoStageHead(head, STAGE2.get(name)(head))


@dataclass(frozen=True)
class Stage2Choice:
    name: str
    loss: Optional[str]  # None for methods that train nothing (tau_norm)
    sampler: Optional[str]
    loss_options: Any = None  # the typed options of `losses.<loss>`

    @classmethod
    def from_params(cls, params: Params, task: str) -> Optional["Stage2Choice"]:
        """`stage2` and its `stage2_methods.<name>` loss and sampler (with the loss's options),
        validated against ``task`` (read by the train stage before stage 1 trains, so a refusal
        costs no training)."""
        name = params.str("stage2", choices=NAMES)
        if name == "none":
            return None
        options = STAGE2.options(name, params)
        if task == "multi" and not STAGE2.capability(name, "trains"):
            raise ConfigError(f"`stage2: {name}` cannot change a multi-label model's mAP: it rescales each class's "
                              "logits, which leaves the order of the images within a class, hence every class's "
                              "average precision, as it was; tau would always be 0. Use `stage2: "
                              f"{'` or `'.join(STAGE2.names(trains=True, per_class_monotone=False))}`, or "
                              "`stage2: none`.")
        if not STAGE2.capability(name, "trains"):
            return cls(name, None, None)
        key = f"stage2_methods.{name}"
        loss, sampler = options.loss, options.sampler
        valid = losses.names_for(task)
        if task == "multi" and loss not in valid and MULTI_LABEL_COUNTERPART.get(loss) in valid:
            print(f"stage 2 {name}: `{key}.loss` {loss!r} is single-label; this multi-label task uses its "
                  f"counterpart {MULTI_LABEL_COUNTERPART[loss]!r}")
            loss = MULTI_LABEL_COUNTERPART[loss]
        if loss not in valid:
            raise ConfigError(f"`{key}.loss` is {loss!r}; for this {task}-label task use one of: {', '.join(valid)} "
                              f"(e.g. `-S {key}.loss={valid[0]}`).")
        if losses.LOSSES.capability(loss, "needs_fixed_scale"):
            raise ConfigError(f"`{key}.loss` is {loss!r}, which needs its own normalised classifier; stage 2 "
                              f"adjusts the stage-1 one. Use one of: "
                              f"{', '.join(losses.names_for(task, needs_fixed_scale=False))}.")
        if sampler not in SAMPLERS:
            raise ConfigError(f"`{key}.sampler` is {sampler!r}; valid: {', '.join(SAMPLERS.names())}.")
        if task == "multi" and STAGE2.capability(name, "per_class_monotone"):
            print(f"WARNING: `stage2: {name}` rescales each class's logits: on this multi-label task it cannot "
                  "change mAP (the order of the images within a class stays), only the thresholded CF1/OF1.")
        return cls(name, loss, sampler, losses.LOSSES.options(loss, params))


class MemoryFeatures:
    """Precomputed representations, shaped like a :class:`SplitFeatures` for :class:`FeatureInput`."""

    has_tokens = False

    def __init__(self, pooled: np.ndarray, labels: np.ndarray, path: str, attrs: Dict):
        self.pooled = pooled
        self.labels = labels
        self.path = path
        self.attrs = attrs

    def __len__(self) -> int:
        return len(self.pooled)


def representations(head: nn.Module, data: FeatureInput, batch_size: int = 1024) -> np.ndarray:
    """``head.features`` of every row of the cached file behind ``data`` (all views, if any)."""
    rows = FeatureInput(data.features, head.input, data.device)
    head.eval()
    out = []
    with torch.inference_mode():
        # An empty split (no validation) still passes one empty batch: its representation has the right width.
        for start in range(0, max(len(rows), 1), batch_size):
            index = np.arange(start, min(start + batch_size, len(rows)))
            out.append(head.features(rows.batch(index)).float().cpu())
    return torch.cat(out).numpy()


def choose_tau(model: TwoStageHead, val_h: FeatureInput, val_labels: np.ndarray, multilabel: bool) -> Dict:
    """tau from ``metrics.TAU_GRID`` (0 to 2) with the best validation score."""
    on_h = OnRepresentation(model.head, model.adjuster)

    def score(tau: float) -> float:
        model.adjuster.tau.fill_(tau)
        return metrics.selection_score(predict(on_h, val_h), val_labels, multilabel)

    tau, best = metrics.pick_on_validation(metrics.TAU_GRID, score)
    model.adjuster.tau.fill_(tau)
    return {"tau": tau, "val_score": best}


class Stage1Classifier(nn.Module):
    """The stage-1 head's own classifier on precomputed ``h``: what stage 2 must beat."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.classifier(h)


def frozen_copy(head: nn.Module) -> nn.Module:
    head = copy.deepcopy(head)
    for param in head.parameters():
        param.requires_grad_(False)
    return head.eval()
