import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from common.compress import (
    HeadMask,
    OnnxClassifier,
    export_onnx,
    head_counts,
    head_importance,
    load_pruned,
    next_heads_to_mask,
    prune_heads,
    quantize_onnx,
    quantize_torch,
    save_pruned,
)
from common.data import load_movie_reviews, split_examples


@pytest.fixture()
def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def batch(n=3, length=10):
    ids = torch.randint(1, 100, (n, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1][:n])}


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def test_full_mask_changes_nothing_and_zero_mask_changes_output(bert):
    b = batch()
    plain = logits(bert, b)
    with HeadMask(bert, torch.ones(2, 4)):
        torch.testing.assert_close(logits(bert, b), plain)
    mask = torch.ones(2, 4)
    mask[0, 1] = 0
    with HeadMask(bert, mask):
        assert not torch.allclose(logits(bert, b), plain)
    torch.testing.assert_close(logits(bert, b), plain)  # hooks removed on exit
    with pytest.raises(ValueError, match="layers, heads"):
        HeadMask(bert, torch.ones(3, 4))


def test_pruning_equals_masking_and_shrinks_the_weights(bert):
    b = batch()
    mask = torch.ones(2, 4)
    mask[0, [0, 2]] = 0
    mask[1, 3] = 0
    with HeadMask(bert, mask):
        masked = logits(bert, b)
    before = sum(p.numel() for p in bert.parameters())
    prune_heads(bert, mask)
    assert head_counts(bert) == [2, 3]
    torch.testing.assert_close(logits(bert, b), masked, atol=1e-5, rtol=1e-5)
    removed = 3 * 8 * (3 * 32 + 3) + 3 * 8 * 32  # 3 heads of width 8: Q, K, V rows (+bias) and W_O columns
    assert before - sum(p.numel() for p in bert.parameters()) == removed
    with pytest.raises(ValueError, match="every head"):
        prune_heads(bert, torch.zeros(2, 4))


def test_saved_pruned_model_rebuilds(bert, tmp_path, monkeypatch):
    mask = torch.ones(2, 4)
    mask[1, :3] = 0
    prune_heads(bert, mask)
    path = save_pruned(bert, tmp_path / "pruned.pt")
    monkeypatch.setattr("common.compress.load_classifier",
                        lambda source: (BertForSequenceClassification(bert.config), None))
    rebuilt, _ = load_pruned(path)
    assert head_counts(rebuilt) == [4, 1]
    torch.testing.assert_close(logits(rebuilt, batch()), logits(bert, batch()))


def test_importance_is_normalised_per_layer_and_zero_for_masked_heads(bert):
    mask = torch.ones(2, 4)
    mask[1, 2] = 0
    importance = head_importance(bert, [batch(), batch(3, 8)], mask)
    assert importance.shape == (2, 4) and importance[1, 2] == 0
    torch.testing.assert_close(importance.norm(dim=1), torch.ones(2))
    assert all(p.grad is None for p in bert.parameters())


def test_next_heads_never_empties_a_layer():
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]])
    mask = torch.ones(2, 3)
    assert next_heads_to_mask(scores, mask, 2) == [(0, 0), (0, 1)]
    mask[0, :2] = 0
    assert next_heads_to_mask(scores, mask, 2) == [(1, 2), (1, 1)]  # layer 0 keeps its last head


def test_onnx_export_matches_pytorch_and_int8_stays_close(bert, tmp_path):
    b = batch()
    fp32 = export_onnx(bert, b, tmp_path / "m.onnx")
    longer = batch(2, 14)  # dynamic batch and sequence axes
    for example in (b, longer):
        np.testing.assert_allclose(OnnxClassifier(fp32).logits(example["input_ids"], example["attention_mask"]),
                                   logits(bert, example).numpy(), atol=1e-4)
    int8 = quantize_onnx(fp32, tmp_path / "m8.onnx")
    assert int8.stat().st_size < fp32.stat().st_size
    quantized = OnnxClassifier(int8).logits(b["input_ids"], b["attention_mask"])
    np.testing.assert_allclose(quantized, logits(bert, b).numpy(), atol=0.1)
    torch.testing.assert_close(logits(quantize_torch(bert), b), logits(bert, b), atol=0.1, rtol=0.1)


def test_movie_reviews_split_is_fixed_and_disjoint():
    examples = load_movie_reviews()
    assert len(examples) == 10568 and {label for _, label in examples} == {0, 1}
    a, b = split_examples(examples, seed=0), split_examples(examples, seed=0)
    assert a == b and [len(a[s]) for s in ("train", "valid", "test")] == [8454, 1057, 1057]
    assert sorted(a["train"] + a["valid"] + a["test"]) == sorted(examples)  # a partition
    with pytest.raises(ValueError, match="valid_share"):
        split_examples(examples, valid_share=0.6, test_share=0.5)
