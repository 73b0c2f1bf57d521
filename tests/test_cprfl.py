"""The CPRFL head: prompt-only VSI equals the full layer, both gradient paths, sizes, training."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ltpipe import heads, losses
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.evaluation import metrics
from ltpipe.evaluation.inference import FeatureInput, predict
from ltpipe.heads.cprfl import PromptVSI
from ltpipe.training.loop import train
from ltpipe.training.samplers import SAMPLERS
from ltpipe.training.spec import TrainConfig
from ltpipe.training.stage2 import MemoryFeatures

CPU = torch.device("cpu")


@pytest.mark.parametrize("tokens,classes,chunk", [(50, 7, 256), (49, 30, 8), (65, 1, 1)])
def test_prompt_rows_equal_the_full_layer(tokens, classes, chunk):
    torch.manual_seed(0)
    vsi = PromptVSI(dim=32, heads=4, head_dim=16, ffn=24, dropout=0.1, class_chunk=chunk).eval()
    visual, prompts = torch.randn(3, tokens, 32), torch.randn(classes, 32)
    full = vsi.forward_full(visual, prompts)
    assert full.shape == (3, classes, 32)
    torch.testing.assert_close(vsi(visual, prompts), full, rtol=1e-5, atol=1e-5)


def test_the_layer_has_no_residual_connections():
    # Zeroing the output projection zeroes the attention branch; with a residual the prompts would
    # still show through, without one the output is the FFN of a constant: the same for every class.
    torch.manual_seed(0)
    vsi = PromptVSI(dim=16, heads=2, head_dim=8, ffn=16, dropout=0.0, class_chunk=256).eval()
    with torch.no_grad():
        vsi.to_out[0].weight.zero_()
    out = vsi(torch.randn(2, 10, 16), torch.randn(5, 16))
    torch.testing.assert_close(out, out[:, :1].expand_as(out))


def test_prompts_get_gradient_through_both_paths():
    torch.manual_seed(0)
    head = heads.rebuild("cprfl", dict(token_dim=24, text_dim=12, num_classes=6, dim=16, heads=2, head_dim=8,
                                       ffn=16, dropout=0.0))
    head.text.normal_()
    tokens, target = torch.randn(4, 9, 24), torch.randint(0, 2, (4, 6)).float()

    def prompt_grad(detach_vsi: bool, detach_classifier: bool) -> torch.Tensor:
        prompts = head.prompts()
        prompts.retain_grad()
        logits = head.score(tokens, prompts.detach() if detach_vsi else prompts,
                            prompts.detach() if detach_classifier else prompts)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
        head.zero_grad()
        return prompts.grad.clone()

    through_vsi = prompt_grad(False, True)
    through_classifier = prompt_grad(True, False)
    both = prompt_grad(False, False)
    assert through_vsi.abs().sum() > 0 and through_classifier.abs().sum() > 0
    torch.testing.assert_close(both, through_vsi + through_classifier)


def test_paper_preset_has_the_official_parameter_counts():
    # Counted from the official modules (reference report, section 1.4): VSI 41,957,376;
    # phi 4,196,352; PI 3,148,800 (ResNet-101 grid width 2048, CLIP-RN50 text width 1024).
    head = heads.rebuild("cprfl", dict(token_dim=2048, text_dim=1024, num_classes=80, dim=2048, heads=8,
                                       head_dim=512, ffn=2048))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert (count(head.vsi), count(head.project), count(head.prompt_init)) == (41_957_376, 4_196_352, 3_148_800)


def paper_logits(state: dict, tokens: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The CPRFL logits written out from the reference report's equations (../shared/reference/cprfl.md,
    sections 1.2-1.5) on the head's raw weights, the way the official code runs the layer: all
    ``T + C`` rows through it, the last ``C`` kept."""
    def linear(x, name, bias=True):
        return x @ state[f"{name}.weight"].T + (state[f"{name}.bias"] if bias else 0)

    def layer_norm(x, name):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * state[f"{name}.weight"] \
            + state[f"{name}.bias"]

    prompts = linear(F.gelu(linear(state["text"], "prompt_init.0")), "prompt_init.2")  # Eq. 2: P = PI(W)
    z = torch.cat([linear(tokens, "project"), prompts.expand(tokens.shape[0], -1, -1)], dim=1)  # Eq. 1, [phi(F); P]
    # VSI (Eqs. 3-5): one pre-LayerNorm layer, no residuals, softmax over all T + C keys.
    q, k, v = (part.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # [B, heads, T+C, head_dim]
               for part in linear(layer_norm(z, "vsi.norm1"), "vsi.to_qkv", bias=False).chunk(3, dim=-1))
    attention = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1)  # scale per head, not per dim
    attended = linear((attention @ v).transpose(1, 2).flatten(2), "vsi.to_out.0")
    refined = linear(F.gelu(linear(layer_norm(attended, "vsi.norm2"), "vsi.ffn.0")), "vsi.ffn.3")
    refined = refined[:, -prompts.shape[0]:]  # P': the category rows
    return torch.einsum("bcd,cd->bc", refined, prompts)  # Eq. 6: <P'_i, P_i>, each class its own prompt


@pytest.mark.parametrize("class_chunk", [256, 2])
def test_logits_are_dot_products_with_each_class_own_prompt(class_chunk):
    # Sizes where the usual slips change the numbers: attention width 2*6 differs from dim 8 and
    # the scale head_dim^-0.5 from dim^-0.5; random norm weights and biases so each one counts.
    torch.manual_seed(0)
    head = heads.rebuild("cprfl", dict(token_dim=5, text_dim=4, num_classes=3, dim=8, heads=2, head_dim=6, ffn=7,
                                       dropout=0.1, tau=0.5, class_chunk=class_chunk, ema=0.0)).eval()
    with torch.no_grad():
        for value in head.state_dict().values():
            value.normal_()
    tokens = torch.randn(2, 6, 5)
    expected = paper_logits({k: v.clone() for k, v in head.state_dict().items()}, tokens, heads=2, head_dim=6)
    torch.testing.assert_close(head(tokens), expected, rtol=1e-5, atol=1e-5)


def planted(num_classes=5, n=400, seed=0, tokens=12, width=16):
    """Multi-label token grids: a present class adds its own pattern to a random token."""
    patterns = np.random.default_rng(99).standard_normal((num_classes, width)) * 2  # shared by every split
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, num_classes)) < 0.3).astype(np.uint8)
    grid = rng.standard_normal((n, tokens, width))
    for i, c in zip(*np.nonzero(labels)):
        grid[i, rng.integers(tokens)] += patterns[c]
    return grid.astype(np.float32), labels


class TokenMemory(MemoryFeatures):
    """In-memory token grids shaped like SplitFeatures."""

    has_tokens = True

    def __init__(self, grid, labels):
        super().__init__(grid[:, 0], labels, "memory", {})
        self.grid = grid
        self.token_shape = grid.shape[1:]

    def tokens(self, index):
        return self.grid[np.asarray(index)]


def fit(head, epochs=15, **cfg):
    (x, y), (vx, vy) = planted(seed=0), planted(seed=1, n=200)
    loss = losses.build("bce", "multi", None, y.sum(0))
    result = train(head, loss, SAMPLERS.get("instance"), FeatureInput(TokenMemory(x, y), "tokens", CPU),
                   FeatureInput(TokenMemory(vx, vy), "tokens", CPU), vy,
                   TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, warmup_epochs=0, **cfg), 0, True, 5, CPU)
    return result, vx, vy


def build_head(**options):
    torch.manual_seed(0)
    ctx = heads.HeadContext(5, 16, (12, 16), np.random.default_rng(2).standard_normal((5, 8)), 100.0)
    return heads.build("cprfl", heads.HEADS.parse("cprfl", Params(dict(dim=32, heads=2, head_dim=16, ffn=32, **options),
                                       prefix="heads.cprfl")), ctx)


def test_cprfl_learns_a_multilabel_task():
    head = build_head()
    result, vx, vy = fit(head)
    assert result.best_score > 0.9  # mAP on held-out images; chance is about 0.3
    test_logits = predict(head, FeatureInput(TokenMemory(vx, vy), "tokens", CPU))
    assert metrics.selection_score(test_logits, vy, True) == pytest.approx(result.best_score)


def test_ema_weights_are_the_ones_validated_and_kept():
    seen = []
    head = build_head(ema=0.999999, dropout=0.0)  # the average barely moves past its first update
    original = losses.build

    def recording_build(*args, **kwargs):
        loss = original(*args, **kwargs)
        forward = loss.forward
        loss.forward = lambda logits, target: (logits.requires_grad and seen.append(  # training steps only
            {k: v.detach().clone() for k, v in head.state_dict().items()}), forward(logits, target))[1]
        return loss

    losses.build = recording_build
    try:
        fit(head, epochs=3)
    finally:
        losses.build = original
    # The average starts from the initial weights, as the official code's ModelEma (a deep copy of
    # the model before training); until issue 16 it started from the weights after the first step.
    initial = seen[0]  # weights the first step starts from
    final_raw = seen[-1]
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, initial[key], rtol=0, atol=1e-4)
    assert any(not torch.allclose(final_raw[k], initial[k], atol=1e-3) for k in final_raw)
    assert any(not torch.equal(seen[1][k], initial[k]) for k in initial)  # the first step moved them


def test_cprfl_needs_tokens_and_text():
    ctx = heads.HeadContext(5, 16, None, np.zeros((5, 8)), 100.0)
    with pytest.raises(ConfigError, match="cprfl.*token grids.*extract.tokens"):
        heads.build("cprfl", None, ctx)
    ctx = heads.HeadContext(5, 16, (12, 16), np.zeros((4, 8)), 100.0)
    with pytest.raises(ConfigError, match="one per class"):
        heads.build("cprfl", None, ctx)
    with pytest.raises(ConfigError, match=r"`heads.cprfl.ema` must be below 1"):
        build_head(ema=1.0)
