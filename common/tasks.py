"""Synthetic sequence tasks: small problems where a mechanism is needed by construction.

A task is a function ``sample(batch_size, generator) -> (inputs, targets)``: ``inputs`` (B, L) token
ids, ``targets`` (B, L) the token each position must predict, or ``IGNORE`` where nothing is scored.
A language model (any module returning ``.logits`` (B, L, V), like ``common.model.GPT``) trains on
the scored positions only and is measured by its accuracy there.

    batches = task_batches(sample)                       # a ``batches`` function for common.train
    train(model, batches, config, loss_fn=masked_loss)
    test = fixed_batches(sample, n_batches=8, batch_size=64, seed=1)   # the same held-out set every run
    masked_accuracy(model, test)                          # {"accuracy", "correct", "total", ...}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # a target nobody scores (cross_entropy's ignore_index)

Sample = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def task_batches(sample: Sample, batch_size: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """A ``batches(generator)`` function for ``common.train.train``: a fresh batch of the task per step."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return lambda generator: sample(batch_size, generator)


def fixed_batches(sample: Sample, n_batches: int, batch_size: int,
                  seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches drawn with their own seed: a held-out set that is the same in every run."""
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches}, {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return [sample(batch_size, generator) for _ in range(n_batches)]


def masked_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the scored positions (targets != IGNORE), plus any auxiliary loss the model reports."""
    x, y = batch
    out = model(x)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
    aux = getattr(out, "aux_loss", None)
    return loss if aux is None else loss + aux


@torch.no_grad()
def scored_predictions(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max predictions and targets at the scored positions of one batch: two (N,) tensors."""
    x, y = batch
    device = next(model.parameters()).device
    logits = model(x.to(device)).logits
    y = y.to(device)
    scored = y != IGNORE
    return logits.argmax(-1)[scored].cpu(), y[scored].cpu()


@torch.no_grad()
def masked_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Accuracy at the scored positions, and the share of sequences with every scored position right.

    Returns ``accuracy``, ``correct``, ``total``, ``sequence_accuracy`` and ``per_item`` (a list of 0/1
    per scored position, in order, for paired tests between models on the same items).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_item, sequences_right, sequences = [], 0, 0
    for x, y in batches:
        logits = model(x.to(device)).logits
        y = y.to(device)
        scored = y != IGNORE
        right = (logits.argmax(-1) == y) & scored
        per_item.append(right[scored].cpu())
        has_scored = scored.any(dim=1)
        sequences_right += int(((right.sum(1) == scored.sum(1)) & has_scored).sum())
        sequences += int(has_scored.sum())
    model.train(was_training)
    items = torch.cat(per_item) if per_item else torch.zeros(0, dtype=torch.bool)
    total = int(items.numel())
    if total == 0:
        raise ValueError("no scored positions in the batches (every target is IGNORE)")
    return {"accuracy": items.float().mean().item(), "correct": int(items.sum()), "total": total,
            "sequence_accuracy": sequences_right / max(sequences, 1), "per_item": items.int().tolist()}


def distance_recall(length: int, distances: Iterable[int], n_values: int = 16, n_noise: int = 32) -> Sample:
    """Recall the one value token planted d positions before the last position (a query token).

    Tokens: 0 the query, 1 .. ``n_values`` the values, then ``n_noise`` noise tokens that fill the
    rest. Each sequence draws d uniformly from ``distances`` (each in [1, length - 1]) and a value;
    only the last position is scored (target: the value). Chance is 1 / ``n_values``. A model whose
    last position cannot see position length - 1 - d (a stack of sliding windows, say) cannot do
    better than chance at that d.
    """
    distances = torch.as_tensor(list(distances), dtype=torch.long)
    if distances.numel() == 0 or int(distances.min()) < 1 or int(distances.max()) > length - 1:
        raise ValueError(f"distances must be non-empty and lie in [1, length - 1 = {length - 1}], "
                         f"got {distances.tolist()}")
    if n_values < 2 or n_noise < 1:
        raise ValueError(f"need n_values >= 2 and n_noise >= 1, got {n_values}, {n_noise}")

    def sample(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(1 + n_values, 1 + n_values + n_noise, (batch_size, length), generator=generator)
        value = torch.randint(1, 1 + n_values, (batch_size,), generator=generator)
        d = distances[torch.randint(0, len(distances), (batch_size,), generator=generator)]
        x[torch.arange(batch_size), length - 1 - d] = value
        x[:, -1] = 0  # the query
        y = torch.full_like(x, IGNORE)
        y[:, -1] = value
        return x, y

    return sample
