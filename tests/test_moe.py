import math

import pytest
import torch

from common.model import GPT, FeedForward, GPTConfig
from common.moe import (
    MoEConfig,
    MoEFeedForward,
    PermuteRows,
    balanced_hash,
    forward_step_times,
    inverse_permutation,
    moe_blocks,
    moe_feed_forward,
    moe_gpt,
    moe_layers,
    record_routing,
)
from common.train import evaluate_lm, lm_loss


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
    ids = torch.randint(0, 30, (100,))
    record = record_routing(model, ids, context_length=16, batch_size=4)
    assert record.experts.shape == (2, 99) and record.counts.sum(-1).tolist() == [2 * 99, 2 * 99]
    assert torch.all(record.max_min_ratio() >= 1)
    assert record.loss == pytest.approx(evaluate_lm(model, ids, 16, batch_size=4)["loss"])


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


@pytest.mark.parametrize("top_k, factor", [(1, 0.5), (1, 4.0), (2, 0.75), (3, 4.0)])
def test_grouped_and_padded_layouts_drop_the_same_assignments_and_agree(top_k, factor):
    grouped = make_moe(n_experts=4, top_k=top_k, capacity_factor=factor, layout="grouped")
    padded = make_moe(n_experts=4, top_k=top_k, capacity_factor=factor, layout="padded")
    padded.load_state_dict(grouped.state_dict())
    with torch.no_grad():
        grouped.b_up.normal_()
        padded.b_up.copy_(grouped.b_up)
    x = torch.randn(3, 11, 16, requires_grad=True)
    out_grouped, out_padded = grouped(x), padded(x)
    torch.testing.assert_close(out_grouped, out_padded)
    assert grouped.stats["dropped"] == padded.stats["dropped"]
    direction = torch.randn_like(x)
    grads = [torch.autograd.grad(((out * direction).sum() + layer.aux_loss), [x, *layer.parameters()])
             for out, layer in ((out_grouped, grouped), (out_padded, padded))]
    for g_grouped, g_padded in zip(*grads, strict=True):  # the same gradients, dropped tokens included
        torch.testing.assert_close(g_grouped, g_padded)
    routing = grouped.route(x.view(-1, 16))
    dispatch = grouped.dispatch(x.view(-1, 16), routing.experts, grouped.capacity(33, routing.experts))
    assert sum(dispatch.sizes) == int(dispatch.kept.sum()) == dispatch.buffer.size(0)


@pytest.mark.parametrize("top_k, factor, permutation", [(1, 4.0, True), (1, 0.5, False), (2, 4.0, False)])
def test_top1_without_drops_dispatches_as_a_permutation(top_k, factor, permutation):
    """Top-1 with room for every token: the rows are permuted and put back; otherwise gathered and scattered."""
    moe = make_moe(n_experts=4, top_k=top_k, capacity_factor=factor)
    x = torch.randn(40, 16)
    routing = moe.route(x)
    dispatch = moe.dispatch(x, routing.experts, moe.capacity(40, routing.experts))
    assert (dispatch.inverse is not None) == permutation
    if permutation:
        torch.testing.assert_close(dispatch.served[dispatch.inverse], torch.arange(40))
        torch.testing.assert_close(dispatch.buffer, x[dispatch.served])
        torch.testing.assert_close(moe(x), loop_reference(moe, x))


def test_permute_rows_gradient_is_the_inverse_permutation():
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    inverse = inverse_permutation(perm)
    torch.testing.assert_close(perm[inverse], torch.arange(7))
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: PermuteRows.apply(t, perm, inverse), (x,))


def test_grouped_layout_counts_only_the_served_tokens():
    """No padded slot is computed: with an even routing and no drop, the FLOPs are the dense FFN's."""
    from common.bench import count_flops

    dense = FeedForward(16, 32)
    moe = make_moe(n_experts=4, capacity_factor=2.0, layout="grouped")
    padded = make_moe(n_experts=4, capacity_factor=2.0, layout="padded")
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = 50 * torch.eye(4)  # token n goes to expert n % 4
        padded.router.weight.copy_(moe.router.weight)
    x = torch.zeros(64, 16)
    x[torch.arange(64), torch.arange(64) % 4] = 1.0
    dispatch = moe.dispatch(x, moe.route(x).experts, capacity=32)
    assert dispatch.sizes == [16, 16, 16, 16]
    assert count_flops(lambda: moe.experts(dispatch.buffer, dispatch.sizes)) == count_flops(lambda: dense(x))
    assert count_flops(lambda: padded(x)) > 1.9 * count_flops(lambda: dense(x))  # 2x the slots, half empty


def test_experts_router_and_dense_ffn_are_decayed_alike():
    from common.train import TrainConfig, make_optimizer

    config = GPTConfig(vocab_size=30, context_length=16, d_model=16, n_layers=2, n_heads=2)
    model = moe_gpt(config, MoEConfig(n_experts=3))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for layer in moe_layers(model):
        assert {id(layer.w_up), id(layer.w_down), id(layer.router.weight)} <= decayed
        assert id(layer.b_up) not in decayed and id(layer.b_down) not in decayed
    dense = GPT(config)
    dense_decayed = {id(p) for g in make_optimizer(dense, TrainConfig()).param_groups
                     if g["weight_decay"] > 0 for p in g["params"]}
    ffn = dense.decoder.blocks[0].feed_forward
    assert {id(ffn.up.weight), id(ffn.down.weight)} <= dense_decayed
    assert id(dense.token_embedding.weight) not in dense_decayed


def test_straight_through_gate_keeps_the_dense_scale_and_the_switch_router_gradient():
    dense = FeedForward(16, 32)
    layers = {gate: make_moe(n_experts=4, gate=gate, capacity_factor=4.0)
              for gate in ("straight-through", "probability")}
    layers["probability"].load_state_dict(layers["straight-through"].state_dict())
    for layer in layers.values():
        with torch.no_grad():  # every expert a copy of the dense FFN
            layer.w_up.copy_(dense.up.weight.t().expand_as(layer.w_up))
            layer.b_up.copy_(dense.up.bias.expand_as(layer.b_up))
            layer.w_down.copy_(dense.down.weight.t().expand_as(layer.w_down))
            layer.b_down.copy_(dense.down.bias.expand_as(layer.b_down))
    x = torch.randn(20, 16)
    y_st, y_p = layers["straight-through"](x), layers["probability"](x)
    torch.testing.assert_close(y_st, dense(x))  # the gate's forward value is exactly 1
    p_top = layers["probability"].route(x).probs.max(-1).values
    torch.testing.assert_close(y_p, p_top[:, None] * dense(x))  # the Switch gate shrinks the branch
    assert 0.25 < float(p_top.detach().mean()) < 0.35  # a little above 1/E at initialisation
    direction = torch.randn(20, 16)
    for y in (y_st, y_p):
        (y * direction).sum().backward()  # a linear loss: dL/dy is the same for both
    torch.testing.assert_close(layers["straight-through"].router.weight.grad, layers["probability"].router.weight.grad)


def test_balanced_hash_is_fixed_random_and_even():
    counts = torch.tensor([300.0, 250, 200, 150, 120, 100, 90, 80, 60, 50, 40, 30, 20, 10, 5, 0])
    table = balanced_hash(counts, 4, seed=0)
    assert table.shape == (16,) and set(table.tolist()) <= {0, 1, 2, 3}
    torch.testing.assert_close(table, balanced_hash(counts, 4, seed=0))
    assert any(not torch.equal(table, balanced_hash(counts, 4, seed=s)) for s in range(1, 5))
    load = torch.zeros(4, dtype=torch.float64).index_add(0, table, counts.double())
    assert float(load.max() / load.min()) < 1.1
    with pytest.raises(ValueError, match="token_counts"):
        balanced_hash(torch.tensor([-1.0, 2.0]), 2)


def test_hash_routed_gpt_sends_each_token_id_to_its_table_expert():
    config = GPTConfig(vocab_size=12, context_length=16, d_model=16, n_layers=2, n_heads=2, dropout=0.0)
    counts = torch.arange(12, 0, -1).float()
    model = moe_gpt(config, MoEConfig(n_experts=3, router="hash", hash_seed=1), token_counts=counts)
    layers = moe_layers(model)
    assert all(layer.router is None for layer in layers)
    assert not torch.equal(layers[0].hash_table, layers[1].hash_table)  # one table per layer
    x = torch.randint(0, 12, (3, 16))
    out = model(x, targets=x)
    assert out.aux_loss.item() == 0.0
    for layer in layers:
        torch.testing.assert_close(layer.stats["experts"][:, 0], layer.hash_table[x.flatten()])
    out.loss.backward()
    assert all(layer.w_up.grad is not None for layer in layers)
    state = model.state_dict()
    assert "decoder.blocks.0.feed_forward.hash_table" in state
    twin = moe_gpt(config, MoEConfig(n_experts=3, router="hash", hash_seed=1), token_counts=counts)
    twin.load_state_dict(state)
    torch.testing.assert_close(twin(x).logits, model(x).logits)
    record = record_routing(model, torch.randint(0, 12, (200,)), context_length=16, batch_size=4)
    assert record.cv().shape == (2,)
    with pytest.raises(ValueError, match="token_counts"):
        moe_gpt(config, MoEConfig(n_experts=3, router="hash"))
    with pytest.raises(RuntimeError, match="moe_gpt"):
        MoEFeedForward(16, 32, MoEConfig(router="hash"), vocab_size=12)(torch.randn(4, 16))


def test_routing_record_cv_and_max_min():
    from common.moe import RoutingRecord

    record = RoutingRecord(torch.zeros(1), torch.zeros(2, 1), torch.tensor([[10, 10, 10, 10], [5, 10, 15, 10]]))
    torch.testing.assert_close(record.cv(), torch.tensor([0.0, (12.5 ** 0.5) / 10], dtype=torch.float64))
    torch.testing.assert_close(record.max_min_ratio(), torch.tensor([1.0, 3.0]))


def test_token_purity_and_churn():
    from common.moe import RoutingRecord, routing_churn

    tokens = torch.tensor([0, 1, 0, 1, 2, 2])
    experts = torch.tensor([[3, 1, 3, 1, 0, 0],   # a function of the token id: purity 1
                            [3, 1, 2, 1, 0, 1]])  # token 0 -> 3 or 2, token 2 -> 0 or 1: 4 of 6 follow the majority
    record = RoutingRecord(tokens, experts, torch.ones(2, 4, dtype=torch.long))
    torch.testing.assert_close(record.token_purity(), torch.tensor([1.0, 4 / 6], dtype=torch.float64))
    torch.testing.assert_close(routing_churn(experts[:1], experts[1:]), torch.tensor([2 / 6], dtype=torch.float64))
    with pytest.raises(ValueError, match="different"):
        routing_churn(experts, experts[:, :3])


@pytest.mark.parametrize("field, value", [("router", "random"), ("gate", "soft"), ("layout", "ragged"),
                                          ("hash_seed", -1)])
def test_bad_new_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{field: value})
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(router="hash", top_k=2)


def test_every_other_block_gets_the_moe_layer_as_in_switch():
    config = GPTConfig(vocab_size=12, context_length=8, d_model=16, n_layers=4, n_heads=2, dropout=0.0)
    model = moe_gpt(config, MoEConfig(n_experts=2), every=2)
    kinds = [type(block.feed_forward) for block in model.decoder.blocks]
    assert kinds == [FeedForward, MoEFeedForward, FeedForward, MoEFeedForward]
    assert moe_blocks(4, 2) == [1, 3] and moe_blocks(5, 2) == [1, 3] and moe_blocks(3, 1) == [0, 1, 2]
    assert moe_blocks(6, 3) == [2, 5]
    assert len(moe_layers(moe_gpt(config, MoEConfig(n_experts=2)))) == 4
    x = torch.randint(0, 12, (2, 8))
    out = model(x, targets=x)
    torch.testing.assert_close(out.aux_loss, sum(layer.aux_loss for layer in moe_layers(model)))
    with pytest.raises(ValueError, match="every"):
        moe_gpt(config, MoEConfig(), every=0)
    with pytest.raises(ValueError, match="every"):
        moe_blocks(4, True)


def test_stats_are_read_from_the_last_pass_and_carry_no_graph():
    moe = make_moe(n_experts=4, top_k=2, capacity_factor=0.5)
    assert moe.stats == {}
    x = torch.randn(10, 16, requires_grad=True)
    moe(x)
    stats = moe.stats
    assert all(not torch.is_tensor(v) or not v.requires_grad for v in stats.values())
    dispatch = moe.dispatch(x, moe.route(x).experts, stats["capacity"])
    assert stats["dropped"].item() == pytest.approx(1 - dispatch.kept.float().mean().item())
    assert stats["load"].sum().item() == pytest.approx(1.0)
    moe(x[:4])
    assert moe.stats["experts"].shape == (4, 2)  # the newest pass
