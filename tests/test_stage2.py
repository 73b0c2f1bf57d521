"""Two-stage methods, post-hoc logit adjustment and the training hooks they rely on."""

import numpy as np
import pytest
import torch

from ltpipe import heads
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.evaluation import metrics
from ltpipe.evaluation.inference import FeatureInput, predict
from ltpipe.evaluation.results import log_prior, logit_adjust
from ltpipe.features.store import SplitFeatures
from ltpipe.training import checkpoint, stage2
from ltpipe.training.loop import match_head_to_loss, stage2_loss, train_stage2
from ltpipe.training.spec import TrainConfig

CPU = torch.device("cpu")
COUNTS = [200, 80, 30, 10, 4]
PARAMS = Params({"losses": {"ce": {}, "grw": {"rho": 1.2}}})


def clusters(counts, dim=16, seed=0, spread=0.8):
    """Gaussian class clusters around random unit means: long-tailed train, balanced val."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((len(counts), dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)

    def draw(per_class):
        labels = np.repeat(np.arange(len(counts)), per_class)
        x = means[labels] + spread * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
        return x.astype(np.float32), labels

    return draw(counts), draw([20] * len(counts))


def memory_input(x, labels):
    return FeatureInput(stage2.MemoryFeatures(x, labels, "memory", {}), "pooled", CPU)


def stage1(head_name="linear", seed=0):
    (x, y), (vx, vy) = clusters(COUNTS, seed=seed)
    torch.manual_seed(seed)
    head = heads.build(head_name, None, heads.HeadContext(len(COUNTS), x.shape[1], None))
    # A stage-1 classifier biased towards the head classes, as CE on long-tailed data leaves it.
    with torch.no_grad():
        head.classifier.weight.mul_(3.0)
    return head, memory_input(x, y), memory_input(vx, vy), vy


def run(name, head_name="linear", epochs=5, adjuster_before=None):
    head, train_in, val_in, val_labels = stage1(head_name)
    picked = stage2.Stage2Choice.from_params(Params(dict(PARAMS.data, stage2=name)), "single")
    loss_fn = stage2_loss(picked, head_name, head, "single", np.array(COUNTS), sum(COUNTS))
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, warmup_epochs=0)
    if adjuster_before is not None:  # the adjuster's initial state, from the same seeded build
        torch.manual_seed(123)
        adjuster_before.update(state(stage2.rebuild(name, stage2.frozen_copy(head)).adjuster))
    torch.manual_seed(123)
    model, summary = train_stage2(picked, loss_fn, head, train_in, val_in, val_labels, cfg, 0, False,
                                  len(COUNTS), CPU)
    return head, model, summary, val_in, val_labels


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", stage2.STAGE2.names())
def test_stage2_changes_only_its_own_parameters(name):
    initial = {}
    head, model, _, _, _ = run(name, adjuster_before=initial)
    before = state(head)  # the stage-1 head passed in is never modified ...
    frozen = state(model.head)  # ... and the model's copy of it equals it
    assert before.keys() == frozen.keys()
    for key in before:
        torch.testing.assert_close(frozen[key], before[key], rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("adjuster.") for n in trainable), trainable
    if name != "tau_norm":  # tau_norm trains nothing: only its tau buffer is set
        assert trainable
        changed = [n for n, p in model.adjuster.named_parameters() if not torch.equal(p, initial[n])]
        assert set(changed) == {n for n, _ in model.adjuster.named_parameters()}, f"{name} left some untrained"
        params_2d = [n for n, p in model.adjuster.named_parameters() if p.ndim >= 2]
        assert params_2d in ([], ["classifier.weight"], ["confidence.weight"]), params_2d  # only matrices decay


def test_crt_reinitialises_the_classifier():
    head, _, _, _ = stage1()
    model = stage2.rebuild("crt", stage2.frozen_copy(head))
    new, old = model.adjuster.classifier.weight, head.classifier.weight
    assert new.shape == old.shape and not torch.allclose(new, old)
    # Fresh PyTorch init: bounded by 1/sqrt(fan_in), unlike the x3 stage-1 weights.
    assert new.abs().max() <= 1 / np.sqrt(new.shape[1]) + 1e-6 < old.abs().max()


def test_crt_with_class_balanced_sampling_lifts_the_tail():
    head, model, _, val_in, val_labels = run("crt", epochs=20)
    before = predict(head, val_in).argmax(1)
    after = predict(model, val_in).argmax(1)
    tail = val_labels >= 3
    assert (after[tail] == val_labels[tail]).mean() > (before[tail] == val_labels[tail]).mean()


def test_lws_disalign_marc_formulas():
    head, _, _, _ = stage1()
    h = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    z = h @ head.classifier.weight.T + head.classifier.bias
    lws = stage2.rebuild("lws", head).adjuster
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]))
    torch.testing.assert_close(lws(h, head), z * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]) )

    dis = stage2.rebuild("disalign", head).adjuster
    assert torch.all(dis.confidence.weight == 0.1)
    with torch.no_grad():
        dis.alpha.fill_(2.0)
        dis.beta.copy_(torch.arange(5.0))
    sigma = torch.sigmoid(h @ dis.confidence.weight.T + dis.confidence.bias)
    torch.testing.assert_close(dis(h, head), (1 + 2.0 * sigma) * z + sigma * torch.arange(5.0))

    marc = stage2.rebuild("marc", head).adjuster
    norms = head.classifier.weight.norm(dim=1)
    torch.testing.assert_close(marc.weight_norm, norms)
    with torch.no_grad():
        marc.a.fill_(0.5)
        marc.b.fill_(-1.0)
    torch.testing.assert_close(marc(h, head), 0.5 * z - norms)


def test_marc_norms_survive_save_and_load(tmp_path):
    _, model, _, val_in, _ = run("marc")
    checkpoint.save_checkpoint(tmp_path / "m.pt", model, "linear", {"stage2": "marc"}, stage2="marc")
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "m.pt")
    assert isinstance(loaded, stage2.TwoStageHead)
    torch.testing.assert_close(loaded.adjuster.weight_norm, model.adjuster.weight_norm)
    np.testing.assert_array_equal(predict(loaded, val_in), predict(model, val_in))


def test_tau_norm_picks_the_best_validation_tau():
    head, model, summary, val_in, val_labels = run("tau_norm")
    h = torch.nn.functional.normalize(torch.from_numpy(val_in.features.pooled), dim=-1)
    weight, bias = head.classifier.weight.detach(), head.classifier.bias.detach()
    scores = {}
    for tau in metrics.TAU_GRID:  # brute force: w_c / ||w_c||^tau, the stage-1 bias kept
        logits = (h @ (weight / weight.norm(dim=1, keepdim=True) ** tau).T + bias).numpy()
        scores[tau] = metrics.selection_score(logits, val_labels, False)
    assert summary["tau"] == max(scores, key=lambda t: (scores[t], -t))
    assert summary["val_score"] == pytest.approx(scores[summary["tau"]])
    assert float(model.adjuster.tau) == pytest.approx(summary["tau"])


def test_tau_norm_at_zero_is_the_stage1_head_exactly():
    head, _, val_in, _ = stage1()
    with torch.no_grad():
        head.classifier.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0]))  # a bias that matters
    model = stage2.rebuild("tau_norm", stage2.frozen_copy(head))
    model.adjuster.tau.fill_(0.0)
    torch.testing.assert_close(torch.from_numpy(predict(model, val_in)), torch.from_numpy(predict(head, val_in)),
                               rtol=0, atol=0)
    model.adjuster.tau.fill_(1.0)  # tau = 1: unit-norm weights, the same bias
    h = torch.nn.functional.normalize(torch.from_numpy(val_in.features.pooled), dim=-1)
    weight = head.classifier.weight.detach()
    expected = h @ (weight / weight.norm(dim=1, keepdim=True)).T + head.classifier.bias.detach()
    torch.testing.assert_close(torch.from_numpy(predict(model, val_in)), expected)


@pytest.mark.parametrize("name", ["crt", "marc", "tau_norm"])
def test_stage2_better_than_stage1_is_kept(name, capsys):
    # The stage-1 head is biased towards the head classes (weights x3, see stage1); re-balancing
    # on the long-tailed clusters beats it on the balanced validation split.
    head, model, summary, val_in, val_labels = run(name, epochs=10)
    assert summary["kept"] is True and summary["val_score"] >= summary["stage1_val_score"]
    assert isinstance(model, stage2.TwoStageHead)
    assert summary["stage1_val_score"] == metrics.selection_score(predict(head, val_in), val_labels, False)
    assert "WARNING" not in capsys.readouterr().out


def test_tau_norm_refuses_a_cosine_head():
    head, _, _, _ = stage1("cosine")
    with pytest.raises(ConfigError, match="tau_norm.*cosine head"):
        stage2.rebuild("tau_norm", head)


def test_stage2_choice_from_params():
    def choose(values, task="single"):
        return stage2.Stage2Choice.from_params(Params(values), task)

    assert choose({"stage2": "none"}) is None
    choice = choose({"stage2": "crt", "stage2_methods": {"crt": {"loss": "bsm"}}})
    assert (choice.loss, choice.sampler) == ("bsm", "class_balanced")
    assert choose({"stage2": "tau_norm"}).loss is None  # trains nothing: no loss to check
    with pytest.raises(ConfigError, match=r"`stage2: tau_norm` cannot change a multi-label model's mAP"):
        choose({"stage2": "tau_norm"}, "multi")
    assert choose({"stage2": "crt"}, "multi").loss == "bce"  # ce's multi-label counterpart
    with pytest.raises(ConfigError, match=r"stage2.*'crtt'.*crt, disalign, lws, marc, none, tau_norm"):
        choose({"stage2": "crtt"})
    with pytest.raises(ConfigError, match=r"`stage2_methods.crt.loss` is 'foo'; .* use one of: bsm, cb"):
        choose({"stage2": "crt", "stage2_methods": {"crt": {"loss": "foo"}}})
    with pytest.raises(ConfigError, match=r"`stage2_methods.marc.loss` is 'grw'; for this multi-label task.*"
                                          r"\(e.g. `-S stage2_methods.marc.loss=asl`\)"):
        choose({"stage2": "marc"}, "multi")
    with pytest.raises(ConfigError, match=r"`stage2_methods.lws.sampler` is 'cbs'; valid: class_balanced"):
        choose({"stage2": "lws", "stage2_methods": {"lws": {"sampler": "cbs"}}})
    with pytest.raises(ConfigError, match=r"`stage2_methods.crt` must be a mapping of options"):
        choose({"stage2": "crt", "stage2_methods": {"crt": "bsm"}})


def test_stage2_refusals_come_before_any_training():
    cosine, _, _, _ = stage1("cosine")
    tau = stage2.Stage2Choice.from_params(Params({"stage2": "tau_norm"}), "single")
    with pytest.raises(ConfigError, match="tau_norm.*cosine head"):
        stage2_loss(tau, "cosine", cosine, "single", np.array(COUNTS), sum(COUNTS))
    with pytest.raises(ConfigError, match=r"`losses.grw.rho` must be at least 0"):
        stage2.Stage2Choice.from_params(Params({"stage2": "marc", "losses": {"grw": {"rho": -1}}}), "single")
    with pytest.raises(ConfigError, match=r"`stage2_methods.crt.loss` is 'ldam', which needs its own"):
        stage2.Stage2Choice.from_params(Params({"stage2": "crt", "stage2_methods": {"crt": {"loss": "ldam"}}}),
                                        "single")


def test_ldam_style_losses_need_a_cosine_head():
    class NeedsScale(torch.nn.Module):
        head_scale = 30.0

    linear, _, _, _ = stage1("linear")
    with pytest.raises(ConfigError, match=r"needs a normalised classifier: set `head: cosine`"):
        match_head_to_loss("linear", linear, "ldam", NeedsScale())
    cosine, _, _, _ = stage1("cosine")
    match_head_to_loss("cosine", cosine, "ldam", NeedsScale())
    assert cosine.classifier.log_scale.exp().item() == pytest.approx(30.0)
    assert not cosine.classifier.log_scale.requires_grad
    # Without a scale (Imbalance-VLM's LDAM) any head is fine and nothing is fixed.
    NeedsScale.head_scale = None
    match_head_to_loss("linear", linear, "ldam", NeedsScale())
    assert all(p.requires_grad for p in linear.parameters())


def test_posthoc_logit_adjustment_by_hand():
    prior = log_prior(np.array([0, 0, 0, 1]), 3)  # counts 3, 1, 0 -> 0 is clamped to 1
    np.testing.assert_allclose(prior, np.log([3 / 5, 1 / 5, 1 / 5]))
    logits = np.array([[1.0, 0.8, 0.2]])
    np.testing.assert_allclose(logit_adjust(logits, prior, 1.0), [[1 - np.log(0.6), 0.8 - np.log(0.2),
                                                                    0.2 - np.log(0.2)]])
    assert logit_adjust(logits, prior, 1.0).argmax() == 1 and logits.argmax() == 0


def test_pick_on_validation_takes_the_first_best():
    assert metrics.pick_on_validation((0.0, 0.5, 1.0, 1.5), lambda t: -abs(t - 1.0)) == (1.0, 0.0)
    assert metrics.pick_on_validation((0.0, 0.5, 1.0), lambda t: 0.3) == (0.0, 0.3)


def test_iterations_replace_epochs():
    from ltpipe.training.loop import train
    from ltpipe.training.samplers import SAMPLERS

    head, train_in, val_in, val_labels = stage1()
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, logits, target):
            if logits.requires_grad:  # a training step (not the all-zero logits of the final check)
                calls.append(len(target))
            return torch.nn.functional.cross_entropy(logits, target)

    result = train(head, Counting(), SAMPLERS.get("instance"), train_in, val_in, val_labels,
                   TrainConfig(epochs=99, batch_size=100, iterations=7), 0, False, len(COUNTS), CPU)
    assert len(calls) == 7  # 324 images: 4 steps an epoch, so 2 epochs, the second cut at 3 steps
    assert len(result.history) == 2


def test_decoder_crt_keeps_the_decoder_blocks(tiny_features, tiny_prepared):
    train_feats = SplitFeatures(tiny_features / "train.h5")
    val = SplitFeatures(tiny_features / "val.h5")
    torch.manual_seed(0)
    head = heads.rebuild("decoder", {"dim": train_feats.token_shape[-1], "num_classes": tiny_prepared.num_classes,
                                     "depth": 1, "heads": 2, "mlp_ratio": 0.5, "final_norm": False,
                                     "readout": "cls"})
    before = state(head)
    choice = stage2.Stage2Choice("crt", "ce", "class_balanced")
    loss_fn = stage2_loss(choice, "decoder", head, "single", np.bincount(train_feats.labels),
                          len(train_feats.labels))
    model, _ = train_stage2(choice, loss_fn, head, FeatureInput(train_feats, "tokens", CPU),
                            FeatureInput(val, "tokens", CPU), val.labels, TrainConfig(epochs=2, batch_size=32), 0,
                            False, tiny_prepared.num_classes, CPU)
    for key, value in state(model.head).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert predict(model, FeatureInput(val, "tokens", CPU)).shape == (len(val), tiny_prepared.num_classes)


def test_ldam_drw_switches_on_by_step_also_with_iterations():
    from ltpipe import losses
    from ltpipe.training.loop import train
    from ltpipe.training.samplers import SAMPLERS

    head, train_in, val_in, val_labels = stage1("cosine")
    ldam = losses.build("ldam", "single", None, np.array(COUNTS))
    match_head_to_loss("cosine", head, "ldam", ldam)
    active = []
    forward = ldam.forward
    ldam.forward = lambda logits, target: (logits.requires_grad and active.append(ldam.drw_active),
                                           forward(logits, target))[1]
    # 324 images, batch 25: 13 steps an epoch; 20 iterations = 2 epochs, DRW from step round(0.8 * 20) = 16.
    train(head, ldam, SAMPLERS.get("instance"), train_in, val_in, val_labels,
          TrainConfig(epochs=1, batch_size=25, iterations=20, warmup_epochs=0), 0, False, len(COUNTS), CPU)
    assert active == [False] * 16 + [True] * 4
    assert head.classifier.log_scale.exp().item() == pytest.approx(30.0)  # s held fixed through training
