"""Decision Transformer (Chen et al. 2021) on CartPole-v1: offline data, model, rollouts.

Reinforcement learning as sequence modelling: a trajectory is the token sequence
``R̂_1, s_1, a_1, R̂_2, s_2, a_2, …`` where ``R̂_t = Σ_{t' ≥ t} r_t'`` is the return still to
collect (return-to-go). A causal Transformer reads it and predicts ``a_t`` from the token
of ``s_t``; at test time the first ``R̂`` is the return we ask for.

Dimension letters in shapes:
    B batch, K context (time steps), T tokens (3K, or 2K without returns), D width,
    S state size (4 for CartPole), A actions (2), N time steps of a dataset, E episodes.

Where it departs from kzl/decision-transformer: actions are discrete (cross-entropy, not
MSE); training windows are sampled uniformly over time steps (not over episodes); the
loss covers every unpadded action of a window; a LayerNorm-free embedding sum feeds the
project's own pre-norm decoder (``common.model.Decoder``).

Command line (trains and evaluates what the notebook does)::

    python -m common.rl --preset cpu --seed 0 --out-dir build/rl_cli
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.model import GPT, Decoder, GPTConfig
from common.train import TrainConfig, train

ENV_ID = "CartPole-v1"
MAX_EPISODE_STEPS = 500  # CartPole-v1 truncates here: the best return is 500
STATE_DIM = 4  # cart position, cart velocity, pole angle, pole angular velocity
N_ACTIONS = 2  # push left, push right
POLICIES = ("random", "noisy_heuristic", "expert")

# ---------------------------------------------------------------------------------------
# behaviour policies and the offline dataset

# a(s) = 1[w · s > 0]: push right when the weighted state leans right.
HEURISTIC_WEIGHTS = np.array([0.0, 0.0, 1.0, 1.0])  # angle + angular velocity; ignores the cart
EXPERT_WEIGHTS = np.array([0.1, 0.5, 1.0, 0.5])  # a PD controller on the pole and the cart


class LinearPolicy:
    """``a = 1[w · s > 0]``, replaced by a uniformly random action with probability ``epsilon``.

    ``w = None`` is the random policy (``epsilon`` is then 1).
    """

    def __init__(self, weights: np.ndarray | None, epsilon: float, rng: np.random.Generator):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.weights, self.epsilon, self.rng = weights, 1.0 if weights is None else epsilon, rng

    def __call__(self, state: np.ndarray) -> int:
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(N_ACTIONS))
        return int(state @ self.weights > 0)


@dataclass(frozen=True)
class BehaviourMix:
    """How many episodes each behaviour policy contributes to the offline dataset.

    The noisy heuristic perturbs its weights once per episode, w = w_heuristic + σ ξ with
    ξ ~ N(0, I): each episode follows one deterministic policy, and the spread of σ spreads
    the returns over the whole range 10–500.
    """

    random: int = 200
    noisy_heuristic: int = 400
    expert: int = 100
    weight_noise: float = 0.5  # σ
    seed: int = 0

    def __post_init__(self):
        for name in POLICIES:
            if getattr(self, name) < 0:
                raise ValueError(f"BehaviourMix.{name} must be >= 0, got {getattr(self, name)}")
        if self.random + self.noisy_heuristic + self.expert == 0:
            raise ValueError("BehaviourMix needs at least one episode")
        if self.weight_noise < 0:
            raise ValueError(f"BehaviourMix.weight_noise must be >= 0, got {self.weight_noise}")

    def key(self) -> str:
        """A short hash naming the cache file of this mix."""
        text = json.dumps({**asdict(self), "env": ENV_ID, "version": 1}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclass
class Trajectories:
    """Episodes stored flat: step ``i`` of episode ``e`` is row ``starts[e] + i``.

    observations (N, S) float32, actions (N,) int64, rewards (N,) float32;
    per episode: starts, lengths (E,) int64, policy (E,) index into ``POLICIES``,
    weights (E, S) of its linear policy (NaN for the random policy).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    policy: np.ndarray
    weights: np.ndarray

    @property
    def n_episodes(self) -> int:
        return len(self.starts)

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted return of each episode (E,)."""
        return np.add.reduceat(self.rewards, self.starts) if len(self.rewards) else np.zeros(0)

    @property
    def episode_of_step(self) -> np.ndarray:
        """(N,) episode index of each row."""
        return np.repeat(np.arange(self.n_episodes), self.lengths)

    @property
    def timesteps(self) -> np.ndarray:
        """(N,) time step of each row inside its episode, 0-based."""
        return np.arange(len(self.rewards)) - np.repeat(self.starts, self.lengths)

    def returns_to_go(self) -> np.ndarray:
        """(N,) R̂_t = Σ_{t' >= t} r_t' within each episode."""
        return returns_to_go(self.rewards, self.starts, self.lengths)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part.npz")
        np.savez_compressed(partial, **asdict(self))
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectories:
        with np.load(path) as arrays:
            return cls(**{name: arrays[name] for name in cls.__dataclass_fields__})


def returns_to_go(rewards: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Reverse cumulative sum of ``rewards`` (N,) inside each episode: R̂_t = Σ_{t'=t}^{end} r_t'."""
    if int(lengths.sum()) != len(rewards):
        raise ValueError(f"lengths must sum to len(rewards)={len(rewards)}, got {int(lengths.sum())}")
    total = np.cumsum(rewards[::-1])[::-1]  # Σ_{t' >= t} over the whole array
    ends = starts + lengths  # first row after each episode
    after = np.append(total, 0.0)[ends]  # what the following episodes add
    return (total - np.repeat(after, lengths)).astype(np.float32)


def play_episode(env: gym.Env, policy: Callable[[np.ndarray], int], seed: int) -> tuple[np.ndarray, ...]:
    """One episode: observations (L, S), actions (L,), rewards (L,)."""
    state, _ = env.reset(seed=seed)
    observations, actions, rewards = [], [], []
    done = False
    while not done:
        action = policy(state)
        observations.append(state)
        actions.append(action)
        state, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        done = terminated or truncated
    return np.array(observations, np.float32), np.array(actions, np.int64), np.array(rewards, np.float32)


def generate_dataset(mix: BehaviourMix) -> Trajectories:
    """Play the episodes of ``mix`` (seeded: the same mix gives the same data)."""
    rng = np.random.default_rng(mix.seed)
    env = gym.make(ENV_ID)
    episodes, policy_ids, all_weights = [], [], []
    for policy_id, name in enumerate(POLICIES):
        for _ in range(getattr(mix, name)):
            weights = {"random": None, "expert": EXPERT_WEIGHTS,
                       "noisy_heuristic": HEURISTIC_WEIGHTS + mix.weight_noise * rng.standard_normal(STATE_DIM)}[name]
            episodes.append(play_episode(env, LinearPolicy(weights, 0.0, rng), seed=int(rng.integers(2**31))))
            policy_ids.append(policy_id)
            all_weights.append(np.full(STATE_DIM, np.nan) if weights is None else weights)
    env.close()
    lengths = np.array([len(e[2]) for e in episodes], np.int64)
    return Trajectories(
        observations=np.concatenate([e[0] for e in episodes]),
        actions=np.concatenate([e[1] for e in episodes]),
        rewards=np.concatenate([e[2] for e in episodes]),
        starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        lengths=lengths,
        policy=np.array(policy_ids, np.int64),
        weights=np.array(all_weights, np.float32),
    )


def load_or_generate(mix: BehaviourMix, cache_dir: str | Path) -> tuple[Trajectories, Path]:
    """The dataset of ``mix``, read from ``cache_dir`` when it was generated before."""
    path = Path(cache_dir) / f"cartpole-{mix.key()}.npz"
    if path.exists():
        return Trajectories.load(path), path
    data = generate_dataset(mix)
    return data, data.save(path)


def top_episodes(data: Trajectories, fraction: float) -> np.ndarray:
    """Indices of the best ``fraction`` of episodes by return (for filtered BC, "%BC")."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * data.n_episodes))
    return np.argsort(-data.returns, kind="stable")[:count]


# ---------------------------------------------------------------------------------------
# training windows


class WindowSampler:
    """Random windows of K consecutive steps, left-padded at the start of an episode.

    Each window ends at a time step drawn uniformly from the chosen episodes' steps, so
    every step is the last (hardest, least context) step of some windows.
    Returns a dict of tensors: returns_to_go (B, K), states (B, K, S), actions (B, K),
    timesteps (B, K), padding (B, K) bool (True: a padding step).
    """

    def __init__(self, data: Trajectories, context: int, batch_size: int, episodes: np.ndarray | None = None):
        if context < 1 or batch_size < 1:
            raise ValueError(f"context and batch_size must be >= 1, got {context}, {batch_size}")
        self.context, self.batch_size = context, batch_size
        self.observations = torch.from_numpy(data.observations)
        self.actions = torch.from_numpy(data.actions)
        self.rtg = torch.from_numpy(data.returns_to_go())
        self.timesteps = torch.from_numpy(data.timesteps)
        chosen = np.arange(data.n_episodes) if episodes is None else np.asarray(episodes)
        self.rows = torch.from_numpy(np.isin(data.episode_of_step, chosen).nonzero()[0])

    def __call__(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        last = self.rows[torch.randint(len(self.rows), (self.batch_size,), generator=generator)]  # (B,)
        offsets = torch.arange(self.context) - (self.context - 1)  # (K,) = -(K-1) … 0
        padding = self.timesteps[last, None] + offsets < 0  # (B, K): before the episode starts
        rows = (last[:, None] + offsets).clamp_min(0)
        rows = torch.where(padding, last[:, None], rows)  # padding rows: any valid row, masked later
        return {
            "returns_to_go": self.rtg[rows].masked_fill(padding, 0.0),
            "states": self.observations[rows].masked_fill(padding[..., None], 0.0),
            "actions": self.actions[rows].masked_fill(padding, 0),
            "timesteps": self.timesteps[rows].masked_fill(padding, 0),
            "padding": padding,
        }


# ---------------------------------------------------------------------------------------
# the model


@dataclass
class DTConfig:
    """A Decision Transformer (or, with ``use_returns=False``, a behaviour-cloning Transformer)."""

    context: int = 20  # K time steps in the window
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    dropout: float = 0.1
    use_returns: bool = True
    return_scale: float = float(MAX_EPISODE_STEPS)  # R̂ / scale is in [0, 1] for CartPole
    max_timestep: int = MAX_EPISODE_STEPS
    state_dim: int = STATE_DIM
    n_actions: int = N_ACTIONS

    def __post_init__(self):
        for name in ("context", "max_timestep", "state_dim", "n_actions"):
            if getattr(self, name) < 1:
                raise ValueError(f"DTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.return_scale <= 0:
            raise ValueError(f"DTConfig.return_scale must be > 0, got {self.return_scale}")
        self.gpt_config()  # checks d_model, n_layers, n_heads, dropout

    @property
    def tokens_per_step(self) -> int:
        return 3 if self.use_returns else 2

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.n_actions, context_length=self.tokens_per_step * self.context,
                         d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                         dropout=self.dropout)


class DecisionTransformer(nn.Module):
    """Embeds (R̂_t, s_t, a_t) per step, interleaves them, and predicts a_t from the s_t token.

    One linear embedding per continuous modality (return-to-go, state), an embedding table
    for the discrete action, and a timestep embedding added to all three tokens of a step
    (the only position signal, as in the paper). States are standardised with the
    dataset's statistics, kept as buffers so they travel with the weights.
    """

    def __init__(self, config: DTConfig, state_mean: np.ndarray | None = None,
                 state_std: np.ndarray | None = None):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed_return = nn.Linear(1, d)
        self.embed_state = nn.Linear(config.state_dim, d)
        self.embed_action = nn.Embedding(config.n_actions, d)
        self.embed_timestep = nn.Embedding(config.max_timestep, d)
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = Decoder(config.gpt_config())
        self.head = nn.Linear(d, config.n_actions)
        mean = np.zeros(config.state_dim) if state_mean is None else state_mean
        std = np.ones(config.state_dim) if state_std is None else state_std
        self.register_buffer("state_mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("state_std", torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))
        self.apply(GPT._init_weights)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tokens(self, returns_to_go: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
               timesteps: torch.Tensor) -> torch.Tensor:
        """Interleaved token embeddings (B, T, D), T = 3K: R̂_1, s_1, a_1, R̂_2, … (s_1, a_1, … for BC)."""
        time = self.embed_timestep(timesteps)  # (B, K, D)
        s = self.embed_state((states - self.state_mean) / self.state_std) + time
        a = self.embed_action(actions) + time
        per_step = [s, a]
        if self.config.use_returns:
            r = self.embed_return(returns_to_go[..., None] / self.config.return_scale) + time
            per_step = [r, s, a]
        return torch.stack(per_step, dim=2).flatten(1, 2)  # (B, K, 3, D) -> (B, 3K, D)

    def forward(self, returns_to_go: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                timesteps: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """returns_to_go (B, K), states (B, K, S), actions (B, K), timesteps (B, K) int,
        padding (B, K) bool (True: a left-padding step) -> action logits (B, K, A).

        The logits of step t come from the s_t token: they see R̂_≤t, s_≤t, a_<t and nothing later.
        """
        if states.size(1) > self.config.context:
            raise ValueError(f"window of {states.size(1)} steps exceeds DTConfig.context={self.config.context}")
        if int(timesteps.min()) < 0 or int(timesteps.max()) >= self.config.max_timestep:
            raise ValueError(f"timesteps must be in [0, max_timestep={self.config.max_timestep}), got "
                             f"{int(timesteps.min())} to {int(timesteps.max())}")
        h = self.dropout(self.tokens(returns_to_go, states, actions, timesteps))
        token_padding = None
        if padding is not None:  # every token of a padding step is a padding key
            token_padding = padding.repeat_interleave(self.config.tokens_per_step, dim=1)  # (B, T)
        h = self.decoder(h, key_padding_mask=token_padding)
        state_tokens = h.unflatten(1, (-1, self.config.tokens_per_step))[:, :, -2]  # (B, K, D): s_t
        return self.head(state_tokens)


def action_loss(model: DecisionTransformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy -log p(a_t | R̂_≤t, s_≤t, a_<t) over the unpadded steps of the windows."""
    logits = model(**batch)  # (B, K, A)
    targets = batch["actions"].masked_fill(batch["padding"], -100)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


# ---------------------------------------------------------------------------------------
# evaluation rollouts


@dataclass
class Rollouts:
    """Returns (M,) of M evaluation episodes, with the target and the reset seed of each."""

    targets: np.ndarray
    returns: np.ndarray
    seeds: np.ndarray


def _left_pad(window: np.ndarray, context: int) -> np.ndarray:
    """(M, k, …) with k <= K -> (M, K, …), zeros on the left."""
    pad = [(0, 0), (context - window.shape[1], 0)] + [(0, 0)] * (window.ndim - 2)
    return np.pad(window, pad)


@torch.no_grad()
def rollout(model: DecisionTransformer, targets: Sequence[float], episodes: int, seed: int = 0,
            greedy: bool = True, device: torch.device | str | None = None,
            max_steps: int = MAX_EPISODE_STEPS) -> Rollouts:
    """Play ``episodes`` episodes per target, all at once: one batched forward pass per step.

    Episode j of every target starts from ``env.reset(seed=seed + j)``, so targets are
    compared on the same initial states and a rerun gives the same returns. The first
    return-to-go is the target; after each reward R̂_{t+1} = R̂_t - r_t. The window holds the
    last K steps, left-padded (with a key padding mask) while t < K.
    """
    if episodes < 1 or not targets:
        raise ValueError(f"need episodes >= 1 and at least one target, got {episodes}, {list(targets)}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    K = model.config.context
    env_targets = np.repeat(np.asarray(targets, np.float32), episodes)  # (M,)
    seeds = np.tile(seed + np.arange(episodes), len(targets))
    envs = [gym.make(ENV_ID) for _ in env_targets]
    M, S = len(envs), model.config.state_dim
    states = np.zeros((M, max_steps, S), np.float32)
    actions = np.zeros((M, max_steps), np.int64)
    rtg = np.zeros((M, max_steps), np.float32)
    returns = np.zeros(M, np.float32)
    for j, env in enumerate(envs):
        states[j, 0] = env.reset(seed=int(seeds[j]))[0]
    rtg[:, 0] = env_targets
    generator = torch.Generator().manual_seed(seed)
    alive = np.ones(M, bool)
    for t in range(max_steps):
        idx = alive.nonzero()[0]
        lo = max(0, t + 1 - K)
        window = {
            "returns_to_go": _left_pad(rtg[idx, lo:t + 1], K),
            "states": _left_pad(states[idx, lo:t + 1], K),
            "actions": _left_pad(actions[idx, lo:t + 1], K),  # a_t is a placeholder: causal, unseen
            "timesteps": _left_pad(np.broadcast_to(np.arange(lo, t + 1), (len(idx), t + 1 - lo)), K),
            "padding": np.broadcast_to(np.arange(K) < K - (t + 1 - lo), (len(idx), K)),
        }
        batch = {k: torch.as_tensor(np.array(v), device=device) for k, v in window.items()}
        logits = model(**batch)[:, -1].float().cpu()  # (M_alive, A): the s_t token
        chosen = (logits.argmax(-1) if greedy else
                  torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]).numpy()
        for j, action in zip(idx, chosen, strict=True):
            state, reward, terminated, truncated, _ = envs[j].step(int(action))
            actions[j, t] = action
            returns[j] += reward
            if terminated or truncated or t + 1 == max_steps:
                alive[j] = False
                continue
            states[j, t + 1] = state
            rtg[j, t + 1] = rtg[j, t] - reward  # R̂_{t+1} = R̂_t - r_t
        if not alive.any():
            break
    for env in envs:
        env.close()
    model.train(was_training)
    return Rollouts(env_targets, returns, seeds)


# ---------------------------------------------------------------------------------------
# training


def train_agent(data: Trajectories, config: DTConfig, train_config: TrainConfig, batch_size: int,
                episodes: np.ndarray | None = None, checkpoint_path: str | Path | None = None,
                description: str = "DT", progress: bool = True) -> tuple[DecisionTransformer, dict]:
    """Train a (return-conditioned or BC) Transformer on ``data`` (or on some ``episodes``).

    Returns the model (eval mode) and a summary: final loss, steps, seconds, parameters.
    The initial weights depend only on ``train_config.seed``, not on what ran before.
    """
    torch.manual_seed(train_config.seed)
    model = DecisionTransformer(config, data.observations.mean(0), data.observations.std(0))
    sampler = WindowSampler(data, config.context, batch_size, episodes)
    state = train(model, sampler, train_config, loss_fn=action_loss, checkpoint_path=checkpoint_path,
                  description=description, progress=progress)
    losses = [h["loss"] for h in state.history if "loss" in h]
    return model, {"loss": losses[-1], "loss_curve": [(h["step"], h["loss"]) for h in state.history],
                   "train_s": state.train_seconds, "parameters": model.num_parameters()}


# ---------------------------------------------------------------------------------------
# the experiment of notebook 06 (also run by ``python -m common.rl``)

MODES = {"sampled": False, "argmax": True}  # how actions are picked from π(a | …): name -> greedy

PRESETS = {
    "smoke": {
        "mix": BehaviourMix(random=20, noisy_heuristic=30, expert=5),
        "model": {"context": 4, "d_model": 16, "n_layers": 1, "n_heads": 2},
        "steps": 30, "baseline_steps": 20, "batch_size": 16, "lr": 1e-3,
        "targets": [20, 40, 60], "episodes": 2, "baseline_episodes": 2, "seeds": 2,
        "contexts": [1, 4], "ablation_seeds": 2,
        "filtered_fraction": 0.1, "threads": 1, "max_steps": 60, "mode": "sampled",
    },
    "cpu": {
        "mix": BehaviourMix(),
        "model": {"context": 10, "d_model": 32, "n_layers": 2, "n_heads": 2},
        "steps": 3000, "baseline_steps": 3000, "batch_size": 64, "lr": 1e-3,
        "targets": [25, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500], "episodes": 30,
        "baseline_episodes": 30, "seeds": 5, "contexts": [1, 5, 10], "ablation_seeds": 3,
        "filtered_fraction": 0.1, "threads": 1, "max_steps": MAX_EPISODE_STEPS, "mode": "sampled",
    },
    "gpu": {
        "mix": BehaviourMix(random=400, noisy_heuristic=1600, expert=100),
        "model": {"context": 20, "d_model": 128, "n_layers": 3, "n_heads": 4},
        "steps": 20000, "baseline_steps": 20000, "batch_size": 128, "lr": 3e-4,
        "targets": [25, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500], "episodes": 100,
        "baseline_episodes": 100, "seeds": 5, "contexts": [1, 5, 10, 20], "ablation_seeds": 5,
        "filtered_fraction": 0.1, "threads": None, "max_steps": MAX_EPISODE_STEPS, "mode": "sampled",
    },
}


def train_config(cfg: dict, steps: int, seed: int, device: torch.device | str) -> TrainConfig:
    """The optimisation settings shared by every agent of a preset."""
    return TrainConfig(steps=steps, lr=cfg["lr"], warmup_steps=min(100, steps // 10), weight_decay=1e-4,
                       eval_every=0, log_every=max(1, steps // 100), seed=seed, device=str(device))


def summarise(rollouts: Rollouts) -> dict[str, list[float]]:
    """Mean and standard deviation of the return per target."""
    targets = sorted(set(rollouts.targets.tolist()))
    chosen = [rollouts.returns[rollouts.targets == t] for t in targets]
    return {"targets": targets, "returns_mean": [float(r.mean()) for r in chosen],
            "returns_std": [float(r.std()) for r in chosen]}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN when x or y is constant."""
    from scipy.stats import spearmanr

    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x and y need the same length >= 2, got {len(x)} and {len(y)}")
    if len(set(x)) == 1 or len(set(y)) == 1:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def calibration(targets: Sequence[float], achieved: Sequence[float], up_to: float) -> dict:
    """How closely the mean achieved returns follow the targets ``<= up_to`` (the data's best).

    ``spearman``: rank correlation (only the order; NaN when the achieved returns are all equal);
    ``mae``: mean |achieved - target|; ``slope``: least-squares slope of achieved on target
    (1 for a perfect dial, 0 for an agent that ignores the target); ``n_targets``: how many.
    """
    t, a = np.asarray(targets, np.float64), np.asarray(achieved, np.float64)
    if t.shape != a.shape:
        raise ValueError(f"targets and achieved need the same shape, got {t.shape} and {a.shape}")
    inside = t <= up_to
    if inside.sum() < 2 or len(set(t[inside].tolist())) < 2:
        raise ValueError(f"calibration needs two distinct targets <= {up_to}, got {t.tolist()}")
    t, a = t[inside], a[inside]
    return {"spearman": spearman(t.tolist(), a.tolist()), "mae": float(np.abs(a - t).mean()),
            "slope": float(np.polyfit(t, a, 1)[0]), "n_targets": int(inside.sum())}


UNDEFINED = "undefined: the returns it ranks are all equal, so no rank correlation exists"


def seed_summary(values: Sequence[float], seeds: Sequence[int], why: str = UNDEFINED) -> dict:
    """``common.stats.summary`` over the seeds whose value is defined (finite).

    Seeds with an undefined value (NaN) are listed under ``undefined_seeds`` with the reason; when
    no seed has one, the result is ``{"undefined": why, "seeds": ...}`` (never a NaN).
    """
    from common.stats import summary

    if len(values) != len(seeds):
        raise ValueError(f"one seed per value: {len(seeds)} seeds for {len(values)} values")
    kept = [(float(v), s) for v, s in zip(values, seeds, strict=True) if np.isfinite(v)]
    if not kept:
        return {"undefined": why, "seeds": list(seeds)}
    out = summary([v for v, _ in kept], [s for _, s in kept])
    if len(kept) < len(seeds):
        out.update(undefined_seeds=[s for v, s in zip(values, seeds, strict=True) if not np.isfinite(v)],
                   undefined=why)
    return out


def dataset_summary(data: Trajectories) -> dict:
    return {"episodes": data.n_episodes, "steps": int(data.lengths.sum()),
            "return_mean": float(data.returns.mean()), "return_max": float(data.returns.max()),
            "per_policy": {name: {"episodes": int((data.policy == i).sum()),
                                  "return_mean": float(data.returns[data.policy == i].mean())}
                           for i, name in enumerate(POLICIES) if (data.policy == i).any()}}


def fit_agent(name: str, cfg: dict, data: Trajectories, checkpoint: Callable[..., Path], seed: int,
              device: torch.device | str, steps: int, progress: bool = True,
              episodes: np.ndarray | None = None, batch_size: int | None = None,
              **overrides) -> tuple[DecisionTransformer, dict]:
    """Train the preset's model, with ``overrides`` of its ``DTConfig`` (``use_returns``, ``context``).

    ``batch_size``: windows per step (default: the preset's).
    """
    config = DTConfig(**{**cfg["model"], **overrides})
    batch_size = batch_size or cfg["batch_size"]
    optimisation = train_config(cfg, steps, seed, device)
    # what shapes the weights: the data, the model, the optimisation, the batch and the episodes used
    # (not the evaluation settings of the preset, so changing those never retrains)
    path = checkpoint(name, cfg["mix"], config, optimisation, batch_size,
                      None if episodes is None else np.asarray(episodes).tolist())
    return train_agent(data, config, optimisation, batch_size, episodes, path, description=name,
                       progress=progress)


def evaluation_seed(seed: int) -> int:
    """First environment seed of the evaluation episodes (far from the data's seeds' typical use)."""
    return 10_000 + 1000 * seed


def training_seeds(cfg: dict, seed: int) -> list[int]:
    """The preset's training seeds, starting at the run's ``seed``."""
    return [seed + i for i in range(cfg["seeds"])]


def ablation_batch_size(cfg: dict, context: int) -> int:
    """Windows per step for context ``context`` so that every K supervises the same number of actions
    per step as the preset's model (batch_size × K of the preset): batch ∝ 1 / K."""
    actions = cfg["batch_size"] * cfg["model"]["context"]
    if actions % context:
        raise ValueError(f"context {context} does not divide the {actions} supervised actions per step")
    return actions // context


def evaluate_dt(model: DecisionTransformer, cfg: dict, data: Trajectories, eval_seed: int,
                modes: Sequence[str] = tuple(MODES)) -> dict:
    """Per action mode: the per-target summary, the episode returns and the calibration."""
    out = {}
    for mode in modes:
        played = rollout(model, cfg["targets"], cfg["episodes"], eval_seed, greedy=MODES[mode],
                         max_steps=cfg["max_steps"])
        summary = summarise(played)
        out[mode] = {**summary, **calibration(summary["targets"], summary["returns_mean"], float(data.returns.max())),
                     "returns": played.returns.tolist()}
    return out


def seed_experiment(cfg: dict, data: Trajectories, checkpoint: Callable[..., Path], seed: int,
                    device: torch.device | str, eval_seed: int, progress: bool = True) -> dict:
    """One training seed: DT, BC and %BC trained, each played with sampled and arg-max actions."""
    common = {"cfg": cfg, "data": data, "checkpoint": checkpoint, "seed": seed, "device": device,
              "progress": progress}
    dt, dt_info = fit_agent(f"dt-s{seed}", steps=cfg["steps"], **common)
    bc, bc_info = fit_agent(f"bc-s{seed}", steps=cfg["baseline_steps"], use_returns=False, **common)
    fbc, fbc_info = fit_agent(f"filtered_bc-s{seed}", steps=cfg["baseline_steps"], use_returns=False,
                              episodes=top_episodes(data, cfg["filtered_fraction"]), **common)
    out = {"seed": seed, "dt": evaluate_dt(dt, cfg, data, eval_seed),
           "train_s": dt_info["train_s"] + bc_info["train_s"] + fbc_info["train_s"],
           "info": {"dt": dt_info, "bc": bc_info, "filtered_bc": fbc_info}}
    for name, model in (("bc", bc), ("filtered_bc", fbc)):
        for mode, greedy in MODES.items():
            played = rollout(model, [0], cfg["baseline_episodes"], eval_seed, greedy=greedy,
                             max_steps=cfg["max_steps"])
            out[f"{name}_{mode}"] = float(played.returns.mean())
    return out


def context_run(cfg: dict, data: Trajectories, checkpoint: Callable[..., Path], seed: int, context: int,
                device: torch.device | str, eval_seed: int, progress: bool = True,
                main: dict | None = None) -> dict:
    """DT with context ``context`` at equal supervised actions per step, played with the preset's mode.

    ``main``: the seed's ``seed_experiment`` result, reused when ``context`` is the preset's own K.
    """
    mode = cfg["mode"]
    if main is not None and context == cfg["model"]["context"]:
        return {**{k: v for k, v in main["dt"][mode].items() if k != "returns"}, "seed": seed,
                "train_s": main["info"]["dt"]["train_s"], "loss": main["info"]["dt"]["loss"]}
    model, info = fit_agent(f"dt_K{context}-s{seed}", cfg=cfg, data=data, checkpoint=checkpoint, seed=seed,
                            device=device, steps=cfg["steps"], progress=progress,
                            batch_size=ablation_batch_size(cfg, context), context=context)
    result = evaluate_dt(model, cfg, data, eval_seed, modes=(mode,))[mode]
    return {**{k: v for k, v in result.items() if k != "returns"}, "seed": seed, "train_s": info["train_s"],
            "loss": info["loss"]}


def seed_metrics(cfg: dict, runs: Sequence[dict], data: Trajectories) -> dict:
    """The results-file metrics of the per-seed runs (``seed_experiment``): DT per target and action mode,
    its calibration, the baselines and the comparisons, with intervals over training seeds."""
    from common.stats import compare

    seeds = [r["seed"] for r in runs]
    mode = cfg["mode"]
    out = {"seeds": len(seeds), "training_seeds": seeds, "episodes_per_target": cfg["episodes"],
           "baseline_episodes": cfg["baseline_episodes"], "mode": mode, "targets": list(cfg["targets"]),
           "dataset": dataset_summary(data)}
    for m in MODES:
        per_target = np.array([r["dt"][m]["returns_mean"] for r in runs])  # (seeds, targets)
        out[m] = {"returns_mean": [seed_summary(per_target[:, j], seeds) for j in range(per_target.shape[1])],
                  **{key: seed_summary([r["dt"][m][key] for r in runs], seeds)
                     for key in ("spearman", "mae", "slope")}}
    out.update(spearman=out[mode]["spearman"], mae=out[mode]["mae"], calibration_slope=out[mode]["slope"])
    for name in ("bc", "filtered_bc"):
        for m in MODES:
            out[f"{name}_{m}_return"] = seed_summary([r[f"{name}_{m}"] for r in runs], seeds)
    top = [r["dt"][mode]["returns_mean"][-1] for r in runs]
    out["comparisons"] = {
        f"dt_top_vs_{name}_{m}": compare(top, [r[f"{name}_{m}"] for r in runs], higher_is_better=True,
                                         paired=True, names=(f"DT at {cfg['targets'][-1]}", f"{name} {m}")).to_dict()
        for name in ("bc", "filtered_bc") for m in MODES}
    out["comparisons"]["argmax_vs_sampled_mae"] = compare(
        [r["dt"]["argmax"]["mae"] for r in runs], [r["dt"]["sampled"]["mae"] for r in runs],
        higher_is_better=False, paired=True, names=("arg-max", "sampled")).to_dict()
    return out


def ablation_metrics(cfg: dict, ablation: dict[int, list[dict]]) -> dict:
    """The context ablation (``context_run`` per K and seed) as results-file metrics: per K its calibration,
    loss and training time over seeds, and each K against the largest."""
    from common.stats import compare

    contexts = sorted(ablation)
    seeds = [r["seed"] for r in ablation[contexts[0]]]
    actions = cfg["batch_size"] * cfg["model"]["context"]
    largest = contexts[-1]
    return {
        "held_equal": (f"{actions} supervised action slots per step (windows per step = {actions} / K), "
                       f"{cfg['steps']} steps"),
        "mode": cfg["mode"], "seeds": seeds,
        "per_context": {f"K={k}": {"batch_size": ablation_batch_size(cfg, k),
                                   "returns_mean": [seed_summary([r["returns_mean"][j] for r in ablation[k]], seeds)
                                                    for j in range(len(cfg["targets"]))],
                                   **{key: seed_summary([r[key] for r in ablation[k]], seeds)
                                      for key in ("spearman", "mae", "slope", "loss", "train_s")}}
                        for k in contexts},
        "comparisons": {
            f"K={k}_vs_K={largest}_mae": compare([r["mae"] for r in ablation[k]], [r["mae"] for r in ablation[largest]],
                                                 higher_is_better=False, paired=True,
                                                 names=(f"K={k}", f"K={largest}")).to_dict()
            for k in contexts[:-1]},
    }


def run_experiment(cfg: dict, data: Trajectories, checkpoint: Callable[..., Path], seed: int,
                   device: torch.device | str, progress: bool = True) -> dict:
    """What the notebook computes, in one call: DT, BC and %BC over the seeds, the context ablation."""
    eval_seed = evaluation_seed(seed)
    runs = [seed_experiment(cfg, data, checkpoint, s, device, eval_seed, progress)
            for s in training_seeds(cfg, seed)]
    ablation = {k: [context_run(cfg, data, checkpoint, r["seed"], k, device, eval_seed, progress, main=r)
                    for r in runs[:cfg["ablation_seeds"]]] for k in cfg["contexts"]}
    return {**seed_metrics(cfg, runs, data), "context_ablation": ablation_metrics(cfg, ablation)}


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: generate the data, train DT and the baselines, evaluate, write the results."""
    from common.notebook import start_run

    parser = argparse.ArgumentParser(description="Decision Transformer on CartPole-v1 (notebook 06).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="build/rl_cli", help="where figures/ and results/ go")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (refused when not available)")
    args = parser.parse_args(argv)
    try:
        run = start_run("06_decision_transformer", args.preset == "smoke", args.preset, args.seed, args.out_dir,
                        args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))  # a clear message and exit status 2, before any folder is made
    cfg = PRESETS[run.preset]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    data, path = load_or_generate(cfg["mix"], run.paths.cache)
    print(f"dataset: {data.n_episodes} episodes, {len(data.rewards)} steps ({path})")
    metrics = run_experiment(cfg, data, run.checkpoint, run.seed, run.device)
    print(json.dumps({k: metrics[k] for k in ("spearman", "mae", "calibration_slope", "bc_argmax_return")},
                     indent=1))
    print(f"results -> {run.save_results(metrics)}")
    return metrics


if __name__ == "__main__":
    main()
