"""What one run trains, parsed once from params.yaml: the typed run spec.

A stage reads params.yaml here, once: the names a user types (head, loss, sampler, stage-2
method), each name's typed options (:mod:`ltpipe.core.options`), the seed, the optimiser and
schedule, and the device. Everything below the stage takes these objects, never `Params`.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ltpipe import heads, losses
from ltpipe.core.config import Params
from ltpipe.core.options import option, parse
from ltpipe.core.runtime import read_threads
from ltpipe.features.token_reader import TOKEN_CACHES
from ltpipe.training import stage2
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.trainer import SCHEDULES, SELECTIONS

OPTIMIZERS = ("adamw", "sgd")
SHUFFLES = ("rows", "blocks")


@dataclass(frozen=True)
class TrainConfig:
    """The optimiser and schedule of training on cached features (`train`, or a sweep cell's
    `sweep.train`)."""

    epochs: int = option(100, minimum=1, doc="passes over the training split")
    batch_size: int = option(128, minimum=1)
    optimizer: str = option("adamw", choices=OPTIMIZERS, doc="adamw, or sgd with Nesterov momentum")
    lr: float = option(0.02, above=0, doc="peak learning rate (after the linear warm-up; cosine decay to 0)")
    weight_decay: float = option(0.0005, minimum=0, doc="on weight matrices only (tensors of 2 or more dimensions)")
    warmup_epochs: float = option(1.0, minimum=0)
    momentum: float = option(0.9, minimum=0, maximum=1, doc="sgd only")
    iterations: Optional[int] = option(None, minimum=1, doc="optimiser steps; when set, replaces epochs")
    warmup_iterations: Optional[int] = option(None, minimum=0, doc="warm-up steps; when set, replaces warmup_epochs")
    schedule: str = option("cosine", choices=tuple(SCHEDULES),
                           doc="cosine: warm-up then cosine to 0; cosine_7_16: Imbalance-VLM's (warm-up then "
                               "max(0, cos(pi 7/16 t)), ends at 0.195 lr); onecycle: CPRFL's (torch's OneCycleLR, "
                               "rising over the warm-up)")
    select: str = option("best_val", choices=SELECTIONS,
                         doc="the model kept: best_val (best validation score over epochs) or last (needed "
                             "without a validation split)")
    token_cache: str = option("auto", choices=TOKEN_CACHES,
                              doc="token grids of the training split: memory, disk (read a batch ahead), or auto: "
                                  "memory when they take at most half of MemAvailable")
    shuffle: str = option("rows", choices=SHUFFLES,
                          doc="rows: each epoch's rows in a random order; blocks: contiguous blocks of block_rows rows "
                              "in a random order, rows shuffled within block_buffer blocks (token caches larger "
                              "than RAM on slow disks)")
    block_rows: int = option(256, minimum=1, doc="shuffle: blocks only: rows per contiguous block")
    block_buffer: int = option(8, minimum=1, doc="shuffle: blocks only: blocks whose rows are shuffled together")
    key: str = field(default="train", metadata={"param": False})  # the section read, for messages

    @classmethod
    def from_params(cls, section: Params) -> "TrainConfig":
        return parse(cls, section)


@dataclass(frozen=True)
class RunSpec:
    task: str  # single | multi
    head: str
    head_options: Any
    loss: str
    loss_options: Any
    sampler: str
    stage2: Optional[stage2.Stage2Choice]
    seed: int
    train: Optional[TrainConfig]  # None where another section schedules training (fine-tuning)
    device: str
    threads: Any = "auto"  # `model.threads`: auto or a count (ltpipe.core.runtime.choose_threads)

    def identity(self) -> Dict:
        """The names that identify the run in its metrics and checkpoint."""
        return {"head": self.head, "loss": self.loss, "sampler": self.sampler,
                "stage2": self.stage2.name if self.stage2 else "none", "seed": self.seed}


def read_run_spec(params: Params, task: str, head: Optional[str] = None, loss: Optional[str] = None,
                  seed: Optional[int] = None, sampler_key: str = "sampler", train_key: Optional[str] = "train",
                  with_stage2: bool = True) -> RunSpec:
    """The run spec from ``params``: `head`, `loss`, `sampler`, `stage2`, `seed` and `train` with
    their options sections, validated against ``task``. A sweep cell passes its own head, loss and
    seed and reads `sweep.sampler` and `sweep.train`; fine-tuning schedules itself (``train_key=None``)."""
    head = params.str("head") if head is None else head
    loss = params.str("loss") if loss is None else loss
    sampler = params.str(sampler_key)
    second = stage2.Stage2Choice.from_params(params, task) if with_stage2 else None
    seed = params.int("seed", minimum=0) if seed is None else seed
    heads.HEADS.entry(head)  # unknown names fail here, before any option or feature is read
    losses.check(loss, task)
    SAMPLERS.entry(sampler)
    return RunSpec(task=task, head=head, head_options=heads.HEADS.options(head, params), loss=loss,
                   loss_options=losses.LOSSES.options(loss, params), sampler=sampler, stage2=second, seed=seed,
                   train=TrainConfig.from_params(params.sub(train_key)) if train_key else None,
                   device=params.str("model.device"), threads=read_threads(params))
