"""Reliability: training that runs to the end but ships a bad model, and choices that could
only fail at the last stage.

Each case injects the fault for real (hand-built features on which stage 1 is already the best
model, a learning rate that wrecks training without a NaN, a multi-label dataset given a
single-label-only choice) and checks that the outcome is handled: the better model is kept,
the run says so in one WARNING line and in its summary, or the choice is refused before any
training with one `ltpipe error:` line.
"""

import numpy as np
import pytest
import torch

from ltpipe import heads, losses
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.data import manifest
from ltpipe.evaluation import metrics
from ltpipe.evaluation import results as evaluation
from ltpipe.evaluation.inference import FeatureInput, predict
from ltpipe.training import loop as training
from ltpipe.training import stage2
from ltpipe.training.loop import check_outcome, loss_diverged, stage2_loss, train, train_stage2
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import TrainConfig
from tests.conftest import make_source

CPU = torch.device("cpu")


def memory_input(x, labels):
    return FeatureInput(stage2.MemoryFeatures(np.asarray(x, np.float32), labels, "memory", {}), "pooled", CPU)


# ---------------------------------------------------------------- stage 2 worse than stage 1

def threshold_features(n=60, seed=0):
    """Unit vectors at angles spread over (-pi/2, pi/2); class 0 iff cos(angle) > 0.5. A
    linear head with ``w_0 = -w_1 = (10, 0)`` and ``b_1 - b_0 = 10`` draws exactly that
    boundary: it is perfect, and only through its bias (without it the boundary is at 0)."""
    angles = np.random.default_rng(seed).uniform(-1.5, 1.5, n)
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return x, (x[:, 0] <= 0.5).astype(np.int64)


def perfect_stage1():
    head = heads.rebuild("linear", {"in_dim": 2, "num_classes": 2})
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]))
        head.classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    return head


def stage2_outcome(name, capsys):
    """Stage 2 ``name`` after a stage 1 that is perfect on validation. Training rows carry the
    labels swapped, so every method that trains is pulled away from the validation optimum."""
    head = perfect_stage1()
    val_x, val_y = threshold_features(seed=1)
    train_x, train_y = threshold_features(n=200, seed=2)
    assert metrics.selection_score(predict(head, memory_input(val_x, val_y)), val_y, False) == 1.0
    choice = stage2.Stage2Choice.from_params(
        Params({"stage2": name, "losses": {"ce": {}, "grw": {"rho": 1.2}}}), "single")
    counts = np.bincount(1 - train_y, minlength=2)
    loss_fn = stage2_loss(choice, "linear", head, "single", counts, len(train_y))
    torch.manual_seed(0)
    model, summary = train_stage2(choice, loss_fn, head, memory_input(train_x, 1 - train_y),
                                  memory_input(val_x, val_y), val_y,
                                  TrainConfig(epochs=2, batch_size=10, lr=0.5, warmup_epochs=0), 0, False, 2, CPU)
    return head, model, summary, memory_input(val_x, val_y), capsys.readouterr().out


@pytest.mark.parametrize("name", stage2.STAGE2.names(trains=True),
                         ids=[f"{n}_worse_than_stage1" for n in stage2.STAGE2.names(trains=True)])
def test_stage2_worse_than_stage1_keeps_stage1(name, capsys):
    head, model, summary, val_in, out = stage2_outcome(name, capsys)
    np.testing.assert_array_equal(predict(model, val_in), predict(head, val_in))  # the model IS stage 1
    assert summary["kept"] is False
    assert summary["val_score"] < summary["stage1_val_score"] == 1.0
    assert not isinstance(model, stage2.TwoStageHead)
    warning = [line for line in out.splitlines() if line.startswith("WARNING:")]
    assert len(warning) == 1 and f"stage 2 {name} validates worse than the stage-1 head" in warning[0]
    assert f"{summary['val_score']:.4f} < 1.0000" in warning[0]


@pytest.mark.parametrize("case", ["tau_norm"], ids=["tau_norm_worse_than_stage1"])
def test_tau_norm_never_ships_a_worse_head(case, capsys):
    # The stage-1 head is perfect only through its bias: tau-normalising without the bias (Kang
    # et al.'s code) scores below it at every tau.
    head, model, summary, val_in, out = stage2_outcome(case, capsys)
    assert summary["tau"] == 0.0 and summary["val_score"] == 1.0
    np.testing.assert_array_equal(predict(model, val_in), predict(head, val_in))
    assert summary["kept"] is True and "WARNING" not in out


# ---------------------------------------------------------------- runs that learn nothing

def clusters(seed=0, classes=4, dim=8, noise=0.3):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim))
    train_y, val_y = np.repeat(np.arange(classes), [60, 30, 15, 8]), np.repeat(np.arange(classes), 10)
    noisy = lambda y: means[y] + noise * rng.standard_normal((len(y), dim))  # noqa: E731
    return memory_input(noisy(train_y), train_y), memory_input(noisy(val_y), val_y), val_y


def run_training(head_name, lr, epochs=6, optimizer="adamw", noise=0.3):
    train_in, val_in, val_y = clusters(noise=noise)
    torch.manual_seed(0)
    head = heads.rebuild(head_name, {"in_dim": 8, "num_classes": 4})
    loss = losses.build("ce", "single", None, np.bincount(train_in.labels))
    result = train(head, loss, SAMPLERS.get("instance"), train_in, val_in, val_y,
                   TrainConfig(epochs=epochs, batch_size=16, lr=lr, optimizer=optimizer), 0, False, 4, CPU)
    return result, val_y


@pytest.mark.parametrize("case", [("cosine", 1e3, "adamw"), ("cosine", 1e3, "sgd")],
                         ids=["lr_huge_chance", "lr_huge_sgd_chance"])
def test_a_run_at_chance_says_so(case, capsys):
    head_name, lr, optimizer = case
    result, val_y = run_training(head_name, lr, optimizer=optimizer)
    capsys.readouterr()
    assert result.best_score == pytest.approx(0.25)  # 4 classes, one predicted for every image
    flags = check_outcome(result.best_score, val_y, False, [r for r in [loss_diverged(result)] if r], lr)
    out = capsys.readouterr().out
    assert flags["above_chance"] is False and flags["chance_score"] == 0.25
    assert "WARNING: the kept model's validation balanced accuracy 0.2500 is not above chance (0.2500" in out
    assert f"lower `train.lr` (now {lr:g})" in out


@pytest.mark.parametrize("case", [("linear", 1e3)], ids=["loss_diverged_finite"])
def test_a_loss_that_diverges_without_nan_says_so(case, capsys):
    # Overlapping classes: no weights fit them all, so a huge step leaves a huge (finite) loss.
    result, val_y = run_training(*case, epochs=6, noise=2.0)
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    reason = loss_diverged(result)
    assert reason is not None and "not below" in reason
    flags = check_outcome(result.best_score, val_y, False, [reason], case[1])
    out = capsys.readouterr().out
    assert flags["loss_diverged"] is True
    assert "WARNING: training diverged without the loss becoming NaN: the last epoch's training loss" in out


# ---------------------------------------------------------------- choices only the last stage used to refuse

class NotTrained(Exception):
    pass


def refuse_before_training(monkeypatch, tmp_path, params):
    """``training.run_stage`` on a multi-label dataset with ``params``; training must not start."""
    prepared = manifest.build(make_source(tmp_path / "ml", multilabel=True))
    monkeypatch.setattr(manifest, "load", lambda _: prepared)

    def fit(*args, **kwargs):
        raise NotTrained

    monkeypatch.setattr(training, "fit", fit)
    base = {"task": "auto", "head": "linear", "loss": "bce", "sampler": "instance", "stage2": "none", "seed": 0,
            "evaluate": {"posthoc": "none"}, "stage2_methods": {}, "train": {},
            "model": {"device": "cpu", "threads": "auto"}}
    return training.run_stage(Params(dict(base, **params)))


@pytest.mark.parametrize("case", [{"evaluate": {"posthoc": "logit_adjust"}}, {"stage2": "tau_norm"}],
                         ids=["posthoc_multilabel", "tau_norm_multilabel"])
def test_multilabel_only_choices_fail_before_training(case, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"cannot change a multi-label model's mAP|logit_adjust` is single-label "
                                          r"only: .* leaves mAP unchanged"):
        refuse_before_training(monkeypatch, tmp_path, case)
    case = dict(case, stage2="none", evaluate={"posthoc": "none"})
    with pytest.raises(NotTrained):  # the same run without the choice goes on to train
        refuse_before_training(monkeypatch, tmp_path, case)


def test_evaluate_refuses_posthoc_on_multilabel_with_the_reason():
    with pytest.raises(ConfigError, match=r"leaves mAP unchanged.*Set `evaluate.posthoc: none`"):
        evaluation.check_posthoc(Params({"evaluate": {"posthoc": "logit_adjust"}}), True)
    assert evaluation.check_posthoc(Params({"evaluate": {"posthoc": "logit_adjust"}}), False) == "logit_adjust"


@pytest.mark.parametrize("case", ["crt", "lws"], ids=["crt_multilabel_ce", "lws_multilabel_ce"])
def test_stage2_ce_on_multilabel_becomes_bce(case, capsys):
    params = Params({"stage2": case, "stage2_methods": {case: {"loss": "ce", "sampler": "class_balanced"}}})
    choice = stage2.Stage2Choice.from_params(params, "multi")
    assert (choice.loss, choice.sampler) == ("bce", "class_balanced")
    out = capsys.readouterr().out
    assert f"stage 2 {case}: `stage2_methods.{case}.loss` 'ce' is single-label; this multi-label task uses " \
           "its counterpart 'bce'" in out
    # And it trains: a multi-label stage 2 with the substituted loss runs to the end.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.uint8)
    head = heads.rebuild("linear", {"in_dim": 6, "num_classes": 3})
    loss_fn = stage2_loss(choice, "linear", head, "multi", y.sum(0), len(y))
    model, summary = train_stage2(choice, loss_fn, head, memory_input(x, y), memory_input(x, y), y,
                                  TrainConfig(epochs=2, batch_size=20), 0, True, 3, CPU)
    # The model returned is the one whose validation score the summary reports.
    assert summary["kept"] == (summary["val_score"] >= summary["stage1_val_score"])
    shipped = summary["val_score"] if summary["kept"] else summary["stage1_val_score"]
    assert metrics.selection_score(predict(model, memory_input(x, y)), y, True) == pytest.approx(shipped)
