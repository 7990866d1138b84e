"""Synthetic-task machinery: only scored positions count, held-out sets repeat exactly."""

import pytest
import torch

from common.model import GPT, GPTConfig
from common.tasks import IGNORE, fixed_batches, masked_accuracy, masked_loss, task_batches
from common.train import TrainConfig, train


def copy_first(batch_size, generator):
    """Inputs: a random token then zeros; the last position must name the first token."""
    x = torch.zeros(batch_size, 6, dtype=torch.long)
    x[:, 0] = torch.randint(1, 5, (batch_size,), generator=generator)
    y = torch.full_like(x, IGNORE)
    y[:, -1] = x[:, 0]
    return x, y


def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=5, context_length=6, d_model=32, n_layers=1, n_heads=2, dropout=0.0))


def test_a_model_learns_a_task_scored_on_one_position():
    model = small_gpt()
    test = fixed_batches(copy_first, n_batches=2, batch_size=64, seed=1)
    assert masked_accuracy(model, test)["accuracy"] < 0.6
    train(model, task_batches(copy_first, 32), TrainConfig(steps=150, warmup_steps=10, lr=3e-3),
          loss_fn=masked_loss, progress=False)
    result = masked_accuracy(model, test)
    assert result["accuracy"] > 0.95 and result["total"] == 128 and len(result["per_item"]) == 128
    assert result["sequence_accuracy"] == pytest.approx(result["accuracy"])  # one scored position each


def test_only_scored_positions_count():
    model = small_gpt()
    x, y = copy_first(4, torch.Generator().manual_seed(0))
    assert masked_loss(model, (x, y)).item() == pytest.approx(
        torch.nn.functional.cross_entropy(model(x).logits[:, -1], y[:, -1]).item(), rel=1e-6)


def test_fixed_batches_repeat_and_bad_sizes_are_refused():
    a, b = fixed_batches(copy_first, 2, 8, seed=3), fixed_batches(copy_first, 2, 8, seed=3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="batch_size"):
        task_batches(copy_first, 0)
    with pytest.raises(ValueError, match="no scored positions"):
        masked_accuracy(small_gpt(), [(torch.zeros(2, 6, dtype=torch.long), torch.full((2, 6), IGNORE))])
