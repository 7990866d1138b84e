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

Shapes: B batch, L sequence length, D model width, V vocabulary, N number of layers,
A active tokens (a flat count over the batch), Q most active tokens in one row.
Layers are numbered 1..N; "depth" is the number of layers a token went through.
"""

from __future__ import annotations

import math
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
        """idx (B, L) -> logits of the last layer (B, L, V): the full-depth model."""
        return self.logits(self.exit_states(idx)[-1])


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
        if threshold < 0:
            raise ValueError(f"{type(self).__name__} threshold must be >= 0, got {threshold}")
        self.threshold = threshold


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
        if depth < 1:
            raise ValueError(f"FixedDepthPolicy depth must be >= 1, got {depth}")
        self.depth = depth

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
    total, count, exits = 0.0, 0, []
    for x, y in windows(ids, context_length, batch_size, device):
        out = adaptive_forward(model, x, policy)
        total += F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
        exits.append(out.exit_layer.flatten().cpu())
    return ExitEvaluation(repr(policy), total / count, torch.cat(exits), model.n_layers)


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
# token categories for the analysis

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its
itself just me more most my myself no nor not now of off on once only or other our ours out
over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours 's n't 're 've 'm 'll 'd
""".split())


def token_category(token: str) -> str:
    """The word class of a PTB token: stop-word, number, punctuation/symbol, <eos>, <unk>, content."""
    if token in ("<eos>", "<unk>"):
        return token
    if token == "N":  # PTB writes every number as N
        return "number"
    if token in STOP_WORDS:
        return "stop-word"
    if not any(c.isalnum() for c in token):
        return "punctuation/symbol"
    return "content word"


def frequency_band(count: int, frequent_at: int = 1000, rare_below: int = 50) -> str:
    """``frequent`` (>= frequent_at training occurrences), ``rare`` (< rare_below) or ``middle``."""
    if rare_below > frequent_at:
        raise ValueError(f"rare_below ({rare_below}) must be <= frequent_at ({frequent_at})")
    return "frequent" if count >= frequent_at else "rare" if count < rare_below else "middle"
