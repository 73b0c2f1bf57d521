"""One optimisation loop for everything ltpipe trains: heads on cached features and end-to-end
fine-tuning (LIFT's single trainer is the model).

The two differ only in what is plugged in, never in copies of the loop:

* a **feed** yields each step's micro-batches, ``(inputs, targets, share)`` with ``share`` the
  micro-batch's fraction of the step's batch: cached feature rows (one micro-batch a step), or
  images through the encoder split over processes and accumulation steps (``ltpipe.finetune``);
* the **optimiser** and its parameter groups (one learning rate, or the encoder's and the added
  modules');
* the **policies**, each an option with one documented meaning (:class:`LoopOptions`).

Policies, and why each path uses the value it does:

* ``last_batch`` (:meth:`Plan.make`): ``keep`` trains an epoch's last, shorter batch, so every
  row is seen every epoch (cached heads: ``steps = ceil(rows / batch)``); ``drop`` drops it
  (fine-tuning: each step's batch is split over processes and accumulation steps, and a short
  batch could leave a process without images; ``steps = floor(rows / batch)``).
* ``select``: ``best_val`` keeps the state with the best validation score (cached heads: a head
  is small); ``last`` keeps the last state (fine-tuning: keeping the best would hold a second copy
  of the encoder; the schedule decays to zero, so the last is the settled one).
* **EMA** (``ema`` > 0): an exponential moving average of the trainable weights, started from the
  initial weights and updated after every optimiser step, as CPRFL's ``ModelEma``; the average is
  what is validated and kept.
* **Schedule** (:data:`SCHEDULES`, per step): ``cosine``, linear warm-up then cosine decay to zero
  (:func:`warmup_cosine`); ``cosine_7_16``, Imbalance-VLM's (:func:`warmup_cosine_7_16`); ``onecycle``,
  CPRFL's (torch's ``OneCycleLR``). ``iterations`` replaces ``epochs`` and ``warmup_iterations``
  replaces ``warmup_epochs`` when set.
* Losses that change over training (LDAM's deferred re-weighting) get
  ``set_progress(step, total_steps)`` before every step's forward pass.
"""

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ltpipe.core.errors import ConfigError, TrainingError
from ltpipe.core.runtime import autocast

# One micro-batch of a step: inputs on the device, targets, its share of the step's batch, and whether it
# is the step's last (gradients are synchronised across processes then). A step's micro-batches come
# lazily, so accumulation bounds memory.
MicroBatch = Tuple[torch.Tensor, torch.Tensor, float, bool]


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero (per step)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_cosine_7_16(total_steps: int, warmup_steps: int):
    """Imbalance-VLM's schedule (USB's ``get_cosine_schedule_with_warmup``, ``num_cycles=7/16``):
    ``step / warmup`` during the warm-up (0 at the first step), then ``max(0, cos(pi * 7/16 * t))``
    with ``t`` the share of the steps after the warm-up: the last factor is cos(7 pi / 16) ~ 0.195, not 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, math.cos(math.pi * 7.0 / 16.0 * progress))

    return factor


def one_cycle(optimizer: torch.optim.Optimizer, plan: "Plan") -> torch.optim.lr_scheduler.LRScheduler:
    """CPRFL's ``OneCycleLR(max_lr=lr, pct_start=0.1)`` with torch's other defaults (start at lr / 25,
    cosine up and down, end at lr / 25 / 1e4, momentum or Adam's beta1 cycled 0.95 -> 0.85 -> 0.95); the
    rise is the warm-up's share of the steps. Each parameter group peaks at its own learning rate."""
    if plan.warmup_steps >= plan.total_steps:
        raise ConfigError(f"the one-cycle schedule rises over the warm-up ({plan.warmup_steps} steps) and must fall "
                          f"after it, but the run has {plan.total_steps} steps. Shorten the warm-up (`warmup_epochs` "
                          "or `warmup_iterations`; CPRFL: a tenth of the run).")
    if plan.warmup_steps == 1:
        # torch's OneCycleLR interpolates over (rise steps - 1): a one-step rise divides by zero.
        raise ConfigError("the one-cycle schedule cannot rise over a single step (torch's OneCycleLR divides by the "
                          "warm-up's steps - 1): set the warm-up (`warmup_epochs` or `warmup_iterations`) to 0 or "
                          "to at least 2 steps.")
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                                               total_steps=plan.total_steps,
                                               pct_start=plan.warmup_steps / plan.total_steps)


# The learning-rate schedules by the names users type (`train.schedule`, `finetune.train.schedule`).
SCHEDULES: Dict[str, Callable[[torch.optim.Optimizer, "Plan"], torch.optim.lr_scheduler.LRScheduler]] = {
    "cosine": lambda optimizer, plan: torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(plan.total_steps, plan.warmup_steps)),
    "cosine_7_16": lambda optimizer, plan: torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_7_16(plan.total_steps, plan.warmup_steps)),
    "onecycle": one_cycle,
}

# What `select` keeps: the state with the best validation score, or the last one.
SELECTIONS = ("best_val", "last")


@dataclass(frozen=True)
class Plan:
    """Steps of a run, fixed by the data size and the schedule options."""

    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int

    @classmethod
    def make(cls, rows: int, batch_size: int, epochs: int, iterations: Optional[int], warmup_epochs: float,
             last_batch: str, warmup_iterations: Optional[int] = None) -> "Plan":
        steps_per_epoch = math.ceil(rows / batch_size) if last_batch == "keep" else rows // batch_size
        total = iterations or epochs * steps_per_epoch
        warmup = warmup_iterations if warmup_iterations is not None else round(warmup_epochs * steps_per_epoch)
        return cls(steps_per_epoch, total, math.ceil(total / steps_per_epoch), warmup)

    def epoch_steps(self, step: int) -> Tuple[int, int, int]:
        """``(epoch, first, end)``: the epoch of ``step`` and its step range ``[first, end)`` within it."""
        epoch, first = divmod(step, self.steps_per_epoch)
        return epoch, first, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


class WeightAverage:
    """``average = decay * average + (1 - decay) * weight`` after every step, over the trainable
    parameters, from their initial values (CPRFL's ``ModelEma``)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def swap(self) -> None:
        """Exchange the model's trainable weights with the averages (storage, not copies)."""
        for i, param in enumerate(self.params):
            param.data, self.shadow[i] = self.shadow[i], param.data

    @contextlib.contextmanager
    def swapped_in(self):
        """The model with the averaged weights, restored afterwards."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self) -> List[torch.Tensor]:
        return [s.detach().cpu() for s in self.shadow]

    def load_state_dict(self, state: List[torch.Tensor]) -> None:
        with torch.no_grad():
            for s, saved in zip(self.shadow, state):
                s.copy_(saved)


@dataclass
class LoopOptions:
    """How one run trains, besides its feed, model, loss and optimiser (see the module docstring)."""

    select: str = "best_val"  # SELECTIONS
    schedule: str = "cosine"  # a key of SCHEDULES
    ema: float = 0.0  # decay of the weight average; 0: off
    clip_grad_norm: float = 0.0  # 0: off
    precision: str = "fp32"  # autocast precision; fp16 adds a gradient scaler
    world: int = 1  # processes (DistributedDataParallel averages their gradients)
    nonfinite: Callable[[float, int, int], str] = (  # the error for a NaN/inf loss, from (loss, epoch, step)
        lambda loss, epoch, step: f"the training loss became {loss} at step {step}.")


@dataclass
class Outcome:
    """What a run ends with: the kept state's epoch and validation score, and per-epoch history."""

    best_epoch: int = -1
    best_score: Optional[float] = None
    best_state: Optional[Dict[str, torch.Tensor]] = None
    history: List[Dict] = field(default_factory=list)
    last_loss: Optional[float] = None
    last_score: Optional[float] = None


class Trainer:
    """The loop. ``trained`` is what the forward pass runs (a DistributedDataParallel wrapper, or the
    model itself); ``model`` is what is validated and kept."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, plan: Plan,
                 device: torch.device, options: LoopOptions, trained: Optional[nn.Module] = None):
        self.model, self.loss_fn, self.optimizer, self.plan = model, loss_fn, optimizer, plan
        self.device, self.options = device, options
        self.trained = trained if trained is not None else model
        self.schedule = SCHEDULES[options.schedule](optimizer, plan)
        self.scaler = torch.amp.GradScaler(device.type, enabled=options.precision == "fp16")
        self.ema = WeightAverage(model, options.ema) if options.ema > 0 else None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.outcome = Outcome()

    def kept_model(self):
        """A context in which ``model`` holds the weights that are validated and kept."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def train_step(self, micro_batches: Iterable[MicroBatch], epoch: int) -> Tuple[float, int]:
        """One optimiser step over the step's micro-batches; returns the step's loss (all processes)
        and the rows this process trained on."""
        step_loss = torch.zeros((), device=self.device)
        rows = 0
        for inputs, targets, share, last in micro_batches:
            sync = last or self.options.world == 1
            rows += len(targets)
            with (contextlib.nullcontext() if sync else self.trained.no_sync()):
                if hasattr(self.loss_fn, "set_progress"):
                    self.loss_fn.set_progress(self.step, self.plan.total_steps)
                with autocast(self.device, self.options.precision):
                    logits = self.trained(inputs)
                loss = self.loss_fn(logits.float(), targets.to(self.device)) * share
                self.scaler.scale(loss * self.options.world).backward()  # DDP averages over processes
            step_loss += loss.detach()
        if self.options.world > 1:
            torch.distributed.all_reduce(step_loss)  # each share is already weighted by its images
        value = float(step_loss)
        if not math.isfinite(value):
            # Every process sees the same reduced loss, so all stop here together.
            raise TrainingError(self.options.nonfinite(value, epoch, self.step))
        if self.options.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.options.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return value, rows

    def validate(self, epoch: int, validate: Optional[Callable[[nn.Module], Optional[float]]]) -> Optional[float]:
        """Score the kept weights; under ``best_val``, remember the best state. Random draws inside
        validation never shift the training's (dropout masks after it stay the same)."""
        if validate is None:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with self.kept_model():
                score = validate(self.model)
                best = self.outcome.best_score
                if self.options.select == "best_val" and score is not None and (best is None or score > best):
                    self.outcome.best_epoch, self.outcome.best_score = epoch, score
                    self.outcome.best_state = copy.deepcopy(self.model.state_dict())
        self.outcome.last_score = score
        return score

    def run(self, feed: Callable[[int, int, int], Iterable[Iterable[MicroBatch]]],
            validate: Optional[Callable[[nn.Module], Optional[float]]] = None,
            on_step: Optional[Callable[[Dict], None]] = None, on_epoch: Optional[Callable[[Dict], None]] = None,
            after_step: Optional[Callable[[int], None]] = None) -> Outcome:
        """Train from ``self.step`` to the plan's last step. ``feed(epoch, first, end)`` yields the
        micro-batches of the epoch's steps ``first..end-1``; ``validate(model)`` scores the kept
        weights at the end of every epoch; ``on_step`` / ``on_epoch`` receive the log rows;
        ``after_step(step)`` runs after each step's validation (checkpoints)."""
        while self.step < self.plan.total_steps:
            epoch, first, end = self.plan.epoch_steps(self.step)
            self.model.train()
            epoch_loss, epoch_rows = 0.0, 0
            for micro_batches in feed(epoch, first, end):
                rates = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
                loss, rows = self.train_step(micro_batches, epoch)
                epoch_loss += loss * rows
                epoch_rows += rows
                self.outcome.last_loss = loss
                if on_step is not None:
                    on_step({"step": self.step, "epoch": epoch, "loss": loss, "rates": rates})
                epoch_done = self.step % self.plan.steps_per_epoch == 0 or self.step == self.plan.total_steps
                if epoch_done:
                    score = self.validate(epoch, validate)
                    if on_epoch is not None:
                        on_epoch({"epoch": epoch, "step": self.step, "train_loss": epoch_loss / epoch_rows,
                                  "val_score": score, "lr": self.optimizer.param_groups[0]["lr"]})
                if after_step is not None:
                    after_step(self.step)
        if self.options.select == "best_val" and self.outcome.best_state is not None:
            self.model.load_state_dict(self.outcome.best_state)
        elif self.ema is not None:
            self.ema.swap()  # the average is the model kept
        return self.outcome


def batches_of(order: np.ndarray, batch_size: int, first: int, end: int) -> List[np.ndarray]:
    """Steps ``first..end-1`` of an epoch's sampled ``order``: consecutive slices of ``batch_size``
    rows (the last one shorter when the plan keeps it)."""
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(first, end)]
