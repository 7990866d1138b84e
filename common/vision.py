"""A Vision Transformer encoder and a captioning decoder that reads it through cross-attention.

Shapes: B batch, C channels, H = W image side, p patch side, P = (H/p)² patches,
D model width, T caption length, V vocabulary.

    image (B, C, H, W) ──ViT──> patches (B, P, D) ───────────────┐ keys, values
    caption so far (B, T) ──embed──> causal self-attention ──> cross-attention ──> FFN ──> logits (B, T, V)
                                                      queries ───┘
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import CrossAttention, MultiHeadAttention
from common.model import Block, FeedForward, GPTConfig
from common.train import no_weight_decay


@dataclass
class CaptionerConfig:
    vocab_size: int
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    d_model: int = 128
    n_heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    max_caption_length: int = 16
    dropout: float = 0.1
    patch_positions: str = "sincos"  # "sincos": fixed 2-D sine/cosine (MAE); "learned": a free table (ViT)
    word_dropout: float = 0.0  # training only: share of caption words (after the start token) hidden from the decoder

    def __post_init__(self):
        for name in ("vocab_size", "image_size", "patch_size", "channels", "d_model", "n_heads",
                     "encoder_layers", "decoder_layers", "max_caption_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"CaptionerConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CaptionerConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if not 0 <= self.word_dropout < 1:
            raise ValueError(f"CaptionerConfig.word_dropout must be in [0, 1), got {self.word_dropout!r}")
        if self.patch_positions not in ("sincos", "learned"):
            raise ValueError(f"CaptionerConfig.patch_positions must be 'sincos' or 'learned', "
                             f"got {self.patch_positions!r}")
        if self.patch_positions == "sincos" and self.d_model % 4:
            raise ValueError(f"CaptionerConfig.d_model ({self.d_model}) must be a multiple of 4 for "
                             f"2-D sine/cosine patch positions")
        if self.d_model % self.n_heads:
            raise ValueError(f"CaptionerConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block_config(self, n_layers: int, context: int) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, context_length=context, d_model=self.d_model,
                         n_layers=n_layers, n_heads=self.n_heads, dropout=self.dropout)


def sincos_positions_2d(side: int, d_model: int) -> torch.Tensor:
    """Fixed 2-D positions of a side x side grid (MAE, He et al. 2022) -> (side², D), row-major.

    Half of the channels encode the row, half the column, each with the 1-D code of Vaswani
    et al.: PE(pos, 2i) = sin(pos / 10000^(4i/D)), PE(pos, 2i+1) = cos(pos / 10000^(4i/D)).
    Unlike a freshly initialised table (std 0.02), these are unit-scale from the first step,
    so "where is this patch" is readable at once.
    """
    quarter = d_model // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (D/4,)
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")  # (side, side) each

    def code(pos: torch.Tensor) -> torch.Tensor:  # (side²,) -> (side², D/2)
        angles = pos.flatten()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([code(rows), code(cols)], dim=-1)


class ViTEncoder(nn.Module):
    """ViT (Dosovitskiy et al. 2021): patches -> linear embedding + positions -> encoder blocks.

    image (B, C, H, W) -> patch features (B, P, D). No class token: the decoder reads every patch.
    """

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        # x_p W_E for every p x p patch: a convolution with stride p is exactly that linear map
        self.patch_embedding = nn.Conv2d(config.channels, config.d_model, config.patch_size, stride=config.patch_size)
        side = config.image_size // config.patch_size
        if config.patch_positions == "learned":
            self.position_embedding = nn.Parameter(torch.randn(1, config.n_patches, config.d_model) * 0.02)
            no_weight_decay(self.position_embedding)  # a table of positions, not a weight matrix
        else:
            positions = sincos_positions_2d(side, config.d_model)[None]  # (1, P, D)
            self.register_buffer("position_embedding", positions, persistent=False)
        block_config = config.block_config(config.encoder_layers, config.n_patches)

        def bidirectional(c: GPTConfig, i: int) -> nn.Module:
            return MultiHeadAttention(c.d_model, c.n_heads, c.dropout, causal=False, layer_index=i)

        self.blocks = nn.ModuleList(Block(block_config, i, attention=bidirectional)
                                    for i in range(config.encoder_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        wanted = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != wanted:
            raise ValueError(f"ViTEncoder expects images of shape (batch, {c.channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(images.shape)}: resize the images to the configured "
                             f"image_size (a larger image would silently lose its border pixels)")
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, P, D)
        h = self.dropout(patches + self.position_embedding)  # z_0 = [x_p E] + E_pos
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


class CrossAttentionBlock(nn.Module):
    """Decoder block: x + SelfAttn(LN x) (causal), x + CrossAttn(LN x, patches), x + FFN(LN x)."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.self_attention = MultiHeadAttention(config.d_model, config.n_heads, config.dropout, causal=True,
                                                 layer_index=layer_index)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.cross_attention = CrossAttention(config.d_model, config.n_heads, dropout=config.dropout)
        self.norm3 = nn.LayerNorm(config.d_model)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, need_weights: bool = False) -> torch.Tensor:
        x = x + self.self_attention(self.norm1(x))
        x = x + self.cross_attention(self.norm2(x), memory, need_weights=need_weights)  # Q text, K/V patches
        return x + self.feed_forward(self.norm3(x))


class Captioner(nn.Module):
    """ViT encoder + Transformer decoder with cross-attention; output head tied to the embeddings."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config)
        decoder_config = config.block_config(config.decoder_layers, config.max_caption_length)
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_caption_length, config.d_model)
        self.blocks = nn.ModuleList(CrossAttentionBlock(decoder_config, i) for i in range(config.decoder_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor, need_weights: bool = False) -> torch.Tensor:
        """tokens (B, T), memory (B, P, D) -> logits (B, T, V)."""
        if tokens.size(1) > self.config.max_caption_length:
            raise ValueError(f"caption of {tokens.size(1)} tokens exceeds max_caption_length "
                             f"{self.config.max_caption_length}")
        positions = torch.arange(tokens.size(1), device=tokens.device)
        words = self.token_embedding(tokens)
        if self.training and self.config.word_dropout > 0:
            # word dropout (Bowman et al. 2016): the decoder must name what it sees, not what the
            # words so far make likely (e.g. "red" -> "circle" because red squares were never seen)
            keep = torch.rand(tokens.shape, device=tokens.device) >= self.config.word_dropout
            keep[:, 0] = True  # the start token stays
            words = words * keep[..., None]
        h = words + self.position_embedding(positions)
        for block in self.blocks:
            h = block(h, memory, need_weights)
        return self.head(self.norm(h))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(tokens, self.encoder(images))

    def cross_attention_maps(self) -> torch.Tensor:
        """Weights of the last decode with ``need_weights``: last layer, mean over heads -> (B, T, P)."""
        return self.cross_attention_layers()[-1]

    def cross_attention_layers(self) -> torch.Tensor:
        """Weights of the last decode with ``need_weights``: every layer, mean over heads -> (layers, B, T, P)."""
        return torch.stack([block.cross_attention.last_weights.mean(dim=1) for block in self.blocks])


def caption_loss(model: Captioner, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Teacher forcing: predict token t+1 from the image and tokens ≤ t; padding targets are -100."""
    images, tokens = batch
    logits = model(images, tokens[:, :-1].clamp(min=0))
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def greedy_captions(model: Captioner, images: torch.Tensor, bos_id: int, eos_id: int,
                    need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy decoding -> tokens (B, T) after the start token, and with ``need_weights`` the
    last layer's cross-attention of every generated token over the patches (B, T, P)."""
    model.eval()
    memory = model.encoder(images)
    tokens = torch.full((images.size(0), 1), bos_id, device=images.device)
    for _ in range(model.config.max_caption_length - 1):
        next_token = model.decode(tokens, memory, need_weights)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if (tokens[:, 1:] == eos_id).any(dim=1).all():
            break
    maps = model.cross_attention_maps() if need_weights else None
    return tokens[:, 1:], maps


@torch.no_grad()
def beam_captions(model: Captioner, images: torch.Tensor, bos_id: int, eos_id: int, beam: int = 3,
                  length_penalty: float = 0.0) -> torch.Tensor:
    """Beam search: keep the ``beam`` best prefixes by total log-probability -> tokens (B, T).

    A finished beam (it produced ``eos_id``) only extends with ``eos_id`` at no cost.
    Final scores are divided by length**length_penalty (0: plain log-probability).
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    model.eval()
    batch = images.size(0)
    memory = model.encoder(images).repeat_interleave(beam, dim=0)  # (B·k, P, D)
    tokens = torch.full((batch * beam, 1), bos_id, device=images.device)
    scores = torch.zeros(batch, beam, device=images.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive at first
    vocab = model.config.vocab_size
    for _ in range(model.config.max_caption_length - 1):
        log_probs = model.decode(tokens, memory)[:, -1].log_softmax(-1)  # (B·k, V)
        finished = (tokens[:, 1:] == eos_id).any(dim=1)
        log_probs[finished] = float("-inf")
        log_probs[finished, eos_id] = 0.0
        total = (scores.reshape(-1, 1) + log_probs).reshape(batch, beam * vocab)
        scores, flat = total.topk(beam, dim=-1)  # (B, k)
        origin = (flat // vocab) + torch.arange(batch, device=images.device)[:, None] * beam
        tokens = torch.cat([tokens[origin.flatten()], (flat % vocab).reshape(-1, 1)], dim=1)
        if (tokens[:, 1:] == eos_id).any(dim=1).all():
            break
    lengths = ((tokens[:, 1:] != eos_id).cumprod(dim=1).sum(dim=1) + 1).reshape(batch, beam).float()
    best = (scores / lengths**length_penalty).argmax(dim=-1)
    return tokens.reshape(batch, beam, -1)[torch.arange(batch), best, 1:]


# ---------------------------------------------------------------------------------------
# captions <-> tensors


def encode_captions(tokenizer, captions: list[list[str]], length: int) -> torch.Tensor:
    """Every reference as [eos] words [eos], padded with -100 -> (N images, R references, length).

    The end-of-sentence token doubles as the start token, as in GPT-2. All images must have
    the same number of references R.
    """
    eos = tokenizer.eos_id
    rows = []
    for references in captions:
        encoded = []
        for caption in references:
            ids = [eos, *tokenizer.encode(caption), eos]
            if len(ids) > length:
                raise ValueError(f"caption {caption!r} needs {len(ids)} tokens; length is {length}")
            encoded.append(ids + [-100] * (length - len(ids)))
        rows.append(encoded)
    return torch.tensor(rows)


def decode_caption(tokenizer, ids: torch.Tensor) -> str:
    """Tokens after the start token, up to (not including) the first end token."""
    words = []
    for i in ids.tolist():
        if i == tokenizer.eos_id:
            break
        words.append(i)
    return tokenizer.decode(words)


def caption_batches(images: torch.Tensor, tokens: torch.Tensor, batch_size: int):
    """A ``batches(generator)`` function for ``common.train.train``: random images, one random
    reference each -> (images (B, C, H, W), tokens (B, T))."""
    def sample(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(0, len(images), (batch_size,), generator=generator)
        reference = torch.randint(0, tokens.size(1), (batch_size,), generator=generator)
        return images[picks], tokens[picks, reference]
    return sample
