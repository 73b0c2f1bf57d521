"""Non-parametric heads on pooled embeddings: weighted k-nearest neighbours and nearest class mean.

Neither head has trainable parameters. The training stage calls ``head.fit(pooled, labels)``
once with the training features instead of running gradient descent. Everything a fitted
head needs at prediction time lives in registered buffers, and ``fit`` records the buffer
shapes in ``self.kwargs``, so a checkpoint round-trips through
:func:`ltpipe.training.checkpoint.save_checkpoint` / :func:`~ltpipe.training.checkpoint.load_checkpoint`
(``weights_only=True``).

Similarities are cosines of L2-normalised features, searched exactly with faiss
(``IndexFlatIP``). The faiss index is not part of the state dict. It is built on the
first ``forward`` after a ``fit`` or a ``load_state_dict`` and then reused.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ltpipe.core.errors import DataError
from ltpipe.core.options import option
from ltpipe.heads import HeadContext, register

if TYPE_CHECKING:
    import faiss

EPS = 1e-8  # added to probabilities before the log, so an absent class gets log(1e-8), not -inf


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _check_fit_inputs(pooled: np.ndarray, labels: np.ndarray, in_dim: int, num_classes: int,
                      head: str) -> Tuple[torch.Tensor, np.ndarray, bool]:
    """Validate training features and labels. Return the normalised features, the labels
    (int64 ``[N]`` or 0/1 uint8 ``[N, C]``) and whether the labels are multi-label."""
    pooled = np.asarray(pooled)
    labels = np.asarray(labels)
    if pooled.ndim != 2 or pooled.shape[1] != in_dim:
        raise DataError(f"`{head}` head was built for {in_dim}-wide pooled features but got training features "
                        f"of shape {pooled.shape}. Re-run `dvc repro extract`.")
    n = pooled.shape[0]
    if n == 0:
        raise DataError(f"`{head}` head got no training images to fit on.")
    if labels.shape[0] != n:
        raise DataError(f"`{head}` head got {n} training features but {labels.shape[0]} labels.")
    if labels.ndim == 1:
        labels = labels.astype(np.int64)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(f"`{head}` head: training labels must lie in [0, {num_classes}), got "
                            f"[{labels.min()}, {labels.max()}].")
        multilabel = False
    elif labels.ndim == 2 and labels.shape[1] == num_classes:
        labels = (labels != 0).astype(np.uint8)
        multilabel = True
    else:
        raise DataError(f"`{head}` head: training labels must be [N] class indices or an [N, {num_classes}] "
                        f"multi-hot matrix, got shape {labels.shape}.")
    if not np.isfinite(pooled).all():
        raise DataError(f"`{head}` head: the training features hold NaN or infinite values. "
                        "Re-run `dvc repro extract`.")
    features = _normalize(torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32)))
    return features, labels, multilabel


class _IndexedHead(nn.Module):
    """A pooled head that searches its ``_bank()`` rows with an exact inner-product faiss index.

    The index is an in-memory cache over buffers. ``fit`` and ``load_state_dict`` reset it,
    it is rebuilt on first use, and it is never pickled or deep-copied.
    """

    def __init__(self):
        super().__init__()
        self._index: Optional["faiss.Index"] = None

    def _bank(self) -> torch.Tensor:
        raise NotImplementedError

    def _search(self, queries: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if self._index is None:
            # Imported here, not at module level: importing the head registry (every stage that trains) must not
            # load faiss, which only knn and ncm use and a bare GPU machine does not have.
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())  # faiss has its own OpenMP pool: the stage's count
            bank = _as_numpy(self._bank())
            index = faiss.IndexFlatIP(bank.shape[1])
            index.add(bank)
            self._index = index
        sims, idx = self._index.search(_as_numpy(queries), k)
        if (idx < 0).any():  # faiss returns -1 for queries it could not rank (NaN features)
            raise DataError("a feature vector holds NaN or infinite values. Re-run `dvc repro extract`.")
        return sims, idx

    def _load_from_state_dict(self, *args, **kwargs):
        self._index = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> Dict:
        # faiss indexes are SWIG objects; copies of the head rebuild theirs lazily.
        state = self.__dict__.copy()
        state["_index"] = None
        return state


@dataclass(frozen=True)
class KNNOptions:
    k: int = option(10, minimum=1, doc="neighbours (clamped to the training features)")
    temperature: float = option(0.07, above=0, doc="T of the exp(similarity / T) vote weights")


@dataclass(frozen=True)
class NCMOptions:
    scale: float = option(16.0, above=0, doc="s of the logits s * cos(x, class mean)")


@register("knn", KNNOptions, input="pooled", trains=False, fits=True)
class KNNHead(_IndexedHead):
    """Weighted k-nearest-neighbour classifier (Wu et al., CVPR 2018, "Unsupervised Feature
    Learning via Non-Parametric Instance Discrimination"; the weighted kNN evaluation of
    DINO, Caron et al., ICCV 2021).

    For a query ``x`` with neighbours ``j`` (the ``k`` training features with the highest
    cosine similarity ``s_j``), the weights are ``w_j = exp(s_j / T)``. Single-label:
    ``p_c = sum_{j: y_j = c} w_j / sum_j w_j`` and the logits are ``log(p_c + 1e-8)``.
    Multi-label: ``p_c = sum_j w_j y_jc / sum_j w_j`` and the logits are
    ``log(p_c + 1e-8) - log(1 - p_c + 1e-8)``. A class without a neighbour gets ``p_c = 0``.
    ``k`` is clamped to the number of training features.
    """

    def __init__(self, in_dim: int, num_classes: int, k: int, temperature: float,
                 bank_size: int = 0, multilabel: bool = False):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "num_classes": num_classes, "k": k, "temperature": temperature,
                       "bank_size": bank_size, "multilabel": multilabel}
        self.k = k
        self.temperature = temperature
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.register_buffer("bank", torch.zeros(bank_size, in_dim))
        label_shape = (bank_size, num_classes) if multilabel else (bank_size,)
        self.register_buffer("bank_labels", torch.zeros(label_shape, dtype=torch.uint8 if multilabel else torch.int64))

    @classmethod
    def from_options(cls, options: KNNOptions, ctx: HeadContext) -> "KNNHead":
        return cls(ctx.pooled_dim, ctx.num_classes, k=options.k, temperature=options.temperature)

    def _bank(self) -> torch.Tensor:
        return self.bank

    @torch.no_grad()
    def fit(self, pooled: np.ndarray, labels: np.ndarray) -> None:
        """Store the normalised training features and their labels as the neighbour bank."""
        features, labels, multilabel = _check_fit_inputs(pooled, labels, self.kwargs["in_dim"], self.num_classes,
                                                         "knn")
        device = self.bank.device
        self.bank = features.to(device)
        self.bank_labels = torch.from_numpy(labels).to(device)
        self.multilabel = multilabel
        self.kwargs.update(bank_size=int(features.shape[0]), multilabel=multilabel)
        self._index = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank.shape[0] == 0:
            raise RuntimeError("the knn head has an empty bank: call fit() or load a fitted checkpoint")
        k = min(self.k, self.bank.shape[0])
        sims, idx = self._search(_normalize(x), k)
        labels = self.bank_labels
        sims = torch.from_numpy(sims).to(labels.device, torch.float64)  # float64: p near 1 stays apart from 1
        idx = torch.from_numpy(idx).to(labels.device)
        # exp((s - max s) / T): the max cancels in the ratio and keeps exp from overflowing.
        weights = torch.exp((sims - sims[:, :1]) / self.temperature)  # faiss sorts by decreasing similarity
        total = weights.sum(dim=1, keepdim=True)
        if self.multilabel:
            # one neighbour rank at a time: memory [B, C], not [B, k, C]
            votes = torch.zeros(x.shape[0], self.num_classes, dtype=torch.float64, device=labels.device)
            for j in range(k):
                votes += weights[:, j:j + 1] * labels[idx[:, j]]
            probs = votes / total
            # in float64 the rounding error of 1 - p (~1e-16) stays far below EPS, also when p is near 1
            rest = (total - votes).clamp_min(0) / total
            logits = torch.log(probs + EPS) - torch.log(rest + EPS)
        else:
            votes = torch.zeros(x.shape[0], self.num_classes, dtype=torch.float64, device=labels.device)
            probs = votes.scatter_add_(1, labels[idx], weights) / total
            logits = torch.log(probs + EPS)
        return logits.to(device=x.device, dtype=torch.float32)


@register("ncm", NCMOptions, input="pooled", trains=False, fits=True)
class NCMHead(_IndexedHead):
    """Nearest class mean: ``z_c = scale * cos(x, m_c)``, where ``m_c`` is the re-normalised mean
    of the normalised training features of class ``c`` (multi-label: of the images that have
    class ``c``). Cosine classifiers on class means as in Mensink et al. (TPAMI 2013) and
    the NCM baselines of long-tailed recognition (Kang et al., ICLR 2020)."""

    def __init__(self, in_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "num_classes": num_classes, "scale": scale}
        self.scale = scale
        self.register_buffer("means", torch.zeros(num_classes, in_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_options(cls, options: NCMOptions, ctx: HeadContext) -> "NCMHead":
        return cls(ctx.pooled_dim, ctx.num_classes, scale=options.scale)

    def _bank(self) -> torch.Tensor:
        return self.means

    @torch.no_grad()
    def fit(self, pooled: np.ndarray, labels: np.ndarray) -> None:
        """Set every class mean from the training features; fails if a class has no image."""
        num_classes = self.kwargs["num_classes"]
        features, labels, multilabel = _check_fit_inputs(pooled, labels, self.kwargs["in_dim"], num_classes, "ncm")
        if multilabel:
            members = torch.from_numpy(labels).double()
            counts = members.sum(dim=0)
            sums = members.T @ features.double()
        else:  # index_add, not a one-hot matrix: that would be N x C doubles (28 GB at iNat scale)
            index = torch.from_numpy(labels)
            counts = torch.bincount(index, minlength=num_classes).double()
            sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(
                0, index, features.double())
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            shown = ", ".join(str(c) for c in empty[:20]) + (", ..." if len(empty) > 20 else "")
            raise DataError(f"`ncm` head: {len(empty)} class(es) have no training image, so they have no "
                            f"class mean (class index {shown}). Use another head (e.g. `knn`), or a "
                            "training split with at least one image per class.")
        means = _normalize((sums / counts.unsqueeze(1)).float())
        self.means = means.to(self.means.device)
        self.fitted = torch.ones((), dtype=torch.bool, device=self.fitted.device)
        self._index = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("the ncm head has no class means: call fit() or load a fitted checkpoint")
        num_classes = self.means.shape[0]
        sims, idx = self._search(_normalize(x), num_classes)
        cos = torch.zeros(x.shape[0], num_classes).scatter_(1, torch.from_numpy(idx), torch.from_numpy(sims))
        return (self.scale * cos).to(device=x.device, dtype=torch.float32)
