import numpy as np
import pytest
import torch

from common import rl
from common.train import TrainConfig

MIX = rl.BehaviourMix(random=4, noisy_heuristic=3, expert=1, seed=3)


@pytest.fixture(scope="module")
def data():
    return rl.generate_dataset(MIX)


def tiny_model(use_returns=True, context=4):
    torch.manual_seed(0)
    config = rl.DTConfig(context=context, d_model=16, n_layers=2, n_heads=2, dropout=0.0, use_returns=use_returns)
    return rl.DecisionTransformer(config).eval()


def test_returns_to_go_is_the_reverse_cumulative_sum_within_each_episode():
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 5.0], np.float32)
    starts, lengths = np.array([0, 3, 5]), np.array([3, 2, 1])
    np.testing.assert_allclose(rl.returns_to_go(rewards, starts, lengths), [6, 5, 3, 30, 20, 5])
    with pytest.raises(ValueError, match="lengths"):
        rl.returns_to_go(rewards, starts, np.array([3, 2, 2]))


def test_dataset_mixes_policies_and_its_returns_match_cartpole(data):
    assert data.n_episodes == 8 and data.lengths.sum() == len(data.rewards) == len(data.observations)
    np.testing.assert_array_equal(data.policy, [0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(data.returns, data.lengths)  # CartPole pays 1 per step
    assert data.returns[data.policy == 2][0] == rl.MAX_EPISODE_STEPS  # the expert never falls
    rtg = data.returns_to_go()
    np.testing.assert_array_equal(rtg[data.starts], data.returns)  # R̂ at t = 0 is the return
    assert (rtg[data.starts + data.lengths - 1] == 1).all()


def test_generation_is_seeded_and_the_cache_round_trips(data, tmp_path):
    again, path = rl.load_or_generate(MIX, tmp_path)
    assert path.exists() and path.name.endswith(".npz")
    cached, same_path = rl.load_or_generate(MIX, tmp_path)
    assert same_path == path
    for name in rl.Trajectories.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(again, name), getattr(data, name))
        np.testing.assert_array_equal(getattr(cached, name), getattr(data, name))
    assert rl.BehaviourMix(random=5).key() != MIX.key()


def test_bad_settings_raise_value_errors_naming_the_field():
    with pytest.raises(ValueError, match="weight_noise"):
        rl.BehaviourMix(weight_noise=-0.1)
    with pytest.raises(ValueError, match="context"):
        rl.DTConfig(context=0)
    with pytest.raises(ValueError, match="n_heads"):
        rl.DTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="epsilon"):
        rl.LinearPolicy(rl.EXPERT_WEIGHTS, 1.5, np.random.default_rng())


def test_windows_are_left_padded_at_the_start_of_an_episode(data):
    sampler = rl.WindowSampler(data, context=6, batch_size=64)
    batch = sampler(torch.Generator().manual_seed(0))
    assert batch["states"].shape == (64, 6, 4) and batch["actions"].shape == (64, 6)
    steps = batch["timesteps"]
    for b in range(64):
        real = ~batch["padding"][b]
        assert real[-1] and (real.int().diff() >= 0).all()  # padding only on the left
        t = steps[b, real]
        assert (t.diff() == 1).all() and (batch["padding"][b].sum() == max(0, 5 - t[-1].item()))
    rtg = batch["returns_to_go"]
    real = ~batch["padding"]
    both = real[:, 1:] & real[:, :-1]
    assert (rtg[:, :-1] - rtg[:, 1:])[both].eq(1).all()  # R̂_{t+1} = R̂_t - r_t with r = 1


def test_filtered_windows_come_only_from_the_top_episodes(data):
    best = rl.top_episodes(data, 0.25)
    assert len(best) == 2 and data.returns[best].min() >= np.sort(data.returns)[-2]
    sampler = rl.WindowSampler(data, context=3, batch_size=200, episodes=best)
    batch = sampler(torch.Generator().manual_seed(1))
    allowed = {tuple(row) for e in best for row in data.observations[data.starts[e]:data.starts[e] + data.lengths[e]]}
    sampled = batch["states"][~batch["padding"]].numpy()
    assert all(tuple(row) in allowed for row in sampled)


def test_tokens_are_interleaved_return_state_action_per_step():
    model = tiny_model()
    B, K = 2, 4
    rtg, states = torch.rand(B, K), torch.randn(B, K, 4)
    actions, steps = torch.randint(0, 2, (B, K)), torch.arange(K).repeat(B, 1)
    tokens = model.tokens(rtg, states, actions, steps)
    time = model.embed_timestep(steps)
    assert tokens.shape == (B, 3 * K, 16)
    torch.testing.assert_close(tokens[:, 0::3], model.embed_return(rtg[..., None] / 500.0) + time)
    torch.testing.assert_close(tokens[:, 1::3], model.embed_state(states) + time)
    torch.testing.assert_close(tokens[:, 2::3], model.embed_action(actions) + time)
    bc_tokens = tiny_model(use_returns=False).tokens(rtg, states, actions, steps)
    assert bc_tokens.shape == (B, 2 * K, 16)


@pytest.mark.parametrize("use_returns", [True, False])
def test_action_logits_of_step_t_never_depend_on_later_tokens(use_returns):
    model = tiny_model(use_returns, context=6)
    B, K = 3, 6
    rtg, states = torch.rand(B, K) * 500, torch.randn(B, K, 4)
    actions, steps = torch.randint(0, 2, (B, K)), torch.arange(K).repeat(B, 1) + 10
    base = model(rtg, states, actions, steps)
    assert base.shape == (B, K, 2)
    for t in (0, 3, 5):
        # a_t and everything after step t may change; the logits of steps <= t may not
        later_actions = actions.clone()
        later_actions[:, t:] = 1 - later_actions[:, t:]
        changed_states, changed_rtg = states.clone(), rtg.clone()
        changed_states[:, t + 1:] += 1.0
        changed_rtg[:, t + 1:] += 100.0
        out = model(changed_rtg, changed_states, later_actions, steps)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        if t + 1 < K:
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])
    # and the logits of step t do depend on s_t and (with returns) on R̂_t
    moved = states.clone()
    moved[:, 2] += 1.0
    assert not torch.allclose(model(rtg, moved, actions, steps)[:, 2], base[:, 2])
    if use_returns:
        raised = rtg.clone()
        raised[:, 2] += 100.0
        assert not torch.allclose(model(raised, states, actions, steps)[:, 2], base[:, 2])


def test_left_padding_with_the_mask_equals_the_unpadded_window():
    model = tiny_model(context=6)
    k = 3
    rtg, states = torch.rand(1, k) * 500, torch.randn(1, k, 4)
    actions, steps = torch.randint(0, 2, (1, k)), torch.arange(k)[None]
    short = model(rtg, states, actions, steps)

    def pad(x):
        return torch.cat([torch.full_like(x[:, :1], 7).expand(1, 6 - k, *x.shape[2:]), x], dim=1)

    padding = torch.tensor([[True] * (6 - k) + [False] * k])
    padded = model(pad(rtg), pad(states), pad(actions) % 2, pad(steps), padding=padding)
    torch.testing.assert_close(padded[:, -k:], short)


def test_loss_ignores_padding_and_gradients_reach_every_parameter(data):
    model = tiny_model().train()
    batch = rl.WindowSampler(data, context=4, batch_size=16)(torch.Generator().manual_seed(0))
    loss = rl.action_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - np.log(2)) < 0.3
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    padded = {**batch, "actions": batch["actions"].masked_fill(batch["padding"], 1)}
    torch.testing.assert_close(rl.action_loss(model.eval(), padded), rl.action_loss(model, batch))


def test_rollouts_run_batched_and_are_reproducible():
    model = tiny_model(context=3)
    first = rl.rollout(model, targets=[20, 500], episodes=2, seed=5, max_steps=60)
    again = rl.rollout(model, targets=[20, 500], episodes=2, seed=5, max_steps=60)
    np.testing.assert_array_equal(first.targets, [20, 20, 500, 500])
    np.testing.assert_array_equal(first.seeds, [5, 6, 5, 6])
    assert ((first.returns >= 1) & (first.returns <= 60)).all()
    np.testing.assert_array_equal(first.returns, again.returns)
    sampled = rl.rollout(model, targets=[100], episodes=3, seed=5, greedy=False, max_steps=60)
    np.testing.assert_array_equal(sampled.returns, rl.rollout(model, [100], 3, seed=5, greedy=False,
                                                             max_steps=60).returns)


def test_a_short_training_run_lowers_the_action_loss(data):
    config = rl.DTConfig(context=4, d_model=16, n_layers=1, n_heads=2, dropout=0.0)
    batch = rl.WindowSampler(data, 4, 128)(torch.Generator().manual_seed(9))
    untrained = rl.DecisionTransformer(config, data.observations.mean(0), data.observations.std(0))
    before = rl.action_loss(untrained.eval(), batch).item()
    model, info = rl.train_agent(data, config, TrainConfig(steps=60, lr=3e-3, warmup_steps=5, eval_every=0,
                                                           device="cpu"), batch_size=32, progress=False)
    assert info["parameters"] == model.num_parameters()
    assert rl.action_loss(model, batch).item() < before - 0.1


def test_negative_or_too_large_timesteps_are_refused_with_the_allowed_range():
    model = tiny_model()
    rtg, states, actions = torch.rand(1, 4), torch.randn(1, 4, 4), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, max_timestep=500\).*-1"):
        model(rtg, states, actions, torch.tensor([[-1, 0, 1, 2]]))
    with pytest.raises(ValueError, match="timesteps must be in"):
        model(rtg, states, actions, torch.tensor([[497, 498, 499, 500]]))


def test_calibration_measures_order_gap_and_slope_up_to_the_data_maximum():
    perfect = rl.calibration([100, 200, 300, 600], [100, 200, 300, 0], up_to=500)
    assert perfect == {"spearman": 1.0, "mae": 0.0, "slope": pytest.approx(1.0), "n_targets": 3}
    flat = rl.calibration([100, 200, 300], [250, 250, 250], up_to=500)
    assert np.isnan(flat["spearman"]) and flat["slope"] == pytest.approx(0.0) and flat["mae"] == pytest.approx(250 / 3)
    shifted = rl.calibration([100, 200, 300], [150, 250, 350], up_to=500)
    assert shifted["mae"] == pytest.approx(50) and shifted["slope"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two distinct targets"):
        rl.calibration([100, 600], [1, 2], up_to=500)


def test_seed_summary_never_writes_nan_and_says_why():
    full = rl.seed_summary([0.9, 1.0, 0.95], [0, 1, 2])
    assert full["mean"] == pytest.approx(0.95) and full["seeds"] == [0, 1, 2] and "undefined" not in full
    part = rl.seed_summary([0.9, float("nan"), 1.0], [0, 1, 2])
    assert part["values"] == [0.9, 1.0] and part["seeds"] == [0, 2] and part["undefined_seeds"] == [1]
    assert "all equal" in part["undefined"]
    none = rl.seed_summary([float("nan")] * 2, [3, 4])
    assert set(none) == {"undefined", "seeds"} and none["seeds"] == [3, 4]


def test_ablation_batches_hold_the_supervised_actions_per_step_equal():
    cfg = rl.PRESETS["cpu"]
    actions = cfg["batch_size"] * cfg["model"]["context"]
    for k in cfg["contexts"]:
        assert rl.ablation_batch_size(cfg, k) * k == actions
    assert rl.ablation_batch_size(cfg, cfg["model"]["context"]) == cfg["batch_size"]
    with pytest.raises(ValueError, match="does not divide"):
        rl.ablation_batch_size(cfg, 7)


def test_every_preset_meets_the_protocol_and_its_contexts_divide_the_batch():
    for name, cfg in rl.PRESETS.items():
        assert cfg["mode"] in rl.MODES and cfg["model"]["context"] in cfg["contexts"], name
        assert cfg["ablation_seeds"] <= cfg["seeds"], name
        for k in cfg["contexts"]:
            rl.ablation_batch_size(cfg, k)
    assert rl.PRESETS["cpu"]["seeds"] >= 5 and rl.PRESETS["cpu"]["episodes"] >= 30
    assert rl.PRESETS["cpu"]["ablation_seeds"] >= 3


def test_the_experiment_runs_end_to_end_on_the_smoke_preset_with_finite_results(data, tmp_path):
    cfg = {**rl.PRESETS["smoke"], "seeds": 2, "ablation_seeds": 2, "steps": 5, "baseline_steps": 5,
           "max_steps": 30}

    def checkpoint(name, *shaped_by):
        return tmp_path / f"{name}.pt"

    metrics = rl.run_experiment(cfg, data, checkpoint, seed=3, device="cpu", progress=False)
    assert metrics["seeds"] == 2 and metrics["training_seeds"] == [3, 4]
    assert metrics["episodes_per_target"] == cfg["episodes"]
    for key in ("mae", "calibration_slope", "bc_argmax_return", "bc_sampled_return", "filtered_bc_argmax_return"):
        assert np.isfinite(metrics[key]["mean"]) and metrics[key]["seeds"] == [3, 4], key
    assert "mean" in metrics["spearman"] or "undefined" in metrics["spearman"]
    ablation = metrics["context_ablation"]
    assert ablation["seeds"] == [3, 4] and set(ablation["per_context"]) == {"K=1", "K=4"}
    assert ablation["per_context"]["K=1"]["batch_size"] == 4 * ablation["per_context"]["K=4"]["batch_size"]

    def numbers(value):
        if isinstance(value, dict):
            return [n for k, v in value.items() if k != "ci" for n in numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in numbers(v)]
        return [value] if isinstance(value, float) else []

    assert all(np.isfinite(numbers(metrics)))


def test_the_command_line_refuses_an_unavailable_device_before_making_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as stop:
        rl.main(["--preset", "smoke", "--device", "cuda", "--out-dir", str(out)])
    assert stop.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()
