"""Feeding cached features to a head, and batched prediction."""

from typing import List, Optional

import numpy as np
import torch
from torch import nn

from ltpipe.core.errors import ConfigError
from ltpipe.features.store import SplitFeatures
from ltpipe.features.token_reader import BlockReads, available_memory, choose_token_cache


class FeatureInput:
    """Feeds a head the cached input it reads (pooled embeddings or token grids).

    Token grids are read in the cache's dtype (float16) into a reused host buffer and cast to
    float32 on the device: float16 -> float32 is exact, so the values are those of a cast on the
    CPU, with half the bytes to move. On CUDA the host buffers are pinned and copied with
    ``non_blocking``; two of them alternate so that a batch read ahead (``read_ahead``) never
    overwrites one whose copy may still be under way.
    """

    def __init__(self, features: SplitFeatures, kind: str, device: torch.device):
        if kind not in ("pooled", "tokens"):
            raise ValueError(kind)
        if kind == "tokens" and not features.has_tokens:
            raise ConfigError(f"this head reads token grids, but {features.path} has none. "
                              "Set `extract.tokens: true` and re-run `dvc repro`.")
        self.features = features
        self.kind = kind
        self.device = device
        self._pooled = torch.from_numpy(features.pooled) if kind == "pooled" else None
        # The training feed reads batch k+1 in a background thread while batch k trains (token grids
        # only: a batch of pooled rows is an index into memory, nothing to overlap).
        self.read_ahead = kind == "tokens"
        self.pin_memory = device.type == "cuda"
        self._host = [None, None]  # alternating host buffers for token grids
        self._float = [None, None]  # and, on a CPU, for their float32 cast (``batch(reuse=True)``)
        self._copied = [None, None]  # CUDA events: each buffer's last copy to the device is done
        self._slot = 0
        self._cache_chosen = False

    def __len__(self) -> int:
        return len(self.features)

    @property
    def labels(self) -> np.ndarray:
        return self.features.labels

    def set_epoch(self, epoch: int) -> None:
        """Inputs that change with the epoch (augmented views) override this."""

    def use_token_cache(self, mode: str) -> None:
        """Hold the split's token grids in RAM or stream them from the file, as ``mode`` (``auto |
        memory | disk``, :func:`choose_token_cache`) says; the first call decides and prints why."""
        if self.kind != "tokens" or self._cache_chosen or not isinstance(self.features, SplitFeatures):
            return
        self._cache_chosen = True
        name = self.features.path.name
        if self.features.tokens_in_memory:
            print(f"token grids of {name}: in memory (loaded when opened)")
            return
        memory, why = choose_token_cache(mode, self.features.token_bytes, available_memory())
        if memory:
            self.features.load_tokens()
        print(f"token grids of {name}: {'in memory' if memory else 'read from disk'}, {why}")

    def file_rows(self, index: np.ndarray) -> np.ndarray:
        """The rows of the cache file that hold inputs ``index`` (sorted stays sorted)."""
        return index

    def block_reads(self, batches: List[np.ndarray], block_rows: int, block_buffer: int) -> Optional[BlockReads]:
        """For an epoch of batches ordered by ``samplers.block_order``: the plan that reads the token
        grids from the file in whole blocks of ``block_rows`` inputs, each once (pass it to :meth:`batch`);
        None where nothing is read from a file (pooled rows, grids in memory)."""
        if self.kind != "tokens" or not isinstance(self.features, SplitFeatures) or self.features.tokens_in_memory:
            return None

        def read(inputs: np.ndarray, out: np.ndarray) -> np.ndarray:
            return self.features.token_rows(self.file_rows(inputs), out)

        return BlockReads(batches, block_rows, block_buffer, len(self), read, self.features.token_buffer)

    def advise(self, index: np.ndarray) -> None:
        """Rows ``index`` (sorted) are the next batch: their token grids start coming from the disk now
        (``read_ahead``'s ``advise``), so the batch's read finds them in the page cache."""
        if self.kind == "tokens" and isinstance(self.features, SplitFeatures):
            self.features.advise_token_rows(self.file_rows(np.asarray(index, dtype=np.int64)))

    def batch(self, index: np.ndarray, reuse: bool = False, reads: Optional[BlockReads] = None) -> torch.Tensor:
        """The head's input for rows ``index`` as float32 on ``self.device``. With ``reuse``, token grids
        on a CPU are cast into one of two alternating buffers (no new 40 MB allocation a batch): the
        tensor returned is overwritten two calls later, so the caller holds at most the batch training
        and the one read ahead (the training feed). With ``reads`` (:meth:`block_reads`), token grids
        come from its blocks: the same values, read from the file in whole blocks."""
        index = np.asarray(index, dtype=np.int64)
        if self._pooled is not None:
            x = self._pooled[torch.from_numpy(self.file_rows(index))]
            return x.to(self.device, non_blocking=True)
        if not isinstance(self.features, SplitFeatures):  # grids already in memory as float32 arrays (tests)
            return torch.from_numpy(self.features.tokens(self.file_rows(index))).to(self.device, non_blocking=True)
        slot = self._slot
        self._slot = 1 - slot
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        host = self._host[slot]
        if host is None or len(host) < len(index):
            shape = (len(index),) + tuple(self.features.token_shape)
            dtype = torch.from_numpy(np.empty(0, dtype=self.features.token_dtype)).dtype
            host = self._host[slot] = torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
        if reads is not None:
            rows = torch.from_numpy(reads.rows(index, host.numpy()))
        else:
            rows = torch.from_numpy(self.features.token_rows(self.file_rows(index), host.numpy()))
        if reuse and self.device.type == "cpu":
            out = self._float[slot]
            if out is None or len(out) < len(index):
                out = self._float[slot] = torch.empty(host.shape, dtype=torch.float32)
            return out[:len(index)].copy_(rows)
        x = rows.to(self.device, non_blocking=self.pin_memory)  # on a CPU: `rows` itself
        if self.pin_memory:
            self._copied[slot] = torch.cuda.Event()
            self._copied[slot].record()
        # The cast on the device; a float32 cache's rows still in the host buffer are copied off it.
        return x.to(torch.float32, copy=x.data_ptr() == rows.data_ptr())


# Rows per forward pass of a prediction (validation, evaluation): a sequential read of this many rows.
PREDICT_BATCH = 1024


@torch.inference_mode()
def predict(head: nn.Module, data: FeatureInput, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    head.eval()
    out = None  # filled in place: one [N, C] array, not a list of batches and their concatenation
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        logits = head(data.batch(index)).float().cpu().numpy()
        if out is None:
            out = np.empty((len(data), logits.shape[1]), dtype=np.float32)
        out[index[0]:index[-1] + 1] = logits
    return out


class ViewInput(FeatureInput):
    """Training input over ``train_views.h5``: each epoch, every image is seen through one
    of its ``views`` cached augmentations, drawn from ``(seed, epoch)``."""

    def __init__(self, features: SplitFeatures, kind: str, device: torch.device, views: int, seed: int):
        super().__init__(features, kind, device)
        self.views = views
        self.seed = seed
        self.count = len(features) // views
        self._choice = np.zeros(self.count, dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    @property
    def labels(self) -> np.ndarray:
        return self.features.labels[:: self.views]

    def set_epoch(self, epoch: int) -> None:
        self._choice = np.random.default_rng([self.seed, epoch, 7]).integers(0, self.views, self.count)

    def file_rows(self, index: np.ndarray) -> np.ndarray:
        # Under `shuffle: blocks` a block is one of images, read as its images' chosen views: rows in
        # increasing file order within the block's views, 1/views of the block's bytes.
        return index * self.views + self._choice[index]
