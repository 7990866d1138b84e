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

When every token has one expert (top-1) and none is dropped, dispatch and combine are a
permutation of the rows and its inverse; they then run as gathers both ways (``PermuteRows``:
the backward pass of a permutation is the inverse permutation, not a scatter-add into zeros),
with the gate applied in token order. The values are the same, and the layer runs fewer
operators, which is what its time on a CPU is made of at small widths.

Two layouts of the expert inputs (``MoEConfig.layout``): ``"padded"``, the fixed-shape
(E, C, D) buffer that accelerators want (empty slots are computed too: the FLOPs of
``capacity_factor`` x the tokens), and ``"grouped"``, the kept assignments sorted expert
by expert into an (M, D) matrix and one matmul per expert on its rows (no padding: the
FLOPs of the tokens actually served). Both drop the same assignments and give the same output.

Two routers (``MoEConfig.router``): ``"learned"`` (a linear layer, softmax, top-k) and
``"hash"`` (Roller et al. 2021, Hash Layers): a fixed table sends each input token id to one
expert, whatever its context; the control that tells what learning the routing adds. A
hash-routed model reads the token ids through a hook: build it with ``moe_gpt``.

Gates (``MoEConfig.gate``) for top-1: ``"probability"`` is the Switch gate g = p_i, which is
a little above 1/E at initialisation (the router's logits are small), so the MoE branch of
the residual stream starts about E times smaller than a dense FFN's; ``"straight-through"``
is g = 1 + p_i - sg(p_i) (sg: stop-gradient): its forward value is exactly 1, so the branch
has the dense FFN's scale, and the router gets the same gradient as with g = p_i. For
top-k > 1 both use the gates renormalised over the k chosen experts (they sum to 1).

Balancing: the Switch loss ``N_E * sum_i f_i P_i`` (f_i: share of the N*K assignments
that chose expert i, P_i: mean router probability of expert i; 1 when uniform) and the
optional ST-MoE router z-loss ``mean_n (logsumexp_i z_ni)^2``, weighted and summed into
the module attribute ``aux_loss``, which ``common.model.GPT`` adds to ``LMOutput.aux_loss``.

Where it departs from the papers: f_i counts all K choices and divides by N*K (so the
loss is 1 at perfect balance for every K; Mixtral's version grows with K); during
evaluation the capacity is by default large enough that no token is dropped (dropping
depends on the other tokens of the batch, which a causal model should not see); the
straight-through top-1 gate (an option, above).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.bench import synchronize, time_interleaved
from common.data import eval_windows
from common.model import GPT, GPTConfig, default_feed_forward
from common.train import no_weight_decay

ROUTERS = ("learned", "hash")
GATES = ("probability", "straight-through")
LAYOUTS = ("grouped", "padded")


@dataclass
class MoEConfig:
    """Settings of the mixture. Every field is checked on creation."""

    n_experts: int = 4
    top_k: int = 1
    capacity_factor: float = 1.25  # training: C = ceil(capacity_factor * K * N / E)
    eval_capacity_factor: float | None = None  # None: no token is dropped in evaluation
    aux_loss_weight: float = 1e-2  # Switch load-balancing loss coefficient (alpha)
    z_loss_weight: float = 0.0  # ST-MoE router z-loss coefficient (1e-3 in the paper)
    router: str = "learned"  # "learned" | "hash" (a fixed token-id -> expert table; no balancing losses)
    gate: str = "probability"  # top-1 gate: "probability" (Switch, g = p_i) | "straight-through" (value 1)
    layout: str = "grouped"  # expert inputs: "grouped" (no padding) | "padded" (fixed (E, C, D) buffer)
    hash_seed: int = 0  # seed of the hash tables (router="hash")

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
        for name, allowed in (("router", ROUTERS), ("gate", GATES), ("layout", LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoEConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.router == "hash" and self.top_k != 1:
            raise ValueError(f"MoEConfig.top_k must be 1 with router='hash' (a table gives one expert), "
                             f"got {self.top_k}")
        if not isinstance(self.hash_seed, int) or self.hash_seed < 0:
            raise ValueError(f"MoEConfig.hash_seed must be an integer >= 0, got {self.hash_seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Routing:
    """The router's decision for N tokens (a hash router has no logits or probabilities)."""

    logits: torch.Tensor | None  # (N, E) fp32
    probs: torch.Tensor | None  # (N, E) fp32, softmax of the logits
    experts: torch.Tensor  # (N, K) long, chosen experts, best first
    gates: torch.Tensor  # (N, K) fp32, weights of the chosen experts' outputs

    def detach(self) -> Routing:
        parts = (self.logits, self.probs, self.experts, self.gates)
        return Routing(*(None if t is None else t.detach() for t in parts))


@dataclass
class Dispatch:
    """Where each of the K*N assignments (choice-major: a = j * N + n) went."""

    buffer: torch.Tensor  # padded: (E, C, D), empty slots zero; grouped: (M, D) kept rows, expert by expert
    served: torch.Tensor  # (M,) the kept assignments, expert by expert (a grouped buffer's rows, in order)
    counts: torch.Tensor  # (E,) assignments that chose each expert, before the capacity
    slot: torch.Tensor | None = None  # padded: (M,) row of the flattened (E*C, D) buffer of each served assignment
    sizes: list[int] | None = None  # grouped: rows of each expert in the buffer
    inverse: torch.Tensor | None = None  # (N,) when ``served`` is a permutation of the tokens: its inverse

    @property
    def kept(self) -> torch.Tensor:
        """(K*N,) bool: which assignments were served."""
        assignments = int(self.counts.sum())
        return torch.zeros(assignments, dtype=torch.bool, device=self.served.device).index_fill_(0, self.served, True)


class PermuteRows(torch.autograd.Function):
    """x (N, D), perm (N,), inverse (N,) -> x[perm]; the backward pass gathers the gradient with the
    inverse permutation (``index_select``'s own backward would scatter-add it into zeros)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """perm (N,) a permutation of 0..N-1 -> its inverse: inverse[perm[i]] = i."""
    return torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))


class _LastPass(NamedTuple):
    """What a forward pass leaves for ``MoEFeedForward.stats`` (all detached)."""

    routing: Routing
    load: torch.Tensor  # (E,) f_i
    served: int  # M, the assignments within capacity
    capacity: int
    balance_loss: torch.Tensor


class MoEFeedForward(nn.Module):
    """Top-k mixture of E FFN experts: (B, L, D) -> (B, L, D).

    Each expert is ``W_2 GELU(W_1 x + b_1) + b_2`` with hidden width ``d_ff``, like
    ``common.model.FeedForward``; the E experts' weights are stacked in (E, D, F) and (E, F, D)
    tensors, which the optimizer decays like the dense FFN's matrices; the stacked biases (E, F)
    and (E, D) are marked ``no_weight_decay``, like the dense FFN's biases. After a forward
    pass the module holds ``aux_loss`` (the weighted balancing losses, a scalar tensor) and
    ``stats`` (detached routing statistics of that pass, computed when read: ``load`` (E,) share
    of assignments per expert before capacity, ``dropped`` share of assignments over capacity,
    ``balance_loss``, ``z_loss``, ``top_probability`` (mean router probability of the first
    choice), ``experts`` (N, K)).

    ``vocab_size`` is needed only by a hash router (its table has one entry per token id).
    """

    def __init__(self, d_model: int, d_ff: int, config: MoEConfig, dropout: float = 0.0, bias: bool = True,
                 vocab_size: int | None = None):
        super().__init__()
        self.config = config
        e = config.n_experts
        self.router = nn.Linear(d_model, e, bias=False) if config.router == "learned" else None
        if config.router == "hash":
            if not isinstance(vocab_size, int) or vocab_size < 1:
                raise ValueError(f"a hash router needs vocab_size (a positive integer), got {vocab_size!r}")
            self.register_buffer("hash_table", torch.arange(vocab_size) % e)  # set by moe_gpt
        self.token_ids: torch.Tensor | None = None  # (B, L) ids of the current input (hash router)
        self.w_up = nn.Parameter(torch.empty(e, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(e, d_ff, d_model))
        self.b_up = nn.Parameter(torch.zeros(e, d_ff)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(e, d_model)) if bias else None
        no_weight_decay(*(b for b in (self.b_up, self.b_down) if b is not None))  # stacked biases: (E, F) but biases
        self.dropout = nn.Dropout(dropout)
        for weight in (self.w_up, self.w_down, *([self.router.weight] if self.router is not None else [])):
            nn.init.normal_(weight, mean=0.0, std=0.02)  # as GPT initialises its Linear layers
        self.aux_loss: torch.Tensor | None = None
        self._last_pass: _LastPass | None = None  # what ``stats`` reads

    def route(self, x: torch.Tensor) -> Routing:
        """x (N, D) -> the routing of each token, computed in fp32 even under autocast."""
        if self.router is None:
            return self.hash_route(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = torch.mm(self.router.weight.float(), x.float().t())  # z = W_r x of every token, (E, N)
        # expert-major (E, N): a softmax or max over E rows of N is vectorised along the tokens, ~10x faster
        # on a CPU than over N rows of E
        probs = logits.softmax(dim=0)  # p_i(x) = exp(z_i) / sum_j exp(z_j)
        gates, experts = (probs.max(dim=0, keepdim=True) if self.config.top_k == 1
                          else probs.topk(self.config.top_k, dim=0))  # (K, N)
        gates, experts = gates.t(), experts.t()  # (N, K)
        if self.config.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)  # renormalise over the chosen K (GShard, Mixtral)
        elif self.config.gate == "straight-through":
            gates = 1.0 + gates - gates.detach()  # value 1 (the dense FFN's scale), gradient of p_i
        return Routing(logits.t(), probs.t(), experts, gates)  # "probability": g = p_i, the Switch gate

    def hash_route(self, x: torch.Tensor) -> Routing:
        """The expert of each token is ``hash_table[token id]``, gate 1."""
        if self.token_ids is None or self.token_ids.numel() != x.size(0):
            raise RuntimeError("a hash router needs the token ids of its input: build the model with moe_gpt(...), "
                               "whose hook hands each layer the ids before the forward pass")
        experts = self.hash_table[self.token_ids.reshape(-1).to(self.hash_table.device)].unsqueeze(-1)  # (N, 1)
        return Routing(None, None, experts, x.new_ones(x.size(0), 1, dtype=torch.float32))

    def capacity(self, n_tokens: int, experts: torch.Tensor) -> int:
        """Slots per expert: ceil(factor * K * N / E); without a factor, the busiest expert's load."""
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        if factor is None:
            return max(1, int(torch.bincount(experts.flatten(), minlength=self.config.n_experts).max()))
        return max(1, math.ceil(factor * self.config.top_k * n_tokens / self.config.n_experts))

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, capacity: int) -> Dispatch:
        """x (N, D), experts (N, K) -> the expert inputs (sort-based, no loop): an (E, C, D) buffer
        (``layout="padded"``) or the (M, D) kept rows sorted by expert (``"grouped"``)."""
        n, d = x.shape
        e = self.config.n_experts
        choice = experts.t().reshape(-1)  # (K*N,) choice-major: first choices take the first slots
        order = torch.argsort(choice, stable=True)  # assignments grouped by expert, in priority order
        counts = torch.bincount(choice, minlength=e)  # (E,)
        if self.config.layout == "grouped":
            sizes = counts.tolist()  # the one host sync: the per-expert matmuls need the row counts
            if self.config.top_k == 1 and max(sizes) <= capacity:  # every token served once: a permutation
                inverse = inverse_permutation(order)
                return Dispatch(PermuteRows.apply(x, order, inverse), order, counts, sizes=sizes, inverse=inverse)
        sorted_choice = choice[order]
        starts = counts.cumsum(0) - counts  # first sorted index of each expert
        position = torch.arange(choice.numel(), device=x.device) - starts[sorted_choice]  # queue place, sorted
        kept_sorted = position < capacity
        served = order[kept_sorted]  # the kept assignments, expert by expert; assignment a is token a % N
        rows = x.index_select(0, served % n)  # (M, D); its backward is an index_add (no sort)
        if self.config.layout == "padded":
            slot = (sorted_choice * capacity + position)[kept_sorted]  # (M,) expert-major row of each kept one
            buffer = x.new_zeros(e * capacity, d).index_copy(0, slot, rows)
            return Dispatch(buffer.view(e, capacity, d), served, counts, slot=slot)
        return Dispatch(rows, served, counts, sizes=[min(size, capacity) for size in sizes])

    def experts(self, h: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """expert_i(x) = W_2,i GELU(W_1,i x + b_1,i) + b_2,i on each expert's rows: (E, C, D) -> (E, C, D)
        with two batched matmuls, or (M, D) -> (M, D) with one matmul per expert on ``sizes`` rows."""
        if sizes is None:
            h = torch.bmm(h, self.w_up) if self.b_up is None else torch.baddbmm(self.b_up[:, None], h, self.w_up)
            h = F.gelu(h)
            return (torch.bmm(h, self.w_down) if self.b_down is None
                    else torch.baddbmm(self.b_down[:, None], h, self.w_down))
        w_up, w_down = self.w_up.unbind(0), self.w_down.unbind(0)  # backward: one stack, not E zero-padded selects
        b_up = self.b_up.unbind(0) if self.b_up is not None else None
        b_down = self.b_down.unbind(0) if self.b_down is not None else None
        outputs = []
        for i, rows in enumerate(h.split(list(sizes))):
            z = rows @ w_up[i] if b_up is None else torch.addmm(b_up[i], rows, w_up[i])
            z = F.gelu(z)
            outputs.append(z @ w_down[i] if b_down is None else torch.addmm(b_down[i], z, w_down[i]))
        return torch.cat(outputs)

    def combine(self, y: torch.Tensor, dispatch: Dispatch, gates: torch.Tensor) -> torch.Tensor:
        """Expert outputs -> (N, D): y(x) = sum_{i in top-k} g_i(x) expert_i(x); dropped -> 0."""
        n = gates.size(0)
        if dispatch.inverse is not None:  # top-1, nothing dropped: put the rows back in token order
            return PermuteRows.apply(y, dispatch.inverse, dispatch.served) * gates.to(y.dtype)
        rows = y.reshape(-1, y.size(-1))
        if dispatch.slot is not None:  # padded: the kept assignments' rows of the (E*C, D) outputs
            rows = rows[dispatch.slot]
        weights = gates.t().reshape(-1).index_select(0, dispatch.served).to(y.dtype)  # g of each kept one, (M,)
        return y.new_zeros(n, y.size(-1)).index_add(0, dispatch.served % n, rows * weights[:, None])

    def balance_loss(self, routing: Routing, load: torch.Tensor) -> torch.Tensor:
        """Switch load-balancing loss from the router's probabilities and the load f (E,); 0 for a hash router."""
        if routing.probs is None:
            return routing.gates.new_zeros(())
        p = routing.probs.mean(dim=0)  # P_i = (1/N) sum_n p_i(x_n)
        return self.config.n_experts * torch.sum(load * p)  # L_aux = N_E * sum_i f_i P_i (f carries no gradient)

    @staticmethod
    def z_loss(routing: Routing) -> torch.Tensor:
        """ST-MoE router z-loss (a scalar); 0 for a hash router."""
        if routing.logits is None:
            return routing.gates.new_zeros(())
        return torch.logsumexp(routing.logits, dim=-1).square().mean()  # L_z = mean_n (log sum_i e^{z_ni})^2

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
        h = self.experts(dispatch.buffer, dispatch.sizes)
        mark("experts")
        y = self.combine(h, dispatch, routing.gates)
        mark("combine")
        load = dispatch.counts.float() / routing.experts.numel()  # f_i: share of the N*K assignments
        balance = self.balance_loss(routing, load)
        self.aux_loss = self.config.aux_loss_weight * balance
        if self.config.z_loss_weight > 0:  # no logsumexp (and no graph) when the z-loss is off
            self.aux_loss = self.aux_loss + self.config.z_loss_weight * self.z_loss(routing)
        mark("balancing losses")
        self._last_pass = _LastPass(routing.detach(), load, dispatch.served.numel(), capacity, balance.detach())
        out = self.dropout(y).view(shape)
        mark("statistics, dropout, reshape")
        return out

    @property
    def stats(self) -> dict:
        """Detached routing statistics of the last forward pass, computed when read (so training pays
        nothing for them): ``load``, ``dropped``, ``capacity``, ``balance_loss``, ``z_loss``,
        ``top_probability`` and ``experts``, as described in the class docstring; {} before any pass."""
        if self._last_pass is None:
            return {}
        routing, load, served, capacity, balance = self._last_pass
        top = routing.probs.max(dim=-1).values.mean() if routing.probs is not None else routing.gates.new_ones(())
        return {"load": load, "dropped": 1.0 - load.new_tensor(served / routing.experts.numel()),
                "capacity": capacity, "balance_loss": balance, "z_loss": self.z_loss(routing),
                "top_probability": top, "experts": routing.experts}


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


def _check_every(every: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1 (an MoE layer in every every-th block), got {every!r}")


def moe_blocks(n_layers: int, every: int = 1) -> list[int]:
    """Indices of the blocks that hold an MoE layer: the last of each group of ``every`` blocks
    (``every=2``: blocks 1, 3, 5, ...)."""
    _check_every(every)
    return [index for index in range(n_layers) if index % every == every - 1]


def moe_feed_forward(config: MoEConfig, every: int = 1):
    """A ``feed_forward`` factory for ``GPT``: the blocks of ``moe_blocks(n_layers, every)`` get their own
    ``MoEFeedForward``, the others the dense FFN. ``every=2`` is the GShard and Switch Transformer
    placement (an MoE layer in every other block); 1 puts one in every block."""
    _check_every(every)

    def factory(gpt_config, layer_index: int) -> nn.Module:
        if layer_index not in moe_blocks(gpt_config.n_layers, every):
            return default_feed_forward(gpt_config, layer_index)
        return MoEFeedForward(gpt_config.d_model, gpt_config.d_ff, config, gpt_config.dropout, gpt_config.bias,
                              vocab_size=gpt_config.vocab_size)
    return factory


def balanced_hash(token_counts: Sequence[float] | torch.Tensor, n_experts: int, seed: int = 0) -> torch.Tensor:
    """A fixed, random token id -> expert table (V,) whose load is even on text with these counts.

    Token ids go most frequent first (ties in random order), each to an expert drawn at random
    among those it does not push above the mean load (the least-loaded one when none has room),
    so the table knows nothing of context or meaning, only how often each token occurs.
    """
    counts = torch.as_tensor(token_counts, dtype=torch.float64).flatten()
    if counts.numel() < 1 or bool((counts < 0).any()):
        raise ValueError("token_counts must be a non-empty sequence of counts >= 0")
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an integer >= 1, got {n_experts!r}")
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(counts.numel(), generator=generator)
    order = shuffled[torch.argsort(counts[shuffled], descending=True, stable=True)]
    target = counts.sum() / n_experts
    load = torch.zeros(n_experts, dtype=torch.float64)
    table = torch.empty(counts.numel(), dtype=torch.long)
    for token in order.tolist():
        room = torch.nonzero(load + counts[token] <= target).flatten()
        expert = (int(room[torch.randint(room.numel(), (1,), generator=generator)]) if room.numel()
                  else int(load.argmin()))
        table[token] = expert
        load[expert] += counts[token]
    return table


def _hand_token_ids(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a hash-routed GPT: each MoE layer gets the input token ids."""
    ids = args[0] if args else kwargs["idx"]
    for layer in moe_layers(model):
        layer.token_ids = ids


def moe_gpt(config: GPTConfig, moe: MoEConfig, token_counts: Sequence[float] | torch.Tensor | None = None,
            every: int = 1) -> GPT:
    """A ``GPT`` whose FFNs are ``MoEFeedForward`` layers (in every ``every``-th block, as ``moe_feed_forward``).
    With ``router="hash"`` each MoE layer gets its own ``balanced_hash`` table (seeded by ``hash_seed`` and the
    layer), balanced on ``token_counts`` (each token id's count in the training split), and a hook hands the
    layers the token ids."""
    model = GPT(config, feed_forward=moe_feed_forward(moe, every))
    if moe.router == "hash":
        if token_counts is None or len(token_counts) != config.vocab_size:
            raise ValueError(f"router='hash' needs token_counts: one count per token id ({config.vocab_size})")
        for index, layer in enumerate(moe_layers(model)):
            layer.hash_table.copy_(balanced_hash(token_counts, moe.n_experts, seed=1000 * moe.hash_seed + index))
        model.register_forward_pre_hook(_hand_token_ids, with_kwargs=True)
    return model


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE layers of a model, in forward order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@dataclass
class RoutingRecord:
    """Routing of a model over a token stream, and its next-token loss there."""

    tokens: torch.Tensor  # (T,) input token ids
    experts: torch.Tensor  # (layers, T) first-choice expert of each token in each layer
    counts: torch.Tensor  # (layers, E) assignments (all K choices) per expert
    loss: float = float("nan")  # mean next-token cross-entropy (nats), as common.train.evaluate_lm

    @property
    def load(self) -> torch.Tensor:
        """(layers, E) share of assignments per expert."""
        return self.counts / self.counts.sum(dim=-1, keepdim=True)

    def max_min_ratio(self) -> torch.Tensor:
        """(layers,) busiest / idlest expert load (inf when an expert gets nothing)."""
        return self.counts.max(dim=-1).values / self.counts.min(dim=-1).values

    def cv(self) -> torch.Tensor:
        """(layers,) coefficient of variation of the load: std / mean over experts (0: even)."""
        counts = self.counts.double()
        return counts.std(dim=-1, unbiased=False) / counts.mean(dim=-1)

    def token_purity(self) -> torch.Tensor:
        """(layers,) share of the tokens routed (first choice) to the expert their token id goes to most
        often: 1 when the routing is a function of the token id alone (a hash), about 1/E when unrelated."""
        n_experts = self.counts.size(1)
        purity = []
        for experts in self.experts:
            pairs = torch.zeros(int(self.tokens.max()) + 1, n_experts, dtype=torch.long)
            pairs.index_put_((self.tokens, experts), torch.ones_like(experts), accumulate=True)
            purity.append(pairs.max(dim=1).values.sum() / self.tokens.numel())
        return torch.stack(purity).double()


def routing_churn(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(layers,) share of the tokens whose first-choice expert differs between two ``RoutingRecord.experts``
    of the same tokens (e.g. two evaluation points of one training run)."""
    if before.shape != after.shape:
        raise ValueError(f"routings of different token streams: {tuple(before.shape)} vs {tuple(after.shape)}")
    return (before != after).double().mean(dim=1)


@torch.no_grad()
def record_routing(model: nn.Module, ids: torch.Tensor, context_length: int, batch_size: int = 32,
                   max_tokens: int | None = None) -> RoutingRecord:
    """Run ``model`` (eval mode) over consecutive windows of ``ids`` and record every MoE layer's routing
    and the model's loss (the same windows and loss as ``common.train.evaluate_lm``: one pass gives both)."""
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
    total = 0.0
    for x, y in eval_windows(ids, batch_size, context_length):
        logits = model(x.to(device)).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
        tokens.append(x.flatten())
        experts.append(torch.stack([m.stats["experts"][:, 0].cpu() for m in layers]))
        counts += torch.stack([torch.bincount(m.stats["experts"].flatten().cpu(), minlength=counts.size(1))
                               for m in layers])
    model.train(was_training)
    tokens = torch.cat(tokens)
    return RoutingRecord(tokens, torch.cat(experts, dim=1), counts, total / tokens.numel())

