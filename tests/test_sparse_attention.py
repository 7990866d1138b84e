import pytest
import torch
import torch.nn.functional as F

from common.attention import KVCache
from common.model import GPT, GPTConfig
from common.sparse_attention import (
    SlidingWindowAttention,
    band_mask,
    block_band_mask,
    naive_sliding_window_attention,
    sliding_window_attention,
    sliding_window_factory,
)


def qkv(length: int, batch: int = 2, heads: int = 3, width: int = 8, seed: int = 0, grad: bool = True):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, width, dtype=torch.float64, generator=generator).requires_grad_(grad)
            for _ in range(3)]


def test_band_mask_is_the_last_w_positions():
    assert band_mask(4, 4, 2).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # with a cache the queries are the last positions
    assert band_mask(1, 5, 3).int().tolist() == [[0, 0, 1, 1, 1]]
    # the block mask: row r (position nw + r) against columns at (n-1)w + c
    assert block_band_mask(2).int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("length, window", [(37, 8), (64, 16), (50, 1), (33, 32), (100, 7)])
def test_blocked_equals_dense_band_attention_forward_and_gradients(length, window):
    q, k, v = qkv(length)
    fast = sliding_window_attention(q, k, v, window)
    reference = naive_sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (q, k, v), upstream)
    grads_reference = torch.autograd.grad(reference, (q, k, v), upstream)
    for a, b in zip(grads_fast, grads_reference):
        torch.testing.assert_close(a, b)


def test_blocked_matches_in_float32_on_transposed_inputs():
    # heads split from (B, L, H, E) as in MultiHeadAttention: non-contiguous views
    q, k, v = (torch.randn(2, 45, 4, 16).transpose(1, 2) for _ in range(3))
    torch.testing.assert_close(sliding_window_attention(q, k, v, 8), naive_sliding_window_attention(q, k, v, 8),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [20, 21, 500])
def test_window_at_least_length_is_causal_dense(window):
    q, k, v = qkv(20, grad=False)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_narrow_window_differs_from_causal_dense():
    q, k, v = qkv(40, grad=False)
    assert not torch.allclose(sliding_window_attention(q, k, v, 4), F.scaled_dot_product_attention(q, k, v,
                                                                                                   is_causal=True))


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "8", None])
def test_bad_window_raises(window):
    q, k, v = qkv(10, grad=False)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, window)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(16, 2, window=window)
    with pytest.raises(ValueError, match="window"):
        sliding_window_factory(window)


def test_layer_paths_agree_and_weights_stay_in_the_band():
    torch.manual_seed(0)
    blocked = SlidingWindowAttention(32, 4, window=5).eval()
    explicit = SlidingWindowAttention(32, 4, window=5, backend="explicit").eval()
    explicit.load_state_dict(blocked.state_dict())
    x = torch.randn(2, 23, 32)
    torch.testing.assert_close(blocked(x), explicit(x, need_weights=True), atol=1e-5, rtol=1e-5)
    weights = explicit.last_weights  # (B, H, L, L)
    assert (weights[..., ~band_mask(23, 23, 5)] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 23))


def test_kv_cache_decoding_matches_full_pass():
    torch.manual_seed(0)
    layer = SlidingWindowAttention(16, 2, window=4).eval()
    x = torch.randn(1, 11, 16)
    cache = KVCache(n_layers=1, max_length=11)
    steps = [layer(x[:, :6], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), layer(x), atol=1e-5, rtol=1e-5)


def test_gpt_with_sliding_window_trains_and_only_sees_the_window():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, context_length=40, d_model=16, n_layers=1, n_heads=2, dropout=0.0)
    model = GPT(config, attention=sliding_window_factory(6))
    idx = torch.randint(0, 50, (2, 40))
    out = model(idx, targets=idx)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 50
    delta = (model(changed).logits - model(idx).logits).abs().amax(dim=(0, 2))  # (L,)
    assert (delta[:10] == 0).all()  # the future never leaks
    assert (delta[10:16] > 0).all()  # positions 10 .. 15 have position 10 in their window of 6
    assert (delta[16:] == 0).all()  # one layer: farther positions never see it


@pytest.mark.parametrize("length, key_length, window", [(1, 5, 3), (4, 6, 2), (3, 40, 8), (17, 50, 8), (10, 11, 64),
                                                        (1, 1, 3), (6, 9, 1)])
def test_fewer_queries_than_keys_are_the_last_positions(length, key_length, window):
    # as with a KV cache: query i sits at position key_length - length + i
    q = qkv(length, seed=1)[0]
    k, v = qkv(key_length, seed=2)[1:]
    fast = sliding_window_attention(q, k, v, window)
    reference = naive_sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), upstream),
                    torch.autograd.grad(reference, (q, k, v), upstream)):
        torch.testing.assert_close(a, b)


def test_more_queries_than_keys_is_refused():
    q = qkv(6, grad=False)[0]
    k, v = qkv(4, grad=False)[1:]
    with pytest.raises(ValueError, match="keys"):
        sliding_window_attention(q, k, v, 2)


@pytest.mark.parametrize("length, window, block",
                         [(100, 16, 8), (100, 16, 4), (70, 32, 1), (64, 32, 32), (300, 64, 16)])
def test_every_query_block_equals_the_reference(length, window, block):
    q, k, v = qkv(length)
    fast = sliding_window_attention(q, k, v, window, query_block=block)
    reference = naive_sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), upstream),
                    torch.autograd.grad(reference, (q, k, v), upstream)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the path without autograd writes the blocks into one buffer
        torch.testing.assert_close(sliding_window_attention(q, k, v, window, query_block=block), reference)


@pytest.mark.parametrize("block", [0, 3, 2.0, True, 64])
def test_bad_query_block_raises(block):
    q, k, v = qkv(40, grad=False)
    with pytest.raises(ValueError, match="query_block"):
        sliding_window_attention(q, k, v, 16, query_block=block)


def test_gradients_on_strided_head_views():
    # (B, L, H, E) split into heads with B = 1: the merged (H, L, E) rows are strided views, not copies
    base = [torch.randn(1, 77, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)
    fast = sliding_window_attention(q, k, v, 32)
    reference = naive_sliding_window_attention(q, k, v, 32)
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, base, upstream), torch.autograd.grad(reference, base, upstream)):
        torch.testing.assert_close(a, b)


def test_forward_without_grad_does_not_hold_two_outputs():
    from common.bench import peak_memory

    q, k, v = (torch.randn(1, 4, 2048, 32) for _ in range(3))
    output_bytes = q.numel() * q.element_size()
    with torch.no_grad():
        peak = peak_memory(lambda: sliding_window_attention(q, k, v, 64))
    assert output_bytes <= peak < 1.5 * output_bytes


def test_flex_refuses_a_backward_on_the_cpu():
    from common.sparse_attention import flex_sliding_window

    attend = flex_sliding_window(64, 8, compile=False)
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        attend(q, k, v)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no backward on the CPU"):
        attend(q, k, v)
    q, k, v = (t.detach() for t in (q, k, v))  # forward only is fine, and equals the blocked kernel
    torch.testing.assert_close(attend(q, k, v), sliding_window_attention(q, k, v, 8), atol=1e-5, rtol=1e-5)


def test_distance_recall_plants_one_value_at_distance_d():
    from common.tasks import IGNORE, distance_recall

    x, y = distance_recall(20, [7], n_values=5, n_noise=9)(64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 20)
    assert (x[:, -1] == 0).all() and (y[:, :-1] == IGNORE).all()
    assert (x[:, 20 - 1 - 7] == y[:, -1]).all() and ((y[:, -1] >= 1) & (y[:, -1] <= 5)).all()
    values_elsewhere = (x[:, :-1] >= 1) & (x[:, :-1] <= 5)
    assert (values_elsewhere.sum(1) == 1).all()  # one value per sequence, the rest noise
    with pytest.raises(ValueError, match="distances"):
        distance_recall(20, [0, 5])
    with pytest.raises(ValueError, match="distances"):
        distance_recall(20, [20])


def test_compiled_flex_fails_loudly_past_its_shape_limit(monkeypatch):
    """Past the compiler's recompilation limit FlexAttention would fall back to the eager reference
    (the full L x L matrix) with only a warning; it must raise instead."""
    import common.sparse_attention as sa

    monkeypatch.setattr(sa, "MAX_FLEX_SHAPES", 1)
    with pytest.raises(RuntimeError, match="MAX_FLEX_SHAPES = 1 shapes"), torch.no_grad():
        for length in (48, 80, 112):  # shapes no other test compiles
            q = torch.randn(1, 1, length, 8)
            sa.flex_sliding_window(length, 8)(q, q, q)
