import pytest
import torch

from common.bench import count_flops
from common.early_exit import (
    ConfidencePolicy,
    EarlyExitGPT,
    FixedDepthPolicy,
    HaltingPolicy,
    adaptive_forward,
    evaluate_policy,
    frequency_band,
    halting_loss,
    masked_forward,
    measure_policies,
    multi_exit_loss,
    oracle_depth,
    per_exit_nll,
    time_policies,
    token_category,
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
    with pytest.raises(ValueError, match="rare_below"):
        frequency_band(5, frequent_at=10, rare_below=20)


def test_token_categories():
    assert [token_category(t) for t in ("the", "N", "$", "<eos>", "<unk>", "stock", "n't")] == [
        "stop-word", "number", "punctuation/symbol", "<eos>", "<unk>", "content word", "stop-word"]
    assert [frequency_band(c) for c in (5000, 100, 3)] == ["frequent", "middle", "rare"]


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
