"""Low-rank factorised attention: a drop-in replacement for ``nn.MultiheadAttention``.

Each of the query, key and value projections W (E x D_in) becomes a product of two thin
matrices, W ≈ W1 W2 with W1 (E x r) and W2 (r x D_in): the layer stores r (E + D_in)
numbers instead of E·D_in, and projecting L tokens costs 2·L·r (E + D_in) FLOPs instead of
2·L·E·D_in. Both shrink only while r < E·D_in / (E + D_in) (r < E/2 when D_in = E). The
output projection stays dense.

``LowRankMultiheadAttention`` takes ``nn.MultiheadAttention``'s constructor arguments plus
``rank`` and has its forward signature and returns, masks included, so it can replace the
attention of ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` or anything
else built on ``nn.MultiheadAttention``. ``from_multihead_attention`` factors a trained
dense layer by truncated SVD (at full rank it reproduces the dense layer);
``low_rank_`` does that for every attention in a model. ``gpt_attention`` plugs either
layer into ``common.model.GPT``.

Dimension letters: N batch, L query length, S key length, E embed_dim, H num_heads,
Eh = E / H head width, r rank, K kdim, V vdim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.model import Factory, GPTConfig
from common.train import no_weight_decay


def check_rank(rank: int, max_rank: int, name: str = "rank") -> None:
    """Raise ``ValueError`` unless ``1 <= rank <= max_rank``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(f"{name} must be an integer in [1, {max_rank}], got {rank!r}")


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of W (m, n) in Frobenius norm (Eckart–Young): W1 (m, r), W2 (r, n).

    W = U Σ Vᵀ; W1 = U_r Σ_r^½, W2 = Σ_r^½ V_rᵀ, so both factors carry the same scale.
    Computed in float64 and returned in W's dtype.
    """
    check_rank(rank, min(weight.shape))
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def energy_kept(matrix: torch.Tensor) -> torch.Tensor:
    """Share of ‖W‖²_F that the best rank-r approximation keeps, for r = 1 … min(m, n).

    matrix (..., m, n) -> (..., min(m, n)): Σ_{i<=r} σ_i² / Σ_i σ_i².
    """
    s2 = torch.linalg.svdvals(matrix.detach().double()) ** 2
    return (s2.cumsum(-1) / s2.sum(-1, keepdim=True)).float()


def uniform_causal_attention(length: int) -> torch.Tensor:
    """The causal attention matrix that learned nothing: row i spreads 1 / (i + 1) over keys 0 … i. (L, L)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    return torch.ones(length, length).tril() / torch.arange(1, length + 1)[:, None]


def random_causal_attention(length: int, scale: float, n: int = 1,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Causal softmax of random scores: softmax(scale · N(0, 1) + M) with M the causal mask. (n, L, L)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1 or n < 1:
        raise ValueError(f"length and n must be positive integers, got {length!r}, {n!r}")
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale!r}")
    scores = scale * torch.randn(n, length, length, generator=generator)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


class LowRankLinear(nn.Module):
    """A linear layer whose weight has rank <= r: y = x W2ᵀ W1ᵀ + b, i.e. W = W1 W2.

    x (..., in_features) -> y (..., out_features). ``w1`` is (out_features, r), ``w2`` is
    (r, in_features). The factors are plain parameters (not ``nn.Linear``s), so a model's
    own init of its linear layers leaves them alone.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_rank(rank, min(in_features, out_features))
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.w1 = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.w2 = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw a dense weight as ``nn.Linear`` does and keep its best rank-r part."""
        dense = torch.empty(self.out_features, self.in_features)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        bias = None
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            bias = torch.empty(self.out_features).uniform_(-bound, bound)
        self.load_dense_(dense, bias)

    @torch.no_grad()
    def load_dense_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Set W1, W2 to the truncated SVD of ``weight`` (out, in) and copy ``bias``."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        w1, w2 = truncated_svd(weight, self.rank)
        self.w1.copy_(w1)
        self.w2.copy_(w2)
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-r approximation of a dense ``nn.Linear``."""
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    linear.weight.device, linear.weight.dtype)
        return layer.load_dense_(linear.weight, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) matrix W1 W2 (for inspection; ``forward`` never forms it)."""
        return self.w1 @ self.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.w2), self.w1, self.bias)  # y = (x W2ᵀ) W1ᵀ + b

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def additive_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """PyTorch's mask convention: a bool mask (True = blocked) becomes 0 / -inf; a float mask is added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ValueError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


class LowRankMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with rank-r query, key and value projections.

    Args: those of ``nn.MultiheadAttention`` (embed_dim, num_heads, dropout, bias,
    add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype), plus
        rank: r in [1, min(embed_dim, kdim, vdim)], shared by W_Q, W_K and W_V; None gives
            each projection its full rank min(embed_dim, its input width). At full rank the
            layer can represent any dense projection (with twice the parameters when
            kdim = vdim = embed_dim).

    Forward: (query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal) -> (output, weights), with the shapes, mask
    conventions and ``is_causal`` semantics of ``nn.MultiheadAttention``.

    There is no fused ``in_proj_weight``: ``in_proj_weight`` and ``in_proj_bias`` are None
    and ``_qkv_same_embed_dim`` is False, which is what keeps the fused inference kernels
    of ``nn.TransformerEncoderLayer`` (that read ``in_proj_weight``) away from this layer.
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None,
                 rank: int | None = None):
        if embed_dim <= 0 or num_heads <= 0:  # the checks and messages of nn.MultiheadAttention
            raise ValueError(f"embed_dim and num_heads must be greater than 0,"
                             f" got embed_dim={embed_dim} and num_heads={num_heads} instead")
        if embed_dim % num_heads:
            raise AssertionError("embed_dim must be divisible by num_heads")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.max_rank = min(embed_dim, self.kdim, self.vdim)
        if rank is not None:
            check_rank(rank, self.max_rank, f"rank (at most min(embed_dim, kdim, vdim) = {self.max_rank})")
        self.rank = rank
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        full = lambda d_in: min(embed_dim, d_in) if rank is None else rank  # None: each one full rank
        self.q_proj = LowRankLinear(embed_dim, embed_dim, full(embed_dim), bias, **factory)  # W_Q ≈ W1_Q W2_Q
        self.k_proj = LowRankLinear(self.kdim, embed_dim, full(self.kdim), bias, **factory)  # W_K ≈ W1_K W2_K
        self.v_proj = LowRankLinear(self.vdim, embed_dim, full(self.vdim), bias, **factory)  # W_V ≈ W1_V W2_V
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)  # W_O, dense
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            no_weight_decay(self.bias_k, self.bias_v)  # bias vectors stored as (1, 1, E)
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's init, factored: Xavier-uniform W_Q, W_K, W_V (drawn as one
        (3E, E) matrix when K = V = E, as PyTorch does), zero biases."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.kdim == self.vdim == self.embed_dim:
            dense = nn.init.xavier_uniform_(torch.empty(3 * self.embed_dim, self.embed_dim)).chunk(3)
        else:
            dense = [nn.init.xavier_uniform_(torch.empty(p.out_features, p.in_features)) for p in projections]
        for proj, weight in zip(projections, dense):
            proj.load_dense_(weight)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        for bias in (self.bias_k, self.bias_v):
            if bias is not None:
                nn.init.xavier_normal_(bias)

    @classmethod
    @torch.no_grad()
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, rank: int | None = None
                                 ) -> LowRankMultiheadAttention:
        """Factor a (trained) ``nn.MultiheadAttention`` by truncated SVD of W_Q, W_K, W_V.

        Everything else (biases, W_O, bias_k/v, flags, dropout, train/eval mode) is copied.
        At full rank the result computes the same function as ``mha``.
        """
        weight = mha.in_proj_weight
        layer = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.out_proj.bias is not None,
                    mha.bias_k is not None, mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first,
                    mha.out_proj.weight.device, mha.out_proj.weight.dtype, rank=rank)
        weights = (weight.chunk(3) if mha._qkv_same_embed_dim
                   else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        for proj, w, b in zip((layer.q_proj, layer.k_proj, layer.v_proj), weights, biases):
            proj.load_dense_(w, b)
        layer.out_proj.load_state_dict(mha.out_proj.state_dict())
        if mha.bias_k is not None:
            layer.bias_k.copy_(mha.bias_k)
            layer.bias_v.copy_(mha.bias_v)
        return layer.train(mha.training)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, H, L, Eh)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def merge_masks(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                    n: int, length: int, source: int) -> torch.Tensor | None:
        """Additive attn_mask (L, S) or (N·H, L, S) plus key_padding_mask (N, S) -> (N, 1|H, L, S)."""
        mask = None
        if attn_mask is not None:
            allowed = {2: (length, source), 3: (n * self.num_heads, length, source)}
            if tuple(attn_mask.shape) != allowed.get(attn_mask.dim()):
                raise ValueError(f"attn_mask must have shape {allowed[2]} or {allowed[3]}, "
                                 f"got {tuple(attn_mask.shape)}")
            mask = attn_mask.view(n, self.num_heads, length, source) if attn_mask.dim() == 3 else attn_mask[None, None]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, source):
                raise ValueError(f"key_padding_mask must have shape {(n, source)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            padding = key_padding_mask[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention``.

        query (L, N, E), key (S, N, K), value (S, N, V); (N, ·, ·) with ``batch_first``;
        unbatched (L, E), (S, K), (S, V). ``key_padding_mask`` (N, S) or (S): True or -inf
        marks a key nobody may attend to (a float mask is added). ``attn_mask`` (L, S) or
        (N·H, L, S), same convention. ``is_causal`` is a hint that ``attn_mask`` is causal;
        with no padding mask and no weights asked for, the fused causal kernel is used.
        Returns the output shaped like ``query`` (last dim E) and, with ``need_weights``,
        the weights (N, L, S), or (N, H, L, S) when ``average_attn_weights`` is False.
        """
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        key_padding_mask = additive_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. "
                               "You may use nn.Transformer.generate_square_subsequent_mask to create it.")
        fused_causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if fused_causal else additive_mask(attn_mask, "attn_mask", query.dtype)

        n, length = query.shape[:2]
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # x W1 W2 (N, ·, E)
        if self.bias_k is not None:  # one learned key/value every query can attend to
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (N, H, ·, Eh)
        if self.add_zero_attn:  # one all-zero key/value
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        mask = self.merge_masks(attn_mask, key_padding_mask, n, length, k.size(-2))
        mask = None if mask is None else mask.to(q.dtype)  # q may be bf16 under autocast

        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)  # q kᵀ / √Eh  (N, H, L, S)
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            weights = F.dropout(weights, dropout) if dropout > 0 else weights
            out = weights @ v  # (N, H, L, Eh)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=fused_causal)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))  # concat heads, then W_O  (N, L, E)

        if not batched:
            return out[0], None if weights is None else weights[0]
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, rank={self.rank}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")


def _pad_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Append one always-allowed key column to an additive mask (…, S) -> (…, S + 1)."""
    return None if mask is None else F.pad(mask, (0, 1))


def low_rank_(model: nn.Module, rank: int | None) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by its rank-r SVD factorisation, in place.

    ``nn.TransformerEncoder``'s nested-tensor fast path reads the fused ``in_proj_weight``,
    so it is switched off on every encoder touched.
    """
    if isinstance(model, nn.TransformerEncoder):
        model.use_nested_tensor = False
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(model, name, LowRankMultiheadAttention.from_multihead_attention(child, rank))
        else:
            low_rank_(child, rank)
    return model


class CausalSelfAttention(nn.Module):
    """Adapts an ``nn.MultiheadAttention``-like layer (batch_first) to ``common.model.GPT``'s blocks.

    x (B, L, D) -> (B, L, D): causal self-attention, then dropout on the output (as the
    project's own attention does). No KV cache: generation recomputes the prefix.
    """

    def __init__(self, attention: nn.Module, dropout: float = 0.0):
        super().__init__()
        if not getattr(attention, "batch_first", False):
            raise ValueError("attention must be built with batch_first=True")
        self.attention = attention
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, cache=None,
                need_weights: bool = False) -> torch.Tensor:
        """``key_padding_mask`` (B, L): True marks a padding token (e.g. left padding)."""
        if cache is not None:
            raise NotImplementedError("CausalSelfAttention keeps no KV cache; call the model without cache")
        n, length = x.shape[:2]
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # True = blocked
        if key_padding_mask is None:  # the fused causal kernel
            y, _ = self.attention(x, x, x, need_weights=need_weights, attn_mask=future, is_causal=True)
            return self.resid_dropout(y)
        if tuple(key_padding_mask.shape) != (n, length) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor of shape {(n, length)}, "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        # Under left padding a padding query may look at nothing: PyTorch's fused eval kernel returns NaN
        # for such a row and the NaN reaches every real position of the next layer. As the project's own
        # attention does (common.attention.combine_masks), open such a row to every key: its output is
        # garbage nobody reads, but finite. (B, L, S) -> (B·H, L, S), the layout attn_mask expects.
        blocked = future | key_padding_mask[:, None, :]
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        blocked = blocked.repeat_interleave(self.attention.num_heads, dim=0)
        y, _ = self.attention(x, x, x, need_weights=need_weights, attn_mask=blocked)
        return self.resid_dropout(y)


def gpt_attention(rank: int | None = None, dense: bool = False) -> Factory:
    """``attention=`` factory for ``GPT``: ``nn.MultiheadAttention`` if ``dense``, else rank-r low rank."""

    def factory(config: GPTConfig, layer_index: int) -> nn.Module:
        args = (config.d_model, config.n_heads, config.dropout, config.bias)
        layer = (nn.MultiheadAttention(*args, batch_first=True) if dense
                 else LowRankMultiheadAttention(*args, batch_first=True, rank=rank))
        return CausalSelfAttention(layer, config.dropout)

    return factory


def attention_parameters(model: nn.Module) -> int:
    """Parameters inside the model's attention layers (projections, biases, W_O)."""
    kinds = (nn.MultiheadAttention, LowRankMultiheadAttention)
    return sum(p.numel() for m in model.modules() if isinstance(m, kinds) for p in m.parameters())
