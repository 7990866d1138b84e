"""Token-by-token generation: greedy, temperature, top-k and top-p (nucleus) sampling.

``generate`` works with any model whose forward takes ``(idx, cache=...)`` and returns
an object with ``.logits`` (B, L, V), like ``common.model.GPT``.
"""

from __future__ import annotations

import math

import torch


def check_sampling_args(
    temperature: float, top_k: int | None, top_p: float | None, allow_negative_temperature: bool
) -> None:
    """Raise ``ValueError`` that names the argument and what is allowed."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if temperature < 0 and not allow_negative_temperature:
        raise ValueError(
            f"temperature must be >= 0 (0 means greedy), got {temperature}. A negative "
            "temperature reverses the ranking of the tokens, so sampling favours the least "
            "likely ones; pass allow_negative_temperature=True to do it on purpose."
        )
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p.

    logits (B, V) -> (B, V). Top-p keeps the smallest set of most likely tokens whose
    probabilities sum to at least p (Holtzman et al. 2020); the most likely token always stays.
    """
    check_sampling_args(1.0, top_k, top_p, allow_negative_temperature=False)
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    allow_negative_temperature: bool = False,
) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> ids (B,).

    temperature 0 is greedy (argmax). Otherwise p_i = softmax(z_i / T): T < 1 sharpens the
    distribution, T > 1 flattens it, and T < 0 (only when explicitly allowed) reverses it.
    Top-k/top-p filter the logits after the temperature is applied.
    """
    check_sampling_args(temperature, top_k, top_p, allow_negative_temperature)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature  # z / T
    probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    allow_negative_temperature: bool = False,
) -> torch.Tensor:
    """Extend ``prompt`` (B, L) by ``max_new_tokens`` sampled tokens -> (B, L + new).

    With ``use_cache`` the prompt is encoded once and each step feeds only the newest
    token (KV cache); once the sequence would outgrow the model's context, generation
    falls back to recomputing the last ``context_length`` tokens at each step.
    Sampling draws from ``generator`` (on the CPU), so a seed makes it repeatable.
    """
    check_sampling_args(temperature, top_k, top_p, allow_negative_temperature)
    check_prompt(prompt, model.config.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    was_training = model.training
    model.eval()
    try:
        context = model.config.context_length
        tokens = prompt
        cache = model.new_cache() if use_cache and prompt.size(1) < context else None
        step_input = tokens
        for _ in range(max_new_tokens):
            if cache is not None and cache.length + step_input.size(1) <= context:
                logits = model(step_input, cache=cache, logits_to_keep=1).logits[:, -1]
            else:
                cache = None
                logits = model(tokens[:, -context:], logits_to_keep=1).logits[:, -1]
            next_token = sample_next(logits.cpu(), temperature, top_k, top_p, generator,
                                     allow_negative_temperature).to(tokens.device)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
    finally:
        model.train(was_training)
    return tokens


def check_prompt(prompt: torch.Tensor, vocab_size: int) -> None:
    """A prompt is (batch, length >= 1) integer token ids in [0, vocab_size)."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.size(1) < 1:
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a (batch, length >= 1) tensor of token ids, got {shape}")
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise ValueError(f"prompt must hold integer token ids (torch.long), got dtype {prompt.dtype}; "
                         "encode text with the tokenizer first")
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}) (the model's vocabulary), "
                         f"got ids from {low} to {high}")


# ---------------------------------------------------------------------------------------
# measures of generated text


@torch.no_grad()
def continuation_nll(model: torch.nn.Module, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Mean negative log-likelihood (nats/token) the model gives each continuation.

    sequences (B, L) = prompt + generated tokens -> (B,). Scored at temperature 1: how
    typical the text is for the model, a proxy of its quality (lower = more fluent, and
    at the extreme, more repetitive).
    """
    if sequences.size(1) - 1 > model.config.context_length:
        raise ValueError(f"sequences of {sequences.size(1)} tokens exceed the context "
                         f"({model.config.context_length}) + 1; score shorter continuations")
    if not 1 <= prompt_length < sequences.size(1):
        raise ValueError(f"prompt_length must be in [1, {sequences.size(1) - 1}], got {prompt_length}")
    logits = model(sequences[:, :-1]).logits.float()  # (B, L-1, V): position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), sequences[:, 1:], reduction="none")
    return nll[:, prompt_length - 1 :].mean(dim=1)
