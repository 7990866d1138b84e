import pytest
import torch

from common.adaptive_span import (
    AdaptiveSpanAttention,
    adaptive_span_factory,
    fixed_span_factory,
    log_span_mask,
    model_spans,
    ramp_mask,
    span_param_group,
)
from common.attention import MultiHeadAttention
from common.bench import count_flops
from common.model import GPT, GPTConfig


def make_layer(init_span, backend="sdpa", trim=True, max_span=40, ramp=8, penalty=0.0):
    torch.manual_seed(0)
    return AdaptiveSpanAttention(32, 4, max_span=max_span, ramp=ramp, init_span=init_span, penalty=penalty,
                                 backend=backend, trim=trim).eval()


def test_ramp_mask_values_and_shape():
    distance = torch.arange(-2, 12)[None, :].expand(3, -1)  # (3, 14)
    m = ramp_mask(distance, torch.tensor([0.0, 4.0, 10.0]), ramp=4)
    assert m.shape == (3, 3, 14)
    row = m[1, 0]  # z = 4, R = 4: 1 up to x = 4, then 3/4, 1/2, 1/4, 0 at x = 8
    assert row[2 : 2 + 5].tolist() == [1.0] * 5
    assert row[7:11].tolist() == [0.75, 0.5, 0.25, 0.0]
    log_m = log_span_mask(distance, torch.tensor([0.0, 4.0, 10.0]), ramp=4)
    assert torch.isinf(log_m[:, :, :2]).all()  # future keys
    assert torch.isinf(log_m[0, 0, 2 + 4 :]).all() and torch.isfinite(log_m[0, 0, 2:6]).all()


def test_full_span_equals_dense_causal_attention():
    layer = make_layer(init_span=40)  # z = Z = 40 >= every distance in an L = 17 window: m = 1 everywhere
    dense = MultiHeadAttention(32, 4, causal=True).eval()
    dense.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init_span", [0.0, 3.5, 12.0])
def test_sdpa_log_mask_equals_paper_renormalisation(init_span):
    fast = make_layer(init_span, trim=False)
    paper = make_layer(init_span, backend="explicit")
    x = torch.randn(2, 23, 32)
    out = paper(x, need_weights=True)
    torch.testing.assert_close(fast(x), out, atol=1e-5, rtol=1e-5)
    weights = paper.last_weights  # (B, H, L, S)
    assert weights.shape == (2, 4, 23, 23)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 23))
    assert (weights.triu(1) == 0).all()
    reach = init_span + paper.ramp  # m = 0 from distance z + R on
    distance = torch.arange(23)[:, None] - torch.arange(23)
    assert (weights[..., distance >= reach] == 0).all()


@pytest.mark.parametrize("length", [64, 101, 160])
def test_trimming_does_not_change_outputs(length):
    trimmed, dense = make_layer(5.0, max_span=128), make_layer(5.0, max_span=128, trim=False)
    with torch.no_grad():  # heads with different spans
        for layer in (trimmed, dense):
            layer.span_fraction.copy_(torch.tensor([0.0, 3.0, 9.5, 17.0]) / 128)
    assert trimmed.block_plan(length, length, max(trimmed.head_windows(length))) is not None
    x = torch.randn(2, length, 32)
    torch.testing.assert_close(trimmed(x), dense(x), atol=1e-5, rtol=1e-5)
    assert trimmed.attention_pairs(length) < dense.attention_pairs(length) == 4 * length * length


def test_each_head_is_trimmed_to_its_own_window_with_the_same_gradients():
    trimmed, dense = make_layer(5.0, max_span=256), make_layer(5.0, max_span=256, trim=False)
    spans = torch.tensor([0.0, 0.0, 2.5, 150.0])  # two heads share a plan, one runs dense
    for layer in (trimmed, dense):
        with torch.no_grad():
            layer.span_fraction.copy_(spans / 256)
        layer.train()
    plans = trimmed.head_plans(200, 200)
    assert plans[0] == plans[1] == (4, 2) and plans[3] is None
    x = torch.randn(2, 200, 32)
    outputs = [layer(x) for layer in (trimmed, dense)]
    torch.testing.assert_close(*outputs, atol=1e-5, rtol=1e-5)
    for out in outputs:
        out.pow(2).sum().backward()
    torch.testing.assert_close(trimmed.span_fraction.grad, dense.span_fraction.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trimmed.qkv.weight.grad, dense.qkv.weight.grad, atol=1e-4, rtol=1e-4)
    pairs = trimmed.head_pairs(200)
    assert pairs[3] == 200 * 200 and pairs[0] == pairs[1] == 50 * 4 * 12  # 50 blocks of 4 queries x 12 keys
    assert trimmed.attention_pairs(200) == sum(pairs) < 2 * 200 * 200  # per layer: 4 dense heads


def test_fixed_span_is_a_frozen_buffer():
    model = GPT(GPTConfig(vocab_size=11, context_length=16, d_model=32, n_layers=2, n_heads=4, dropout=0.0),
                attention=fixed_span_factory(3.0, max_span=16, ramp=4))
    assert model_spans(model).eq(3.0).all()
    assert not any("span_fraction" in name for name, _ in model.named_parameters())
    assert span_param_group(model)["params"] == []
    out = model(torch.randint(0, 11, (2, 16)), targets=torch.randint(0, 11, (2, 16)))
    out.loss.backward()
    assert out.aux_loss.item() == 0.0 and model_spans(model).eq(3.0).all()


def test_counted_flops_match_the_pairs_computed():
    x = torch.randn(1, 96, 32)
    for trim in (True, False):
        layer = make_layer(6.0, max_span=96, trim=trim)
        q, k, v = layer.project(x)
        counted = count_flops(lambda layer=layer, q=q, k=k, v=v: layer.attend(q, k, v, None, False))
        assert counted == layer.attention_flops(1, 96)


def test_gradients_reach_the_spans_and_penalty_pushes_them_down():
    layer = make_layer(6.0, penalty=0.0).train()
    x = torch.randn(2, 30, 32)
    layer(x).pow(2).sum().backward()
    assert layer.span_fraction.grad is not None and (layer.span_fraction.grad != 0).all()
    assert torch.isfinite(layer.qkv.weight.grad).all()

    penalised = make_layer(6.0, penalty=0.5)
    penalised(x)
    penalised.aux_loss.backward()  # d(λ mean z)/d(z/Z) = λ Z / H > 0: descent shortens spans
    torch.testing.assert_close(penalised.span_fraction.grad, torch.full((4,), 0.5 * 40 / 4))


def test_spans_are_clamped_after_an_optimizer_step():
    layer = make_layer(6.0)
    with torch.no_grad():
        layer.span_fraction.copy_(torch.tensor([-0.3, 0.5, 1.7, 1.0]))
    assert layer.spans.tolist() == [0.0, 20.0, 40.0, 40.0]
    layer(torch.randn(1, 5, 32))
    assert layer.span_fraction.min() >= 0 and layer.span_fraction.max() <= 1


def test_padding_and_kv_cache_use_the_dense_path():
    layer = make_layer(3.0)
    x = torch.randn(2, 12, 32)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, :4] = True
    out = layer(x, key_padding_mask=padding)
    torch.testing.assert_close(out[0], layer(x[:1])[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    model = GPT(GPTConfig(vocab_size=11, context_length=16, d_model=32, n_layers=2, n_heads=4, dropout=0.0),
                attention=adaptive_span_factory(max_span=16, ramp=4, init_span=2.0)).eval()
    idx = torch.randint(0, 11, (1, 10))
    cache = model.new_cache()
    stepwise = torch.cat([model(idx[:, :6], cache=cache).logits, model(idx[:, 6:], cache=cache).logits], dim=1)
    torch.testing.assert_close(stepwise, model(idx).logits, atol=1e-4, rtol=1e-4)


def test_gpt_sums_the_span_penalty_and_exposes_spans():
    config = GPTConfig(vocab_size=11, context_length=16, d_model=32, n_layers=3, n_heads=4)
    model = GPT(config, attention=adaptive_span_factory(max_span=16, init_span=8.0, penalty=0.01))
    out = model(torch.randint(0, 11, (2, 16)), targets=torch.randint(0, 11, (2, 16)))
    torch.testing.assert_close(out.aux_loss, torch.tensor(3 * 0.01 * 8.0))
    assert model_spans(model).shape == (3, 4)
    group = span_param_group(model, lr_scale=2.0)
    assert len(group["params"]) == 3 and group["weight_decay"] == 0.0 and group["lr_scale"] == 2.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_span"):
        AdaptiveSpanAttention(32, 4, max_span=0)
    with pytest.raises(ValueError, match="ramp"):
        AdaptiveSpanAttention(32, 4, max_span=8, ramp=0)
    with pytest.raises(ValueError, match="init_span"):
        AdaptiveSpanAttention(32, 4, max_span=8, init_span=9)
    with pytest.raises(ValueError, match="penalty"):
        AdaptiveSpanAttention(32, 4, max_span=8, penalty=-1)


def test_planted_copy_task_structure_and_levels():
    from common.tasks import IGNORE, PlantedCopy

    task = PlantedCopy(length=40, distance=15, alphabet=4, payloads=3, table_seed=1)
    x, y = task(64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 40) and task.vocab_size == 8 and task.chance == pytest.approx(1 / 3)
    markers = (x == task.marker).nonzero()
    assert markers.shape == (64, 2)  # one marker per sequence
    rows, where = markers[:, 0], markers[:, 1]
    assert (where >= 15).all()
    torch.testing.assert_close(y[rows, where], x[rows, where - 15])  # the marker's target: the payload d back
    assert ((x[rows, where - 15] >= 4) & (x[rows, where - 15] < 7)).all()
    copy = y >= 4
    assert copy.sum() == 64 and (copy == (x == task.marker)).all()
    local = (y != IGNORE) & ~copy
    assert (y[local] < 4).all() and not local[:, 0].any()
    for row, m in zip(rows, where):  # nothing around a planted token is scored on the chain
        for p in (m - 15, m):
            assert not local[row, max(p - 1, 0) : p + 2].any()
    levels = task.levels()
    assert levels["order 0"] >= levels["order 1"] >= levels["order 2 (the chain)"] > 0


def test_planted_copy_loss_weights_copy_and_local_positions_equally():
    from common.tasks import PlantedCopy

    task = PlantedCopy(length=24, distance=10, alphabet=4, payloads=3)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, context_length=24, d_model=16, n_layers=1, n_heads=2,
                          dropout=0.0))
    batch = task(8, torch.Generator().manual_seed(0))
    x, y = batch
    losses = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                               reduction="none")
    copy = y.flatten() >= 4
    local = (y.flatten() != -100) & ~copy
    torch.testing.assert_close(task.loss(model, batch), losses[local].mean() + losses[copy].mean())
    score = task.score(model, [batch])
    assert score["copy_total"] == 8 and len(score["per_item"]) == 8
    assert score["local_loss"] == pytest.approx(losses[local].mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="scoring needs both"):
        task.score(model, [])
    with pytest.raises(ValueError, match="distance must be an integer"):
        PlantedCopy(length=24, distance=10.0)
