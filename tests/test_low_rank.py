import itertools

import pytest
import torch
from torch import nn

from common.low_rank import (
    CausalSelfAttention,
    LowRankLinear,
    LowRankMultiheadAttention,
    attention_parameters,
    energy_kept,
    gpt_attention,
    low_rank_,
    truncated_svd,
)
from common.model import GPT, GPTConfig

E, H, L, S, N = 16, 4, 5, 7, 3


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    w = torch.randn(12, 9)
    sigma = torch.linalg.svdvals(w)
    for r in (1, 4, 9):
        w1, w2 = truncated_svd(w, r)
        assert w1.shape == (12, r) and w2.shape == (r, 9)
        assert torch.linalg.matrix_rank(w1 @ w2) == r
        # Eckart–Young: the error is the energy of the dropped singular values
        torch.testing.assert_close(torch.linalg.norm(w - w1 @ w2), sigma[r:].square().sum().sqrt(),
                                   atol=1e-5, rtol=1e-5)
    kept = energy_kept(w)
    assert kept.shape == (9,) and (kept.diff() >= 0).all()
    torch.testing.assert_close(kept[-1], torch.tensor(1.0))
    torch.testing.assert_close(kept[0], sigma[0] ** 2 / sigma.square().sum())


def test_low_rank_linear_full_rank_equals_dense_and_counts_parameters():
    torch.manual_seed(0)
    dense = nn.Linear(10, 6)
    x = torch.randn(4, 2, 10, requires_grad=True)
    full = LowRankLinear.from_linear(dense, rank=6)
    torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.weight, dense.weight, atol=1e-5, rtol=1e-5)
    low = LowRankLinear(10, 6, rank=2)
    assert sum(p.numel() for p in low.parameters()) == 2 * (10 + 6) + 6
    assert torch.linalg.matrix_rank(low.weight) == 2
    low(x).sum().backward()
    assert low.w1.grad is not None and low.w2.grad is not None and x.grad.abs().sum() > 0


MASKS = ["none", "bool_attn", "float_attn_3d", "bool_padding", "float_padding", "both", "causal",
         "causal_padding"]


def make_masks(kind: str, n: int = N, length: int = L, source: int = S):
    """(attn_mask, key_padding_mask, is_causal) with no query row fully masked."""
    g = torch.Generator().manual_seed(1)
    blocked = torch.rand(length, source, generator=g) < 0.3
    blocked[:, 0] = False
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -2:] = True
    padding[-1, -3:] = True
    causal = torch.ones(length, source, dtype=torch.bool).triu(1 + source - length)
    float_attn = torch.randn(n * H, length, source, generator=g)
    float_padding = torch.zeros(n, source).masked_fill(padding, float("-inf"))
    return {
        "none": (None, None, False),
        "bool_attn": (blocked, None, False),
        "float_attn_3d": (float_attn, None, False),
        "bool_padding": (None, padding, False),
        "float_padding": (None, float_padding, False),
        "both": (blocked, padding, False),
        "causal": (causal, None, True),
        "causal_padding": (causal, padding, True),
    }[kind]


def pair(rank=None, **kwargs):
    """An nn.MultiheadAttention and its SVD copy at the given rank (default: full)."""
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(E, H, **kwargs)
    if dense.in_proj_bias is not None:  # non-zero biases, so copying them is tested too
        nn.init.normal_(dense.in_proj_bias)
        nn.init.normal_(dense.out_proj.bias)
    return dense, LowRankMultiheadAttention.from_multihead_attention(dense, rank)


@pytest.mark.parametrize("mask_kind, need_weights, average, batch_first",
                         [(m, w, a, b) for m, (w, a), b in itertools.product(
                             MASKS, [(False, True), (True, True), (True, False)], [True, False])])
def test_full_rank_matches_pytorch_for_every_mask(mask_kind, need_weights, average, batch_first):
    dense, low = pair(batch_first=batch_first)
    length = S if mask_kind.startswith("causal") else L  # a causal mask is square
    attn_mask, padding, is_causal = make_masks(mask_kind, length=length)
    q, kv = torch.randn(N, length, E), torch.randn(N, S, E)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    if mask_kind.startswith("causal"):
        q = kv  # causal self-attention
    args = dict(key_padding_mask=padding, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average, is_causal=is_causal)
    for train in (True, False):  # eval + no_grad takes PyTorch's fused fast path when it can
        dense.train(train), low.train(train)
        with torch.set_grad_enabled(train):
            expected, expected_w = dense(q, kv, kv, **args)
            out, w = low(q, kv, kv, **args)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        if need_weights:
            torch.testing.assert_close(w, expected_w, atol=1e-6, rtol=1e-4)
        else:
            assert w is None and expected_w is None


@pytest.mark.parametrize("options", [
    dict(kdim=6, vdim=10), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=12, vdim=12),
])
@pytest.mark.parametrize("mask_kind", ["none", "both", "float_attn_3d"])
def test_full_rank_matches_pytorch_for_every_constructor_option(options, mask_kind):
    dense, low = pair(**options)
    attn_mask, padding, _ = make_masks(mask_kind)
    q = torch.randn(L, N, E)
    k, v = torch.randn(S, N, options.get("kdim", E)), torch.randn(S, N, options.get("vdim", E))
    q.requires_grad_(True)
    expected, expected_w = dense(q, k, v, key_padding_mask=padding, attn_mask=attn_mask)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), q)
    out, w = low(q, k, v, key_padding_mask=padding, attn_mask=attn_mask)
    (grad,) = torch.autograd.grad(out.square().sum(), q)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, expected_w, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grad, grad_expected, atol=1e-4, rtol=1e-4)


def test_unbatched_inputs_match_pytorch():
    dense, low = pair()
    q, kv = torch.randn(L, E), torch.randn(S, E)
    padding = torch.tensor([False] * (S - 2) + [True, True])
    for args in ({}, {"key_padding_mask": padding, "average_attn_weights": False}):
        expected, expected_w = dense(q, kv, kv, **args)
        out, w = low(q, kv, kv, **args)
        assert out.shape == (L, E)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w, expected_w, atol=1e-6, rtol=1e-4)


def test_low_rank_projections_have_the_rank_asked_for():
    dense, low = pair(rank=3)
    for proj in (low.q_proj, low.k_proj, low.v_proj):
        assert torch.linalg.matrix_rank(proj.weight) == 3
    x = torch.randn(L, N, E)
    out, _ = low(x, x, x)
    assert out.shape == (L, N, E) and not torch.allclose(out, dense(x, x, x)[0], atol=1e-3)
    full_params = sum(p.numel() for p in nn.MultiheadAttention(E, H).parameters())
    assert attention_parameters(low) == 3 * (3 * (E + E) + E) + E * E + E
    assert attention_parameters(low) < full_params


@pytest.mark.parametrize("rank, options", [
    (0, {}), (-1, {}), (E + 1, {}), (7, dict(kdim=6)), (11, dict(vdim=10)), (2.5, {}), (True, {}),
])
def test_bad_rank_raises_value_error_naming_rank(rank, options):
    with pytest.raises(ValueError, match=r"rank .*\[1, \d+\]"):
        LowRankMultiheadAttention(E, H, rank=rank, **options)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(E, 6, rank=7)


@pytest.mark.parametrize("embed_dim, num_heads", [(10, 4), (0, 2), (8, 0)])
def test_bad_shapes_raise_what_pytorch_raises(embed_dim, num_heads):
    with pytest.raises(Exception) as pytorch_error:
        nn.MultiheadAttention(embed_dim, num_heads)
    with pytest.raises(pytorch_error.type) as ours:
        LowRankMultiheadAttention(embed_dim, num_heads, rank=1)
    assert str(ours.value) == str(pytorch_error.value)


def test_bad_masks_raise_value_error_naming_the_argument():
    low = LowRankMultiheadAttention(E, H, rank=4)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="attn_mask"):
        low(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        low(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.long))
    with pytest.raises(RuntimeError, match="is_causal"):
        low(x, x, x, is_causal=True)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("train", [True, False])
def test_swapped_into_transformer_layers_at_full_rank(train):
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True), 2)
    decoder = nn.TransformerDecoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(N, S, E), torch.randn(N, L, E)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    modules = (encoder, decoder)
    for m in modules:
        m.train(train)
    with torch.set_grad_enabled(train):  # eval + no grad: PyTorch's fused encoder path
        memory = encoder(src, src_key_padding_mask=padding)
        expected = decoder(tgt, memory, tgt_mask=causal, memory_key_padding_mask=padding, tgt_is_causal=True)
        for m in modules:
            low_rank_(m, rank=None)
        memory_low = encoder(src, src_key_padding_mask=padding)
        out = decoder(tgt, memory_low, tgt_mask=causal, memory_key_padding_mask=padding, tgt_is_causal=True)
    assert isinstance(encoder.layers[1].self_attn, LowRankMultiheadAttention)
    assert isinstance(decoder.multihead_attn, LowRankMultiheadAttention)
    keep = ~padding  # PyTorch's nested-tensor path zeroes padded positions; compare real ones
    torch.testing.assert_close(memory_low[keep], memory[keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_gpt_with_low_rank_attention_is_causal_and_trains():
    config = GPTConfig(vocab_size=50, context_length=12, d_model=16, n_layers=2, n_heads=4, dropout=0.0)
    torch.manual_seed(0)
    dense = GPT(config, attention=gpt_attention(dense=True)).eval()
    torch.manual_seed(0)
    low = GPT(config, attention=gpt_attention(rank=4)).eval()
    assert isinstance(low.decoder.blocks[0].attention, CausalSelfAttention)
    assert attention_parameters(low) < attention_parameters(dense)
    assert dense.num_parameters() - low.num_parameters() == (
        attention_parameters(dense) - attention_parameters(low))
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(low(idx).logits[:, :8], low(changed).logits[:, :8])
    # full-rank SVD copy of the dense GPT computes the same logits
    copy = GPT(config, attention=gpt_attention(dense=True)).eval()
    copy.load_state_dict(dense.state_dict())
    low_rank_(copy, rank=None)
    torch.testing.assert_close(copy(idx).logits, dense(idx).logits, atol=1e-5, rtol=1e-4)
    low.train()
    low(idx, targets=idx).loss.backward()
    assert low.decoder.blocks[0].attention.attention.q_proj.w1.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="cache"):
        low(idx[:, :1], cache=low.new_cache())


@pytest.mark.parametrize("factory", [dict(dense=True), dict(rank=4), dict()], ids=["dense", "rank4", "full"])
def test_gpt_left_padded_batch_stays_finite_in_every_mode(factory):
    """A left-padded row has query rows that may look at nothing (a padding query under the causal
    mask); PyTorch's fused eval path returns NaN there, which then spreads to the real positions."""
    config = GPTConfig(vocab_size=50, context_length=12, d_model=16, n_layers=2, n_heads=2, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config, attention=gpt_attention(**factory))
    idx = torch.randint(0, 50, (3, 8))
    padding = torch.zeros(3, 8, dtype=torch.bool)
    padding[0, :3] = True  # left padding
    padding[1, :1] = True
    real = ~padding
    outputs = []
    for train, grad in [(True, True), (False, True), (False, False)]:  # the last: eval + no_grad fast path
        model.train(train)
        with torch.set_grad_enabled(grad):
            logits = model(idx, key_padding_mask=padding).logits
        assert torch.isfinite(logits).all(), f"non-finite logits (train={train}, grad={grad})"
        outputs.append(logits.detach())
    for other in outputs[1:]:  # every path gives the real positions the same logits
        torch.testing.assert_close(other[real], outputs[0][real], atol=1e-5, rtol=1e-4)
    # the real positions do not depend on the padding tokens
    changed = idx.clone()
    changed[padding] = (changed[padding] + 7) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(changed, key_padding_mask=padding).logits[real], outputs[-1][real],
                                   atol=1e-5, rtol=1e-4)


def test_reference_attention_matrices_are_causal_and_row_stochastic():
    from common.low_rank import random_causal_attention, uniform_causal_attention

    uniform = uniform_causal_attention(6)
    assert uniform.shape == (6, 6) and torch.equal(uniform.triu(1), torch.zeros(6, 6))
    torch.testing.assert_close(uniform.sum(-1), torch.ones(6))
    torch.testing.assert_close(uniform[3, :4], torch.full((4,), 0.25))
    # a constant score is the uniform matrix; random scores stay causal and row-stochastic
    torch.testing.assert_close(random_causal_attention(6, 0.0)[0], uniform)
    random = random_causal_attention(6, 2.0, n=3, generator=torch.Generator().manual_seed(0))
    assert random.shape == (3, 6, 6) and torch.equal(random.triu(1), torch.zeros(3, 6, 6))
    torch.testing.assert_close(random.sum(-1), torch.ones(3, 6))
    # the uniform causal matrix is full rank, yet most of its energy sits in a few directions
    assert torch.linalg.matrix_rank(uniform) == 6 and energy_kept(uniform)[1] > 0.8
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="length"):
            uniform_causal_attention(bad)
    with pytest.raises(ValueError, match="scale"):
        random_causal_attention(4, -1.0)


def test_keyed_recall_task_has_exactly_k_key_dimensions():
    from common.tasks import IGNORE, KeyedRecall

    task = KeyedRecall(key_bits=4, n_pairs=10, n_values=3, n_queries=5)
    inputs, targets = task.sample(6, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (6, 15) and (targets[:, :10] == IGNORE).all()
    table, queries = inputs[:, :10] - task.pair_offset, inputs[:, 10:] - task.query_offset
    keys, values = table // task.n_values, table % task.n_values
    assert all(len(set(row.tolist())) == 10 for row in keys)  # distinct keys in each table
    for b in range(6):
        for q in range(5):
            (where,) = (keys[b] == queries[b, q]).nonzero()[0]
            assert targets[b, 10 + q] == values[b, where]
    embedding = task.embedding(32)
    assert embedding.shape == (task.vocab_size, 32) and (embedding[:, task.code_width:] == 0).all()
    pair_rows, query_rows = embedding[task.pair_offset:task.query_offset], embedding[task.query_offset:]
    # every table token has the same sum and norm (and so has every query): a LayerNorm treats them alike
    assert pair_rows.sum(1).unique().numel() == 1 and pair_rows.norm(dim=1).unique().numel() == 1
    assert query_rows.sum(1).unique().numel() == 1 and query_rows.norm(dim=1).unique().numel() == 1
    assert torch.linalg.matrix_rank(pair_rows[:, :8]) == 4 and torch.linalg.matrix_rank(query_rows) == 4
    # a rank-k bilinear score (query code -> key code) finds every key
    c = 2 * task.key_bits
    score = torch.zeros(32, 32)
    score[c + task.n_values:2 * c + task.n_values, :c] = torch.eye(c)
    assert torch.linalg.matrix_rank(score) == c
    found = (embedding[inputs[:, 10:]] @ score @ embedding[inputs[:, :10]].transpose(1, 2)).argmax(-1)
    torch.testing.assert_close(keys.gather(1, found), queries)
    # seeing fewer key bits can only lose accuracy; all k bits are enough
    seen = [task.accuracy_seeing(b, n_sequences=500) for b in range(5)]
    assert seen[-1] == 1.0 and all(a <= b + 1e-9 for a, b in zip(seen, seen[1:])) and seen[0] < 0.7
    config = GPTConfig(vocab_size=task.vocab_size, context_length=task.length, d_model=32, n_layers=1, n_heads=1,
                       tie_weights=False)
    model = task.freeze_inputs(GPT(config, attention=gpt_attention(rank=2)))
    assert not model.token_embedding.weight.requires_grad and not model.position_embedding.weight.requires_grad
    assert (model.position_embedding.weight == 0).all()
    with pytest.raises(ValueError, match="d_model"):
        task.embedding(8)
    with pytest.raises(ValueError, match="n_pairs"):
        KeyedRecall(key_bits=2, n_pairs=5)
    with pytest.raises(ValueError, match="key_bits"):
        KeyedRecall(key_bits=0)


def test_keyed_recall_training_tables_mix_sizes():
    from common.tasks import IGNORE, KeyedRecall

    task = KeyedRecall(key_bits=5, n_pairs=12, n_values=4, n_queries=6)
    inputs, targets = task.mixed_sample(200, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (200, 18) and (targets[:, :12] == IGNORE).all()
    table = inputs[:, :12] - task.pair_offset
    keys, values = table // task.n_values, table % task.n_values
    queries = inputs[:, 12:] - task.query_offset
    sizes = []
    for b in range(200):
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert len(pairs) == len(set(zip(keys[b].tolist(), values[b].tolist())))  # one value per key
        assert all(targets[b, 12 + q].item() == pairs[queries[b, q].item()] for q in range(6))
        sizes.append(len(pairs))
    assert min(sizes) == 1 and max(sizes) == 12  # from one repeated pair to a full table
