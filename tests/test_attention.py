import pytest
import torch

from common.attention import CrossAttention, KVCache, MultiHeadAttention, causal_mask, combine_masks, scaled_dot_product


def test_causal_mask_is_shifted_triangle():
    mask = causal_mask(2, 5)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(ValueError, match="key_length"):
        causal_mask(5, 2)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_and_explicit_backends_agree(causal):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 32)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, :4] = True  # left padding
    sdpa = MultiHeadAttention(32, 4, causal=causal, backend="sdpa").eval()
    explicit = MultiHeadAttention(32, 4, causal=causal, backend="explicit").eval()
    explicit.load_state_dict(sdpa.state_dict())
    for mask in (None, padding):
        a, b = sdpa(x, key_padding_mask=mask), explicit(x, key_padding_mask=mask, need_weights=True)
        keep = slice(None) if mask is None else ~mask  # padding queries are garbage by design
        torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
        weights = explicit.last_weights
        assert weights.shape == (3, 4, 11, 11)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 11))
        if causal:  # real queries never look ahead (padding queries are opened on purpose)
            assert (weights[[0, 2]].triu(1) == 0).all() and (weights[1, :, 4:].triu(5) == 0).all()
        if mask is not None:
            assert (weights[1, :, 4:, :4] == 0).all()  # nobody real looks at padding


def test_future_tokens_never_change_earlier_outputs():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, causal=True).eval()
    x = torch.randn(2, 9, 16)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 4, 16)
    torch.testing.assert_close(layer(x)[:, :5], layer(changed)[:, :5])
    assert not torch.allclose(layer(x)[:, 5:], layer(changed)[:, 5:])


def test_fused_causal_path_builds_no_mask(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("causal_mask built on the fused path")

    layer = MultiHeadAttention(8, 2, causal=True, backend="sdpa").eval()
    x = torch.randn(2, 6, 8)
    expected = layer(x)
    monkeypatch.setattr("common.attention.causal_mask", fail)
    torch.testing.assert_close(layer(x), expected)


def test_fully_masked_rows_stay_finite_with_gradients():
    layer = MultiHeadAttention(8, 2, causal=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    padding = torch.tensor([[True, True, False, False, False], [False] * 5])
    layer(x, key_padding_mask=padding).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert combine_masks(None, None) is None


def test_kv_cache_matches_full_recompute():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, causal=True).eval()
    x = torch.randn(2, 7, 16)
    full = layer(x)
    cache = KVCache(n_layers=1, max_length=7)
    parts = [layer(x[:, :3], cache=cache), layer(x[:, 3:4], cache=cache), layer(x[:, 4:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 7"):
        layer(x[:, :1], cache=cache)


def test_cross_attention_shapes_and_padding():
    torch.manual_seed(0)
    layer = CrossAttention(16, 4, d_memory=24, backend="explicit").eval()
    text, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 24)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[:, 6:] = True
    out = layer(text, memory, padding, need_weights=True)
    assert out.shape == (2, 5, 16)
    assert (layer.last_weights[..., 6:] == 0).all()
    torch.testing.assert_close(out, layer(text, memory[:, :6]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="backend"):
        MultiHeadAttention(8, 2, backend="flash")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="backend"):
        scaled_dot_product(q, q, q, backend="nope")


def test_a_cached_step_builds_no_mask_and_matches_the_full_forward(monkeypatch):
    """One new query at the end of the keys may see every key: no causal mask is built for it."""
    import common.attention as attention
    from common.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context_length=12, d_model=16, n_layers=2, n_heads=2, dropout=0.0)).eval()
    x = torch.randint(0, 20, (2, 8))
    cache = model.new_cache()
    model(x[:, :7], cache=cache)
    built = []
    original = attention.causal_mask
    monkeypatch.setattr(attention, "causal_mask", lambda *a, **k: built.append(a) or original(*a, **k))
    step = model(x[:, 7:], cache=cache, logits_to_keep=1).logits
    assert built == []
    torch.testing.assert_close(step[:, -1], model(x).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_aux_losses_are_found_once_and_summed():
    from common.model import GPT, GPTConfig

    class Penalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.aux_loss = None

        def forward(self, x):
            self.aux_loss = x.square().mean()
            return x

    config = GPTConfig(vocab_size=20, context_length=8, d_model=16, n_layers=2, n_heads=2, dropout=0.0)
    model = GPT(config, feed_forward=lambda c, i: Penalised())
    assert len(model.aux_loss_modules) == 2
    out = model(torch.randint(0, 20, (1, 5)))
    assert out.aux_loss is not None and out.aux_loss > 0
    assert GPT(config).aux_loss_modules == [] and GPT(config)(torch.zeros(1, 3, dtype=torch.long)).aux_loss is None


@pytest.mark.parametrize("shape", [(2, 5), (3, 6), (3, 6, 1)])
def test_a_padding_mask_of_the_wrong_shape_is_refused(shape):
    layer = MultiHeadAttention(16, 2)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, keys\) = \(3, 5\)"):
        layer(torch.randn(3, 5, 16), key_padding_mask=torch.zeros(shape, dtype=torch.bool))
