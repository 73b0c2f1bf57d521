"""The end-to-end fine-tuning loop, on one process or many (``torchrun``).

Losses, samplers, heads and the warm-up + cosine schedule are the cached path's own
(:mod:`ltpipe.losses`, :mod:`ltpipe.samplers`, :mod:`ltpipe.heads`,
:func:`ltpipe.training.warmup_cosine`); this module adds what images need.

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

The model kept is the last one (fine-tuning runs a cosine schedule to zero; keeping the
best epoch would need a second copy of the encoder in every checkpoint).
"""

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ltpipe.config import Params
from ltpipe.errors import ConfigError, TrainingError
from ltpipe.features.extract import AugmentedViews, ImageFiles, Workers
from ltpipe.paths import atomic_target
from ltpipe.runtime import autocast, data_loader_kwargs, load_tensors
from ltpipe.samplers import class_members
from ltpipe.training import OPTIMIZERS, build_optimizer, progress_bar, warmup_cosine

# Embeddings and learned prompt vectors are exempt from weight decay, as are biases and norms.
NO_DECAY = ("positional_embedding", "class_embedding", "prompts.tokens", "head.context")


@dataclass
class FinetuneConfig:
    epochs: int = 10
    iterations: Optional[int] = None  # optimiser steps; when set, replaces `epochs`
    batch_size: int = 64  # global: over all processes and accumulation steps
    micro_batch: int = 64  # images per forward pass in one process
    optimizer: str = "adamw"
    lr: float = 1e-5  # pretrained encoder parameters
    head_lr: float = 1e-3  # parameters fine-tuning adds: the head, VPT prompts, CoOp context
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    clip_grad_norm: float = 1.0  # 0: off
    ema: float = 0.0  # decay; 0: off
    checkpoint_every: int = 200  # steps
    min_scale: float = 0.08  # smallest random crop, as a share of the image area
    workers: int = 2
    grad_checkpointing: bool = False

    @classmethod
    def from_params(cls, section: Params) -> "FinetuneConfig":
        return cls(
            epochs=section.int("epochs", minimum=1),
            iterations=(None if section.raw("iterations", None) is None
                        else section.int("iterations", minimum=1)),
            batch_size=section.int("batch_size", minimum=1),
            micro_batch=section.int("micro_batch", minimum=1),
            optimizer=section.str("optimizer", choices=OPTIMIZERS),
            lr=section.float("lr", minimum=0, exclusive_minimum=True),
            head_lr=section.float("head_lr", minimum=0, exclusive_minimum=True),
            weight_decay=section.float("weight_decay", minimum=0),
            warmup_epochs=section.float("warmup_epochs", minimum=0),
            momentum=section.float("momentum", minimum=0, maximum=1),
            clip_grad_norm=section.float("clip_grad_norm", minimum=0),
            ema=section.float("ema", minimum=0, maximum=0.999999),  # 1 would never move from the start
            checkpoint_every=section.int("checkpoint_every", minimum=1),
            min_scale=section.float("min_scale", minimum=0, maximum=1, exclusive_minimum=True),
            workers=section.int("workers", minimum=0),
            grad_checkpointing=section.bool("grad_checkpointing"),
        )

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


class ShadowEMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every step, for trainable parameters."""

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

    def save(self, step: int, model, optimizer, schedule, scaler, ema: Optional[ShadowEMA],
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

    def load(self, model, optimizer, schedule, scaler, ema: Optional[ShadowEMA], device: torch.device) -> int:
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


@dataclass
class Plan:
    """Steps and batches of a run, fixed by the data size and the config."""

    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int
    accumulation: int

    @classmethod
    def make(cls, num_images: int, cfg: FinetuneConfig, world: int) -> "Plan":
        if num_images < cfg.batch_size:
            raise ConfigError(f"`finetune.train.batch_size` ({cfg.batch_size}) is larger than the training split "
                              f"({num_images} images); lower it.")
        accumulation = cfg.accumulation(world)
        if cfg.batch_size < world * accumulation:
            raise ConfigError(f"`finetune.train.batch_size` ({cfg.batch_size}) must give each of the {world} "
                              "processes at least one image per micro-batch: raise it (or `micro_batch`, for fewer "
                              "accumulation steps), or use fewer processes.")
        steps_per_epoch = num_images // cfg.batch_size
        total = cfg.iterations or cfg.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, math.ceil(total / steps_per_epoch),
                   round(cfg.warmup_epochs * steps_per_epoch), accumulation)


def finetune(model, loss_fn: nn.Module, sampler: Callable, files: ImageFiles, labels: np.ndarray, num_classes: int,
             cfg: FinetuneConfig, seed: int, device: torch.device, precision: str,
             workers: Workers, work_dir: Path, log_step: Optional[Callable[[Dict], None]] = None,
             validate: Optional[Callable[[nn.Module], float]] = None) -> Dict:
    """Fine-tune ``model`` (a :class:`ltpipe.finetune.model.FinetuneModel`) in place; return a summary.

    Training images are augmented at the encoder's input size and normalisation. ``validate(model)``,
    when given, scores the model on the validation split at the end of every epoch.
    """
    plan = Plan.make(len(labels), cfg, workers.world)
    if plan.warmup_steps >= plan.total_steps:
        print(f"WARNING: the warm-up ({plan.warmup_steps} steps) covers all {plan.total_steps} steps: the learning "
              "rate never reaches `finetune.train.lr` nor decays.")
    members = class_members(labels, num_classes)
    target = torch.from_numpy(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64))
    views = AugmentedViews.for_encoder(files, plan.epochs, model.encoder.visual, seed, cfg.min_scale)
    loss_fn.to(device)
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, plan.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = ShadowEMA(model, cfg.ema) if cfg.ema > 0 else None
    if workers.world > 1 and workers.rank > 0:
        torch.manual_seed(seed + 7919 * workers.rank)  # dropout masks differ across processes
    resume = ResumeState(work_dir, workers)
    step = resume.load(model, optimizer, schedule, scaler, ema, device)
    if step:
        print(f"resuming fine-tuning at step {step} of {plan.total_steps} from {resume.path}")
    trained = model
    if workers.world > 1:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    started, first_step = time.perf_counter(), step
    last = {"loss": resume.saved.get("loss"), "val_score": resume.saved.get("val_score")}
    bar = progress_bar(plan.total_steps, f"finetune ({plan.epochs} epochs)", unit="step", initial=step,
                       disable=workers.rank > 0)
    while step < plan.total_steps:
        epoch, offset = divmod(step, plan.steps_per_epoch)
        order = sampler(members, len(labels), seed, epoch)
        end = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
        batches = [order[k * cfg.batch_size:(k + 1) * cfg.batch_size] for k in range(offset, end)]
        mine = [piece for batch in batches for piece in micro_batches(batch, workers.world, plan.accumulation,
                                                                      workers.rank)]
        # Its own generator: creating the iterator must not draw from the global RNG (dropout's).
        loader = DataLoader(views, batch_sampler=[(piece * plan.epochs + epoch).tolist() for piece in mine],
                            generator=torch.Generator(), **data_loader_kwargs(device, cfg.workers))
        model.train()
        micro = iter(zip(loader, mine))
        for batch in batches:
            step_loss = torch.zeros((), device=device)
            for a in range(plan.accumulation):
                (images, _, _), piece = next(micro)
                sync = a == plan.accumulation - 1 or workers.world == 1
                with (contextlib.nullcontext() if sync else trained.no_sync()):
                    with autocast(device, precision):
                        logits = trained(images.to(device, non_blocking=True))
                    if hasattr(loss_fn, "set_progress"):
                        loss_fn.set_progress(step, plan.total_steps)
                    share = len(piece) / len(batch)
                    loss = loss_fn(logits.float(), target[torch.from_numpy(piece)].to(device)) * share
                    scaler.scale(loss * workers.world).backward()  # DDP averages over processes
                step_loss += loss.detach()
            if workers.world > 1:
                torch.distributed.all_reduce(step_loss)  # each share is already weighted by its images
            step_loss = float(step_loss)
            if not math.isfinite(step_loss):
                bar.close()
                # Every process sees the same reduced loss, so all stop here together.
                raise TrainingError(
                    f"the fine-tuning loss became {step_loss} at step {step}. Lower `finetune.train.lr` / `head_lr` "
                    f"(now {cfg.lr} / {cfg.head_lr}); the last checkpoint ({resume.path}) is kept.")
            row = {"step": step + 1, "epoch": epoch, "loss": step_loss,
                   **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}}  # the rates this step used
            if cfg.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if ema is not None:
                ema.update()
            step += 1
            last["loss"] = step_loss
            if log_step is not None and workers.rank == 0:
                log_step(row)
            if validate is not None and (step % plan.steps_per_epoch == 0 or step == plan.total_steps):
                # Before the checkpoint of this step: a resumed run never skips an epoch's validation.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    with (ema.swapped_in() if ema is not None else contextlib.nullcontext()):
                        last["val_score"] = validate(model)
                if log_step is not None and workers.rank == 0:
                    log_step({"step": step, "epoch": epoch, "val_score": last["val_score"]})
            if step % cfg.checkpoint_every == 0 or step == plan.total_steps:
                resume.save(step, model, optimizer, schedule, scaler, ema, device, **last)
            shown = "" if last["val_score"] is None else f", val {last['val_score']:.4f}"
            bar.set_postfix_str(f"epoch {epoch}, loss {step_loss:.4g}{shown}", refresh=False)
            bar.update()
    bar.close()
    if ema is not None:
        ema.swap()  # the average is the model kept
    seconds = time.perf_counter() - started
    steps_done = step - first_step
    return {"steps": plan.total_steps, "epochs": plan.epochs, "resumed_from_step": first_step,
            "accumulation": plan.accumulation, "processes": workers.world, "seconds": round(seconds, 2),
            "steps_per_second": round(steps_done / seconds, 3) if steps_done else None,
            "final_loss": last["loss"], "val_score": last["val_score"]}
