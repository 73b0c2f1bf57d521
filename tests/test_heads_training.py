import re

import numpy as np
import pytest
import torch

from ltpipe import heads, losses
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.evaluation.inference import FeatureInput, predict
from ltpipe.evaluation.zeroshot import zeroshot_logits
from ltpipe.features.store import SplitFeatures, TextFeatures
from ltpipe.training import checkpoint
from ltpipe.training.loop import param_groups, train
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import TrainConfig
from ltpipe.training.trainer import warmup_cosine


def context(features_dir, num_classes):
    tr = SplitFeatures(features_dir / "train.h5")
    text = TextFeatures(features_dir / "text.h5")
    return heads.HeadContext(num_classes, tr.pooled.shape[1], tr.token_shape, text.embeddings, text.logit_scale)


def test_unknown_head_lists_names():
    valid = re.escape(", ".join(heads.HEADS.names()))
    with pytest.raises(ConfigError, match=rf"unknown head 'linaer'.*Valid names: {valid}\."):
        heads.HEADS.get("linaer")


def test_text_initialised_linear_head_is_the_zero_shot_classifier(tiny_features, tiny_prepared):
    ctx = context(tiny_features, tiny_prepared.num_classes)
    head = heads.build("linear", heads.HEADS.parse("linear", Params({"init": "text"})), ctx)
    test = SplitFeatures(tiny_features / "test.h5")
    logits = predict(head, FeatureInput(test, "pooled", torch.device("cpu")))
    expected = zeroshot_logits(test.pooled, TextFeatures(tiny_features / "text.h5"))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_decoder_depth_zero_is_a_linear_probe_on_cls():
    head = heads.rebuild("decoder", {"dim": 8, "num_classes": 3, "depth": 0})
    tokens = torch.randn(2, 5, 8)
    expected = tokens[:, 0] @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(tokens), expected)


def test_decoder_defaults_follow_imbalance_vlm():
    head = heads.rebuild("decoder", {"dim": 192, "num_classes": 10})
    assert len(head.blocks) == 3
    block = head.blocks[0]
    assert block.attn.num_heads == 4
    assert block.attn.in_proj_bias is not None  # qkv bias
    assert block.mlp[0].out_features == 96  # mlp ratio 0.5
    assert isinstance(head.norm, torch.nn.Identity)  # no final LayerNorm


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    head = heads.rebuild("cosine", {"in_dim": 4, "num_classes": 3, "scale": 10.0})
    run = {"head": "cosine", "loss": "bsm", "sampler": "instance", "stage2": "none", "seed": 3}
    checkpoint.save_checkpoint(tmp_path / "h.pt", head, "cosine", run)
    loaded, loaded_run = checkpoint.load_checkpoint(tmp_path / "h.pt")
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), head(x))
    assert loaded_run == run


def test_weight_decay_skips_biases_and_scales():
    head = heads.rebuild("cosine", {"in_dim": 4, "num_classes": 3})
    decay, no_decay = param_groups(head, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 1


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def _train(tiny_features, tiny_prepared, seed, head_name="cosine", epochs=15):
    torch.manual_seed(seed)
    ctx = context(tiny_features, tiny_prepared.num_classes)
    head = heads.build(head_name, None, ctx)
    tr = SplitFeatures(tiny_features / "train.h5", load_tokens=head.input == "tokens")
    va = SplitFeatures(tiny_features / "val.h5", load_tokens=head.input == "tokens")
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05)
    loss = losses.build("ce", "single", None, tiny_prepared.classes["train_count"].to_numpy())
    cpu = torch.device("cpu")
    result = train(head, loss, SAMPLERS.get("instance"), FeatureInput(tr, head.input, cpu),
                   FeatureInput(va, head.input, cpu), va.labels, cfg, seed, False, tiny_prepared.num_classes, cpu)
    return head, result


def test_training_learns_and_keeps_the_best_validation_epoch(tiny_features, tiny_prepared):
    head, result = _train(tiny_features, tiny_prepared, seed=0)
    scores = [row["val_score"] for row in result.history]
    assert result.best_score == max(scores)
    assert result.best_epoch == int(np.argmax(scores))
    assert result.best_score > 1.0 / tiny_prepared.num_classes, "validation above chance"
    assert result.history[-1]["train_loss"] < 0.7 * result.history[0]["train_loss"]
    train_feats = SplitFeatures(tiny_features / "train.h5")
    fitted = predict(head, FeatureInput(train_feats, "pooled", torch.device("cpu"))).argmax(1)
    majority = np.bincount(train_feats.labels).max() / len(train_feats.labels)
    assert (fitted == train_feats.labels).mean() > majority + 0.1, "beyond always predicting the head class"


def test_training_is_deterministic_for_a_seed(tiny_features, tiny_prepared):
    a, ra = _train(tiny_features, tiny_prepared, seed=0, epochs=3)
    b, rb = _train(tiny_features, tiny_prepared, seed=0, epochs=3)
    c, rc = _train(tiny_features, tiny_prepared, seed=1, epochs=3)
    for key in a.state_dict():
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert ra.history == rb.history
    assert ra.history != rc.history


def test_decoder_trains_on_token_grids(tiny_features, tiny_prepared):
    head, result = _train(tiny_features, tiny_prepared, seed=0, head_name="decoder", epochs=2)
    assert len(result.history) == 2
    assert np.isfinite(result.history[-1]["train_loss"])


def test_decoder_reads_the_mean_token_when_the_grid_has_no_cls():
    ctx = heads.HeadContext(3, 8, (5, 8), tokens_have_cls=False)
    head = heads.build("decoder", heads.HEADS.parse("decoder", Params({"depth": 0})), ctx)
    tokens = torch.randn(2, 5, 8)
    expected = tokens.mean(dim=1) @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(tokens), expected)
    assert heads.rebuild("decoder", head.kwargs).readout == "mean"


def test_diverging_training_is_a_clear_error(tiny_features, tiny_prepared):
    from ltpipe.core.errors import TrainingError

    train_feats = SplitFeatures(tiny_features / "train.h5")
    train_feats.pooled[:] = np.nan
    val = SplitFeatures(tiny_features / "val.h5")
    head = heads.rebuild("linear", {"in_dim": train_feats.pooled.shape[1], "num_classes": tiny_prepared.num_classes})
    cpu = torch.device("cpu")
    loss = losses.build("ce", "single", None, tiny_prepared.classes["train_count"].to_numpy())
    with pytest.raises(TrainingError, match=r"training loss became nan at epoch 0. Lower `train.lr`"):
        train(head, loss, SAMPLERS.get("instance"), FeatureInput(train_feats, "pooled", cpu),
              FeatureInput(val, "pooled", cpu), val.labels, TrainConfig(epochs=1), 0, False,
              tiny_prepared.num_classes, cpu)


def test_loss_class_counts_come_from_the_cached_training_rows():
    from ltpipe.training.loop import class_counts

    np.testing.assert_array_equal(class_counts(np.array([0, 2, 2, 2]), 4), [1, 0, 3, 0])
    multi = np.array([[1, 0, 1], [1, 1, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(class_counts(multi, 3), [2, 1, 1])


def test_training_shows_per_epoch_progress_with_the_validation_score(tiny_features, tiny_prepared, capfd,
                                                                      monkeypatch):
    from ltpipe.training import loop as training

    monkeypatch.setitem(training.PROGRESS_INTERVAL, "log", 0.0)  # redraw at every epoch, as a terminal would
    capfd.readouterr()
    _, result = _train(tiny_features, tiny_prepared, seed=0, epochs=3)
    out, err = capfd.readouterr()
    assert "epoch" not in out  # progress goes to stderr, stdout stays for results and warnings
    # One draw per epoch (closing the bar draws the last one again), each with that epoch's numbers.
    shown = {re.search(r"(\d)/3", part).group(1): part for part in err.replace("\n", "\r").split("\r")
             if "val " in part}
    assert sorted(shown) == ["1", "2", "3"], err
    for epoch, row in enumerate(result.history, start=1):
        part = shown[str(epoch)]
        assert part.strip().startswith("train:")
        assert f"val {row['val_score']:.4f}" in part and f"loss {row['train_loss']:.4g}" in part


def test_progress_in_a_log_redraws_at_most_every_half_minute(tiny_features, tiny_prepared, capfd):
    capfd.readouterr()
    _train(tiny_features, tiny_prepared, seed=0, epochs=5)
    err = capfd.readouterr().err
    # Not a terminal: the bar's first draw and its final state only (a run under 30 s).
    assert len([part for part in err.replace("\n", "\r").split("\r") if part.startswith("train:")]) == 2, err
    assert "5/5" in err
