"""Multi-head attention: one core that the notebooks' variants extend.

Dimension letters used in shapes:
    B batch, H heads, L query length, S key length, D model width, E = D / H head width.

Masks follow ``F.scaled_dot_product_attention``: a boolean ``allowed`` (…, L, S) is True
where a query may look at a key. ``key_padding_mask`` (B, S) follows
``nn.MultiheadAttention``: True marks a padding key that nobody may look at.

Extension points (each variant overrides one and inherits the rest):
    ``project``       x -> q, k, v                  (low-rank projections: notebook 05)
    ``attend``        q, k, v, masks -> output      (sliding window 02, adaptive span 03)
Cross-attention (notebook 07) is the same core with keys and values from another sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "explicit")


def causal_mask(query_length: int, key_length: int, device=None) -> torch.Tensor:
    """Lower-triangular ``allowed`` mask (L, S) for queries that are the last L of S positions.

    Query i sits at absolute position ``S - L + i`` and may look at keys 0 … ``S - L + i``:
    the triangle is shifted right when a KV cache holds ``S - L`` earlier positions.
    """
    offset = key_length - query_length
    if offset < 0:
        raise ValueError(f"key_length ({key_length}) must be >= query_length ({query_length})")
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(diagonal=offset)


def combine_masks(
    allowed: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Merge an ``allowed`` mask (L, S) or (B, H, L, S) with padding (B, S) into (B, 1|H, L, S).

    A query row that may look at nothing (a padding query under left padding) is opened
    to every key instead: its output is garbage that the caller ignores, but it stays
    finite, so neither the forward pass nor the gradients turn into NaN.
    """
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        allowed = keep if allowed is None else allowed & keep
    if allowed is None:
        return None
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def check_padding_mask(key_padding_mask: torch.Tensor | None, batch: int, keys: int) -> None:
    """A padding mask is (B, S): one flag per key of each sequence (cached keys included)."""
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, keys):
        raise ValueError(f"key_padding_mask must have shape (batch, keys) = ({batch}, {keys}) (True marks a "
                         f"padding key), got {tuple(key_padding_mask.shape)}")


def scaled_dot_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    dropout: float = 0.0,
    backend: str = "sdpa",
    is_causal: bool = False,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q kᵀ / √E + mask) v.

    q (B, H, L, E), k and v (B, H, S, E); ``allowed`` broadcastable to (B, H, L, S).
    Returns the output (B, H, L, E) and, with ``need_weights`` (explicit path only), the
    attention weights (B, H, L, S). ``is_causal`` (no other mask, L == S) lets SDPA use
    its fused causal kernel.
    """
    if backend == "sdpa" and not need_weights:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=is_causal and allowed is None
        )
        return out, None
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, L, S)
    if is_causal and allowed is None:
        allowed = causal_mask(q.size(-2), k.size(-2), q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, dropout, training=dropout > 0) @ v
    return out, weights if need_weights else None


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding.

    Pre-allocates (B, H, max_length, E) per layer on first use; ``append`` writes the new
    positions and returns views of everything cached so far.
    """

    def __init__(self, n_layers: int, max_length: int):
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    @property
    def length(self) -> int:
        """Positions cached (in the first layer: the one that appends first)."""
        return self.lengths[0]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, L, E) -> all keys and values of this layer (B, H, S, E)."""
        start, new = self.lengths[layer], k.size(-2)
        if start + new > self.max_length:
            raise ValueError(f"KV cache holds at most {self.max_length} positions; {start} + {new} would overflow")
        if self.keys[layer] is None:
            shape = (*k.shape[:-2], self.max_length, k.size(-1))
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][..., start : start + new, :] = k
        self.values[layer][..., start : start + new, :] = v
        self.lengths[layer] = start + new
        return self.keys[layer][..., : start + new, :], self.values[layer][..., : start + new, :]


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017) with causal/padding masks and a KV cache.

    Args:
        d_model: width D; must be divisible by ``n_heads``.
        n_heads: H.
        dropout: dropout on the attention weights (and the output projection).
        causal: mask the future (decoder) or not (encoder).
        backend: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"explicit"``
            (materialises softmax(q kᵀ/√E): slow, O(L·S) memory, but returns the weights).
        layer_index: position in the stack, so the layer finds its slot in a ``KVCache``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = True,
        backend: str = "sdpa",
        layer_index: int = 0,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout, self.causal, self.backend, self.layer_index = dropout, causal, backend, layer_index
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)  # [W_Q; W_K; W_V]
        self.out = nn.Linear(d_model, d_model, bias=bias)  # W_O
        self.resid_dropout = nn.Dropout(dropout)
        self.last_weights: torch.Tensor | None = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, H, L, E)."""
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, E) -> (B, L, D)."""
        return x.transpose(1, 2).flatten(-2)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v (B, H, L, E): Q = x W_Q, K = x W_K, V = x W_V."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, L, E), k, v (B, H, S, E) -> (B, H, L, E) and optional weights (B, H, L, S)."""
        fused_causal = self.causal and key_padding_mask is None and q.size(-2) == k.size(-2)
        # one new query at the end of the keys (a cached decoding step) may look at every key
        needs_mask = self.causal and not fused_causal and q.size(-2) > 1
        allowed = causal_mask(q.size(-2), k.size(-2), q.device) if needs_mask else None
        allowed = combine_masks(allowed, key_padding_mask)
        return scaled_dot_product(
            q, k, v, allowed,
            dropout=self.dropout if self.training else 0.0,
            backend=self.backend,
            is_causal=fused_causal,
            need_weights=need_weights,
        )

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D).

        With a ``cache``, x holds only the new positions; their keys and values are
        appended and the queries attend to everything cached. ``key_padding_mask`` (B, S)
        covers all S keys, cached ones included. With ``need_weights`` the weights
        (B, H, L, S) are kept in ``self.last_weights``.
        """
        q, k, v = self.project(x)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        check_padding_mask(key_padding_mask, q.size(0), k.size(-2))
        y, weights = self.attend(q, k, v, key_padding_mask, need_weights)
        self.last_weights = weights
        return self.resid_dropout(self.out(self.merge_heads(y)))


class CrossAttention(MultiHeadAttention):
    """Queries from the sequence x, keys and values from a memory (e.g. image patches).

    Nothing is causal here: every query may look at every (non-padding) memory position.
    """

    def __init__(self, d_model: int, n_heads: int, d_memory: int | None = None, dropout: float = 0.0,
                 bias: bool = True, backend: str = "sdpa"):
        super().__init__(d_model, n_heads, dropout, bias, causal=False, backend=backend)
        del self.qkv
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W_Q on the text
        self.kv_proj = nn.Linear(d_memory or d_model, 2 * d_model, bias=bias)  # [W_K; W_V] on the memory

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor:
        """x (B, L, D), memory (B, S, D_memory) -> (B, L, D); weights (B, H, L, S) if asked."""
        q = self.split_heads(self.q_proj(x))
        k, v = (self.split_heads(t) for t in self.kv_proj(memory).chunk(2, dim=-1))
        check_padding_mask(memory_padding_mask, q.size(0), k.size(-2))
        y, weights = self.attend(q, k, v, memory_padding_mask, need_weights)
        self.last_weights = weights
        return self.resid_dropout(self.out(self.merge_heads(y)))
