"""The end-to-end fine-tuning loop, on one process or many (``torchrun``).

Losses, samplers, heads and the learning-rate schedules are the cached path's own
(:mod:`ltpipe.losses`, :mod:`ltpipe.training.samplers`, :mod:`ltpipe.heads`,
:data:`ltpipe.training.trainer.SCHEDULES`); this module adds what images need.

* **Global batch.** Each step draws ``batch_size`` indices from the sampler's epoch
  order, whatever the number of processes: the batch is split into
  ``processes x accumulation`` near-equal micro-batches of at most ``micro_batch``
  images, and micro-batch ``a * processes + rank`` is process ``rank``'s ``a``-th. Each
  micro-batch's mean loss is weighted by its share of the batch, so after
  DistributedDataParallel averages the gradients one step equals one step on the whole
  batch in one process (exactly for per-image losses; LADE's and the multi-label
  losses' batch statistics are per micro-batch). The last incomplete batch of an epoch
  is dropped, so every process gets images on every step.
* **Augmentation.** Random resized crop and horizontal flip drawn from ``(seed, image,
  epoch)`` (:class:`ltpipe.features.extract.AugmentedViews`): independent of workers,
  processes and resumption.
* **Exact resume.** Every ``checkpoint_every`` steps (and at the end) the trainable
  state, optimiser, schedule, loss scaler, EMA and every process's RNG state are saved
  atomically; a killed run restarts from the last save and, data order and
  augmentation being functions of the step, ends where an uninterrupted run ends.
* **Precision.** Autocast in ``model.precision`` (bf16 on CUDA by default, fp32 on CPU);
  fp16 adds a gradient scaler.
* **EMA.** An exponential moving average of the trainable parameters only (the frozen
  ones cannot change), validated and kept when ``ema > 0``.

The loop itself, its EMA and its policies are the cached path's
(:class:`ltpipe.training.trainer.Trainer`): here the policies are ``last_batch: drop`` and
``select: last`` (fine-tuning runs a cosine schedule to zero; keeping the best epoch would
need a second copy of the encoder in every checkpoint).
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.core.options import option, parse
from ltpipe.core.paths import atomic_target
from ltpipe.core.runtime import data_loader_kwargs, load_tensors
from ltpipe.features.extract import AugmentedViews, Workers
from ltpipe.features.image_files import ImageFiles
from ltpipe.training.loop import build_optimizer, progress_bar
from ltpipe.training.samplers import class_members
from ltpipe.training.spec import OPTIMIZERS
from ltpipe.training.trainer import SCHEDULES, LoopOptions, Plan, Trainer, WeightAverage, batches_of

# Embeddings and learned prompt vectors are exempt from weight decay, as are biases and norms.
NO_DECAY = ("positional_embedding", "class_embedding", "prompts.tokens", "head.context")


@dataclass(frozen=True)
class FinetuneConfig:
    """The optimiser, schedule and data loading of end-to-end fine-tuning (`finetune.train`)."""

    epochs: int = option(10, minimum=1)
    iterations: Optional[int] = option(None, minimum=1, doc="optimiser steps; when set, replaces epochs")
    batch_size: int = option(64, minimum=1, doc="global: split over processes and accumulation steps")
    micro_batch: int = option(64, minimum=1, doc="images per forward pass and process")
    optimizer: str = option("adamw", choices=OPTIMIZERS, doc="adamw, or sgd with Nesterov momentum")
    lr: float = option(1e-5, above=0, doc="pretrained encoder parameters")
    head_lr: float = option(1e-3, above=0, doc="what fine-tuning adds: the head, VPT prompts, CoOp context")
    weight_decay: float = option(0.05, minimum=0)
    warmup_epochs: float = option(1.0, minimum=0)
    warmup_iterations: Optional[int] = option(None, minimum=0, doc="warm-up steps; when set, replaces warmup_epochs")
    schedule: str = option("cosine", choices=tuple(SCHEDULES),
                           doc="cosine | cosine_7_16 | onecycle, as `train.schedule`")
    momentum: float = option(0.9, minimum=0, maximum=1, doc="sgd only")
    clip_grad_norm: float = option(1.0, minimum=0, doc="0: off")
    ema: float = option(0.0, minimum=0, maximum=0.999999,  # 1 would never move from the start
                        doc="EMA decay of the trainable weights (e.g. 0.999); 0: off")
    checkpoint_every: int = option(200, minimum=1, doc="steps; a killed run resumes from the last checkpoint")
    min_scale: float = option(0.08, above=0, maximum=1, doc="random resized crop: smallest area share")
    workers: int = option(2, minimum=0, doc="DataLoader worker processes (per process)")
    grad_checkpointing: bool = option(False, doc="recompute activations in backward: less memory, slower")

    @classmethod
    def from_params(cls, section: Params) -> "FinetuneConfig":
        return parse(cls, section)

    def accumulation(self, world: int) -> int:
        return math.ceil(self.batch_size / (world * self.micro_batch))


def micro_batches(batch: np.ndarray, world: int, accumulation: int, rank: int) -> List[np.ndarray]:
    """Process ``rank``'s micro-batches of one global batch (see the module docstring)."""
    pieces = np.array_split(batch, world * accumulation)
    return [pieces[a * world + rank] for a in range(accumulation)]


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> List[Dict]:
    """Pretrained encoder parameters at ``lr``, added ones at ``head_lr``; weight decay on weight
    matrices only."""
    groups: Dict[tuple, List] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        added = not name.startswith("encoder.visual.")
        decay = param.ndim >= 2 and not any(key in name for key in NO_DECAY)
        groups.setdefault((added, decay), []).append(param)
    return [{"params": params, "lr": cfg.head_lr if added else cfg.lr,
             "weight_decay": cfg.weight_decay if decay else 0.0, "name": ("head" if added else "encoder")}
            for (added, decay), params in sorted(groups.items())]


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    return build_optimizer(param_groups(model, cfg), cfg.optimizer, cfg.lr, cfg.momentum)


def _rng_state(device: torch.device) -> Dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ResumeState:
    """``state.pt`` in the run's work directory: everything an exact resume needs."""

    def __init__(self, work_dir: Path, workers: Workers):
        self.path = Path(work_dir) / "state.pt"
        self.workers = workers
        self.saved: Dict = {}  # what the last save recorded besides the state (last loss, val score)

    def save(self, step: int, model, optimizer, schedule, scaler, ema: Optional[WeightAverage],
             device: torch.device, **record) -> None:
        rng = _rng_state(device)
        if self.workers.world > 1:
            gathered = [None] * self.workers.world
            torch.distributed.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        if self.workers.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"step": step, "model": model.tuned_state(), "optimizer": optimizer.state_dict(),
                       "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                       "ema": ema.state_dict() if ema is not None else None, "rng": rng_states, **record}
            with atomic_target(self.path) as partial:
                torch.save(payload, partial)
        self.workers.barrier()

    def load(self, model, optimizer, schedule, scaler, ema: Optional[WeightAverage], device: torch.device) -> int:
        """Restore the last save, if any; return the step to continue from."""
        if not self.path.is_file():
            return 0
        saved = load_tensors(self.path, "a fine-tuning resume state", mmap=True)
        self.saved = {k: saved.get(k) for k in ("loss", "val_score")}
        model.load_tuned_state(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None and saved["ema"] is not None:
            ema.load_state_dict(saved["ema"])
        if len(saved["rng"]) == self.workers.world:
            _set_rng_state(saved["rng"][self.workers.rank], device)
        else:
            print(f"WARNING: resuming with {self.workers.world} processes a run saved with {len(saved['rng'])}: "
                  "training goes on, but random draws (dropout) differ from an uninterrupted run.")
        return int(saved["step"])


def plan_run(num_images: int, cfg: FinetuneConfig, world: int) -> Tuple[Plan, int]:
    """The step plan (an epoch's last, shorter batch dropped: see :mod:`ltpipe.training.trainer`) and
    the accumulation steps of a run."""
    if num_images < cfg.batch_size:
        raise ConfigError(f"`finetune.train.batch_size` ({cfg.batch_size}) is larger than the training split "
                          f"({num_images} images); lower it.")
    accumulation = cfg.accumulation(world)
    if cfg.batch_size < world * accumulation:
        raise ConfigError(f"`finetune.train.batch_size` ({cfg.batch_size}) must give each of the {world} "
                          "processes at least one image per micro-batch: raise it (or `micro_batch`, for fewer "
                          "accumulation steps), or use fewer processes.")
    return Plan.make(num_images, cfg.batch_size, cfg.epochs, cfg.iterations, cfg.warmup_epochs, "drop",
                     cfg.warmup_iterations), accumulation


def image_feed(views: AugmentedViews, sampler: Callable, labels: np.ndarray, num_classes: int, cfg: FinetuneConfig,
               plan: Plan, accumulation: int, workers: Workers, seed: int, device: torch.device):
    """The trainer's feed: each step's global batch from the sampler's epoch order, this process's
    micro-batches of it as augmented images (see the module docstring)."""
    members = class_members(labels, num_classes)
    target = torch.from_numpy(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64))

    def feed(epoch: int, first: int, end: int):
        order = sampler(members, len(labels), seed, epoch)
        batches = batches_of(order, cfg.batch_size, first, end)
        mine = [piece for batch in batches for piece in micro_batches(batch, workers.world, accumulation,
                                                                      workers.rank)]
        # Its own generator: creating the iterator must not draw from the global RNG (dropout's).
        loader = DataLoader(views, batch_sampler=[(piece * plan.epochs + epoch).tolist() for piece in mine],
                            generator=torch.Generator(), **data_loader_kwargs(device, cfg.workers))
        micro = iter(zip(loader, mine))

        def step_batches(batch):
            for a in range(accumulation):
                (images, _, _), piece = next(micro)
                share, last = len(piece) / len(batch), a == accumulation - 1
                yield images.to(device, non_blocking=True), target[torch.from_numpy(piece)], share, last

        for batch in batches:
            yield step_batches(batch)

    return feed


def resumed_trainer(model, loss_fn: nn.Module, cfg: FinetuneConfig, plan: Plan, seed: int, device: torch.device,
                    precision: str, workers: Workers, resume: "ResumeState") -> Trainer:
    """The trainer of a fine-tuning run (``select: last``), restored from the last checkpoint if any."""

    def nonfinite(loss: float, epoch: int, step: int) -> str:
        return (f"the fine-tuning loss became {loss} at step {step}. Lower `finetune.train.lr` / `head_lr` (now "
                f"{cfg.lr} / {cfg.head_lr}); the last checkpoint ({resume.path}) is kept.")

    options = LoopOptions(select="last", schedule=cfg.schedule, ema=cfg.ema, clip_grad_norm=cfg.clip_grad_norm,
                          precision=precision, world=workers.world, nonfinite=nonfinite)
    trainer = Trainer(model, loss_fn, make_optimizer(model, cfg), plan, device, options)
    if workers.world > 1 and workers.rank > 0:
        torch.manual_seed(seed + 7919 * workers.rank)  # dropout masks differ across processes
    trainer.step = resume.load(model, trainer.optimizer, trainer.schedule, trainer.scaler, trainer.ema, device)
    if trainer.step:
        print(f"resuming fine-tuning at step {trainer.step} of {plan.total_steps} from {resume.path}")
    trainer.outcome.last_loss, trainer.outcome.last_score = resume.saved.get("loss"), resume.saved.get("val_score")
    if workers.world > 1:
        trainer.trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return trainer


class RunLog:
    """The trainer's callbacks while fine-tuning: per-step log rows, validation rows, checkpoints
    every ``checkpoint_every`` steps (and at the end), and the progress bar."""

    def __init__(self, trainer: Trainer, resume: "ResumeState", cfg: FinetuneConfig, workers: Workers,
                 log_step: Optional[Callable[[Dict], None]], validates: bool):
        self.trainer, self.resume, self.cfg = trainer, resume, cfg
        self.log_step = log_step if workers.rank == 0 else None
        self.validates = validates
        plan = trainer.plan
        self.bar = progress_bar(plan.total_steps, f"finetune ({plan.epochs} epochs)", unit="step",
                                initial=trainer.step, disable=workers.rank > 0)

    def on_step(self, row: Dict) -> None:
        if self.log_step is not None:
            self.log_step({"step": row["step"], "epoch": row["epoch"], "loss": row["loss"],
                           **{f"lr/{name}": rate for name, rate in row["rates"].items()}})  # the rates this step used

    def on_epoch(self, row: Dict) -> None:
        if self.validates and self.log_step is not None:
            self.log_step({"step": row["step"], "epoch": row["epoch"], "val_score": row["val_score"]})

    def after_step(self, step: int) -> None:
        trainer = self.trainer
        last = {"loss": trainer.outcome.last_loss, "val_score": trainer.outcome.last_score}
        if step % self.cfg.checkpoint_every == 0 or step == trainer.plan.total_steps:
            self.resume.save(step, trainer.model, trainer.optimizer, trainer.schedule, trainer.scaler, trainer.ema,
                             trainer.device, **last)
        shown = "" if last["val_score"] is None else f", val {last['val_score']:.4f}"
        self.bar.set_postfix_str(f"epoch {trainer.plan.epoch_steps(step - 1)[0]}, loss {last['loss']:.4g}{shown}",
                                 refresh=False)
        self.bar.update()


def finetune(model, loss_fn: nn.Module, sampler: Callable, files: ImageFiles, labels: np.ndarray, num_classes: int,
             cfg: FinetuneConfig, seed: int, device: torch.device, precision: str,
             workers: Workers, work_dir: Path, log_step: Optional[Callable[[Dict], None]] = None,
             validate: Optional[Callable[[nn.Module], float]] = None) -> Dict:
    """Fine-tune ``model`` (a :class:`ltpipe.finetune.model.FinetuneModel`) in place with
    :class:`~ltpipe.training.trainer.Trainer`; return a summary. The model kept is the last one.

    Training images are augmented at the encoder's input size and normalisation. ``validate(model)``,
    when given, scores the model on the validation split at the end of every epoch.
    """
    plan, accumulation = plan_run(len(labels), cfg, workers.world)
    if plan.warmup_steps >= plan.total_steps:
        print(f"WARNING: the warm-up ({plan.warmup_steps} steps) covers all {plan.total_steps} steps: the learning "
              "rate never reaches `finetune.train.lr` nor decays.")
    views = AugmentedViews.for_encoder(files, plan.epochs, model.encoder.visual, seed, cfg.min_scale)
    loss_fn.to(device)
    resume = ResumeState(work_dir, workers)
    trainer = resumed_trainer(model, loss_fn, cfg, plan, seed, device, precision, workers, resume)
    feed = image_feed(views, sampler, labels, num_classes, cfg, plan, accumulation, workers, seed, device)
    started, first_step = time.perf_counter(), trainer.step
    log = RunLog(trainer, resume, cfg, workers, log_step, validate is not None)
    try:
        outcome = trainer.run(feed, validate, on_step=log.on_step, on_epoch=log.on_epoch, after_step=log.after_step)
    finally:
        log.bar.close()
    seconds = time.perf_counter() - started
    steps_done = trainer.step - first_step
    return {"steps": plan.total_steps, "epochs": plan.epochs, "resumed_from_step": first_step,
            "accumulation": accumulation, "processes": workers.world, "seconds": round(seconds, 2),
            "steps_per_second": round(steps_done / seconds, 3) if steps_done else None,
            "final_loss": outcome.last_loss, "val_score": outcome.last_score}
