import math

import pytest
import torch

from common.model import GPT, FeedForward, GPTConfig
from common.moe import MoEConfig, MoEFeedForward, forward_step_times, moe_feed_forward, moe_layers, record_routing
from common.train import lm_loss


def make_moe(d_model=16, d_ff=32, **overrides) -> MoEFeedForward:
    torch.manual_seed(0)
    return MoEFeedForward(d_model, d_ff, MoEConfig(**overrides))


def loop_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, no capacity: y = sum_{i in top-k} g_i expert_i(x)."""
    routing = moe.route(x)
    out = torch.zeros_like(x)
    for n in range(x.size(0)):
        for j in range(moe.config.top_k):
            i = routing.experts[n, j]
            h = torch.nn.functional.gelu(x[n] @ moe.w_up[i] + moe.b_up[i])
            out[n] += routing.gates[n, j] * (h @ moe.w_down[i] + moe.b_down[i])
    return out


def test_one_expert_equals_the_dense_ffn():
    dense = FeedForward(16, 32)
    moe = make_moe(n_experts=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.w_up[0].copy_(dense.up.weight.t())
        moe.b_up[0].copy_(dense.up.bias)
        moe.w_down[0].copy_(dense.down.weight.t())
        moe.b_down[0].copy_(dense.down.bias)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), dense(x))
    assert moe.stats["dropped"] == 0


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_vectorised_dispatch_matches_a_token_loop(top_k):
    moe = make_moe(n_experts=4, top_k=top_k, capacity_factor=4.0)  # room for every token
    with torch.no_grad():
        moe.b_up.normal_()
        moe.b_down.normal_()
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(moe(x).view(-1, 16), loop_reference(moe, x.view(-1, 16)))
    if top_k > 1:
        torch.testing.assert_close(moe.route(x.view(-1, 16)).gates.sum(-1), torch.ones(18))


def test_capacity_drops_the_latest_tokens_and_they_get_zero():
    moe = make_moe(n_experts=2, capacity_factor=0.5)  # C = ceil(0.5 * 8 / 2) = 2 slots per expert
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x_0 > 0 goes to expert 0, else expert 1
    x = torch.randn(8, 16)
    x[:, 0] = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0])
    y = moe(x)
    # expert 0 gets tokens 0, 1, 2, 4 and keeps 0, 1; expert 1 gets 3, 5, 6, 7 and keeps 3, 5
    dropped = torch.tensor([2, 4, 6, 7])
    assert moe.stats["capacity"] == 2
    assert torch.all(y[dropped] == 0)
    assert torch.all(y[[0, 1, 3, 5]].abs().sum(-1) > 0)
    assert moe.stats["dropped"].item() == pytest.approx(0.5)
    torch.testing.assert_close(y[[0, 1, 3, 5]], loop_reference(moe, x)[[0, 1, 3, 5]])


def test_first_choices_are_served_before_second_choices():
    moe = make_moe(n_experts=2, top_k=2, capacity_factor=0.5)  # C = ceil(0.5 * 2 * 4 / 2) = 2
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.zeros(4, 16)
    x[:, 0] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # tokens 0, 1 prefer expert 0; 2, 3 expert 1
    moe(x)
    # every token's first choice fits (2 per expert), so every second choice is dropped
    assert moe.stats["dropped"].item() == pytest.approx(0.5)
    dispatch = moe.dispatch(x, moe.route(x).experts, capacity=2)
    assert dispatch.kept.tolist() == [True] * 4 + [False] * 4


def test_balance_loss_on_known_routing():
    moe = make_moe(d_model=4, n_experts=4, aux_loss_weight=0.5, z_loss_weight=0.25)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))  # the router's logits are the inputs
    moe(logits)
    probs = logits.softmax(-1)
    f = torch.tensor([2 / 3, 1 / 3, 0.0, 0.0])  # tokens 0, 1 -> expert 0, token 2 -> expert 1
    expected_balance = 4 * (f * probs.mean(0)).sum()  # N_E * sum_i f_i P_i
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(moe.stats["balance_loss"], expected_balance)
    torch.testing.assert_close(moe.stats["z_loss"], expected_z)
    torch.testing.assert_close(moe.aux_loss, 0.5 * expected_balance + 0.25 * expected_z)
    torch.testing.assert_close(moe.stats["load"], f)


def test_balance_loss_is_one_for_a_uniform_router():
    moe = make_moe(n_experts=4)
    with torch.no_grad():
        moe.router.weight.zero_()  # P_i = 1/4, so N_E * sum_i f_i / 4 = sum_i f_i = 1
    moe(torch.randn(10, 16))
    assert moe.stats["balance_loss"].item() == pytest.approx(1.0)


def test_gradients_reach_experts_router_and_input():
    moe = make_moe(n_experts=4, top_k=2, z_loss_weight=1e-3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    (moe(x).square().sum() + moe.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_balance_loss_alone_pushes_the_router_towards_the_idle_experts():
    moe = make_moe(n_experts=2, aux_loss_weight=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.randn(64, 16).abs()  # x_0 > 0: every token prefers expert 0
    moe(x)
    moe.aux_loss.backward()
    # gradient descent lowers expert 0's logit weight and raises expert 1's
    assert moe.router.weight.grad[0, 0] > 0 and moe.router.weight.grad[1, 0] < 0


def test_no_token_is_dropped_in_evaluation_by_default():
    moe = make_moe(n_experts=4, capacity_factor=0.25).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 5.0
    x = torch.randn(12, 16).abs()
    moe(x)
    assert moe.stats["dropped"] == 0 and moe.stats["capacity"] == 12
    moe.train()
    moe(x)
    assert moe.stats["capacity"] == 1 and moe.stats["dropped"].item() == pytest.approx(11 / 12)


def test_router_stays_fp32_under_autocast():
    moe = make_moe(n_experts=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.route(torch.randn(6, 16))
        y = moe(torch.randn(6, 16))
    assert routing.logits.dtype == torch.float32 and routing.gates.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_gpt_with_moe_sums_the_aux_loss_into_the_training_loss():
    config = GPTConfig(vocab_size=30, context_length=16, d_model=16, n_layers=2, n_heads=2, dropout=0.0)
    model = GPT(config, feed_forward=moe_feed_forward(MoEConfig(n_experts=3, top_k=2)))
    x = torch.randint(0, 30, (2, 16))
    out = model(x, targets=x)
    layers = moe_layers(model)
    assert len(layers) == 2
    torch.testing.assert_close(out.aux_loss, layers[0].aux_loss + layers[1].aux_loss)
    torch.testing.assert_close(lm_loss(model, (x, x)), out.loss + out.aux_loss)
    record = record_routing(model, torch.randint(0, 30, (100,)), context_length=16, batch_size=4)
    assert record.experts.shape == (2, 99) and record.counts.sum(-1).tolist() == [2 * 99, 2 * 99]
    assert torch.all(record.max_min_ratio() >= 1)


@pytest.mark.parametrize("field, value", [
    ("n_experts", 0), ("top_k", 5), ("top_k", 0), ("capacity_factor", 0.0),
    ("eval_capacity_factor", -1.0), ("aux_loss_weight", -0.1), ("z_loss_weight", math.nan),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{field: value})


def test_forward_marked_matches_forward_and_names_every_step():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, MoEConfig(n_experts=4, top_k=2)).eval()
    x = torch.randn(2, 5, 8)
    steps = []
    assert torch.equal(layer.forward_marked(x, steps.append), layer(x))
    assert steps == ["route", "dispatch", "experts", "combine", "balancing losses", "statistics, dropout, reshape"]


def test_forward_step_times_covers_steps_whole_and_references():
    layer = MoEFeedForward(8, 16, MoEConfig(n_experts=2))
    x = torch.randn(12, 8)
    times = forward_step_times(layer, x, rounds=2, references={"dense": lambda: x @ x.t()})
    assert set(times) == {"route", "dispatch", "experts", "combine", "balancing losses",
                          "statistics, dropout, reshape", "whole layer", "dense"}
    assert all(t > 0 for t in times.values())
    with pytest.raises(ValueError, match="rounds"):
        forward_step_times(layer, x, rounds=0)
