"""Sliding-window (local) causal attention that never builds the L x L score matrix.

Letters: B batch, H heads, L query length, S key length, E head width, w window,
b query block (a divisor of w; w/2 by default), m = ⌈(L - w) / b⌉ query blocks after the first w positions.

Each query looks at the w most recent positions, itself included:

    allowed(i, j) = 0 <= i - j < w,     M_ij = 0 if allowed else -inf,
    out_i = softmax(q_i Kᵀ / √E + M_i) V.

A window w >= L allows every earlier position: it *is* causal dense attention.

Blocked computation (``sliding_window_attention``): the first w queries see only keys 0 .. w-1,
plain causal attention on those w keys. The remaining queries are cut into blocks of b positions;
query w + ib + r of block i needs keys from ib + r + 1 to w + ib + r, which all lie in the key window
of w + b positions starting at ib. So block i attends to one window of w + b keys through one band
mask of shape (b, w + b) that is the same for every block and head (query row r sits at position
w + ib + r, key column c at ib + c, so 0 <= i - j < w reads r < c <= r + w). The sequence end is
padded with zeros to w + mb positions; padded keys lie after every real query, so causality
already hides them.

Cost: w + b scores per query (b of them masked, but computed) instead of up to L: time O(L·(w+b)·E),
memory O(L·w) per head; the biggest temporary is one (b, w + b) score tile inside
``F.scaled_dot_product_attention``. A smaller b computes fewer masked scores but makes more, smaller
tiles; b = w/2 (1.5w scores per query instead of 2w for b = w) was the fastest forward + backward here.

The key and value windows overlap: they are strided views of the keys (no copy), made by
``_KeyWindows``, whose backward adds the window gradients back onto the keys with w/b + 1 block-shifted
additions (autograd's ``unfold``/``as_strided`` backward for overlapping views is several times slower).
Without gradients the output is written block range by block range into one buffer, so the forward
holds about 1.25 copies of the output at its peak instead of two (the kernel's output, then a ``cat``).

Queries shorter than the keys (S > L, as with a KV cache) are the last L of S positions: only the
last L + w - 1 keys can be seen, and the queries are padded at the front to that length.

Reference points: ``naive_sliding_window_attention`` materialises the (L, S) scores with
the explicit band mask (the "standard layer"), and ``flex_sliding_window`` is PyTorch's
FlexAttention with a sliding-window block mask (compiled; no backward on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def block_band_mask(window: int, device=None, block: int | None = None) -> torch.Tensor:
    """The (b, w + b) ``allowed`` mask of a query block against its key window (b = w by default).

    Row r is position w + ib + r, column c is position ib + c: allowed iff r < c <= r + w. With
    b = w the window is [previous block | own block].
    """
    block = window if block is None else block
    rows = torch.arange(block, device=device)[:, None]  # (b, 1)
    cols = torch.arange(window + block, device=device)  # (w + b,)
    return (cols > rows) & (cols <= rows + window)


def naive_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """softmax(q kᵀ/√E + M) v with the explicit (L, S) band mask M: O(L·S) time and memory.

    q (B, H, L, E), k and v (B, H, S, E) -> (B, H, L, E). The reference the fast path must match.
    """
    allowed = band_mask(q.size(-2), k.size(-2), window, q.device)  # (L, S)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, L, S): q kᵀ / √E
    scores = scores.masked_fill(~allowed, float("-inf"))  # + M
    return scores.softmax(dim=-1) @ v


def default_query_block(window: int) -> int:
    """b = w/2 for even windows of 32 or more (1.5w scores per query), else b = w."""
    return window // 2 if window >= 32 and window % 2 == 0 else window


class _KeyWindows(torch.autograd.Function):
    """x (BH, w + mb, E) -> (x[:, :w], windows (BH, m, w + b, E)): window i holds rows ib ... ib + w + b - 1.

    Both are views of x (the windows overlap: no copy). The backward adds the window gradients
    back onto the rows: w/b + 1 additions of (BH, m, b, E) slices, shifted by one block each.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int, block: int, n_blocks: int):
        rows, width = x.stride(1), x.stride(2)
        ctx.sizes = (window, block, n_blocks)
        windows = x.as_strided((x.size(0), n_blocks, window + block, x.size(2)),
                               (x.stride(0), block * rows, rows, width), x.storage_offset())
        return x[:, :window], windows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_first: torch.Tensor | None, grad_windows: torch.Tensor | None):
        window, block, n_blocks = ctx.sizes
        heads, _, _, width = grad_windows.shape
        grad = grad_windows.new_empty(heads, n_blocks + window // block, block, width)  # x as blocks of b rows
        grad[:, :n_blocks] = grad_windows[:, :, :block]  # piece 0 of window i is block i
        grad[:, n_blocks:].zero_()
        for piece in range(1, window // block + 1):  # piece j of window i is block i + j
            grad[:, piece:piece + n_blocks] += grad_windows[:, :, piece * block:(piece + 1) * block]
        grad = grad.view(heads, -1, width)
        if grad_first is not None:
            grad[:, :window] += grad_first
        return grad, None, None, None


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             dropout: float = 0.0, query_block: int | None = None) -> torch.Tensor:
    """Causal attention of each query to its w most recent positions (itself included), blocked.

    q (B, H, L, E), k and v (B, H, S, E) -> (B, H, L, E); any L (padded inside). S > L: the queries
    are the last L of S positions (a KV cache); S < L is refused. A window w >= S is exactly causal
    dense attention (the fused causal kernel is used). ``dropout`` is applied to the attention weights,
    as in ``F.scaled_dot_product_attention``. ``query_block`` (b, a divisor of w; default
    ``default_query_block(w)``) sets the tile: w + b scores per query.
    """
    check_window(window)
    length, key_length = q.size(-2), k.size(-2)
    if key_length != length:
        return _attend_last_queries(q, k, v, window, dropout, query_block)
    block = default_query_block(window) if query_block is None else query_block
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or window % block:
        raise ValueError(f"query_block must be a positive divisor of the window ({window}), got {block!r}")
    if window >= length:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    batch, heads, _, width = q.shape
    w, b, n_blocks = window, block, -(-(length - window) // block)
    padded = w + n_blocks * b
    qf, kf, vf = ((F.pad(t, (0, 0, 0, padded - length)) if padded > length else t).reshape(batch * heads, padded, width)
                  for t in (q, k, v))  # (BH, w + mb, E): zeros at the end, a free view when nothing is padded
    q_first, q_rest = qf.split([w, padded - w], dim=1)
    q_blocks = q_rest.reshape(batch * heads, n_blocks, b, width)  # (BH, m, b, E)
    (k_first, k_windows), (v_first, v_windows) = (_KeyWindows.apply(t, w, b, n_blocks) for t in (kf, vf))
    # the first w queries: causal attention on keys 0 .. w-1 (BH, 1, w, E); 4-D calls keep SDPA's fused kernel
    first = F.scaled_dot_product_attention(q_first[:, None], k_first[:, None], v_first[:, None], dropout_p=dropout,
                                           is_causal=True)
    mask = torch.zeros(b, w + b, dtype=q.dtype, device=q.device).masked_fill_(
        ~block_band_mask(w, q.device, b), float("-inf"))  # (b, w + b), shared by every block and head

    def attend(blocks: slice) -> torch.Tensor:  # query blocks against their key windows (BH, n, b, E)
        return F.scaled_dot_product_attention(q_blocks[:, blocks], k_windows[:, blocks], v_windows[:, blocks],
                                              attn_mask=mask, dropout_p=dropout)

    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = torch.cat([first.reshape(batch * heads, w // b, b, width), attend(slice(None))], dim=1)
    else:  # no autograd: write a quarter of the blocks at a time into one buffer (peak ~1.25 outputs, not 2)
        out = q.new_empty(batch * heads, w // b + n_blocks, b, width)  # (BH, w/b + m, b, E)
        out[:, :w // b] = first.reshape(batch * heads, w // b, b, width)
        step = -(-n_blocks // 4)
        for start in range(0, n_blocks, step):
            out[:, w // b + start:w // b + start + step] = attend(slice(start, start + step))
    return out.view(batch, heads, padded, width)[:, :, :length]


def _attend_last_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout: float,
                         query_block: int | None) -> torch.Tensor:
    """S != L: the L queries are the last L of the S key positions (as with a KV cache)."""
    length, key_length = q.size(-2), k.size(-2)
    if key_length < length:
        raise ValueError(f"sliding_window_attention: {key_length} keys for {length} queries; the queries are the "
                         "last positions of the keys, so the keys must be at least as many as the queries")
    seen = min(key_length, length + window - 1)  # the first query sees back to position S - L - w + 1
    k, v = k[..., key_length - seen:, :], v[..., key_length - seen:, :]
    if length == 1:  # one query sees every key kept
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    lead = seen - length  # positions before the first query: padded queries, dropped from the output
    out = sliding_window_attention(F.pad(q, (0, 0, lead, 0)), k, v, window, dropout, query_block)
    return out[..., lead:, :]


class SlidingWindowAttention(MultiHeadAttention):
    """Causal multi-head attention in which each query sees only its w most recent positions.

    Args:
        d_model, n_heads, dropout, bias, backend, layer_index: as ``MultiHeadAttention``.
        window: w >= 1 positions per query, itself included; w >= L is causal dense attention.

    Self-attention over a whole sequence (the training and scoring case) and incremental decoding
    with a ``KVCache`` run the blocked kernel, O(L·w). A ``key_padding_mask``, ``need_weights`` or
    the ``explicit`` backend take the dense path with the (L, S) band mask instead: same result,
    O(L·S) cost.
    """

    def __init__(self, d_model: int, n_heads: int, window: int, dropout: float = 0.0, bias: bool = True,
                 backend: str = "sdpa", layer_index: int = 0):
        super().__init__(d_model, n_heads, dropout, bias, causal=True, backend=backend, layer_index=layer_index)
        self.window = check_window(window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
               need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, L, E), k, v (B, H, S, E) -> (B, H, L, E) and optional weights (B, H, L, S)."""
        dropout = self.dropout if self.training else 0.0
        if key_padding_mask is None and not need_weights and self.backend == "sdpa":
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


MAX_FLEX_SHAPES = 64  # compiled FlexAttention shapes in one process before a call fails (not falls back)


def flex_sliding_window(length: int, window: int, device=None, compile: bool = True) -> Callable:
    """FlexAttention with a sliding-window block mask for sequences of ``length``.

    Returns ``attend(q, k, v) -> out`` for q, k, v (B, H, length, E). Forward only on the CPU:
    FlexAttention has no CPU backward, so a call there with an input that requires grad raises a
    ``RuntimeError`` before anything is compiled. (Letting the
    compiled call fail instead makes the compiler skip it for the rest of the process and fall back
    to the eager reference, which builds the full L x L score matrix: 2 GB at L = 4096 with 8 heads.)
    Compiled, the first call takes seconds per shape; ``compile=False`` runs the slow eager
    reference (for quick checks only). Every shape is a new compilation of ``flex_attention``; past
    the compiler's limit of recompilations (8 by default) it would silently run the eager reference
    too, so compiled calls raise the limit to ``MAX_FLEX_SHAPES`` and fail loudly beyond it.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    check_window(window)

    def in_window(b, h, q_idx, kv_idx):  # 0 <= i - j < w
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    mask = create_block_mask(in_window, None, None, length, length, device=str(device or "cpu"))
    compiled = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise RuntimeError("flex_sliding_window: FlexAttention has no backward on the CPU, and these inputs "
                               "require grad (it refuses them even under torch.no_grad()). Pass tensors that do "
                               "not (e.g. q.detach()), or use sliding_window_attention, which has a backward.")
        if not compile:
            return compiled(q, k, v, block_mask=mask)
        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_FLEX_SHAPES, fail_on_recompile_limit_hit=True):
                return compiled(q, k, v, block_mask=mask)
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            raise RuntimeError(f"flex_sliding_window: more than MAX_FLEX_SHAPES = {MAX_FLEX_SHAPES} shapes compiled "
                               "in this process; reuse shapes, or raise common.sparse_attention.MAX_FLEX_SHAPES "
                               "before the calls") from error

    return attend
