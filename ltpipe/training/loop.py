"""One training loop for every head, loss and sampler on cached features.

Methods differ by the pieces plugged in (head, loss, sampler), never by copies of
this loop. The model kept is the one with the best validation score (balanced
accuracy, or mAP for multi-label); the test split is never looked at here.
"""

import copy
import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ltpipe import heads, losses
from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.core.runtime import resolve_device, seed_everything, use_threads
from ltpipe.data import manifest
from ltpipe.data.validation_split import select_without_validation
from ltpipe.evaluation import metrics
from ltpipe.evaluation.inference import FeatureInput, ViewInput, predict
from ltpipe.evaluation.results import check_features, check_posthoc, check_task
from ltpipe.features.store import SplitFeatures, TextFeatures
from ltpipe.features.token_reader import read_ahead
from ltpipe.training import checkpoint, stage2
from ltpipe.training.samplers import SAMPLERS, block_order, block_rng, class_members, classes_per_batch
from ltpipe.training.spec import RunSpec, TrainConfig, read_run_spec
from ltpipe.training.trainer import LoopOptions, Plan, Trainer, batches_of


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Weight decay on weight matrices only: biases, norms and scales are exempt."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: List[Dict], name: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """``adamw``, or ``sgd`` with Nesterov momentum (plain SGD at momentum 0, which Nesterov needs above 0)."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return build_optimizer(param_groups(model, cfg.weight_decay), cfg.optimizer, cfg.lr, cfg.momentum)


# Seconds between redraws of a progress bar: in place in a terminal; in a log file (DVC's queue
# logs, CI) every redraw stays, so a long run there adds a line every half minute, not one a step.
PROGRESS_INTERVAL = {"terminal": 2.0, "log": 30.0}


def progress_bar(total: int, desc: str, unit: str = "epoch", initial: int = 0, disable: bool = False) -> tqdm:
    """A tqdm bar on stderr (DVC shows a stage's stderr as it runs) for training loops."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                mininterval=PROGRESS_INTERVAL["terminal" if interactive else "log"], dynamic_ncols=interactive)


@dataclass
class TrainResult:
    best_state: Dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    history: List[Dict] = field(default_factory=list)
    # The loss of all-zero logits (a model that has learned nothing) on training rows: a trained
    # model whose last-epoch loss is above it has diverged even if the loss stayed finite.
    uninformative_loss: Optional[float] = None


def uninformative_loss(loss_fn: nn.Module, target: torch.Tensor, num_classes: int, device: torch.device,
                       rows: int = 4096) -> float:
    """``loss_fn`` of all-zero logits on up to ``rows`` evenly spaced rows of ``target`` (log C for
    softmax cross-entropy; the loss's own value for every other loss, margins and weights included)."""
    index = torch.from_numpy(np.linspace(0, len(target) - 1, min(rows, len(target))).round().astype(np.int64))
    with torch.no_grad():
        return float(loss_fn(torch.zeros(len(index), num_classes, device=device), target[index].to(device)))


def train(head: nn.Module, loss_fn: nn.Module, sampler, train_data: FeatureInput, val_data: FeatureInput,
          val_labels: np.ndarray, cfg: TrainConfig, seed: int, multilabel: bool, num_classes: int,
          device: torch.device, logger=None, desc: str = "train") -> TrainResult:
    """Fit the trainable parameters of ``head`` on cached features with :class:`Trainer`; keep the
    state with the best validation score (``best_val``). A progress bar named ``desc`` shows the
    epochs with the last loss and validation score."""
    head.to(device)
    loss_fn.to(device)
    labels = train_data.labels
    members = class_members(labels, num_classes)
    target = torch.from_numpy(labels.astype(np.float32) if multilabel else labels.astype(np.int64))
    plan = Plan.make(len(train_data), cfg.batch_size, cfg.epochs, cfg.iterations, cfg.warmup_epochs, "keep",
                     cfg.warmup_iterations)
    if plan.warmup_steps >= plan.total_steps:
        warmup_key = "warmup_iterations" if cfg.warmup_iterations is not None else "warmup_epochs"
        print(f"WARNING: the warm-up ({plan.warmup_steps} steps, `{cfg.key}.{warmup_key}`) covers all "
              f"{plan.total_steps} training steps: the learning rate never reaches `{cfg.key}.lr` nor decays.")

    def nonfinite(loss: float, epoch: int, step: int) -> str:
        return (f"the training loss became {loss} at epoch {epoch}. Lower `{cfg.key}.lr` (now {cfg.lr}) or check "
                "the feature cache for NaN values.")

    # An exponential moving average of the weights (CPRFL's official code: 0.998) is what is validated and kept.
    options = LoopOptions(select=cfg.select, schedule=cfg.schedule, ema=getattr(head, "ema_decay", 0.0),
                          nonfinite=nonfinite)
    trainer = Trainer(head, loss_fn, make_optimizer(head, cfg), plan, device, options)
    last_order = []

    train_data.use_token_cache(cfg.token_cache)
    blocks = cfg.shuffle == "blocks"
    if blocks:
        report_block_shuffle(labels, sampler(members, len(train_data), seed, 0), cfg, seed)

    def feed(epoch: int, first: int, end: int):
        train_data.set_epoch(epoch)
        order = sampler(members, len(train_data), seed, epoch)
        if blocks:
            # The sampler's draws, re-ordered from (seed, epoch) alone: a resumed epoch cuts the same batches.
            order = block_order(order, cfg.block_rows, cfg.block_buffer, block_rng(seed, epoch))
        last_order[:] = [order]
        # A batch is a set (the loss is its mean); sorted rows read the cache forwards. The sampler has
        # decided every batch before any is read: reading ahead changes when rows are read, not which.
        indexes = [np.sort(batch) for batch in batches_of(order, cfg.batch_size, first, end)]
        reads = train_data.block_reads(indexes, cfg.block_rows, cfg.block_buffer) if blocks else None
        # One batch training, one read ahead (two buffers), the one after that advised to the kernel:
        # its rows come off the disk meanwhile, all at once (a cold cache's reads overlap each other).
        load = functools.partial(train_data.batch, reuse=True, reads=reads)
        advise = train_data.advise if reads is None else None  # blocks are read whole, sequentially
        for index, x in read_ahead(load, indexes, enabled=train_data.read_ahead, advise=advise):
            yield [(x, target[torch.from_numpy(index)], 1.0, True)]

    history = []
    bar = progress_bar(plan.epochs, desc)

    def on_epoch(row: Dict) -> None:
        row = {"epoch": row["epoch"], "train_loss": row["train_loss"], "val_score": row["val_score"], "lr": row["lr"]}
        history.append(row)
        if logger is not None:
            logger(row)
        outcome = trainer.outcome
        status = f"loss {row['train_loss']:.4g}"
        if row["val_score"] is not None:
            status += f", val {row['val_score']:.4f}"
        if outcome.best_score is not None:
            status += f", best {outcome.best_score:.4f} (epoch {outcome.best_epoch})"
        bar.set_postfix_str(status, refresh=False)
        bar.update()

    def validate(model: nn.Module) -> Optional[float]:
        if not len(val_labels):  # no validation split (`prepare.val_fraction: 0`): `select: last`
            return None
        return metrics.selection_score(predict(model, val_data), val_labels, multilabel)

    try:
        outcome = trainer.run(feed, validate, on_epoch=on_epoch)
    finally:
        bar.close()  # ends the bar's line before any error's
    if cfg.select == "last":  # the weights the run ended with (the EMA's, if any), whatever validation said
        result = TrainResult(copy.deepcopy(head.state_dict()), plan.epochs - 1, outcome.last_score, history)
    else:
        result = TrainResult(outcome.best_state, outcome.best_epoch, outcome.best_score, history)
    # On the rows the sampler drew last: a re-weighted loss under re-sampling weighs them differently.
    result.uninformative_loss = uninformative_loss(loss_fn, target[torch.from_numpy(last_order[0])], num_classes,
                                                   device)
    return result


# Under `shuffle: blocks`, batches seeing fewer than this share of the distinct classes that row-random
# batches see get a WARNING: the split is stored grouped by class, and each window holds few classes.
FEW_CLASSES_SHARE = 0.5


def report_block_shuffle(labels: np.ndarray, order: np.ndarray, cfg: TrainConfig, seed: int) -> None:
    """Print what `shuffle: blocks` does to the first epoch's batches: their mean number of distinct classes
    against the sampler's row-random order, with a WARNING when the blocks leave batches nearly one-class."""
    shuffled = block_order(order, cfg.block_rows, cfg.block_buffer, block_rng(seed, 0))
    by_blocks = classes_per_batch(labels, shuffled, cfg.batch_size)
    by_rows = classes_per_batch(labels, order, cfg.batch_size)
    print(f"`{cfg.key}.shuffle: blocks`: rows shuffled within windows of {cfg.block_rows} x {cfg.block_buffer} = "
          f"{cfg.block_rows * cfg.block_buffer} rows; a batch of the first epoch sees {by_blocks:.1f} distinct "
          f"classes on average ({by_rows:.1f} with `shuffle: rows`)")
    if by_rows > 0 and by_blocks < FEW_CLASSES_SHARE * by_rows:
        print(f"WARNING: with `{cfg.key}.shuffle: blocks` a batch sees {by_blocks:.1f} classes, against {by_rows:.1f} "
              "row-random: the split is stored grouped by class, so each window of blocks holds few classes and "
              f"the gradient of a batch is biased towards them. Raise `{cfg.key}.block_buffer` (now "
              f"{cfg.block_buffer}) or lower `{cfg.key}.block_rows` (now {cfg.block_rows}), or use "
              "`shuffle: rows` if the cache fits in memory or is on a fast disk.")


def fit_without_gradients(head_name: str, head: nn.Module, train_feats: SplitFeatures, val_data: FeatureInput,
                          val_labels: np.ndarray, multilabel: bool) -> TrainResult:
    """Heads with nothing to train (zeroshot) or fitted in one pass (knn, ncm: capability ``fits``)."""
    if heads.HEADS.capability(head_name, "fits"):
        head.fit(train_feats.pooled, train_feats.labels)
    head.to(val_data.device)
    score = metrics.selection_score(predict(head, val_data), val_labels, multilabel) if len(val_labels) else None
    return TrainResult(copy.deepcopy(head.state_dict()), 0, score)


# A last-epoch training loss more than this many times the first epoch's is a divergence even
# when it stays below the uninformative loss (a normal run ends far below its first epoch).
DIVERGED_LOSS_RATIO = 2.0


def loss_diverged(result: TrainResult) -> Optional[str]:
    """Why the training loss of ``result`` diverged without becoming NaN, or ``None``."""
    if not result.history:
        return None  # fitted without gradients
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    uninformative = result.uninformative_loss
    if uninformative is not None and last >= uninformative - 1e-3 * abs(uninformative):
        return (f"the last epoch's training loss {last:.4g} is not below {uninformative:.4g}, the loss of a "
                "model that predicts nothing (all-zero logits)")
    if len(result.history) > 1 and last > DIVERGED_LOSS_RATIO * first:
        return f"the training loss rose from {first:.4g} (first epoch) to {last:.4g} (last epoch)"
    return None


def check_outcome(score: float, val_labels: np.ndarray, multilabel: bool, diverged: List[str],
                  lr: Optional[float], lr_key: str = "train.lr") -> Dict:
    """Did the kept model learn anything? Prints a WARNING when its validation ``score`` is not
    above chance (``metrics.chance_score``) or a training loss diverged; returns the flags the
    training summary records. Without a validation split (``score`` None) only divergence is checked."""
    if score is None:
        for reason in diverged:
            print(f"WARNING: training diverged without the loss becoming NaN: {reason}. Likely fix: lower "
                  f"`{lr_key}` (now {lr:g}), or check the features and labels.")
        return {"above_chance": None, "chance_score": None, "loss_diverged": bool(diverged)}
    chance = metrics.chance_score(val_labels, multilabel)
    above = metrics.above_chance(score, chance)
    fix = (f"lower `{lr_key}` (now {lr:g}), or check the features and labels" if lr is not None
           else "check the features and labels (`dvc repro -f extract`)")
    if not above:
        what = "mAP" if multilabel else "balanced accuracy"
        print(f"WARNING: the kept model's validation {what} {score:.4f} is not above chance ({chance:.4f}, "
              f"{metrics.CHANCE_MEANING['multi' if multilabel else 'single']}): it learned nothing. Likely fix: "
              f"{fix}.")
    for reason in diverged:
        print(f"WARNING: training diverged without the loss becoming NaN: {reason}. Likely fix: {fix}.")
    return {"above_chance": above, "chance_score": round(chance, 6), "loss_diverged": bool(diverged)}


def match_head_to_loss(head_name: str, head: nn.Module, loss_name: str, loss_fn: nn.Module) -> None:
    """LDAM is defined on a normalised classifier with a fixed scale ``s`` (Cao et al. 2019); with
    ``s: null`` (Imbalance-VLM's variant) it takes the raw logits of any head."""
    if not losses.LOSSES.capability(loss_name, "needs_fixed_scale") or loss_fn.head_scale is None:
        return
    if not heads.HEADS.capability(head_name, "fixed_scale"):
        raise ConfigError(f"loss {loss_name!r} needs a normalised classifier: set "
                          f"`head: {' or '.join(heads.HEADS.names(fixed_scale=True))}` "
                          f"(its scale is then fixed at `losses.{loss_name}.s` = {loss_fn.head_scale}).")
    head.classifier.fix_scale(loss_fn.head_scale)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class in the cached training split: the manifest's ``train_count`` less any
    image extraction skipped as unreadable."""
    if labels.ndim == 1:
        return np.bincount(labels, minlength=num_classes)
    return labels.sum(axis=0, dtype=np.int64)


def stage2_loss(choice: stage2.Stage2Choice, head_name: str, head: nn.Module, task: str,
                counts: np.ndarray, num_images: int) -> Optional[nn.Module]:
    """Validate the stage-2 method against the stage-1 head and build its loss, before any
    training: a method that cannot apply fails here, not after stage 1 has trained."""
    stage2.check_head(choice.name, head_name)
    with torch.random.fork_rng():  # a trial build: it must not shift the seeded initialisations after it
        stage2.STAGE2.get(choice.name)(head)  # method-specific refusals (tau_norm on cosine); reads only
    if choice.loss is None:
        return None
    return losses.build(choice.loss, task, choice.loss_options, counts, num_images)


def train_stage2(choice: stage2.Stage2Choice, loss_fn: Optional[nn.Module], head: nn.Module,
                 train_input: FeatureInput, val_input: FeatureInput, val_labels: np.ndarray, cfg: TrainConfig,
                 seed: int, multilabel: bool, num_classes: int, device: torch.device, logger=None):
    """Stage 2 on the frozen stage-1 representation; returns the model kept and a summary.

    When stage 2's best validation score is below the stage-1 head's, the model returned is the
    stage-1 head itself (``kept`` false, with a WARNING): a two-stage method never ships a model
    that validates worse than the one it started from (under ``select: last`` stage 2 is kept: no
    validation decides). The summary has ``val_score`` (stage 2's
    best), ``stage1_val_score``, ``kept`` and the method's choice (``best_epoch``, or ``tau``), and
    ``loss_diverged`` (a reason, or ``None``) for methods that train.
    """
    head = stage2.frozen_copy(head)
    model = stage2.rebuild(choice.name, head).to(device)
    attrs = {"source": "stage-1 representation"}
    train_rows = stage2.MemoryFeatures(stage2.representations(head, train_input), train_input.features.labels,
                                       "stage-1 train representation", attrs)
    if isinstance(train_input, ViewInput):
        train_h = ViewInput(train_rows, "pooled", device, train_input.views, seed)
    else:
        train_h = FeatureInput(train_rows, "pooled", device)
    val_h = FeatureInput(stage2.MemoryFeatures(stage2.representations(head, val_input), val_labels,
                                               "stage-1 val representation", attrs), "pooled", device)
    # Scored on the same representation as stage 2, so equal models score exactly equal.
    stage1_score = (metrics.selection_score(predict(stage2.Stage1Classifier(head), val_h), val_labels, multilabel)
                    if len(val_labels) else None)
    if loss_fn is None:
        summary = stage2.choose_tau(model, val_h, val_labels, multilabel)
    else:
        stage_logger = (lambda row: logger(dict(row, stage=2))) if logger is not None else None
        result = train(stage2.OnRepresentation(head, model.adjuster), loss_fn, SAMPLERS.get(choice.sampler),
                       train_h, val_h, val_labels, cfg, seed, multilabel, num_classes, device, stage_logger,
                       desc=f"stage 2 {choice.name}")
        summary = {"best_epoch": result.best_epoch, "val_score": result.best_score,
                   "loss_diverged": loss_diverged(result)}
    # `select: last`: stage 2 is the method asked for, kept whatever validation says.
    kept = cfg.select == "last" or summary["val_score"] >= stage1_score
    summary.update(stage1_val_score=stage1_score, kept=kept)
    if not kept:
        print(f"WARNING: stage 2 {choice.name} validates worse than the stage-1 head (validation score "
              f"{summary['val_score']:.4f} < {stage1_score:.4f}): the saved model is the stage-1 head, "
              f"without {choice.name} (`stage2_kept: false` in metrics/train/metrics.json).")
        return head, summary
    return model, summary


def protocol(prepared: manifest.Prepared, val_rows: int, select: str, schedule: str, key: str) -> Dict:
    """How the run is validated and what it keeps, recorded in its metrics: ``validation`` is ``given``
    (the dataset's list), ``carved`` (from train, `prepare.val_fraction`) or ``none``. Without validation
    rows, ``select: best_val`` has nothing to select on and is refused (a model is never picked on test)."""
    validation = prepared.report.get("validation", {})
    source = "none" if not val_rows else "carved" if "carved_from_train" in validation else "given"
    if source == "none" and select == "best_val":
        why = ("`prepare.val_fraction` is 0" if validation.get("none") else
               "every validation image was left out")
        raise select_without_validation(key, why)
    return {"validation": source, "select": select, "schedule": schedule}


def fit(spec: RunSpec, prepared: manifest.Prepared, logger=None):
    """Train ``spec`` on the cached features; returns the model (stage 2 included) and a summary."""
    multilabel = prepared.multilabel
    task = spec.task
    cfg = spec.train
    device = resolve_device(spec.device)
    seed = spec.seed
    seed_everything(seed)
    train_feats = SplitFeatures(paths.FEATURES_DIR / "train.h5")
    val_feats = SplitFeatures(paths.FEATURES_DIR / "val.h5")
    check_features(train_feats, prepared)
    run_protocol = protocol(prepared, len(val_feats.labels), cfg.select, cfg.schedule, cfg.key)
    if spec.stage2 is not None and spec.stage2.loss is None and run_protocol["validation"] == "none":
        raise ConfigError(f"`stage2: {spec.stage2.name}` chooses its tau on the validation split, and there is "
                          "none (`prepare.val_fraction: 0`): carve one with `prepare.val_fraction` > 0, or use a "
                          "stage-2 method that trains (`python -m ltpipe list stage2`).")
    text = TextFeatures(paths.TEXT_FEATURES)
    check_features(text, prepared)
    ctx = heads.HeadContext(prepared.num_classes, train_feats.pooled.shape[1], train_feats.token_shape,
                            text.embeddings, text.logit_scale,
                            tokens_have_cls=str(train_feats.attrs.get("token_layer")) in ("pre_ln", "post_ln"))
    head = heads.build(spec.head, spec.head_options, ctx)
    threads = use_threads(spec.threads, heads.step_size(spec.head, head, ctx.pooled_dim, ctx.num_classes,
                                                        cfg.batch_size), f"training {spec.head}")
    counts = class_counts(train_feats.labels, prepared.num_classes)
    num_images = len(train_feats.labels)
    loss_fn = losses.build(spec.loss, task, spec.loss_options, counts, num_images)
    match_head_to_loss(spec.head, head, spec.loss, loss_fn)
    second = spec.stage2
    second_loss = stage2_loss(second, spec.head, head, task, counts, num_images) if second is not None else None
    started = time.perf_counter()
    train_input = FeatureInput(train_feats, head.input, device)
    views_path = paths.FEATURES_DIR / "train_views.h5"
    if views_path.exists():
        # Augmented views were cached (`extract.views`): train on them, one view per image per epoch.
        views = SplitFeatures(views_path)
        check_features(views, prepared)
        train_input = ViewInput(views, head.input, device, int(views.attrs["views"]), seed)
        print(f"training on {train_input.views} cached augmented views per image")
    val_input = FeatureInput(val_feats, head.input, device)
    trains = heads.HEADS.capability(spec.head, "trains")
    if trains:
        result = train(head, loss_fn, SAMPLERS.get(spec.sampler), train_input, val_input, val_feats.labels, cfg,
                       seed, multilabel, prepared.num_classes, device, logger, desc=f"train {spec.head}")
    else:
        result = fit_without_gradients(spec.head, head, train_feats, val_input, val_feats.labels, multilabel)
    summary = {"best_epoch": result.best_epoch, "val_score": result.best_score, "threads": threads,
               "protocol": run_protocol}
    if cfg.select == "last":
        scored = "" if result.best_score is None else f", validation score {result.best_score:.4f}"
        print(f"trained {spec.head} with {spec.loss}: kept the last model (epoch {result.best_epoch}{scored})")
    else:
        print(f"trained {spec.head} with {spec.loss}: best validation score {result.best_score:.4f} "
              f"at epoch {result.best_epoch}")
    model, kept_score = head, result.best_score
    diverged = [reason for reason in [loss_diverged(result)] if reason]
    if second is not None:
        model, extra = train_stage2(second, second_loss, head, train_input, val_input, val_feats.labels, cfg, seed,
                                    multilabel, prepared.num_classes, device, logger)
        method = {k: v for k, v in extra.items() if k in ("best_epoch", "tau")}
        scores = ("" if extra["val_score"] is None else
                  f", validation score {extra['val_score']:.4f} (stage 1: {extra['stage1_val_score']:.4f})")
        print(f"stage 2 {second.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in method.items()) + scores
              + ("" if extra["kept"] else "; not kept"))
        summary.update({f"stage2_{k}": v for k, v in method.items()})
        summary.update(stage2_val_score=extra["val_score"], stage2_kept=extra["kept"])
        if extra["kept"]:
            kept_score = extra["val_score"]
        if extra.get("loss_diverged"):
            diverged.append(f"stage 2 {second.name}: {extra['loss_diverged']}")
    summary.update(check_outcome(kept_score, val_feats.labels, multilabel, diverged,
                                 cfg.lr if trains or second is not None else None, f"{cfg.key}.lr"))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return model, summary


def run_stage(params: Params, logger=None) -> Dict:
    """The `train` stage: fit the head named by `head` with `loss` and `sampler`, then
    the `stage2` method, if any, on the frozen result."""
    # Every choice is parsed and validated, once, before any feature is loaded.
    prepared = manifest.load(paths.PREPARED_DIR)
    task = "multi" if check_task(params, prepared) else "single"
    spec = read_run_spec(params, task)
    # Validate-only: `evaluate.posthoc` is used by `evaluate` alone (and is not a dependency of
    # train), but a choice that cannot apply to this task must fail before training, not after it.
    check_posthoc(params, task == "multi", prepared.split_size("val"))
    model, summary = fit(spec, prepared, logger)
    run = spec.identity()
    saved_stage2 = run["stage2"]
    if spec.stage2 is not None:
        # The run (eval.json) keeps the method asked for and says whether it was kept; the
        # checkpoint's `stage2` says what the saved model is.
        run["stage2_kept"] = summary["stage2_kept"]
        saved_stage2 = run["stage2"] if summary["stage2_kept"] else "none"
    # The thread count is the train stage's, recorded in its metrics; the checkpoint holds the model.
    checkpoint.save_checkpoint(paths.HEAD_CHECKPOINT, model, spec.head, run, stage2=saved_stage2,
                               **{k: v for k, v in summary.items() if k not in ("seconds", "threads")})
    print(f"training took {summary['seconds']:.1f}s")
    return summary
