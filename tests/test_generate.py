import pytest
import torch

from common.generate import filter_logits, generate, sample_next
from common.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, context_length=16, d_model=32, n_layers=2, n_heads=4, dropout=0.0)).eval()


def test_cached_greedy_generation_equals_full_recomputation(model):
    prompt = torch.randint(0, 30, (3, 4))
    # 30 new tokens: past the context of 16, so the cache-overflow fallback is exercised too
    cached = generate(model, prompt, 30, temperature=0, use_cache=True)
    plain = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (3, 34)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :4], prompt)


def test_seeded_sampling_is_repeatable(model):
    prompt = torch.zeros(2, 1, dtype=torch.long)
    a = generate(model, prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_top_k_keeps_exactly_k_tokens():
    logits = torch.randn(4, 50)
    kept = torch.isfinite(filter_logits(logits, top_k=7))
    assert (kept.sum(-1) == 7).all()
    top = logits.topk(7).indices
    assert kept.gather(-1, top).all()


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.1))
    assert kept.tolist() == [[True, False, False, False]]  # the best token always stays


def test_samples_only_from_allowed_tokens():
    logits = torch.randn(1, 20).repeat(500, 1)
    allowed = set(logits[0].topk(3).indices.tolist())
    picks = sample_next(logits, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) <= allowed


def test_temperature_zero_is_greedy_and_negative_reverses():
    logits = torch.tensor([[1.0, 5.0, 2.0, -3.0]])
    assert sample_next(logits, temperature=0).item() == 1
    picks = sample_next(logits.repeat(2000, 1), temperature=-0.3, allow_negative_temperature=True,
                        generator=torch.Generator().manual_seed(0))
    assert torch.bincount(picks, minlength=4).argmax().item() == 3  # the least likely token wins


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-2.0), "allow_negative_temperature"),
    (dict(temperature=float("nan")), "finite"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.randn(1, 5), **kwargs)


def test_continuation_nll_scores_only_the_continuation(model):
    from common.generate import continuation_nll

    seq = torch.randint(0, 30, (2, 10))
    full = continuation_nll(model, seq, prompt_length=1)
    logits = model(seq[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none").mean(1)
    torch.testing.assert_close(full, expected)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none")
    torch.testing.assert_close(continuation_nll(model, seq, prompt_length=6), per_token[:, 5:].mean(1))
    with pytest.raises(ValueError, match="prompt_length"):
        continuation_nll(model, seq, prompt_length=10)


@pytest.mark.parametrize("prompt, message", [
    (torch.zeros(1, 3), "integer token ids"),
    (torch.tensor([[1, 2, 30]]), r"in \[0, 30\).*from 1 to 30"),
    (torch.tensor([[-1, 2]]), r"in \[0, 30\)"),
    (torch.zeros(3, dtype=torch.long), r"\(batch, length >= 1\)"),
])
def test_bad_prompts_are_refused_with_what_is_allowed(model, prompt, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, 2)


@pytest.mark.parametrize("count", [-3, 2.5, True])
def test_bad_max_new_tokens_is_refused(model, count):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), count)


@pytest.mark.parametrize("kwargs, message", [(dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k")])
def test_filter_logits_refuses_filters_that_keep_nothing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        filter_logits(torch.randn(2, 10), **kwargs)


def test_generation_restores_the_training_mode_when_it_fails(model):
    model.train()

    def broken_forward(*args, **kwargs):
        raise RuntimeError("mid-generation failure")

    model.forward, original = broken_forward, model.forward
    try:
        with pytest.raises(RuntimeError, match="mid-generation"):
            generate(model, torch.zeros(1, 2, dtype=torch.long), 3)
        assert model.training
    finally:
        model.forward = original
        model.eval()


def test_last_position_logits_equal_the_full_forward(model):
    x = torch.randint(0, 30, (2, 9))
    full = model(x).logits
    assert torch.allclose(model(x, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
    assert model(x, logits_to_keep=3).logits.shape == (2, 3, 30)
    with pytest.raises(ValueError, match="loss needs them all"):
        model(x, targets=x, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep must be an integer"):
        model(x, logits_to_keep=-1)
