"""Adaptive attention span (Sukhbaatar et al. 2019): every head learns how far back it looks.

Letters: B batch, H heads, L query length, S key length, E head width, N blocks of queries,
K keys per block, R ramp width, Z maximum span, x = distance from a query back to a key
(0: the query's own position), w = keys a layer needs per query.

Head h owns a span z_h in [0, Z]. Its soft mask over distances,

    m_z(x) = clamp((R + z - x) / R, 0, 1),

is 1 up to distance z and falls linearly to 0 at z + R. It multiplies the attention weights,
which are then renormalised:

    a_ij = m_z(i - j) exp(s_ij) / Σ_k m_z(i - k) exp(s_ik).

That is exactly softmax(s + log m), so the fast path hands log m to
``F.scaled_dot_product_attention`` as a float mask (the ``explicit`` backend computes the
paper's multiply-then-renormalise literally and returns the weights). The L1 penalty
λ/H Σ_h z_h is left in ``aux_loss``, which ``GPT`` adds to its loss.

Trimming: a key farther than w_h = ⌈z_h + R⌉ has weight 0 in head h, so the head never
computes it. Queries are cut into blocks of size b = ⌈w/2⌉, and each block attends only to its
own keys and the ⌈(w-1)/b⌉ = 2 blocks before it: about 1.5·L·w query-key pairs instead of L·S.
Heads are trimmed each to their own window (heads with the same plan share one call), so a
layer with one long head and three short ones pays for one long head, not four.

z is stored as the fraction z / Z (parameter ``span_fraction``), so Adam moves a span by
about lr·Z positions per step whatever Z is. Stored in positions, an lr of 1e-3 would move
a span by a thousandth of a position per step: the "spans never change" trap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import MultiHeadAttention, combine_masks


def ramp_mask(distance: torch.Tensor, spans: torch.Tensor, ramp: int) -> torch.Tensor:
    """m_z(x) for distances x (...) and spans z (H,) -> (H, ...).

    Distances below 0 (future keys) give 1 here: causality is the caller's business.
    """
    z = spans.view(-1, *([1] * distance.dim()))  # (H, 1, ..., 1)
    return ((ramp + z - distance) / ramp).clamp(0.0, 1.0)  # m_z(x) = clamp((R + z - x) / R, 0, 1)


def log_span_mask(distance: torch.Tensor, spans: torch.Tensor, ramp: int) -> torch.Tensor:
    """log m_z(x) (H, ...), -inf for future keys (x < 0) and keys beyond the ramp (m = 0).

    softmax(s + log m) = m·e^s / Σ m·e^s: the post-softmax mask, renormalised. The inner
    ``where`` keeps log away from 0, so no NaN gradient flows back from masked keys.
    """
    m = ramp_mask(distance, spans, ramp)
    visible = (distance >= 0) & (m > 0)
    return torch.where(visible, torch.where(visible, m, 1.0).log(), float("-inf"))


class AdaptiveSpanAttention(MultiHeadAttention):
    """Causal multi-head attention whose heads each learn a span z_h in [0, max_span].

    Args:
        d_model, n_heads, dropout, bias, backend, layer_index: as ``MultiHeadAttention``.
        max_span: Z, the largest span a head may learn (usually the context length).
        ramp: R, the width of the soft edge of the mask (the paper uses 32).
        init_span: z of every head at initialisation, in positions, in [0, max_span].
        penalty: λ of the L1 penalty λ/H Σ_h z_h (loss units per position of span).
        trim: skip the keys beyond each head's span (same outputs, less work).
        learn_span: False freezes every span at ``init_span`` (a fixed window with the same soft edge,
            stored as a buffer, so no optimiser sees it).

    After ``forward``, ``aux_loss`` holds the penalty of this layer (a scalar tensor).
    """

    def __init__(self, d_model: int, n_heads: int, max_span: int, ramp: int = 32, init_span: float = 0.0,
                 penalty: float = 0.0, dropout: float = 0.0, bias: bool = True, backend: str = "sdpa",
                 layer_index: int = 0, trim: bool = True, learn_span: bool = True):
        super().__init__(d_model, n_heads, dropout, bias, causal=True, backend=backend, layer_index=layer_index)
        if not isinstance(max_span, int) or max_span < 1:
            raise ValueError(f"max_span must be a positive integer, got {max_span!r}")
        if not isinstance(ramp, int) or ramp < 1:
            raise ValueError(f"ramp must be a positive integer, got {ramp!r}")
        if not 0.0 <= init_span <= max_span:
            raise ValueError(f"init_span must be in [0, max_span={max_span}], got {init_span}")
        if penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {penalty}")
        self.max_span, self.ramp, self.penalty, self.trim = max_span, ramp, penalty, trim
        fraction = torch.full((n_heads,), init_span / max_span)  # z / Z
        if learn_span:
            self.span_fraction = nn.Parameter(fraction)
        else:
            self.register_buffer("span_fraction", fraction)
        self.learn_span = learn_span
        self.aux_loss: torch.Tensor | None = None

    @property
    def spans(self) -> torch.Tensor:
        """Current spans z (H,) in positions, clamped to [0, Z], without gradient."""
        return self.span_fraction.detach().clamp(0.0, 1.0) * self.max_span

    def head_windows(self, key_length: int) -> list[int]:
        """w_h = ⌈z_h + R⌉ for every head, at most S: the keys head h needs per query."""
        return [min(key_length, math.ceil(z + self.ramp)) for z in self.spans.tolist()]

    @staticmethod
    def plan_pairs(plan: tuple[int, int] | None, query_length: int, key_length: int) -> int:
        """Query-key pairs one head computes per sequence: L·S dense, ⌈L/b⌉·b·(p+1)·b with plan (b, p)."""
        if plan is None:
            return query_length * key_length
        block, before = plan
        return math.ceil(query_length / block) * block * (before + 1) * block

    def block_plan(self, query_length: int, key_length: int, window: int) -> tuple[int, int] | None:
        """(block b, earlier blocks p) for a trimmed head that needs ``window`` keys per query, or None
        when dense is cheaper.

        Blocks of b queries see their own b keys and the p·b before them, p = ⌈(w-1)/b⌉.
        Only self-attention without a cache (L == S) is blocked.
        """
        if not self.trim or query_length != key_length:
            return None
        block = math.ceil(window / 2)
        plan = (block, math.ceil((window - 1) / block))
        return None if self.plan_pairs(plan, query_length, key_length) >= query_length * key_length else plan

    def head_plans(self, query_length: int, key_length: int) -> list[tuple[int, int] | None]:
        """The block plan of every head (None: that head runs dense)."""
        return [self.block_plan(query_length, key_length, w) for w in self.head_windows(key_length)]

    def head_pairs(self, query_length: int, key_length: int | None = None) -> list[int]:
        """Query-key pairs that ``attend`` computes for each head, per sequence, at the current spans."""
        key_length = query_length if key_length is None else key_length
        return [self.plan_pairs(plan, query_length, key_length) for plan in self.head_plans(query_length, key_length)]

    def attention_pairs(self, query_length: int, key_length: int | None = None) -> int:
        """Query-key pairs that ``attend`` computes per sequence, summed over the heads."""
        return sum(self.head_pairs(query_length, key_length))

    def attention_flops(self, batch: int, query_length: int) -> int:
        """FLOPs of q kᵀ and a v: 2 matmuls × 2 FLOPs per multiply-add, per computed pair."""
        return 4 * batch * self.head_dim * self.attention_pairs(query_length)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_padding_mask: torch.Tensor | None, need_weights: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, L, E), k, v (B, H, S, E) -> (B, H, L, E) and optional weights (B, H, L, S)."""
        with torch.no_grad():
            self.span_fraction.clamp_(0.0, 1.0)  # z in [0, Z] after every optimizer step
        spans = self.span_fraction * self.max_span  # z (H,), differentiable
        self.aux_loss = self.penalty * spans.mean()  # λ/H Σ_h z_h
        if self.backend == "explicit" or need_weights:
            return self._explicit(q, k, v, spans, key_padding_mask)
        if key_padding_mask is not None:
            return self._dense(q, k, v, spans, key_padding_mask), None
        plans = self.head_plans(q.size(-2), k.size(-2))
        groups: dict[tuple[int, int] | None, list[int]] = {}
        for head, plan in enumerate(plans):
            groups.setdefault(plan, []).append(head)  # heads with the same plan share one call
        parts, order = [], []
        for plan, heads in groups.items():
            if len(groups) == 1:
                part_q, part_k, part_v, part_z = q, k, v, spans
            else:
                index = torch.tensor(heads, device=q.device)
                part_q, part_k, part_v = (t.index_select(-3, index) for t in (q, k, v))  # (B, h, ·, E)
                part_z = spans.index_select(0, index)  # (h,)
            parts.append(self._dense(part_q, part_k, part_v, part_z, None) if plan is None
                         else self._blocked(part_q, part_k, part_v, part_z, *plan))
            order += heads
        if len(parts) == 1:
            return parts[0], None
        inverse = torch.empty(len(order), dtype=torch.long, device=q.device)
        inverse[torch.tensor(order, device=q.device)] = torch.arange(len(order), device=q.device)
        return torch.cat(parts, dim=-3).index_select(-3, inverse), None  # back to head order

    def _distances(self, query_length: int, key_length: int, device) -> torch.Tensor:
        """x = i - j (L, S) for queries that are the last L of S positions."""
        queries = torch.arange(key_length - query_length, key_length, device=device)
        return queries[:, None] - torch.arange(key_length, device=device)

    def _explicit(self, q, k, v, spans, key_padding_mask):
        """The paper's form: softmax, multiply by m_z, renormalise. Returns the weights too."""
        distance = self._distances(q.size(-2), k.size(-2), q.device)  # (L, S)
        allowed = combine_masks(distance >= 0, key_padding_mask)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, L, S)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        weights = weights * ramp_mask(distance, spans, self.ramp)  # m_z(i - j) · a_ij
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalise
        dropped = F.dropout(weights, self.dropout, training=self.training and self.dropout > 0)
        return dropped @ v, weights

    def _dense(self, q, k, v, spans, key_padding_mask):
        """softmax(q kᵀ/√E + log m) v over all S keys, with SDPA."""
        distance = self._distances(q.size(-2), k.size(-2), q.device)
        mask = log_span_mask(distance, spans, self.ramp)  # (H, L, S)
        if key_padding_mask is not None:
            mask = mask.masked_fill(key_padding_mask.bool()[:, None, None, :], float("-inf"))  # (B, H, L, S)
            mask = mask.masked_fill(mask.isinf().all(dim=-1, keepdim=True), 0.0)  # padding queries: open
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.to(q.dtype), dropout_p=self.dropout if self.training else 0.0)

    def _blocked(self, q, k, v, spans, block: int, before: int):
        """Trimmed self-attention: each block of b queries sees (p + 1)·b keys, K = (p + 1)·b."""
        length = q.size(-2)
        n_blocks = math.ceil(length / block)
        tail = n_blocks * block - length
        keys = (before + 1) * block
        q = F.pad(q, (0, 0, 0, tail)).unflatten(-2, (n_blocks, block))  # (B, H, N, b, E)
        k, v = (F.pad(t, (0, 0, before * block, tail)).unfold(-2, keys, block).transpose(-1, -2)
                for t in (k, v))  # (B, H, N, K, E): block n sees keys n·b - p·b … n·b + b - 1
        i, j = torch.arange(block, device=q.device), torch.arange(keys, device=q.device)
        distance = before * block + i[:, None] - j  # (b, K), the same in every block
        mask = log_span_mask(distance, spans, self.ramp)[:, None]  # (H, 1, b, K)
        key_position = (torch.arange(n_blocks, device=q.device) * block - before * block)[:, None] + j  # (N, K)
        mask = mask.masked_fill((key_position < 0)[None, :, None, :], float("-inf"))  # (H, N, b, K)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.to(q.dtype), dropout_p=self.dropout if self.training else 0.0)
        return out.flatten(-3, -2)[..., :length, :]  # (B, H, L, E)


def adaptive_span_factory(max_span: int, ramp: int = 32, init_span: float = 0.0, penalty: float = 0.0,
                          trim: bool = True, learn_span: bool = True):
    """An ``attention=`` factory for ``GPT``: every layer an ``AdaptiveSpanAttention``."""

    def factory(config, layer_index: int) -> AdaptiveSpanAttention:
        return AdaptiveSpanAttention(
            config.d_model, config.n_heads, max_span, ramp, init_span, penalty, config.dropout,
            config.bias, config.attention_backend, layer_index, trim, learn_span)

    return factory


def fixed_span_factory(span: float, max_span: int, ramp: int = 32, trim: bool = True):
    """A fixed window: every head of every layer keeps span ``span`` (same soft edge, not learned)."""
    return adaptive_span_factory(max_span, ramp, init_span=span, penalty=0.0, trim=trim, learn_span=False)


def span_layers(model: nn.Module) -> list[AdaptiveSpanAttention]:
    """The adaptive-span attention layers of a model, in order."""
    return [m for m in model.modules() if isinstance(m, AdaptiveSpanAttention)]


def model_spans(model: nn.Module) -> torch.Tensor:
    """Current spans of every head: (layers, H), in positions."""
    return torch.stack([layer.spans.cpu() for layer in span_layers(model)])


def span_param_group(model: nn.Module, lr_scale: float = 1.0) -> dict:
    """A ``param_groups`` entry for ``train``: the span fractions, no weight decay, own lr scale."""
    return {"params": [layer.span_fraction for layer in span_layers(model) if layer.learn_span],
            "weight_decay": 0.0,
            "lr_scale": lr_scale}
