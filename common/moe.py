"""A mixture-of-experts feed-forward layer that stays balanced (Shazeer et al. 2017; Switch
Transformer, Fedus et al. 2021; ST-MoE, Zoph et al. 2022; Mixtral).

A drop-in for the FFN sub-layer of a block: ``GPT(config, feed_forward=moe_feed_forward(MoEConfig()))``.

Dimension letters: N tokens (B * L flattened), D model width, F expert hidden width,
E experts, K experts per token (top-k), C capacity (slots per expert).

The forward pass in four steps, each a method so it can be shown and timed on its own:

1. ``route``: router logits in fp32, softmax, top-k experts and their gates.
2. ``dispatch``: a stable sort by expert gives every assignment its position in its
   expert's queue; assignments past the capacity C are dropped; the rest are copied into
   an (E, C, D) buffer (first choices of all tokens before any second choice, then token
   order, as in GShard).
3. ``experts``: all E expert FFNs at once with two batched matmuls on the buffer.
4. ``combine``: each assignment gathers its expert's output and weighs it by its gate. A
   dropped token gets zero from the layer, so the block's residual connection carries it
   through unchanged.

Balancing: the Switch loss ``N_E * sum_i f_i P_i`` (f_i: share of the N*K assignments
that chose expert i, P_i: mean router probability of expert i; 1 when uniform) and the
optional ST-MoE router z-loss ``mean_n (logsumexp_i z_ni)^2``, weighted and summed into
the module attribute ``aux_loss``, which ``common.model.GPT`` adds to ``LMOutput.aux_loss``.

Where it departs from the papers: f_i counts all K choices and divides by N*K (so the
loss is 1 at perfect balance for every K; Mixtral's version grows with K); during
evaluation the capacity is by default large enough that no token is dropped (dropping
depends on the other tokens of the batch, which a causal model should not see).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.bench import synchronize, time_interleaved
from common.data import eval_windows


@dataclass
class MoEConfig:
    """Settings of the mixture. Every field is checked on creation."""

    n_experts: int = 4
    top_k: int = 1
    capacity_factor: float = 1.25  # training: C = ceil(capacity_factor * K * N / E)
    eval_capacity_factor: float | None = None  # None: no token is dropped in evaluation
    aux_loss_weight: float = 1e-2  # Switch load-balancing loss coefficient (alpha)
    z_loss_weight: float = 0.0  # ST-MoE router z-loss coefficient (1e-3 in the paper)

    def __post_init__(self):
        if not isinstance(self.n_experts, int) or self.n_experts < 1:
            raise ValueError(f"MoEConfig.n_experts must be an integer >= 1, got {self.n_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"MoEConfig.top_k must be an integer in [1, n_experts={self.n_experts}], "
                             f"got {self.top_k!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoEConfig.capacity_factor must be > 0, got {self.capacity_factor!r}")
        if self.eval_capacity_factor is not None and not self.eval_capacity_factor > 0:
            raise ValueError(f"MoEConfig.eval_capacity_factor must be > 0 or None, got {self.eval_capacity_factor!r}")
        for name in ("aux_loss_weight", "z_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Routing:
    """The router's decision for N tokens."""

    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32, softmax of the logits
    experts: torch.Tensor  # (N, K) long, chosen experts, best first
    gates: torch.Tensor  # (N, K) fp32, weights of the chosen experts' outputs


@dataclass
class Dispatch:
    """Where each of the K*N assignments (choice-major: a = j * N + n) went."""

    buffer: torch.Tensor  # (E, C, D) expert inputs; empty slots are zero
    slot: torch.Tensor  # (K*N,) row of the flattened buffer, E*C for a dropped assignment
    kept: torch.Tensor  # (K*N,) bool


class MoEFeedForward(nn.Module):
    """Top-k mixture of E FFN experts: (B, L, D) -> (B, L, D).

    Each expert is ``W_2 GELU(W_1 x + b_1) + b_2`` with hidden width ``d_ff``, like
    ``common.model.FeedForward``; the E experts' weights are stacked so one batched matmul
    runs them all. After a forward pass the module holds ``aux_loss`` (the weighted
    balancing losses, a scalar tensor) and ``stats`` (detached routing statistics of that
    pass: ``load`` (E,) share of assignments per expert before capacity, ``dropped``
    share of assignments over capacity, ``balance_loss``, ``z_loss``, ``experts`` (N, K)).
    """

    def __init__(self, d_model: int, d_ff: int, config: MoEConfig, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.config = config
        e = config.n_experts
        self.router = nn.Linear(d_model, e, bias=False)
        self.w_up = nn.Parameter(torch.empty(e, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(e, d_ff, d_model))
        self.b_up = nn.Parameter(torch.zeros(e, d_ff)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(e, d_model)) if bias else None
        self.dropout = nn.Dropout(dropout)
        for weight in (self.router.weight, self.w_up, self.w_down):
            nn.init.normal_(weight, mean=0.0, std=0.02)  # as GPT initialises its Linear layers
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict = {}

    def route(self, x: torch.Tensor) -> Routing:
        """x (N, D) -> the routing of each token, computed in fp32 even under autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # z = W_r x, (N, E)
        probs = logits.softmax(dim=-1)  # p_i(x) = exp(z_i) / sum_j exp(z_j)
        gates, experts = probs.topk(self.config.top_k, dim=-1)  # (N, K)
        if self.config.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)  # renormalise over the chosen K (GShard, Mixtral)
        return Routing(logits, probs, experts, gates)  # K = 1 keeps the raw p_i: the router's gradient (Switch)

    def capacity(self, n_tokens: int, experts: torch.Tensor) -> int:
        """Slots per expert: ceil(factor * K * N / E); without a factor, the busiest expert's load."""
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        if factor is None:
            return max(1, int(torch.bincount(experts.flatten(), minlength=self.config.n_experts).max()))
        return max(1, math.ceil(factor * self.config.top_k * n_tokens / self.config.n_experts))

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, capacity: int) -> Dispatch:
        """x (N, D), experts (N, K) -> the (E, C, D) buffer of expert inputs (sort-based, no loop)."""
        n, d = x.shape
        e = self.config.n_experts
        choice = experts.t().reshape(-1)  # (K*N,) choice-major: first choices take the first slots
        order = torch.argsort(choice, stable=True)  # assignments grouped by expert, in priority order
        counts = torch.bincount(choice, minlength=e)  # (E,)
        starts = counts.cumsum(0) - counts  # first sorted index of each expert
        position = torch.empty_like(choice)
        position[order] = torch.arange(choice.numel(), device=x.device) - starts[choice[order]]
        kept = position < capacity
        slot = torch.where(kept, choice * capacity + position, e * capacity)  # E*C: the discard row
        token = torch.arange(n, device=x.device).repeat(self.config.top_k)  # (K*N,)
        buffer = x.new_zeros(e * capacity + 1, d).index_copy(0, slot, x[token])
        return Dispatch(buffer[:-1].view(e, capacity, d), slot, kept)

    def experts(self, h: torch.Tensor) -> torch.Tensor:
        """All experts at once: (E, C, D) -> (E, C, D), expert_i(x) = W_2,i GELU(W_1,i x + b_1,i) + b_2,i."""
        h = torch.bmm(h, self.w_up) if self.b_up is None else torch.baddbmm(self.b_up[:, None], h, self.w_up)
        h = F.gelu(h)
        return torch.bmm(h, self.w_down) if self.b_down is None else torch.baddbmm(self.b_down[:, None], h, self.w_down)

    def combine(self, y: torch.Tensor, dispatch: Dispatch, gates: torch.Tensor) -> torch.Tensor:
        """Expert outputs (E, C, D) -> (N, D): y(x) = sum_{i in top-k} g_i(x) expert_i(x); dropped -> 0."""
        k, n = gates.shape[1], gates.shape[0]
        rows = torch.cat([y.flatten(0, 1), y.new_zeros(1, y.size(-1))])  # the discard row reads as zero
        picked = rows[dispatch.slot].view(k, n, -1)  # (K, N, D)
        return (picked * gates.t().unsqueeze(-1).to(y.dtype)).sum(dim=0)

    def balance_losses(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Switch load-balancing loss, ST-MoE z-loss (scalars) and the load f (E,)."""
        e = self.config.n_experts
        f = torch.bincount(routing.experts.flatten(), minlength=e).float() / routing.experts.numel()
        p = routing.probs.mean(dim=0)  # P_i = (1/N) sum_n p_i(x_n)
        balance = e * torch.sum(f * p)  # L_aux = N_E * sum_i f_i P_i (f carries no gradient)
        z_loss = torch.logsumexp(routing.logits, dim=-1).square().mean()  # L_z = (1/N) sum_n (log sum_i e^{z_ni})^2
        return balance, z_loss, f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_marked(x, lambda step: None)

    def forward_marked(self, x: torch.Tensor, mark: Callable[[str], None]) -> torch.Tensor:
        """The forward pass, calling ``mark(step)`` as each of its steps ends (for timing)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.route(x)
        mark("route")
        capacity = self.capacity(x.size(0), routing.experts)
        dispatch = self.dispatch(x, routing.experts, capacity)
        mark("dispatch")
        h = self.experts(dispatch.buffer)
        mark("experts")
        y = self.combine(h, dispatch, routing.gates)
        mark("combine")
        balance, z_loss, load = self.balance_losses(routing)
        self.aux_loss = self.config.aux_loss_weight * balance + self.config.z_loss_weight * z_loss
        mark("balancing losses")
        self.stats = {"load": load, "dropped": 1.0 - dispatch.kept.float().mean(), "capacity": capacity,
                      "balance_loss": balance.detach(), "z_loss": z_loss.detach(),
                      "experts": routing.experts.detach()}
        out = self.dropout(y).view(shape)
        mark("statistics, dropout, reshape")
        return out


def forward_step_times(layer: MoEFeedForward, x: torch.Tensor, rounds: int = 20,
                       references: dict[str, Callable[[], object]] | None = None,
                       device: torch.device | str | None = None) -> dict[str, float]:
    """Median seconds of each step of ``layer``'s forward on ``x``, of the whole forward, and
    of each ``references`` callable, all measured in the same rounds.

    Every round runs the forward once step by step (a clock read, after a device sync, as
    each step ends), then the plain forward once, then each reference once, so a busy
    machine slows them all alike and the steps add up to (about) the whole. The first
    round is a warm-up and is not counted.
    """
    step_samples: dict[str, list[float]] = defaultdict(list)
    clock = [0.0]  # the last clock read

    def mark(step: str) -> None:
        synchronize(device)
        now = time.perf_counter()
        step_samples[step].append(now - clock[0])
        clock[0] = now

    def step_by_step() -> None:
        synchronize(device)
        clock[0] = time.perf_counter()
        layer.forward_marked(x, mark)

    totals = time_interleaved({"steps": step_by_step, "whole layer": lambda: layer(x), **(references or {})},
                              rounds, warmup=1, device=device)
    del totals["steps"]
    steps = {step: statistics.median(seconds[1:]) for step, seconds in step_samples.items()}  # [0]: warm-up
    return {**steps, **{name: timing.median for name, timing in totals.items()}}


def moe_feed_forward(config: MoEConfig):
    """A ``feed_forward`` factory for ``GPT``: each block gets its own ``MoEFeedForward``."""
    def factory(gpt_config, layer_index: int) -> MoEFeedForward:
        return MoEFeedForward(gpt_config.d_model, gpt_config.d_ff, config, gpt_config.dropout, gpt_config.bias)
    return factory


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE layers of a model, in forward order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@dataclass
class RoutingRecord:
    """Routing of a model over a token stream."""

    tokens: torch.Tensor  # (T,) input token ids
    experts: torch.Tensor  # (layers, T) first-choice expert of each token in each layer
    counts: torch.Tensor  # (layers, E) assignments (all K choices) per expert

    @property
    def load(self) -> torch.Tensor:
        """(layers, E) share of assignments per expert."""
        return self.counts / self.counts.sum(dim=-1, keepdim=True)

    def max_min_ratio(self) -> torch.Tensor:
        """(layers,) busiest / idlest expert load (inf when an expert gets nothing)."""
        return self.counts.max(dim=-1).values / self.counts.min(dim=-1).values


@torch.no_grad()
def record_routing(model: nn.Module, ids: torch.Tensor, context_length: int, batch_size: int = 32,
                   max_tokens: int | None = None) -> RoutingRecord:
    """Run ``model`` (eval mode) over consecutive windows of ``ids`` and record every MoE layer's routing."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoEFeedForward layer to record")
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens, experts = [], []
    counts = torch.zeros(len(layers), layers[0].config.n_experts, dtype=torch.long)
    for x, _ in eval_windows(ids, batch_size, context_length):
        model(x.to(device))
        tokens.append(x.flatten())
        experts.append(torch.stack([m.stats["experts"][:, 0].cpu() for m in layers]))
        counts += torch.stack([torch.bincount(m.stats["experts"].flatten().cpu(), minlength=counts.size(1))
                               for m in layers])
    model.train(was_training)
    return RoutingRecord(torch.cat(tokens), torch.cat(experts, dim=1), counts)

