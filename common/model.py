"""A GPT-style decoder whose attention, feed-forward and block are pluggable.

Each notebook swaps one part (``attention=``, ``feed_forward=`` or ``block=`` factories,
each called as ``factory(config, layer_index)``) and keeps everything else identical, so
comparisons are fair.

Shapes: B batch, L sequence length, D model width, V vocabulary.

Auxiliary losses: a submodule that has an attribute ``aux_loss`` (set to a tensor during its
forward: the MoE load-balancing loss, say) has it summed into ``LMOutput.aux_loss``; the
training loop adds it to the loss. Such submodules are found once, when the model is built.

Logits: training needs them at every position; generation and scoring the next token only
at the last ones (``logits_to_keep``), which saves the (B, L, V) output head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import BACKENDS, KVCache, MultiHeadAttention


@dataclass
class GPTConfig:
    """Hyper-parameters of the decoder. Every field is checked on creation."""

    vocab_size: int
    context_length: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model
    dropout: float = 0.1
    bias: bool = True
    tie_weights: bool = True
    attention_backend: str = "sdpa"

    def __post_init__(self):
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"GPTConfig.attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


Factory = Callable[[GPTConfig, int], nn.Module]


def default_attention(config: GPTConfig, layer_index: int) -> nn.Module:
    return MultiHeadAttention(
        config.d_model, config.n_heads, config.dropout, config.bias,
        causal=True, backend=config.attention_backend, layer_index=layer_index,
    )


class FeedForward(nn.Module):
    """Position-wise FFN(x) = W_2 GELU(W_1 x + b_1) + b_2: (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


def default_feed_forward(config: GPTConfig, layer_index: int) -> nn.Module:
    return FeedForward(config.d_model, config.d_ff, config.dropout, config.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(LN(x)), then x + FFN(LN(x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, config: GPTConfig, layer_index: int,
                 attention: Factory = default_attention, feed_forward: Factory = default_feed_forward):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attention = attention(config, layer_index)
        self.norm2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.feed_forward = feed_forward(config, layer_index)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), key_padding_mask=key_padding_mask, cache=cache)
        return x + self.feed_forward(self.norm2(x))


class Decoder(nn.Module):
    """A stack of blocks and a final LayerNorm, on embeddings: (B, L, D) -> (B, L, D).

    Models with their own inputs (Decision Transformer's returns, states and actions; a
    captioner's text) embed them and run this stack.
    """

    def __init__(self, config: GPTConfig, block: Callable[..., nn.Module] | None = None,
                 attention: Factory = default_attention, feed_forward: Factory = default_feed_forward):
        super().__init__()
        self.config = config
        if block is None:
            self.blocks = nn.ModuleList(
                Block(config, i, attention, feed_forward) for i in range(config.n_layers)
            )
        else:
            self.blocks = nn.ModuleList(block(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, h: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, key_padding_mask=key_padding_mask, cache=cache)
        return self.norm(h)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, L, V)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy (nats)
    aux_loss: torch.Tensor | None = None  # sum of the submodules' auxiliary losses


class GPT(nn.Module):
    """Token + learned position embeddings, a ``Decoder``, and a (tied) output head."""

    def __init__(self, config: GPTConfig, block: Callable[..., nn.Module] | None = None,
                 attention: Factory = default_attention, feed_forward: Factory = default_feed_forward):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = Decoder(config, block, attention, feed_forward)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.token_embedding.weight  # Press & Wolf 2017
        self.apply(self._init_weights)
        self.aux_loss_modules = aux_loss_modules(self)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel() + self.position_embedding.weight.numel()
        return total

    def new_cache(self, max_length: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, max_length or self.config.context_length)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """idx (B, L) token ids -> logits (B, L, V); with targets (B, L), the loss.

        With a ``cache``, ``idx`` holds only the new tokens and positions continue from
        ``cache.length``. Targets equal to -100 are ignored. ``logits_to_keep = k > 0``
        computes the logits of the last k positions only, (B, k, V) (not with targets).
        """
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0: every position), got {logits_to_keep!r}")
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep > 0 computes only the last positions' logits; the loss needs them all")
        start = cache.length if cache is not None else 0
        length = idx.size(1)
        if start + length > self.config.context_length:
            raise ValueError(
                f"sequence of {start + length} positions exceeds context_length "
                f"{self.config.context_length}; crop the input or raise context_length"
            )
        positions = torch.arange(start, start + length, device=idx.device)
        h = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        h = self.decoder(h, key_padding_mask=key_padding_mask, cache=cache)
        logits = self.head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return LMOutput(logits, loss, collect_aux_loss(self.aux_loss_modules))


def aux_loss_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules that report an auxiliary loss (they have an ``aux_loss`` attribute).

    ``GPT`` finds them once, when it is built (looking them up on every forward cost ~8 % of a
    cached decoding step); after swapping submodules in place, set ``model.aux_loss_modules =
    aux_loss_modules(model)`` again."""
    return [m for m in model.modules() if m is not model and hasattr(m, "aux_loss")]


def collect_aux_loss(modules: list[nn.Module]) -> torch.Tensor | None:
    """Sum the ``aux_loss`` tensors that ``modules`` set in the last forward pass."""
    losses = [m.aux_loss for m in modules if isinstance(m.aux_loss, torch.Tensor)]
    return torch.stack(losses).sum() if losses else None
