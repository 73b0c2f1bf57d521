import open_clip
import pytest
import torch
from torch.nn import functional as F

from ltpipe.core.errors import ConfigError
from ltpipe.features import models
from ltpipe.finetune.coop import CoOpHead
from ltpipe.heads.zeroshot import ZeroShotHead

PROMPTS = ["dog", "tabby cat", "red fox", "hot air balloon"]
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


@pytest.fixture(scope="module")
def clip():
    models.register_project_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("ltpipe-tiny", pretrained=None)
    return model, open_clip.get_tokenizer("ltpipe-tiny")


def text_tower_parameters(model):
    for name in TEXT_TOWER:
        part = getattr(model, name)
        yield from ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())


def pooled_features(model, batch=6, seed=1):
    return torch.randn(batch, model.text_projection.shape[1], generator=torch.Generator().manual_seed(seed))


def test_template_init_reproduces_clips_zero_shot_classifier(clip):
    model, tokenizer = clip
    head = CoOpHead(model, tokenizer, PROMPTS, context=4, init="a photo of a")
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokenizer([f"a photo of a {p}." for p in PROMPTS])), dim=-1)
        torch.testing.assert_close(head.text_features(), expected, atol=1e-5, rtol=0)
        assert head.logit_scale.item() == pytest.approx(model.logit_scale.exp().item())
        logits = head(pooled_features(model))
    torch.testing.assert_close(logits, head.logit_scale * F.normalize(pooled_features(model), dim=-1) @ expected.T,
                               atol=1e-4, rtol=0)


def test_only_the_context_is_trained(clip):
    model, tokenizer = clip
    head = CoOpHead(model, tokenizer, PROMPTS, context=4)
    assert [name for name, p in head.named_parameters() if p.requires_grad] == ["context"]
    loss = F.cross_entropy(head(pooled_features(model)), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    assert head.context.grad is not None and head.context.grad.abs().sum() > 0
    tower = list(text_tower_parameters(model))
    assert tower and all(p.grad is None and not p.requires_grad for p in tower)


def test_state_dict_is_the_context_and_scale_and_round_trips(clip):
    model, tokenizer = clip
    trained = CoOpHead(model, tokenizer, PROMPTS, context=4, logit_scale=30.0)
    with torch.no_grad():
        trained.context.add_(0.1)
    assert set(trained.state_dict()) == {"context", "logit_scale"}
    restored = CoOpHead(model, tokenizer, PROMPTS, context=4, init=None)
    restored.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(pooled_features(model)), trained(pooled_features(model)))


def test_to_zeroshot_is_a_frozen_copy_of_the_current_classifier(clip):
    model, tokenizer = clip
    head = CoOpHead(model, tokenizer, PROMPTS, context=4, logit_scale=50.0)
    frozen = head.to_zeroshot()
    assert isinstance(frozen, ZeroShotHead)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.text.requires_grad and frozen.logit_scale.item() == 50.0
    x = pooled_features(model)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), head(x), atol=1e-5, rtol=1e-5)


def test_init_phrase_must_have_one_token_per_context_vector(clip):
    model, tokenizer = clip
    with pytest.raises(ConfigError, match=r"finetune\.coop\.init 'a photo of a' is 4 tokens.*finetune\.coop\.context"):
        CoOpHead(model, tokenizer, PROMPTS, context=2, init="a photo of a")
    # Counted in BPE tokens, not words: "ltpipe" is two tokens.
    assert CoOpHead(model, tokenizer, PROMPTS, context=2, init="ltpipe").context.shape[0] == 2
    with pytest.raises(ConfigError, match=r"finetune\.coop"):
        CoOpHead(model, tokenizer, PROMPTS, context=1, init="ltpipe")


def test_training_the_context_changes_the_classifier(clip):
    model, tokenizer = clip
    head = CoOpHead(model, tokenizer, PROMPTS, context=4)
    before_weights = [p.clone() for p in text_tower_parameters(model)]
    snapshot = head.to_zeroshot()
    x = pooled_features(model)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    F.cross_entropy(head(x), torch.tensor([3, 2, 1, 0, 3, 2])).backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(head(x), snapshot(x), atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before_weights, text_tower_parameters(model)))


def test_random_init_is_coops_normal_and_follows_the_global_seed(clip):
    model, tokenizer = clip
    torch.manual_seed(123)
    head = CoOpHead(model, tokenizer, PROMPTS, context=16, init=None)
    torch.manual_seed(123)
    again = CoOpHead(model, tokenizer, PROMPTS, context=16, init=None)
    assert head.context.shape == (16, model.token_embedding.embedding_dim)
    assert torch.equal(head.context, again.context)
    assert head.context.std().item() == pytest.approx(0.02, abs=0.002)
    assert abs(head.context.mean().item()) < 0.002
