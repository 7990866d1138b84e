"""Depth-adaptive decoding: every token leaves the stack at its own layer.

Elbayad et al. 2020 (Depth-Adaptive Transformer) put an output classifier after every
decoder layer and let each token stop at a depth of its own; Graves 2016 (ACT) learns when
to stop with a halting unit. This module does both on top of ``common.model``:

- ``EarlyExitGPT`` composes a ``GPT`` (its embeddings, blocks, final norm and tied head):
  the *same* norm + head read out every layer, so layer n has its own next-token
  distribution p_n. A halting classifier per layer, chi_n = sigmoid(w_n . LN(h_n) + b_n),
  says whether the token may stop after layer n.
- Training, two stages: (1) the LM with the exit losses averaged over layers
  (``multi_exit_loss``); (2) the LM frozen, the halting classifiers fitted to an oracle
  depth (``halting_loss``).
- Inference (``adaptive_forward``): layer by layer, only the tokens still *active* are
  computed (query projection, attention, output projection, FFN, exit test). An exited
  token's hidden state is copied upward unchanged, so later tokens still attend to it: each
  layer projects keys and values for every position, queries only for the active ones.
  Compute really drops; nothing is computed and then masked.
- Exit policies: ``HaltingPolicy`` (learned chi_n > threshold), ``ConfidencePolicy``
  (max_w p_n(w) > threshold, as in DeeBERT-style exits), ``FixedDepthPolicy`` (every
  token stops at layer n: the static shallower model).
- Cost: ``flops_per_token`` and ``theory_flops`` count what skipping should save, to set
  beside the FLOP counter and the clock.
- A task of known difficulty, ``VariableChains`` (each token needs k look-ups), with
  ``run_task_policy`` and ``exit_predictions`` to score every exit on it; ``char_category``
  and ``grouped_means`` for the analysis of natural text by kind of character.

Shapes: B batch, L sequence length, D model width, V vocabulary, N number of layers,
A active tokens (a flat count over the batch), Q most active tokens in one row.
Layers are numbered 1..N; "depth" is the number of layers a token went through.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.bench import count_flops, time_interleaved
from common.data import eval_windows
from common.model import GPT, Block, GPTConfig

# ---------------------------------------------------------------------------------------
# the model


class EarlyExitGPT(nn.Module):
    """A ``GPT`` whose every layer can emit the next token, plus one halting classifier per layer.

    Args:
        config: the decoder (``GPTConfig``); every layer shares the final norm and head.
        exit_weights: weight of each layer's loss in ``multi_exit_loss`` (N values >= 0,
            normalised to sum to 1); default uniform, as Elbayad et al. found best.
    """

    def __init__(self, config: GPTConfig, exit_weights: list[float] | None = None):
        super().__init__()
        weights = torch.ones(config.n_layers) if exit_weights is None else torch.tensor(exit_weights, dtype=torch.float)
        if weights.shape != (config.n_layers,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"exit_weights must be {config.n_layers} values >= 0 with a positive sum, "
                             f"got {exit_weights!r}")
        self.config = config
        self.gpt = GPT(config)
        self.halting = nn.ModuleList(nn.Linear(config.d_model, 1) for _ in range(config.n_layers))
        self.register_buffer("exit_weights", weights / weights.sum(), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.gpt.decoder.blocks

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, L) -> token + position embeddings (B, L, D), as in ``GPT``."""
        if idx.size(1) > self.config.context_length:
            raise ValueError(f"sequence of {idx.size(1)} positions exceeds context_length "
                             f"{self.config.context_length}")
        positions = torch.arange(idx.size(1), device=idx.device)
        return self.gpt.dropout(self.gpt.token_embedding(idx) + self.gpt.position_embedding(positions))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit: hidden states (..., D) -> normalised states LN(h) (..., D)."""
        return self.gpt.decoder.norm(h)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Normalised states (..., D) -> next-token logits (..., V) with the tied head."""
        return self.gpt.head(states)

    def halt_probability(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """chi_n = sigmoid(w_n . LN(h_n) + b_n): normalised states (..., D) of layer n -> (...)."""
        return torch.sigmoid(self.halting[layer - 1](states).squeeze(-1))

    def exit_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Full depth for every token: LN(h_n) (B, L, D) after each layer n = 1..N."""
        h = self.embed(idx)
        states = []
        for block in self.blocks:
            h = block(h)
            states.append(self.readout(h))
        return states

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, L) -> logits of the last layer (B, L, V): the full-depth model, with no
        read-out below the last layer (the plain GPT computation)."""
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        return self.logits(self.readout(h))


# ---------------------------------------------------------------------------------------
# training


def per_exit_nll(model: EarlyExitGPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p_n(y_t) of every exit n: idx, targets (B, L) -> (N, B, L) in nats."""
    return torch.stack([
        F.cross_entropy(model.logits(s).flatten(0, 1).float(), targets.flatten(), reduction="none")
        .view_as(targets)
        for s in model.exit_states(idx)
    ])


def multi_exit_loss(model: EarlyExitGPT, batch: tuple[torch.Tensor, torch.Tensor],
                    token_fraction: float = 1.0) -> torch.Tensor:
    """Stage 1: L = sum_n w_n * mean_t(-log p_n(y_t)), the exit losses weighted across layers.

    With ``token_fraction`` < 1 the exits below the last are scored on a random share of
    the positions (the same positions for all of them, drawn from torch's generator): an
    unbiased estimate of their mean loss that reads the V-wide head on fewer tokens. The
    last exit is always scored on every position.
    """
    if not 0 < token_fraction <= 1:
        raise ValueError(f"token_fraction must be in (0, 1], got {token_fraction}")
    x, y = batch
    targets = y.flatten()
    picked = None
    if token_fraction < 1:
        count = max(1, round(token_fraction * targets.numel()))
        picked = torch.randperm(targets.numel(), device=targets.device)[:count]
    losses = []
    for layer, states in enumerate(model.exit_states(x), start=1):
        states = states.flatten(0, 1)
        if picked is not None and layer < model.n_layers:
            states, layer_targets = states[picked], targets[picked]
        else:
            layer_targets = targets
        losses.append(F.cross_entropy(model.logits(states).float(), layer_targets))  # mean_t -log p_n(y_t)
    return (model.exit_weights * torch.stack(losses)).sum()


def oracle_depth(nll: torch.Tensor, depth_penalty: float) -> torch.Tensor:
    """Elbayad et al.'s likelihood oracle: n* = argmin_n (-log p_n(y_t) + lambda * n).

    nll (N, B, L) -> n* (B, L), layers numbered 1..N; ties go to the shallower layer.
    """
    if depth_penalty < 0:
        raise ValueError(f"depth_penalty must be >= 0, got {depth_penalty}")
    depths = torch.arange(1, nll.size(0) + 1, device=nll.device, dtype=nll.dtype)
    return (nll + depth_penalty * depths[:, None, None]).argmin(dim=0) + 1


def halting_loss(model: EarlyExitGPT, batch: tuple[torch.Tensor, torch.Tensor],
                 depth_penalty: float = 0.05) -> torch.Tensor:
    """Stage 2: fit the halting classifiers to the oracle depth; the LM is frozen.

    The exit distribution of sequential halting is q(n) = chi_n prod_{m<n} (1 - chi_m);
    its cross-entropy with a point mass at n* is
    -log chi_{n*} - sum_{m<n*} log(1 - chi_m): a binary cross-entropy on every layer up to
    n* (target 1 at n*, 0 before it; layers after n* are never reached). The last layer
    always stops, so its classifier is not trained.
    """
    x, y = batch
    with torch.no_grad():
        states = model.exit_states(x)
        target_depth = oracle_depth(torch.stack([
            F.cross_entropy(model.logits(s).flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
            for s in states]), depth_penalty)
    total, count = 0.0, 0
    for layer, s in enumerate(states[:-1], start=1):
        reached = target_depth >= layer
        if reached.any():
            logit = model.halting[layer - 1](s[reached]).squeeze(-1)
            target = (target_depth[reached] == layer).float()
            total = total + F.binary_cross_entropy_with_logits(logit, target, reduction="sum")
            count += int(reached.sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------
# exit policies


class ExitPolicy:
    """Decides, after layer n, which of the active tokens stop here.

    ``needs_logits``: the policy reads the exit's next-token distribution (so inference
    pays the V-wide head at every layer a token visits, not only at its exit).
    """

    needs_logits = False

    def should_exit(self, model: EarlyExitGPT, layer: int, states: torch.Tensor,
                    logits: torch.Tensor | None) -> torch.Tensor:
        """states (A, D), logits (A, V) or None -> exit now (A,) bool."""
        raise NotImplementedError


class ThresholdPolicy(ExitPolicy):
    """A policy that exits when a per-token score exceeds ``threshold`` (>= 0)."""

    def __init__(self, threshold: float):
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
            raise ValueError(f"{type(self).__name__} threshold must be a number >= 0 (not NaN), got {threshold!r}")
        self.threshold = float(threshold)


class HaltingPolicy(ThresholdPolicy):
    """Stop when the learned halting probability chi_n exceeds ``threshold`` (> 1: never)."""

    def should_exit(self, model, layer, states, logits):
        return model.halt_probability(layer, states) > self.threshold

    def __repr__(self) -> str:
        return f"halting>{self.threshold:g}"


class ConfidencePolicy(ThresholdPolicy):
    """Stop when the exit is confident: max_w p_n(w) > ``threshold`` (>= 1: never)."""

    needs_logits = True

    def should_exit(self, model, layer, states, logits):
        return logits.float().softmax(dim=-1).amax(dim=-1) > self.threshold

    def __repr__(self) -> str:
        return f"confidence>{self.threshold:g}"


class FixedDepthPolicy(ExitPolicy):
    """Every token stops after layer ``depth``: the static, shallower model."""

    def __init__(self, depth: int):
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
            raise ValueError(f"FixedDepthPolicy depth must be a whole number of layers >= 1, got {depth!r}")
        self.depth = int(depth)

    def should_exit(self, model, layer, states, logits):
        return torch.full(states.shape[:1], layer >= self.depth, device=states.device)

    def __repr__(self) -> str:
        return f"fixed depth {self.depth}"


# ---------------------------------------------------------------------------------------
# inference with real skipping


@dataclass
class AdaptiveOutput:
    logits: torch.Tensor  # (B, L, V): each token's logits at its exit layer
    exit_layer: torch.Tensor  # (B, L) long in 1..N


def block_on_active(block: Block, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One pre-norm block computed for the active tokens only; the others are copied.

    h (B, L, D), active (B, L) bool -> new h (B, L, D). Keys and values come from every
    position (an exited token's copied state is still attended to); queries, the output
    projection and the FFN run on the A active tokens alone. For attention the active
    queries of each row are packed to the left, (B, Q, D) with Q = the most active tokens
    in a row, and each may look at keys up to its own position.
    """
    if bool(active.all()):
        return block(h)  # nothing to skip: the dense block is the same computation, faster
    attn = block.attention
    d = h.size(-1)
    rows, cols = active.nonzero(as_tuple=True)  # (A,), (A,)
    x = block.norm1(h)  # elementwise; needed for the keys of every position
    w, b = attn.qkv.weight, attn.qkv.bias  # [W_Q; W_K; W_V]: (3D, D)
    k, v = F.linear(x, w[d:], None if b is None else b[d:]).chunk(2, dim=-1)  # (B, L, D) each
    q = F.linear(x[rows, cols], w[:d], None if b is None else b[:d])  # (A, D): Q = x W_Q
    slot = active.long().cumsum(dim=1)[rows, cols] - 1  # rank of each active token in its row
    n_slots = int(slot.max()) + 1 if slot.numel() else 0
    q_packed = q.new_zeros(h.size(0), n_slots, d)
    q_packed[rows, slot] = q
    position = torch.zeros(h.size(0), n_slots, dtype=torch.long, device=h.device)
    position[rows, slot] = cols  # padding slots sit at position 0: finite, then dropped
    allowed = torch.arange(h.size(1), device=h.device) <= position[..., None]  # (B, Q, L) causal
    y = F.scaled_dot_product_attention(  # softmax(q k^T / sqrt(E) + mask) v
        attn.split_heads(q_packed), attn.split_heads(k), attn.split_heads(v), attn_mask=allowed[:, None])
    h_active = h[rows, cols] + attn.out(attn.merge_heads(y)[rows, slot])  # x + Attn(LN(x))
    h_active = h_active + block.feed_forward(block.norm2(h_active))  # x + FFN(LN(x))
    return h.index_put((rows, cols), h_active)


@torch.no_grad()
def adaptive_forward(model: EarlyExitGPT, idx: torch.Tensor, policy: ExitPolicy) -> AdaptiveOutput:
    """Run ``idx`` (B, L) with per-token exits; exited tokens are not computed further.

    After each layer n the policy decides for the active tokens; those that stop keep h_n
    as their state in every layer above, and the last layer stops everyone. Because an
    exited state is copied upward unchanged, the final states are every token's exit
    state, and one pass of the shared head over them gives each token's exit logits (the
    head runs once per token). A policy that reads logits has paid the head at every layer
    its tokens visited: those logits are kept instead of being computed again.
    """
    h = model.embed(idx)
    batch, length = idx.shape
    active = torch.ones(batch, length, dtype=torch.bool, device=idx.device)
    exit_layer = torch.full((batch, length), model.n_layers, dtype=torch.long, device=idx.device)
    kept_logits = None  # (B, L, V) logits of the tokens that stopped early, for a policy that reads them
    for layer, block in enumerate(model.blocks, start=1):
        h = block_on_active(block, h, active)
        if layer == model.n_layers:
            break
        rows, cols = active.nonzero(as_tuple=True)
        states = model.readout(h[rows, cols])  # (A, D)
        active_logits = model.logits(states) if policy.needs_logits else None
        stop = policy.should_exit(model, layer, states, active_logits)
        rows, cols = rows[stop], cols[stop]
        if active_logits is not None:
            if kept_logits is None:
                kept_logits = active_logits.new_zeros(batch, length, active_logits.size(-1))
            kept_logits[rows, cols] = active_logits[stop]
        exit_layer[rows, cols] = layer
        active[rows, cols] = False
        if not active.any():
            break
    if kept_logits is None:
        return AdaptiveOutput(model.logits(model.readout(h)), exit_layer)
    rows, cols = active.nonzero(as_tuple=True)  # the tokens that reached the last layer
    kept_logits[rows, cols] = model.logits(model.readout(h[rows, cols]))
    return AdaptiveOutput(kept_logits, exit_layer)


@torch.no_grad()
def masked_forward(model: EarlyExitGPT, idx: torch.Tensor, policy: ExitPolicy) -> AdaptiveOutput:
    """Reference semantics of ``adaptive_forward``, computing every token at every layer.

    The dense blocks run on all tokens and the result is thrown away for the exited ones
    (h_n = h_{n-1} where a token has stopped). Same outputs, no compute saved: the test
    oracle for the skipping implementation.
    """
    h = model.embed(idx)
    active = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    exit_layer = torch.zeros(idx.shape, dtype=torch.long, device=idx.device)
    for layer, block in enumerate(model.blocks, start=1):
        h = torch.where(active[..., None], block(h), h)
        states = model.readout(h)
        stop = active.clone() if layer == model.n_layers else active & policy.should_exit(
            model, layer, states.flatten(0, 1),
            model.logits(states).flatten(0, 1) if policy.needs_logits else None).view_as(active)
        exit_layer[stop] = layer
        active &= ~stop
    return AdaptiveOutput(model.logits(model.readout(h)), exit_layer)


# ---------------------------------------------------------------------------------------
# evaluation


@dataclass
class ExitEvaluation:
    """Perplexity and exit depths of a policy over an evaluation stream."""

    policy: str
    loss: float  # mean next-token NLL (nats)
    exit_layer: torch.Tensor  # (T,) exit layer of each predicted token, in stream order
    n_layers: int
    nll: torch.Tensor | None = None  # (T,) -log p(y_t) of each predicted token at its exit (nats)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def avg_depth(self) -> float:
        return self.exit_layer.float().mean().item()

    @property
    def compute_saving(self) -> float:
        """Fraction of the layer-token computations skipped: 1 - avg_depth / N."""
        return 1.0 - self.avg_depth / self.n_layers

    def exit_hist(self) -> dict[int, float]:
        """Layer -> fraction of tokens that exit there (layers 1..N)."""
        counts = torch.bincount(self.exit_layer, minlength=self.n_layers + 1)[1:].float()
        return {layer: (c / counts.sum()).item() for layer, c in enumerate(counts, start=1)}


def windows(ids: torch.Tensor, context_length: int, batch_size: int,
            device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The consecutive evaluation windows of ``common.data.eval_windows``, on ``device``."""
    for x, y in eval_windows(ids, batch_size, context_length):
        yield x.to(device), y.to(device)


@torch.no_grad()
def evaluate_policy(model: EarlyExitGPT, ids: torch.Tensor, policy: ExitPolicy,
                    context_length: int, batch_size: int = 32) -> ExitEvaluation:
    """Perplexity and per-token exit layers of ``policy`` on the stream ``ids`` (T + 1,)."""
    device = next(model.parameters()).device
    model.eval()
    exits, losses = [], []
    for x, y in windows(ids, context_length, batch_size, device):
        out = adaptive_forward(model, x, policy)
        losses.append(F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="none").cpu())
        exits.append(out.exit_layer.flatten().cpu())
    nll = torch.cat(losses)
    return ExitEvaluation(repr(policy), nll.mean().item(), torch.cat(exits), model.n_layers, nll)


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor, context_length: int, batch_size: int = 32) -> torch.Tensor:
    """-log p(y_t) (nats) of every predicted token of the stream ``ids`` (T + 1,) -> (T,), in
    stream order, for any model returning logits (B, L, V) or an output with ``.logits``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for x, y in windows(ids, context_length, batch_size, device):
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").cpu())
    model.train(was_training)
    return torch.cat(losses)


@torch.no_grad()
def exit_nll_table(model: EarlyExitGPT, ids: torch.Tensor, context_length: int,
                   batch_size: int = 32) -> torch.Tensor:
    """-log p_n(y_t) for every exit n and predicted token t of ``ids``: (N, T)."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([per_exit_nll(model, x, y).flatten(1).cpu()
                      for x, y in windows(ids, context_length, batch_size, device)], dim=1)


def measure_policies(model: EarlyExitGPT, ids: torch.Tensor, policies: list[ExitPolicy],
                     context_length: int, bench_batch: torch.Tensor, batch_size: int = 32,
                     rounds: int = 5) -> list[dict]:
    """Quality and cost of each policy: one row per policy.

    ``ppl``, ``avg_depth``, ``compute_saving`` over the stream ``ids``; ``flops`` of
    ``adaptive_forward`` on ``bench_batch`` (B, L); ``seconds`` and ``time_vs_full``, its
    wall time alone and relative to the full-depth forward, from ``time_policies``.
    """
    rows = []
    for policy in tqdm(policies, desc="policies", leave=False):
        result = evaluate_policy(model, ids, policy, context_length, batch_size)
        rows.append({
            "policy": type(policy).__name__.removesuffix("Policy").lower(),
            "threshold": getattr(policy, "threshold", getattr(policy, "depth", None)),
            "avg_depth": result.avg_depth, "ppl": result.ppl, "compute_saving": result.compute_saving,
            "flops": count_flops(partial(adaptive_forward, model, bench_batch, policy)),
        })
    seconds = time_policies(model, bench_batch, policies, rounds)
    for row, policy in zip(rows, policies):
        row["seconds"] = seconds[repr(policy)]
        row["time_vs_full"] = seconds[repr(policy)] / seconds["full depth"]
    return rows


@torch.no_grad()
def time_policies(model: EarlyExitGPT, bench_batch: torch.Tensor, policies: list[ExitPolicy],
                  rounds: int = 5) -> dict[str, float]:
    """Median seconds of the full-depth forward ("full depth") and of ``adaptive_forward``
    under each policy (keyed by ``repr(policy)``) on ``bench_batch`` (B, L).

    Every round calls each of them once, in turn, so a machine that speeds up or slows
    down during the measurement affects them all alike; one untimed round warms up.
    """
    model.eval()
    calls = {"full depth": partial(model, bench_batch),
             **{repr(p): partial(adaptive_forward, model, bench_batch, p) for p in policies}}
    return {name: timing.median for name, timing in time_interleaved(calls, rounds).items()}


# ---------------------------------------------------------------------------------------
# character categories for the analysis of natural text

CHAR_CATEGORIES = ("space", "word start", "inside word", "digit", "punctuation", "line break")


def char_category(previous: str, char: str) -> str:
    """The kind of a predicted character given the one before it: ``space``, ``line break``,
    ``digit``, ``word start`` (a letter after a non-letter), ``inside word`` (a letter after a
    letter) or ``punctuation`` (anything else)."""
    if char == " ":
        return "space"
    if char == "\n":
        return "line break"
    if char.isdigit():
        return "digit"
    if char.isalpha():
        return "inside word" if previous.isalpha() else "word start"
    return "punctuation"


def grouped_means(values: torch.Tensor, groups: list[str], blocks: torch.Tensor, n_boot: int = 2000,
                  confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """Mean of ``values`` (T,) within each group, with a block-bootstrap interval.

    ``blocks`` (T,) says which block (e.g. evaluation window) each value belongs to; the
    bootstrap resamples whole blocks, since neighbouring tokens are not independent.
    Returns ``{group: {"mean", "ci", "tokens"}}``.
    """
    if not len(values) == len(groups) == len(blocks):
        raise ValueError(f"values, groups and blocks must have one entry per token, got "
                         f"{len(values)}, {len(groups)}, {len(blocks)}")
    names = sorted(set(groups))
    code = torch.tensor([names.index(g) for g in groups])
    block_ids, block = torch.unique(blocks, return_inverse=True)
    n_blocks, n_groups = len(block_ids), len(names)
    sums = torch.zeros(n_blocks, n_groups, dtype=torch.float64)
    counts = torch.zeros(n_blocks, n_groups, dtype=torch.float64)
    sums.index_put_((block, code), values.double(), accumulate=True)
    counts.index_put_((block, code), torch.ones(len(values), dtype=torch.float64), accumulate=True)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_blocks, (n_boot, n_blocks), generator=generator)
    boot = sums[draws].sum(1) / counts[draws].sum(1).clamp_min(1)  # (n_boot, G)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(boot, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=0)
    total = counts.sum(0)
    return {name: {"mean": (sums[:, g].sum() / total[g]).item(), "ci": [low[g].item(), high[g].item()],
                   "tokens": int(total[g])} for g, name in enumerate(names)}


# ---------------------------------------------------------------------------------------
# a task whose difficulty is known by construction: chains of variable assignments


class VariableChains:
    """Tokens of known difficulty: each token assigns a variable, the target is its value, and
    the difficulty is the number of look-ups (hops) needed to find that value.

    A sequence assigns ``n_statements`` distinct variables (of ``n_vars``), one per token. The
    first ``n_literals`` statements are ``v := c`` with distinct literal values c (0 hops: the
    answer is in the token, a copy). Each later statement is a link ``v := u`` with u assigned
    earlier: it draws its number of hops k from ``hop_weights`` (``hop_weights[k - 1]`` is the
    weight of k hops; k is at most one more than the longest chain so far) and points to a
    statement with k - 1 hops, chosen at random. Following a link needs an attention layer: u's
    token is found by its name, and u's own value is there only once u is resolved.

    Each statement is one token ``v * (n_vars + n_values) + source`` (source < n_vars: a variable,
    else the literal ``source - n_vars``); the target is the value token
    ``n_vars * (n_vars + n_values) + value``. Every position is scored; ``hops_of`` measures the
    share of each hop count.

    ``task(batch_size, generator) -> (inputs, targets)``, both (B, n_statements), as in ``common.tasks``.
    """

    def __init__(self, n_vars: int = 12, n_values: int = 16, n_statements: int = 12, n_literals: int = 4,
                 hop_weights: tuple[float, ...] = (0.3, 0.25, 0.25, 0.2)):
        for name, value in (("n_vars", n_vars), ("n_values", n_values), ("n_statements", n_statements),
                            ("n_literals", n_literals)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"VariableChains {name} must be a positive integer, got {value!r}")
        if n_statements > n_vars:
            raise ValueError(f"VariableChains assigns each variable once: n_statements ({n_statements}) "
                             f"must be <= n_vars ({n_vars})")
        if not n_literals <= min(n_statements, n_values):
            raise ValueError(f"n_literals ({n_literals}) must be <= n_statements ({n_statements}) and <= n_values "
                             f"({n_values}): the literal values of a sequence all differ")
        weights = torch.tensor(hop_weights, dtype=torch.float64)
        if weights.ndim != 1 or len(weights) < 1 or not bool(torch.isfinite(weights).all()) \
                or bool((weights < 0).any()) or weights.sum() <= 0:
            raise ValueError(f"hop_weights must be finite weights >= 0 for 1, 2, ... hops with a positive sum, "
                             f"got {hop_weights!r}")
        self.n_vars, self.n_values, self.n_statements, self.n_literals = n_vars, n_values, n_statements, n_literals
        self.hop_weights = tuple(float(w) for w in hop_weights)
        self.n_sources = n_vars + n_values
        self.value_offset = n_vars * self.n_sources
        self.vocab_size = self.value_offset + n_values
        self.max_hops = min(len(hop_weights), n_statements - n_literals)

    def __repr__(self) -> str:
        return (f"VariableChains(n_vars={self.n_vars}, n_values={self.n_values}, n_statements={self.n_statements}, "
                f"n_literals={self.n_literals}, hop_weights={self.hop_weights})")

    def __call__(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.with_hops(batch_size, generator)
        return x, y

    def with_hops(self, batch_size: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch: inputs, targets and the hops of every token, each (B, n_statements)."""
        b, s, m = batch_size, self.n_statements, self.n_literals
        cumulative = torch.tensor(self.hop_weights).cumsum(dim=0)
        var = torch.argsort(torch.rand(b, self.n_vars, generator=generator), dim=1)[:, :s]  # each assigned once
        value = torch.argsort(torch.rand(b, self.n_values, generator=generator), dim=1)[:, :s].clone()
        value[:, m:] = 0  # literals: distinct values; the links take theirs from their chain
        source = torch.cat([self.n_vars + value[:, :m], torch.zeros(b, s - m, dtype=torch.long)], dim=1)
        hops = torch.zeros(b, s, dtype=torch.long)
        draw = torch.rand(b, s, generator=generator)
        pick = torch.rand(b, s, s, generator=generator)  # which earlier statement a link points to
        rows = torch.arange(b)
        for i in range(m, s):
            k = 1 + (draw[:, i, None] * cumulative[-1] >= cumulative).sum(dim=1).clamp(max=len(cumulative) - 1)
            k = torch.minimum(k, hops[:, :i].amax(dim=1) + 1)  # a chain can only extend one that exists
            j = torch.where(hops[:, :i] == (k - 1)[:, None], pick[:, i, :i], -1.0).argmax(dim=1)
            hops[:, i], source[:, i], value[:, i] = k, var[rows, j], value[rows, j]
        return var * self.n_sources + source, self.value_offset + value, hops

    def hops_of(self, x: torch.Tensor) -> torch.Tensor:
        """The hops of every token of inputs ``x`` (B, S), read off the statements themselves."""
        var, source = x // self.n_sources, x % self.n_sources
        hops = torch.zeros_like(x)
        for i in range(x.size(1)):
            defines = (var[:, :i] == source[:, i, None])  # (B, i): the earlier statement of the source variable
            linked = defines.any(dim=1)
            previous = torch.where(defines, hops[:, :i], 0).sum(dim=1)
            hops[:, i] = torch.where(linked, previous + 1, 0)
        return hops

    def chain_of(self, x: torch.Tensor) -> torch.Tensor:
        """Which earlier statements each token's chain runs through: (B, S, S) bool, [b, i, j] true
        when statement j is on the way from statement i to its literal (j < i)."""
        var, source = x // self.n_sources, x % self.n_sources
        b, s = x.shape
        on_chain = torch.zeros(b, s, s, dtype=torch.bool)
        for i in range(s):
            defines = var[:, :i] == source[:, i, None]  # (B, i): the statement of the source variable
            on_chain[:, i, :i] = defines | (defines[:, :, None] & on_chain[:, :i, :i]).any(dim=1)
        return on_chain

    def describe(self, x: torch.Tensor, y: torch.Tensor) -> list[str]:
        """One sequence (S,) as text: ``"c := 5"``, ``"f := c"``, ... with the target value."""
        names = [chr(ord("a") + i) if i < 26 else f"x{i}" for i in range(self.n_vars)]
        out = []
        for token, target in zip(x.tolist(), y.tolist()):
            v, source = divmod(token, self.n_sources)
            right = names[source] if source < self.n_vars else str(source - self.n_vars)
            out.append(f"{names[v]} := {right}  (= {target - self.value_offset})")
        return out


# ---------------------------------------------------------------------------------------
# evaluation on a task with a known difficulty


@dataclass
class TaskRun:
    """A policy run over a fixed test set: per token, its exit layer, prediction and target (all (T,))."""

    policy: str
    exit_layer: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor
    n_layers: int

    @property
    def correct(self) -> torch.Tensor:
        return self.prediction == self.target

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item()

    @property
    def avg_depth(self) -> float:
        return self.exit_layer.float().mean().item()

    def exit_hist(self) -> dict[int, float]:
        counts = torch.bincount(self.exit_layer, minlength=self.n_layers + 1)[1:].float()
        return {layer: (c / counts.sum()).item() for layer, c in enumerate(counts, start=1)}


@torch.no_grad()
def run_task_policy(model: EarlyExitGPT, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    policy: ExitPolicy) -> TaskRun:
    """``adaptive_forward`` with ``policy`` over ``batches`` of (inputs, targets) (B, L): every
    scored position's exit layer and arg-max prediction, in order."""
    device = next(model.parameters()).device
    model.eval()
    exits, predictions, targets = [], [], []
    for x, y in batches:
        out = adaptive_forward(model, x.to(device), policy)
        scored = y.to(device) != -100
        exits.append(out.exit_layer[scored].cpu())
        predictions.append(out.logits.argmax(-1)[scored].cpu())
        targets.append(y[scored.cpu()])
    return TaskRun(repr(policy), torch.cat(exits), torch.cat(predictions), torch.cat(targets), model.n_layers)


@torch.no_grad()
def exit_predictions(model: EarlyExitGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every exit at full depth: arg-max predictions (N, T), the loss -log p_n(y) (N, T) and the
    halting probabilities chi_n (N, T) of the scored positions, in order."""
    device = next(model.parameters()).device
    model.eval()
    predictions, nll, chi = [], [], []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        scored = y != -100
        states = model.exit_states(x)
        logits = [model.logits(s) for s in states]
        predictions.append(torch.stack([lg.argmax(-1)[scored] for lg in logits]).cpu())
        nll.append(torch.stack([F.cross_entropy(lg[scored].float(), y[scored], reduction="none")
                                for lg in logits]).cpu())
        chi.append(torch.stack([model.halt_probability(n, s[scored]) for n, s in enumerate(states, start=1)]).cpu())
    return torch.cat(predictions, dim=1), torch.cat(nll, dim=1), torch.cat(chi, dim=1)


def theory_flops(config: GPTConfig, exit_layer: torch.Tensor) -> float:
    """FLOPs that ``adaptive_forward`` should spend on a batch whose tokens exit at ``exit_layer``
    (any shape), by the count of ``flops_per_token``: every token its own layers and the head,
    plus the keys and values of exited tokens in each layer where a token of the batch is still
    active (up to the deepest exit; above it the loop stops)."""
    deepest = int(exit_layer.max())
    kv = flops_per_token(config, config.n_layers - 1) - flops_per_token(config, config.n_layers - 1, copied_kv=False)
    depth = exit_layer.double()
    return float((flops_per_token(config, depth, copied_kv=False) + (deepest - depth) * kv).sum())


def flops_per_token(config: GPTConfig, depth: float, keys: float | None = None, copied_kv: bool = True) -> float:
    """FLOPs (multiply-add = 2) of one token that leaves a ``config`` stack after ``depth`` layers.

    Each layer it goes through: the projections and the FFN, 2 (4 D^2 + 2 D d_ff) (= 24 D^2 with
    d_ff = 4D), and attention over ``keys`` keys, 4 keys D (default: every position of the context,
    as the masked attention kernels compute it). With ``copied_kv``, each layer above its exit
    also projects its keys and values, 4 D^2, which later tokens read (``adaptive_forward`` does so
    in every layer where a token of the batch is still active); without, the stack simply ends
    there (a static model of that depth). Once: the output head, 2 V D. Linear in ``depth``, so
    the average over tokens is the value at the average depth.
    """
    d, keys = config.d_model, config.context_length if keys is None else keys
    visited = 2 * (4 * d * d + 2 * d * config.d_ff) + 4 * keys * d
    skipped = 4 * d * d if copied_kv else 0
    return depth * visited + (config.n_layers - depth) * skipped + 2 * config.vocab_size * d
