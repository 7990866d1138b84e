"""Sliding-window (local) causal attention that never builds the L x L score matrix.

Letters: B batch, H heads, L query length, S key length, E head width, w window,
N = ⌈L / w⌉ blocks of w positions.

Each query looks at the w most recent positions, itself included:

    allowed(i, j) = 0 <= i - j < w,     M_ij = 0 if allowed else -inf,
    out_i = softmax(q_i Kᵀ / √E + M_i) V.

A window w >= L allows every earlier position: it *is* causal dense attention.

Blocked computation (``sliding_window_attention``): cut the sequence into N blocks of w
positions (the end padded with zeros). Query nw + r of block n needs the keys from
nw + r - w + 1 to nw + r, which all lie in blocks n - 1 and n. So every block n >= 1
attends to one window of 2w keys, [block n-1 | block n], through one band mask of shape
(w, 2w) that is the same for every block and head (query row r sits at position nw + r,
key column c at (n-1)w + c, so 0 <= i - j < w reads r < c <= r + w). Block 0 has no
previous block and is plain causal attention on its own w keys, computed apart. Padded
keys lie after every real query, so causality already hides them.

Cost: 2w scores per query (half of them masked) instead of up to L: time O(L·w·E) and
memory O(L·w) per head; the biggest temporary is the (w, 2w) score tile of a block inside
``F.scaled_dot_product_attention``. The key windows are ``unfold`` views of the padded keys
(no copy), and the backward pass is autograd's (``unfold`` sums the overlapping windows).

Reference points: ``naive_sliding_window_attention`` materialises the (L, S) scores with
the explicit band mask (the "standard layer"), and ``flex_sliding_window`` is PyTorch's
FlexAttention with a sliding-window block mask (compiled; no backward on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common.attention import MultiHeadAttention, combine_masks, scaled_dot_product


def check_window(window: int) -> int:
    """Return ``window`` if it is a positive integer; else raise ``ValueError`` naming it."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer (>= 1), got {window!r}")
    return window


def band_mask(query_length: int, key_length: int, window: int, device=None) -> torch.Tensor:
    """``allowed`` (L, S): query i (at absolute position S - L + i) sees keys j with 0 <= pos_i - j < w.

    With a KV cache the L queries are the last L of S positions, as in ``causal_mask``.
    """
    check_window(window)
    if key_length < query_length:
        raise ValueError(f"key_length ({key_length}) must be >= query_length ({query_length})")
    query_pos = torch.arange(key_length - query_length, key_length, device=device)[:, None]  # (L, 1)
    distance = query_pos - torch.arange(key_length, device=device)  # (L, S): i - j
    return (distance >= 0) & (distance < window)  # 0 <= i - j < w


def block_band_mask(window: int, device=None) -> torch.Tensor:
    """The (w, 2w) ``allowed`` mask of a query block against [previous block | own block].

    Row r is position nw + r, column c is position (n-1)w + c: allowed iff r < c <= r + w.
    """
    rows = torch.arange(window, device=device)[:, None]  # (w, 1)
    cols = torch.arange(2 * window, device=device)  # (2w,)
    return (cols > rows) & (cols <= rows + window)


def naive_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """softmax(q kᵀ/√E + M) v with the explicit (L, S) band mask M: O(L·S) time and memory.

    q (B, H, L, E), k and v (B, H, S, E) -> (B, H, L, E). The reference the fast path must match.
    """
    allowed = band_mask(q.size(-2), k.size(-2), window, q.device)  # (L, S)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, L, S): q kᵀ / √E
    scores = scores.masked_fill(~allowed, float("-inf"))  # + M
    return scores.softmax(dim=-1) @ v


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of each query to its w most recent positions (itself included), blocked.

    q, k, v (B, H, L, E) -> (B, H, L, E); any L (padded inside to a multiple of w). A
    window w >= L is exactly causal dense attention (the fused causal kernel is used).
    ``dropout`` is applied to the attention weights, as in ``F.scaled_dot_product_attention``.
    """
    check_window(window)
    batch, heads, length, width = q.shape
    if window >= length:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    w, n_blocks = window, -(-length // window)
    pad = n_blocks * w - length  # zeros at the end of the sequence (a free view when pad == 0)
    qf, kf, vf = ((F.pad(t, (0, 0, 0, pad)) if pad else t).reshape(batch * heads, n_blocks * w, width)
                  for t in (q, k, v))  # (BH, Nw, E)
    q_blocks = qf.view(batch * heads, n_blocks, w, width)  # (BH, N, w, E)
    first = F.scaled_dot_product_attention(q_blocks[:, :1], kf[:, None, :w], vf[:, None, :w], dropout_p=dropout,
                                           is_causal=True)  # block 0: causal on its own keys (BH, 1, w, E)
    # keys of block n >= 1: positions (n-1)w ... (n+1)w - 1, as overlapping views (BH, N-1, 2w, E)
    k_windows, v_windows = (t.unfold(1, 2 * w, w).transpose(-1, -2) for t in (kf, vf))
    rest = F.scaled_dot_product_attention(q_blocks[:, 1:], k_windows, v_windows, dropout_p=dropout,
                                          attn_mask=block_band_mask(w, q.device))  # (BH, N-1, w, E)
    out = torch.cat([first, rest], dim=1)  # (BH, N, w, E)
    return out.view(batch, heads, n_blocks * w, width)[:, :, :length]


class SlidingWindowAttention(MultiHeadAttention):
    """Causal multi-head attention in which each query sees only its w most recent positions.

    Args:
        d_model, n_heads, dropout, bias, backend, layer_index: as ``MultiHeadAttention``.
        window: w >= 1 positions per query, itself included; w >= L is causal dense attention.

    Self-attention over a whole sequence (the training and scoring case) runs the blocked
    kernel, O(L·w). Incremental decoding with a ``KVCache``, a ``key_padding_mask``,
    ``need_weights`` or the ``explicit`` backend take the dense path with the (L, S) band
    mask instead: same result, O(L·S) cost.
    """

    def __init__(self, d_model: int, n_heads: int, window: int, dropout: float = 0.0, bias: bool = True,
                 backend: str = "sdpa", layer_index: int = 0):
        super().__init__(d_model, n_heads, dropout, bias, causal=True, backend=backend, layer_index=layer_index)
        self.window = check_window(window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
               need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, L, E), k, v (B, H, S, E) -> (B, H, L, E) and optional weights (B, H, L, S)."""
        dropout = self.dropout if self.training else 0.0
        blocked = (key_padding_mask is None and not need_weights and self.backend == "sdpa"
                   and q.size(-2) == k.size(-2))
        if blocked:
            return sliding_window_attention(q, k, v, self.window, dropout), None
        allowed = combine_masks(band_mask(q.size(-2), k.size(-2), self.window, q.device), key_padding_mask)
        return scaled_dot_product(q, k, v, allowed, dropout=dropout, backend=self.backend, need_weights=need_weights)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, window={self.window}"


def sliding_window_factory(window: int) -> Callable:
    """``attention=`` factory for ``common.model.GPT``: every layer gets a window of w positions."""
    check_window(window)

    def factory(config, layer_index: int) -> SlidingWindowAttention:
        return SlidingWindowAttention(config.d_model, config.n_heads, window, config.dropout, config.bias,
                                      backend=config.attention_backend, layer_index=layer_index)

    return factory


def flex_sliding_window(length: int, window: int, device=None, compile: bool = True) -> Callable:
    """FlexAttention with a sliding-window block mask for sequences of ``length``.

    Returns ``attend(q, k, v) -> out`` for q, k, v (B, H, length, E). Forward only on the CPU
    (FlexAttention has no CPU backward). Compiled, the first call takes seconds per shape;
    ``compile=False`` runs the slow eager reference (for quick checks only).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    check_window(window)

    def in_window(b, h, q_idx, kv_idx):  # 0 <= i - j < w
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    mask = create_block_mask(in_window, None, None, length, length, device=str(device or "cpu"))
    attend = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    return lambda q, k, v: attend(q, k, v, block_mask=mask)
