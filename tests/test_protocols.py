"""The papers' protocols: their learning-rate schedules, training on the whole published train list
without a validation split, and `select: last` (issue 18)."""

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ltpipe import heads, losses
from ltpipe.core.errors import ConfigError
from ltpipe.data import manifest
from ltpipe.data.source import DatasetSource, PrepareOptions
from ltpipe.datasets import synthetic
from ltpipe.evaluation.inference import FeatureInput
from ltpipe.features.store import SplitFeatures
from ltpipe.training.loop import protocol, train, train_stage2
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import TrainConfig
from ltpipe.training.stage2 import MemoryFeatures, Stage2Choice
from ltpipe.training.trainer import SCHEDULES, LoopOptions, Plan, Trainer
from tests import dvc_repo
from tests.test_heads_training import context


def _rates(schedule: str, plan: Plan, lrs=(0.03,), optimizer: str = "sgd"):
    """The learning rate (and beta1 / momentum) of each step under the Trainer's own schedule."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs)]
    opt = (torch.optim.SGD(groups, momentum=0.9, nesterov=True) if optimizer == "sgd" else torch.optim.AdamW(groups))
    trainer = Trainer(torch.nn.Linear(1, 1), torch.nn.MSELoss(), opt, plan, torch.device("cpu"),
                      LoopOptions(schedule=schedule))
    rates, momenta = [], []
    for _ in range(plan.total_steps):
        rates.append([g["lr"] for g in opt.param_groups])
        momenta.append(opt.param_groups[0]["betas"][0] if optimizer == "adamw" else opt.param_groups[0]["momentum"])
        opt.step()
        trainer.schedule.step()
    return np.array(rates), np.array(momenta)


def test_imbalance_vlm_schedule_is_its_formula_at_every_step():
    # Imbalance-VLM: 8192 iterations, 512 of linear warm-up, then lr * max(0, cos(pi * 7/16 * t))
    # (USB's get_cosine_schedule_with_warmup, num_cycles = 7/16).
    plan = Plan.make(rows=115846, batch_size=256, epochs=1, iterations=8192, warmup_epochs=1, last_batch="keep",
                     warmup_iterations=512)
    assert (plan.total_steps, plan.warmup_steps) == (8192, 512)
    rates, _ = _rates("cosine_7_16", plan)
    expected = [0.03 * (s / 512 if s < 512 else max(0.0, math.cos(math.pi * 7 / 16 * (s - 512) / (8192 - 512))))
                for s in range(8192)]
    np.testing.assert_allclose(rates[:, 0], expected, rtol=0, atol=1e-12)
    assert rates[0, 0] == 0.0 and rates[512, 0] == pytest.approx(0.03)
    assert rates[-1, 0] / 0.03 == pytest.approx(math.cos(7 * math.pi / 16), abs=1e-3)  # ~0.195, not 0


def _one_cycle_formula(step: int, total: int, pct_start: float, max_lr: float) -> float:
    """torch's OneCycleLR (two phases, cosine) written out: from max_lr / 25 up to max_lr over
    pct_start * total - 1 steps, then down to max_lr / 25 / 1e4 at the last step."""
    initial, final = max_lr / 25.0, max_lr / 25.0 / 1e4
    up = float(pct_start * total) - 1

    def anneal(start, end, pct):
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= up:
        return anneal(initial, max_lr, step / up)
    return anneal(max_lr, final, (step - up) / (total - 1 - up))


def test_one_cycle_is_cprfls_call_and_the_formula_at_every_step():
    # CPRFL: OneCycleLR(max_lr=lr, epochs=80, steps_per_epoch=len(loader), pct_start=0.1); COCO-LT, batch 16:
    # 1909 images -> 120 steps an epoch. ltpipe: the same run with an 8-epoch warm-up (a tenth).
    plan = Plan.make(rows=1909, batch_size=16, epochs=80, iterations=None, warmup_epochs=8, last_batch="keep")
    assert plan.total_steps == 9600 and plan.warmup_steps == 960
    rates, betas = _rates("onecycle", plan, lrs=(1e-5, 5e-5), optimizer="adamw")

    param = torch.nn.Parameter(torch.zeros(1))
    reference_opt = torch.optim.AdamW([param], lr=1e-5)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_opt, max_lr=1e-5, epochs=80, steps_per_epoch=120,
                                                    pct_start=0.1)
    expected_rates, expected_betas = [], []
    for _ in range(plan.total_steps):
        expected_rates.append(reference_opt.param_groups[0]["lr"])
        expected_betas.append(reference_opt.param_groups[0]["betas"][0])
        reference_opt.step()
        reference.step()
    np.testing.assert_allclose(rates[:, 0], expected_rates, rtol=0, atol=1e-12)
    np.testing.assert_allclose(betas, expected_betas, rtol=0, atol=1e-12)  # beta1 cycles 0.95 -> 0.85 -> 0.95
    formula = [_one_cycle_formula(s, 9600, 0.1, 1e-5) for s in range(9600)]
    np.testing.assert_allclose(rates[:, 0], formula, rtol=0, atol=1e-12)
    # A second parameter group peaks at its own rate.
    np.testing.assert_allclose(rates[:, 1], 5 * rates[:, 0], rtol=1e-9, atol=1e-15)


def test_cosine_default_is_unchanged():
    plan = Plan.make(rows=100, batch_size=10, epochs=5, iterations=None, warmup_epochs=1, last_batch="keep")
    rates, _ = _rates("cosine", plan, lrs=(0.02,))
    expected = [0.02 * ((s + 1) / 10 if s < 10 else 0.5 * (1 + math.cos(math.pi * (s - 10) / 40))) for s in range(50)]
    np.testing.assert_allclose(rates[:, 0], expected, rtol=0, atol=1e-12)
    assert set(SCHEDULES) == {"cosine", "cosine_7_16", "onecycle"}


def test_warmup_iterations_replace_warmup_epochs():
    assert Plan.make(1000, 100, 10, None, 2.0, "keep").warmup_steps == 20
    assert Plan.make(1000, 100, 10, None, 2.0, "keep", warmup_iterations=7).warmup_steps == 7
    assert Plan.make(1000, 100, 10, None, 2.0, "keep", warmup_iterations=0).warmup_steps == 0


@pytest.mark.parametrize("total, warmup", [(20, 50), (3, 3), (5, 5)])
def test_one_cycle_without_a_fall_is_refused(total, warmup):
    # A rise as long as the run leaves torch's OneCycleLR a zero-length fall (a ZeroDivisionError at the end).
    plan = Plan.make(100, 100 // total, 1, total, 0, "keep", warmup_iterations=warmup)
    with pytest.raises(ConfigError, match=rf"one-cycle schedule rises over the warm-up .{warmup} steps. and must "
                                          rf"fall after it, but the run has {total} steps"):
        _rates("onecycle", plan)


@pytest.mark.parametrize("total", [2, 3, 100])
def test_one_cycle_rising_over_one_step_is_refused_and_two_or_none_work(total):
    # torch's OneCycleLR divides by (rise steps - 1): a one-step rise was a ZeroDivisionError mid-run.
    with pytest.raises(ConfigError, match=r"cannot rise over a single step .* to 0 or to at least 2 steps"):
        _rates("onecycle", Plan.make(100, 100 // total, 1, total, 0, "keep", warmup_iterations=1))
    for warmup in (0, 2):
        if warmup < total:
            rates, _ = _rates("onecycle", Plan.make(100, 100 // total, 1, total, 0, "keep", warmup_iterations=warmup))
            assert len(rates) == total and np.isfinite(rates).all()


def _train(tiny_features, tiny_prepared, select: str, val_labels=None, epochs: int = 6):
    torch.manual_seed(0)
    head = heads.build("cosine", None, context(tiny_features, tiny_prepared.num_classes))
    tr = SplitFeatures(tiny_features / "train.h5")
    va = SplitFeatures(tiny_features / "val.h5")
    labels = va.labels if val_labels is None else val_labels
    val = MemoryFeatures(va.pooled, labels, "val", dict(va.attrs))
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, select=select)
    loss = losses.build("ce", "single", None, tiny_prepared.classes["train_count"].to_numpy())
    cpu = torch.device("cpu")
    result = train(head, loss, SAMPLERS.get("instance"), FeatureInput(tr, "pooled", cpu),
                   FeatureInput(val, "pooled", cpu), labels, cfg, 0, False, tiny_prepared.num_classes, cpu)
    return head, result


def test_select_last_keeps_the_last_weights_whatever_validation_says(tiny_features, tiny_prepared):
    va = SplitFeatures(tiny_features / "val.h5")
    shuffled = np.random.default_rng(5).permutation(va.labels)
    last, result = _train(tiny_features, tiny_prepared, "last")
    last_shuffled, result_shuffled = _train(tiny_features, tiny_prepared, "last", shuffled)
    assert result.best_epoch == 5 and result.best_score == result.history[-1]["val_score"]
    for key, value in last.state_dict().items():
        assert torch.equal(value, last_shuffled.state_dict()[key]), key
    assert [r["val_score"] for r in result.history] != [r["val_score"] for r in result_shuffled.history]
    # Under best_val the same two validation splits pick different epochs: validation decides there.
    _, best = _train(tiny_features, tiny_prepared, "best_val")
    _, best_shuffled = _train(tiny_features, tiny_prepared, "best_val", shuffled)
    assert best.best_epoch != best_shuffled.best_epoch


def test_select_last_trains_without_a_validation_split(tiny_features, tiny_prepared):
    empty = np.zeros(0, dtype=np.int64)
    head, result = _train(tiny_features, tiny_prepared, "last", val_labels=empty[:0], epochs=2)
    assert result.best_score is None and [r["val_score"] for r in result.history] == [None, None]


def _no_validation_source(tmp_path: Path, multilabel: bool = False) -> DatasetSource:
    spec = synthetic.SyntheticSpec(classes=5, imbalance=5, max_per_class=20, val_per_class=0, test_per_class=3,
                                   image_size=32, multilabel=multilabel)
    lists = synthetic.generate(spec, tmp_path)
    assert "val" not in lists
    return DatasetSource("synthetic", tmp_path, {"train": tmp_path / lists["train"], "val": None,
                                                 "test": tmp_path / lists["test"]},
                         tmp_path / lists["classnames"], multilabel)


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_no_validation_trains_on_every_listed_image(tmp_path, multilabel):
    source = _no_validation_source(tmp_path, multilabel)
    listed = [line.split()[0] for line in source.lists["train"].read_text().splitlines()]
    prepared = manifest.build(source, PrepareOptions(val_fraction=0.0))
    assert prepared.split("train")["path"].tolist() == listed
    assert prepared.split_size("val") == 0 and prepared.report["validation"] == {"none": True,
                                                                                 "train_list_images": len(listed)}
    carved = manifest.build(source, PrepareOptions(val_fraction=0.2))
    assert carved.split_size("val") > 0 and carved.split_size("train") + carved.split_size("val") == len(listed)


def test_protocol_names_the_validation_and_refuses_best_val_without_one(tmp_path):
    source = _no_validation_source(tmp_path)
    none = manifest.build(source, PrepareOptions(val_fraction=0.0))
    carved = manifest.build(source, PrepareOptions(val_fraction=0.2))
    assert protocol(none, 0, "last", "onecycle", "train") == {"validation": "none", "select": "last",
                                                              "schedule": "onecycle"}
    assert protocol(carved, carved.split_size("val"), "best_val", "cosine", "train")["validation"] == "carved"
    with pytest.raises(ConfigError, match=r"no validation split \(`prepare.val_fraction` is 0\), so "
                                          r"`sweep.train.select: best_val` has nothing to choose on: set "
                                          r"`sweep.train.select: last`"):
        protocol(none, 0, "best_val", "cosine", "sweep.train")


@pytest.mark.slow
def test_pipeline_without_validation_trains_every_listed_image_and_records_the_protocol(tmp_path):
    """COCO-LT's protocol at tiny scale through `dvc repro`: no validation list, every listed training
    image trains (CPRFL head, ASL, one-cycle schedule), the last model is kept and the metrics say so."""
    overrides = dict(dvc_repo.SMALL)
    overrides["datasets.synthetic_ml"] = dict(overrides["datasets.synthetic_ml"], val_per_class=0)
    overrides["prepare"] = {"val_fraction": 0}
    overrides["train"] = dict(epochs=3, schedule="onecycle", warmup_epochs=0.5, select="last")
    overrides["sweep"] = dict(overrides["sweep"], losses=["asl"], seeds=[0])
    overrides["sweep.train"] = dict(epochs=2, select="last")
    overrides["heads.cprfl"] = dict(dim=16, heads=2, head_dim=8, ffn=16)
    repo = dvc_repo.make(tmp_path / "repo", overrides)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("dataset: synthetic\n", "dataset: synthetic_ml\n", 1)
                      .replace("head: cosine\n", "head: cprfl\n", 1).replace("loss: ce\n", "loss: asl\n", 1))
    out = dvc_repo.run(repo, "dvc", "repro").stdout
    assert "no validation split (prepare.val_fraction 0)" in out and "kept the last model (epoch 2)" in out

    listed = len((repo / "data/prepared/train.txt").read_text().splitlines())
    with h5py.File(repo / "data/features/train.h5", "r") as train_file, \
            h5py.File(repo / "data/features/val.h5", "r") as val_file:
        assert len(train_file["labels"]) == listed and len(val_file["labels"]) == 0
        assert val_file["tokens"].shape[1:] == train_file["tokens"].shape[1:]
    expected = {"validation": "none", "select": "last", "schedule": "onecycle"}
    train_metrics = json.loads((repo / "metrics/train/metrics.json").read_text())
    assert train_metrics["protocol"] == expected and train_metrics["best_val_score"] is None
    assert not (repo / "metrics/train/plots/metrics/val").exists()  # no validation curve
    cell = json.loads((repo / "metrics/sweep/cosine-asl-0.json").read_text())
    assert cell["protocol"] == dict(expected, schedule="cosine")
    assert json.loads((repo / "metrics/eval.json").read_text())["mAP"] >= 0

    # What needs validation is refused with its fix, before any training.
    params.write_text(params.read_text().replace("select: last\n", "select: best_val\n", 1))
    failed = dvc_repo.run(repo, "dvc", "repro", "train", check=False)
    assert failed.returncode != 0
    assert ("ltpipe error: there is no validation split (`prepare.val_fraction` is 0), so `train.select: best_val` "
            "has nothing to choose on: set `train.select: last`") in failed.stdout + failed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("train_select,posthoc,refusal", [
    ("best_val", "none", "ltpipe error: there is no validation split (`prepare.val_fraction` is 0), so "
                         "`train.select: best_val` has nothing to choose on: set `train.select: last`"),
    ("last", "logit_adjust", "ltpipe error: `evaluate.posthoc: logit_adjust` chooses its tau on the validation "
                             "split, and there is none")])
def test_choices_needing_validation_are_refused_before_any_image_is_encoded(tmp_path, train_select, posthoc,
                                                                             refusal):
    # Issue 25: they were refused when train started, after extraction (hours on a benchmark).
    overrides = dict(dvc_repo.SMALL)
    overrides["datasets.synthetic"] = dict(overrides["datasets.synthetic"], val_per_class=0)
    overrides["prepare"] = {"val_fraction": 0}
    overrides["train"] = dict(epochs=2, select=train_select)
    overrides["evaluate"] = {"posthoc": posthoc}
    repo = dvc_repo.make(tmp_path / "repo", overrides)
    failed = dvc_repo.run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if line.startswith("ltpipe error:")]
    assert len(errors) == 1 and errors[0].startswith(refusal), failed.stdout + failed.stderr
    assert "extract" not in dvc_repo.stages_run(failed.stdout) and not (repo / "data/features").exists()


@pytest.mark.parametrize("method", ["crt", "marc"])
def test_stage_two_without_validation_is_kept_and_trains(tiny_features, tiny_prepared, method):
    torch.manual_seed(0)
    head = heads.build("cosine", None, context(tiny_features, tiny_prepared.num_classes))
    tr = SplitFeatures(tiny_features / "train.h5")
    va = SplitFeatures(tiny_features / "val.h5")
    cpu = torch.device("cpu")
    empty = MemoryFeatures(va.pooled[:0], va.labels[:0], "val", dict(va.attrs))
    choice = Stage2Choice(method, "ce", "class_balanced")
    loss = losses.build("ce", "single", None, tiny_prepared.classes["train_count"].to_numpy())
    cfg = TrainConfig(epochs=2, batch_size=32, select="last")
    model, summary = train_stage2(choice, loss, head, FeatureInput(tr, "pooled", cpu),
                                  FeatureInput(empty, "pooled", cpu), va.labels[:0], cfg, 0, False,
                                  tiny_prepared.num_classes, cpu)
    assert summary["kept"] and summary["val_score"] is None and summary["stage1_val_score"] is None
    assert model is not head and summary["best_epoch"] == 1
