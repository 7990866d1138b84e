import pytest
import torch

from common.bench import count_flops
from common.early_exit import (
    ConfidencePolicy,
    EarlyExitGPT,
    FixedDepthPolicy,
    HaltingPolicy,
    VariableChains,
    adaptive_forward,
    char_category,
    evaluate_policy,
    exit_predictions,
    flops_per_token,
    grouped_means,
    halting_loss,
    masked_forward,
    measure_policies,
    multi_exit_loss,
    oracle_depth,
    per_exit_nll,
    run_task_policy,
    theory_flops,
    time_policies,
    token_nll,
)
from common.model import GPTConfig

V, L = 50, 16


def make_model(n_layers=4, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=V, context_length=L, d_model=32, n_layers=n_layers, n_heads=4, dropout=0.0)
    model = EarlyExitGPT(config).eval()
    for head in model.halting:  # spread the halting probabilities so tokens exit at many depths
        torch.nn.init.normal_(head.weight, std=0.5)
    return model


def tokens(batch=3, seed=1):
    return torch.randint(0, V, (batch, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", [HaltingPolicy(1.5), ConfidencePolicy(1.0)])
def test_a_threshold_that_never_exits_equals_the_full_depth_model(policy):
    model, x = make_model(), tokens()
    out = adaptive_forward(model, x, policy)
    assert (out.exit_layer == model.n_layers).all()
    torch.testing.assert_close(out.logits, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [HaltingPolicy(0.5), ConfidencePolicy(0.025), FixedDepthPolicy(2)])
def test_skipping_exited_tokens_equals_computing_them_and_copying_their_state(policy):
    model, x = make_model(), tokens()
    fast, reference = adaptive_forward(model, x, policy), masked_forward(model, x, policy)
    assert torch.equal(fast.exit_layer, reference.exit_layer)
    torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-5, atol=1e-5)


def test_the_policies_make_tokens_exit_at_several_depths():
    model, x = make_model(), tokens(batch=4)
    for policy in (HaltingPolicy(0.5), ConfidencePolicy(0.025)):
        depths = adaptive_forward(model, x, policy).exit_layer.unique()
        assert len(depths) >= 2, f"{policy} exits everything at {depths.tolist()}: the test is vacuous"


def test_an_exited_token_keeps_its_exit_state_and_logits():
    model, x = make_model(), tokens()
    out = adaptive_forward(model, x, FixedDepthPolicy(1))
    one_layer = model.logits(model.exit_states(x)[0])
    assert (out.exit_layer == 1).all()
    torch.testing.assert_close(out.logits, one_layer, rtol=1e-5, atol=1e-5)
    # a token that stopped at layer 1 is seen by later tokens through its copied layer-1 state
    states = model.exit_states(x)
    mixed = adaptive_forward(model, x, HaltingPolicy(0.5))
    stopped = mixed.exit_layer == 1
    assert stopped.any()
    torch.testing.assert_close(mixed.logits[stopped], model.logits(states[0])[stopped], rtol=1e-5, atol=1e-5)


def test_changing_future_tokens_never_changes_earlier_exits_or_logits():
    model, x = make_model(), tokens()
    policy = HaltingPolicy(0.5)
    for t in (0, 5, L - 1):
        changed = x.clone()
        changed[:, t:] = (changed[:, t:] + 1) % V
        a, b = adaptive_forward(model, x, policy), adaptive_forward(model, changed, policy)
        assert torch.equal(a.exit_layer[:, :t], b.exit_layer[:, :t])
        torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t])
        assert not torch.allclose(a.logits[:, t], b.logits[:, t])


def test_flops_fall_as_tokens_exit_earlier():
    model, x = make_model(), tokens()
    flops = [count_flops(lambda d=d: adaptive_forward(model, x, FixedDepthPolicy(d))) for d in (1, 2, 3, 4)]
    assert flops[0] < flops[1] < flops[2] < flops[3]
    assert count_flops(lambda: adaptive_forward(model, x, FixedDepthPolicy(4))) == pytest.approx(
        count_flops(lambda: model(x)), rel=0.05)


def test_oracle_depth_trades_likelihood_for_depth():
    nll = torch.tensor([[3.0, 1.0], [2.9, 0.5], [1.0, 0.45]])[:, None, :]  # (N=3, B=1, L=2)
    assert oracle_depth(nll, 0.0).tolist() == [[3, 3]]
    assert oracle_depth(nll, 0.2).tolist() == [[3, 2]]
    assert oracle_depth(nll, 10.0).tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="depth_penalty"):
        oracle_depth(nll, -1.0)


def test_stage_losses_train_the_right_parameters():
    model, x = make_model(), tokens()
    batch = (x[:, :-1], x[:, 1:])
    multi_exit_loss(model, batch).backward()
    assert all(p.grad is not None for p in model.gpt.parameters())
    assert all(p.grad is None for p in model.halting.parameters())
    model.zero_grad(set_to_none=True)
    loss = halting_loss(model, batch, depth_penalty=0.05)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is None for p in model.gpt.parameters())
    assert model.halting[0].weight.grad.abs().sum() > 0


def test_evaluation_counts_every_token_and_its_depth():
    model = make_model()
    ids = torch.randint(0, V, (101,), generator=torch.Generator().manual_seed(3))
    full = evaluate_policy(model, ids, FixedDepthPolicy(4), context_length=L, batch_size=4)
    half = evaluate_policy(model, ids, FixedDepthPolicy(2), context_length=L, batch_size=4)
    assert len(full.exit_layer) == 100 and full.avg_depth == 4 and full.compute_saving == 0
    assert half.avg_depth == 2 and half.compute_saving == 0.5
    assert half.exit_hist() == {1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}


def test_bad_arguments_raise():
    config = GPTConfig(vocab_size=V, context_length=L, d_model=32, n_layers=2, n_heads=4)
    with pytest.raises(ValueError, match="exit_weights"):
        EarlyExitGPT(config, exit_weights=[1.0])
    with pytest.raises(ValueError, match="threshold"):
        HaltingPolicy(-0.1)
    with pytest.raises(ValueError, match="depth"):
        FixedDepthPolicy(0)


@pytest.mark.parametrize("make, value", [
    (HaltingPolicy, float("nan")), (ConfidencePolicy, float("nan")), (HaltingPolicy, "0.5"), (HaltingPolicy, None),
    (FixedDepthPolicy, 2.5), (FixedDepthPolicy, True), (FixedDepthPolicy, "2"), (FixedDepthPolicy, float("nan")),
])
def test_policies_refuse_values_that_are_not_thresholds_or_depths(make, value):
    with pytest.raises(ValueError, match="threshold|depth"):
        make(value)


def test_policies_accept_numbers_of_any_numeric_type():
    import numpy as np

    assert HaltingPolicy(1).threshold == 1.0 and HaltingPolicy(np.float32(0.5)).threshold == 0.5
    assert FixedDepthPolicy(np.int64(3)).depth == 3


def test_token_nll_matches_per_exit_nll_for_both_model_kinds():
    from common.model import GPT

    model = make_model()
    ids = torch.randint(0, V, (2 * L + 1,), generator=torch.Generator().manual_seed(3))
    x, y = ids[:-1].view(2, L), ids[1:].view(2, L)
    last_exit = per_exit_nll(model, x, y)[-1].flatten()
    torch.testing.assert_close(token_nll(model, ids, L, batch_size=2), last_exit)
    gpt = GPT(model.config).eval()
    expected = torch.nn.functional.cross_entropy(gpt(x).logits.flatten(0, 1), y.flatten(), reduction="none")
    torch.testing.assert_close(token_nll(gpt, ids, L, batch_size=2), expected)
    evaluation = evaluate_policy(model, ids, FixedDepthPolicy(4), context_length=L, batch_size=2)
    torch.testing.assert_close(evaluation.nll, last_exit)
    assert evaluation.loss == pytest.approx(last_exit.mean().item(), rel=1e-5)


def test_the_full_depth_forward_reads_out_only_the_last_layer():
    model, x = make_model(), tokens()
    torch.testing.assert_close(model(x), model.logits(model.exit_states(x)[-1]))
    assert count_flops(lambda: model(x)) == count_flops(lambda: model.gpt(x))


def test_character_categories():
    pairs = ((" ", "T"), ("T", "h"), ("h", " "), ("1", "9"), ("a", ","), (".", "\n"), ("(", "x"))
    assert [char_category(p, c) for p, c in pairs] == [
        "word start", "inside word", "space", "digit", "punctuation", "line break", "word start"]


def test_grouped_means_give_each_group_its_mean_size_and_an_interval_around_it():
    values = torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0, 3.0, 1.0, 5.0])
    groups = ["a", "a", "b", "b", "a", "b", "a", "b"]
    blocks = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    out = grouped_means(values, groups, blocks, n_boot=500)
    assert out["a"]["mean"] == 1.0 and out["a"]["tokens"] == 4 and out["a"]["ci"] == [1.0, 1.0]
    assert out["b"]["mean"] == pytest.approx(3.5) and out["b"]["tokens"] == 4
    assert out["b"]["ci"][0] < 3.5 < out["b"]["ci"][1]
    with pytest.raises(ValueError, match="one entry per token"):
        grouped_means(values, groups[:-1], blocks)


def test_multi_exit_loss_is_the_weighted_mean_of_exit_losses_and_its_subsample_is_unbiased():
    model, x = make_model(), tokens(batch=4)
    batch = (x[:, :-1], x[:, 1:])
    with torch.no_grad():
        per_exit = per_exit_nll(model, *batch).mean(dim=(1, 2))  # (N,)
        full = multi_exit_loss(model, batch)
        torch.testing.assert_close(full, (model.exit_weights * per_exit).sum())
        torch.manual_seed(0)
        estimates = torch.stack([multi_exit_loss(model, batch, token_fraction=0.25) for _ in range(400)])
    assert not torch.allclose(estimates[0], estimates[1])  # the positions really are sampled
    assert abs(estimates.mean() - full) < 0.01 * full
    with pytest.raises(ValueError, match="token_fraction"):
        multi_exit_loss(model, batch, token_fraction=0.0)


def test_measure_policies_reports_quality_flops_and_interleaved_times():
    model, x = make_model(), tokens(batch=2)
    ids = torch.randint(0, V, (3 * L + 1,), generator=torch.Generator().manual_seed(3))
    policies = [FixedDepthPolicy(1), FixedDepthPolicy(4), HaltingPolicy(0.5)]
    rows = measure_policies(model, ids, policies, L, x, batch_size=2, rounds=2)
    assert [r["policy"] for r in rows] == ["fixeddepth", "fixeddepth", "halting"]
    assert rows[0]["avg_depth"] == 1 and rows[1]["avg_depth"] == 4
    assert rows[0]["flops"] < rows[1]["flops"]
    assert all(r["seconds"] > 0 and r["time_vs_full"] > 0 for r in rows)
    times = time_policies(model, x, policies, rounds=1)
    assert set(times) == {"full depth", *map(repr, policies)}
    with pytest.raises(ValueError, match="rounds"):
        time_policies(model, x, policies, rounds=0)


# ---------------------------------------------------------------------------------------
# the task of known difficulty


def resolve(task, x):
    """Brute force: the value and the number of hops of every statement of one sequence."""
    values, hops, out = {}, {}, []
    for token in x.tolist():
        v, source = divmod(token, task.n_sources)
        if source >= task.n_vars:
            values[v], hops[v] = source - task.n_vars, 0
        else:
            values[v], hops[v] = values[source], hops[source] + 1
        out.append((values[v], hops[v]))
    return out


def test_variable_chains_targets_and_hops_follow_the_statements():
    task = VariableChains(n_vars=10, n_values=12, n_statements=10, n_literals=3, hop_weights=(1, 1, 1, 1))
    x, y, hops = task.with_hops(64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == hops.shape == (64, 10)
    assert int(x.max()) < task.value_offset <= int(y.min()) and int(y.max()) < task.vocab_size
    for row in range(64):
        expected = resolve(task, x[row])
        assert [task.value_offset + v for v, _ in expected] == y[row].tolist()
        assert [k for _, k in expected] == hops[row].tolist()
        literals = (x[row] % task.n_sources)[:3] - task.n_vars
        assert len(set(literals.tolist())) == 3  # distinct literal values, first
        assert len(set((x[row] // task.n_sources).tolist())) == 10  # each variable assigned once
    assert torch.equal(task.hops_of(x), hops)
    assert set(hops.unique().tolist()) == {0, 1, 2, 3, 4} and task.max_hops == 4
    assert (hops[:, :3] == 0).all() and (hops[:, 3:] >= 1).all()


def test_variable_chains_repeat_with_the_generator_and_follow_the_weights():
    task = VariableChains(n_vars=12, n_values=16, n_statements=12, n_literals=4, hop_weights=(1.0, 0.0, 0.0))
    a, b = task(8, torch.Generator().manual_seed(1)), task(8, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert task.hops_of(a[0]).max() == 1  # only one-hop links were asked for
    assert "VariableChains(n_vars=12" in repr(task) and ":=" in task.describe(a[0][0], a[1][0])[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_statements=20), "n_statements"), (dict(n_literals=0), "n_literals"), (dict(n_literals=13), "n_literals"),
    (dict(hop_weights=(0.0, 0.0)), "hop_weights"), (dict(hop_weights=(float("nan"),)), "hop_weights"),
    (dict(n_vars=2.5), "n_vars"),
])
def test_variable_chains_refuse_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VariableChains(**{"n_vars": 12, "n_values": 12, "n_statements": 12, **kwargs})


def test_task_runs_score_every_position_at_its_exit():
    task = VariableChains(n_vars=8, n_values=8, n_statements=8, n_literals=3, hop_weights=(1, 1))
    config = GPTConfig(vocab_size=task.vocab_size, context_length=8, d_model=32, n_layers=3, n_heads=4, dropout=0.0)
    torch.manual_seed(0)
    model = EarlyExitGPT(config).eval()
    batches = [task(4, torch.Generator().manual_seed(s)) for s in (1, 2)]
    predictions, nll, chi = exit_predictions(model, batches)
    assert predictions.shape == nll.shape == chi.shape == (3, 64)
    full = run_task_policy(model, batches, FixedDepthPolicy(3))
    assert (full.exit_layer == 3).all() and torch.equal(full.prediction, predictions[-1])
    first = run_task_policy(model, batches, FixedDepthPolicy(1))
    assert torch.equal(first.prediction, predictions[0]) and first.avg_depth == 1.0
    assert first.exit_hist() == {1: 1.0, 2: 0.0, 3: 0.0}
    states = torch.cat([model.exit_states(x)[0].flatten(0, 1) for x, _ in batches])
    torch.testing.assert_close(chi[0], model.halt_probability(1, states))


def test_flops_per_token_is_linear_in_depth_and_matches_the_counter():
    config = GPTConfig(vocab_size=V, context_length=L, d_model=32, n_layers=4, n_heads=4, dropout=0.0)
    one, two, three = (flops_per_token(config, d) for d in (1, 2, 3))
    assert two - one == pytest.approx(three - two)
    assert flops_per_token(config, 2.5) == pytest.approx((two + three) / 2)
    model, x = make_model(), tokens()
    assert count_flops(lambda: model(x)) / x.numel() == pytest.approx(flops_per_token(config, 4), rel=0.1)
    static = count_flops(lambda: adaptive_forward(model, x, FixedDepthPolicy(2))) / x.numel()
    assert static == pytest.approx(flops_per_token(config, 2, copied_kv=False), rel=0.1)
    assert flops_per_token(config, 2, copied_kv=False) < two


def test_theory_flops_account_for_the_keys_and_values_of_exited_tokens():
    model, x = make_model(), tokens(batch=4)
    out = adaptive_forward(model, x, HaltingPolicy(0.5))
    assert len(out.exit_layer.unique()) >= 2
    measured = count_flops(lambda: adaptive_forward(model, x, HaltingPolicy(0.5)))
    assert measured == pytest.approx(theory_flops(model.config, out.exit_layer), rel=0.1)
    everyone_at_2 = torch.full_like(out.exit_layer, 2)
    assert theory_flops(model.config, everyone_at_2) == pytest.approx(
        x.numel() * flops_per_token(model.config, 2, copied_kv=False))


def test_chain_of_lists_the_statements_on_the_way_to_the_literal():
    task = VariableChains(n_vars=10, n_values=12, n_statements=10, n_literals=3, hop_weights=(1, 1, 1))
    x, _, hops = task.with_hops(32, torch.Generator().manual_seed(4))
    on_chain = task.chain_of(x)
    assert torch.equal(on_chain.sum(-1), hops)  # one statement per hop
    assert not on_chain[:, :3].any() and not torch.triu(on_chain[0]).any()
