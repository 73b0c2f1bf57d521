"""The `finetune@<mode>` stages: fine-tune end to end, then evaluate on the test images.

Reads `finetune.train`, `finetune.<mode>`, `head`/`heads.<head>`, `loss`/`losses.<loss>`,
`sampler`, `seed`, `task`, `model.precision`/`model.device` and the token layer and
prompt templates of `extract` (so a head reads what it reads on cached features).
Writes ``data/finetune/<mode>.pt`` and ``metrics/finetune/<mode>.json`` (the cached
path's metrics schema), its plot tables and ``<mode>_report.json`` (timings).
"""

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ltpipe import losses, presets
from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.runtime import (
    autocast,
    data_loader_kwargs,
    load_tensors,
    resolve_precision,
    seed_everything,
    use_threads,
)
from ltpipe.data import manifest
from ltpipe.evaluation import metrics
from ltpipe.evaluation.results import check_task, model_id, write_metrics
from ltpipe.features import models
from ltpipe.features.extract import ImageFiles, Workers, distributed_workers
from ltpipe.finetune import model as ft_model
from ltpipe.finetune import modes
from ltpipe.finetune.train import FinetuneConfig, finetune
from ltpipe.training.loop import class_counts, match_head_to_loss, protocol
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import read_run_spec


@torch.inference_mode()
def predict_images(model, dataset, batch_size: int, device: torch.device, precision: str, workers: Workers,
                   num_workers: int) -> Optional[np.ndarray]:
    """Logits of every item of ``dataset``. Under ``torchrun`` each process predicts every
    ``world``-th item and process 0 alone receives the whole array (others get ``None``)."""
    model.eval()
    rows = np.arange(workers.rank, len(dataset), workers.world)
    # Its own generator: evaluating must not draw from the global RNG that training's dropout uses.
    loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, shuffle=False,
                        generator=torch.Generator(), **data_loader_kwargs(device, num_workers))
    parts = []
    for images, _, _ in loader:
        with autocast(device, precision):
            parts.append(model(images.to(device, non_blocking=True)).float().cpu().numpy())
    local = np.concatenate(parts) if parts else None
    if workers.world == 1:
        return local
    gathered = [None] * workers.world if workers.rank == 0 else None
    torch.distributed.gather_object(local, gathered, dst=0)
    if workers.rank > 0:
        return None
    width = next(part.shape[1] for part in gathered if part is not None)
    out = np.empty((len(dataset), width), dtype=np.float32)
    for rank, part in enumerate(gathered):
        if part is not None:
            out[rank::workers.world] = part
    return out


def fingerprint(params: Params, mode: str, weights: models.ResolvedWeights) -> str:
    """What a saved resume state depends on: a changed setting or dataset starts a fresh run.
    Settings that cannot change the result (workers, checkpoint interval, gradient
    checkpointing) are left out, so changing them resumes."""
    keys = ["finetune.train", f"finetune.{mode}", "head", "loss", "sampler", "seed", "task", "model.precision",
            "extract.token_layer", "extract.templates"]
    values = {key: params.raw(key, None) for key in keys}
    values["finetune.train"] = {k: v for k, v in (values["finetune.train"] or {}).items()
                                if k not in ("workers", "checkpoint_every", "grad_checkpointing")}
    values.update(heads=params.raw(f"heads.{values['head']}", None),
                  losses=params.raw(f"losses.{values['loss']}", None), mode=mode, weights=weights.sha256,
                  data=[models.sha256_of(paths.PREPARED_DIR / name) for name in ("manifest.csv", "classes.csv")])
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trim_log(log_dir: Path, step: int) -> None:
    """Drop dvclive rows logged after the step a resumed run restarts from (they are re-run)."""
    for tsv in Path(log_dir).glob("plots/**/*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        column = lines[0].split("\t").index("step")
        kept = [lines[0]] + [line for line in lines[1:] if _step_of(line, column) <= step]
        tsv.write_text("\n".join(kept) + "\n")


def _step_of(line: str, column: int) -> float:
    try:
        return int(line.split("\t")[column])
    except (IndexError, ValueError):  # a row cut short by the kill
        return float("inf")


def run_stage(params: Params, mode_name: str, make_logger: Optional[Callable] = None) -> Dict:
    """Fine-tune in mode ``mode_name``; ``make_logger(log_dir, resume_step)`` gives a context
    manager yielding a per-step logging function (the stage script's dvclive)."""
    mode = modes.build(mode_name, modes.MODES.options(mode_name, params))
    preset = presets.check_param(params.raw("preset"))
    cfg = FinetuneConfig.from_params(params.sub("finetune.train"))
    prepared = manifest.load(paths.PREPARED_DIR)
    task = "multi" if check_task(params, prepared) else "single"
    choice = read_run_spec(params, task, train_key=None, with_stage2=False)
    ft_model.check_head(mode, choice.head)
    token_layer = params.str("extract.token_layer")
    templates = params.str("extract.templates")
    weights = models.ResolvedWeights.load(paths.WEIGHTS_JSON)
    workers, device = distributed_workers(params.str("model.device"))
    precision = resolve_precision(params.str("model.precision"), device)
    seed_everything(choice.seed)
    use_threads(choice.threads, None, f"fine-tuning ({mode_name})")
    clip_model, preprocess, tokenizer = models.load(weights, device)
    if cfg.grad_checkpointing:
        clip_model.set_grad_checkpointing(True)
    prompts = prepared.classes["prompt"].tolist()
    model = ft_model.build_model(clip_model, tokenizer, mode, choice.head, choice.head_options,
                                 prompts, token_layer, templates, device, precision)
    del clip_model
    labels = prepared.label_array("train")
    loss_fn = losses.build(choice.loss, task, choice.loss_options, class_counts(labels, prepared.num_classes),
                           len(labels))
    match_head_to_loss(choice.head, model.head, choice.loss, loss_fn)
    if getattr(model.head, "ema_decay", 0.0) > 0 and cfg.ema == 0:
        print(f"WARNING: `heads.{choice.head}.ema` applies to the cached path; fine-tuning averages weights with "
              "`finetune.train.ema` (now 0: off).")

    def images(split: str, transform) -> ImageFiles:
        return ImageFiles.of_split(prepared, split, transform)

    val_labels = prepared.label_array("val")
    val_images = images("val", preprocess)
    run_protocol = protocol(prepared, len(val_labels), "last", cfg.schedule, "finetune.train")

    def validate(m) -> Optional[float]:
        logits = predict_images(m, val_images, cfg.micro_batch, device, precision, workers, cfg.workers)
        return None if logits is None else metrics.selection_score(logits, val_labels, prepared.multilabel)

    work_dir = paths.PARTIAL_DIR / f"finetune-{mode_name}-{fingerprint(params, mode_name, weights)}"
    log_dir = paths.FINETUNE_METRICS_DIR / f"{mode_name}_log"
    resume_step = _saved_step(work_dir / "state.pt")
    print(f"fine-tuning mode {mode_name}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
          f"trainable parameters of {sum(p.numel() for p in model.parameters()):,}; {workers.world} process(es), "
          f"{device}, {precision}")
    logger_cm = make_logger(log_dir, resume_step) if (make_logger and workers.rank == 0) else _no_logger()
    with logger_cm as log_step:
        summary = finetune(model, loss_fn, SAMPLERS.get(choice.sampler), images("train", None), labels,
                           prepared.num_classes, cfg, choice.seed, device, precision, workers, work_dir,
                           log_step, validate if len(val_labels) else None)
    summary["protocol"] = run_protocol
    test_logits = predict_images(model, images("test", preprocess), cfg.micro_batch, device, precision, workers,
                                 cfg.workers)
    if workers.rank == 0:
        save_results(model, mode, choice, cfg, prepared, weights, test_logits, summary, work_dir, preset)
    workers.barrier()
    if workers.world > 1:
        torch.distributed.destroy_process_group()
    return summary


def save_results(model, mode, choice, cfg: FinetuneConfig, prepared: manifest.Prepared, weights, test_logits,
                 summary: Dict, work_dir: Path, preset: str = presets.NONE) -> None:
    """The fine-tuned model, its test metrics and its report (rank 0); the resume state goes."""
    mode_name = mode.name
    run = dict(choice.identity(), mode=mode_name, posthoc="none", posthoc_tau=None, threads=torch.get_num_threads())
    ft_model.save_finetuned(paths.FINETUNE_DIR / f"{mode_name}.pt", model, mode, choice.head, weights.sha256, run)
    cache = model_id(weights.arch, weights.pretrained, weights.sha256)
    fields = dict(dataset=prepared.name, task=prepared.task, **run, features=f"{cache}+finetune",
                  protocol=summary["protocol"])
    metrics_file = (paths.FINETUNE_METRICS_DIR / f"{mode_name}.json").as_posix()

    def compare(result: Dict) -> Optional[Dict]:
        return presets.comparison(preset, fields, weights.arch, weights.pretrained, result, metrics_file)

    result = write_metrics(test_logits, prepared.label_array("test"), prepared, fields, mode_name,
                           paths.FINETUNE_METRICS_DIR, compare=compare)
    presets.report(result.get("preset"))
    report = dict(summary, config=asdict(cfg),
                  trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    (paths.FINETUNE_METRICS_DIR / f"{mode_name}_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work_dir, ignore_errors=True)
    headline = "mAP" if prepared.multilabel else "top1"
    print(f"finetune {mode_name}: test {headline} {result[headline]:.4f} (few {result.get('few', 'n/a')}); "
          f"{summary['seconds']:.1f}s, {summary['steps_per_second']} steps/s")


def _saved_step(path: Path) -> int:
    if not path.is_file():
        return 0
    # mmap: only the step is read, not the optimiser state of a large encoder
    return int(load_tensors(path, "a fine-tuning resume state", mmap=True)["step"])


class _no_logger:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
