import pytest
import torch

from common.model import GPT, FeedForward, GPTConfig


def small_config(**overrides):
    values = dict(vocab_size=40, context_length=24, d_model=32, n_layers=2, n_heads=4, dropout=0.0)
    values.update(overrides)
    return GPTConfig(**values)


def test_logits_shape_loss_and_weight_tying():
    model = GPT(small_config())
    x = torch.randint(0, 40, (3, 24))
    out = model(x, targets=x)
    assert out.logits.shape == (3, 24, 40)
    assert out.loss.ndim == 0 and out.aux_loss is None
    assert model.head.weight is model.token_embedding.weight
    untied = GPT(small_config(tie_weights=False))
    assert untied.num_parameters() == model.num_parameters() + 40 * 32


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(small_config())
    x, y = torch.randint(0, 40, (2, 4, 24))
    assert abs(model(x, targets=y).loss.item() - torch.log(torch.tensor(40.0)).item()) < 0.3


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_changing_future_tokens_never_changes_earlier_logits(backend):
    torch.manual_seed(0)
    model = GPT(small_config(attention_backend=backend)).eval()
    x = torch.randint(0, 40, (2, 20))
    for t in (0, 7, 19):
        changed = x.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 38, changed[:, t:].shape)) % 40
        a, b = model(x).logits, model(changed).logits
        torch.testing.assert_close(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t], b[:, t])


def test_gradients_reach_every_parameter():
    model = GPT(small_config())
    x = torch.randint(0, 40, (2, 24))
    model(x, targets=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_aux_losses_of_submodules_are_summed():
    class LossyFFN(FeedForward):
        def __init__(self, *args):
            super().__init__(*args)
            self.aux_loss = None  # declared when built, so GPT finds it once

        def forward(self, x):
            self.aux_loss = x.pow(2).mean()
            return super().forward(x)

    model = GPT(small_config(), feed_forward=lambda c, i: LossyFFN(c.d_model, c.d_ff))
    out = model(torch.randint(0, 40, (2, 8)))
    assert out.aux_loss is not None and out.aux_loss > 0


def test_sequence_longer_than_context_raises():
    with pytest.raises(ValueError, match="context_length"):
        GPT(small_config())(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("context_length", -1), ("n_heads", 5), ("dropout", 1.0),
    ("attention_backend", "flash"), ("d_model", 3.5),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field if field != "n_heads" else "n_heads"):
        small_config(**{field: value})
