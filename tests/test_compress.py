import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from common.compress import (
    QUANTIZATION_VARIANTS,
    HeadMask,
    NeuronMask,
    OnnxClassifier,
    SentenceBatcher,
    distillation_loss,
    export_onnx,
    full_masks,
    head_counts,
    head_importance,
    keep_layers,
    keep_top_per_layer,
    load_pruned,
    neuron_counts,
    next_heads_to_mask,
    nodes_reading,
    prune_by_importance,
    prune_heads,
    prune_neurons,
    quantize_embedding_rows,
    quantize_onnx,
    quantize_torch,
    save_pruned,
    state_dict_size_mb,
    unit_importance,
)
from common.compress import main as compress_main
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


def test_neuron_mask_and_pruning_agree_and_shrink_the_feed_forward(bert):
    b = batch()
    plain = logits(bert, b)
    with NeuronMask(bert, torch.ones(2, 64)):
        torch.testing.assert_close(logits(bert, b), plain)
    mask = torch.ones(2, 64)
    mask[0, :40] = 0
    mask[1, 10:20] = 0
    with NeuronMask(bert, mask):
        masked = logits(bert, b)
    assert not torch.allclose(masked, plain)
    before = sum(p.numel() for p in bert.parameters())
    prune_neurons(bert, mask)
    assert neuron_counts(bert) == [24, 54]
    torch.testing.assert_close(logits(bert, b), masked, atol=1e-5, rtol=1e-5)
    assert before - sum(p.numel() for p in bert.parameters()) == 50 * (32 + 1 + 32)  # W_1 row + bias, W_2 column
    with pytest.raises(ValueError, match="every feed-forward neuron"):
        prune_neurons(bert, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="layers, neurons"):
        NeuronMask(bert, torch.ones(2, 64))  # the widest layer now has 54 neurons


def test_unit_importance_scores_heads_and_neurons_of_a_pruned_model(bert):
    head_mask = torch.ones(2, 4)
    head_mask[0, 3] = 0
    prune_heads(bert, head_mask)
    heads, neurons = full_masks(bert)
    assert heads.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and neurons.shape == (2, 64)
    neurons[1, 5] = 0
    head_scores, neuron_scores = unit_importance(bert, [batch(), batch(3, 8)], heads, neurons)
    assert head_scores[0, 3] == 0 and neuron_scores[1, 5] == 0
    torch.testing.assert_close(head_scores.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(neuron_scores.norm(dim=1), torch.ones(2))
    assert all(p.grad is None for p in bert.parameters())
    kept = keep_top_per_layer(neuron_scores, neurons, 10)
    assert kept.sum(dim=1).tolist() == [10, 10] and kept[1, 5] == 0
    assert neuron_scores[0][kept[0] > 0].min() >= neuron_scores[0][(kept[0] == 0)].max()


def test_pruned_heads_and_neurons_rebuild_from_file(bert, tmp_path, monkeypatch):
    head_mask, neuron_mask = torch.ones(2, 4), torch.ones(2, 64)
    head_mask[1, :3] = 0
    neuron_mask[0, ::2] = 0
    prune_neurons(prune_heads(bert, head_mask), neuron_mask)
    path = save_pruned(bert, tmp_path / "pruned.pt")
    monkeypatch.setattr("common.compress.load_classifier",
                        lambda source: (BertForSequenceClassification(bert.config), None))
    rebuilt, _ = load_pruned(path)
    assert head_counts(rebuilt) == [4, 1] and neuron_counts(rebuilt) == [32, 64]
    torch.testing.assert_close(logits(rebuilt, batch()), logits(bert, batch()))


def test_a_model_cut_to_fewer_layers_rebuilds_from_file(bert, tmp_path, monkeypatch):
    config = bert.config.to_dict()
    keep_layers(bert, 1)
    assert head_counts(bert) == [4] and bert.config.num_hidden_layers == 1
    prune_heads(bert, torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    path = save_pruned(bert, tmp_path / "pruned.pt")
    monkeypatch.setattr("common.compress.load_classifier",
                        lambda source: (BertForSequenceClassification(type(bert.config)(**config)), None))
    rebuilt, _ = load_pruned(path)
    assert head_counts(rebuilt) == [3]
    torch.testing.assert_close(logits(rebuilt, batch()), logits(bert, batch()))


def test_a_file_that_is_not_a_pruned_model_is_named_with_what_is_expected(tmp_path, capsys):
    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    other = tmp_path / "train.pt"
    torch.save({"model": {}, "optimizer": {}, "state": {}, "config": {}}, other)
    for path, says in ((garbage, "cannot be read"), (other, "training checkpoint"),
                       (tmp_path / "missing.pt", "no such file")):
        with pytest.raises((ValueError, FileNotFoundError), match=says) as error:
            load_pruned(path)
        assert str(path) in str(error.value) and "save_pruned" in str(error.value)
        with pytest.raises(SystemExit) as stop:  # the command line: a message, no traceback
            compress_main(["--checkpoint", str(path), "--out", str(tmp_path / "export")])
        assert stop.value.code == 2 and str(path) in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_distillation_loss_is_cross_entropy_at_alpha_one_and_zero_soft_term_on_the_teacher(bert):
    b = batch()
    b["teacher_logits"] = logits(bert, b)
    bert.eval()
    with torch.no_grad():
        ce = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        torch.testing.assert_close(distillation_loss(bert, b, alpha=1.0), ce)
        torch.testing.assert_close(distillation_loss(bert, b, alpha=0.0), torch.tensor(0.0), atol=1e-6, rtol=0)
        b["teacher_logits"] = -b["teacher_logits"]
        assert distillation_loss(bert, b, alpha=0.0) > 0
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(bert, b, alpha=1.5)


def test_sampler_attaches_the_teacher_logits_of_the_sampled_sentences():
    class Tokenizer:
        def __call__(self, texts, **kwargs):
            ids = torch.tensor([[len(t)] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    examples = [("a" * (i + 1), i % 2) for i in range(10)]
    teacher = torch.arange(20.0).view(10, 2)
    sample = SentenceBatcher(Tokenizer()).sampler(examples, 4, teacher)(torch.Generator().manual_seed(0))
    picked = sample["input_ids"][:, 0] - 1  # the sentence of length i + 1 is example i
    torch.testing.assert_close(sample["teacher_logits"], teacher[picked])
    with pytest.raises(ValueError, match="teacher logits per example"):
        SentenceBatcher(Tokenizer()).sampler(examples, 4, teacher[:5])


def test_quantization_variants_keep_what_they_say_in_fp32_and_stay_close(bert, tmp_path):
    import onnx

    b = batch()
    fp32 = export_onnx(bert, b, tmp_path / "m.onnx")
    assert nodes_reading(fp32, ("classifier",)) and nodes_reading(fp32, ("word_embeddings",))
    reference = logits(bert, b).numpy()
    calibration = [batch(), batch(2, 14)]
    for name in QUANTIZATION_VARIANTS:
        int8 = quantize_onnx(fp32, tmp_path / f"{name}.onnx", name, calibration)
        graph = onnx.load(str(int8)).graph
        float_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        kept = QUANTIZATION_VARIANTS[name].keep_fp32
        assert ("model.bert.embeddings.word_embeddings.weight" in float_weights) == ("embeddings" in kept), name
        classifier = {"model.classifier.weight", "model.classifier.weight_Transposed"}  # a Gemm's weight: transposed
        assert bool(classifier & float_weights) == ("classifier" in kept), name
        assert int8.stat().st_size < fp32.stat().st_size
        quantized = OnnxClassifier(int8).logits(b["input_ids"], b["attention_mask"])
        np.testing.assert_allclose(quantized, reference, atol=0.1, err_msg=name)
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(fp32, tmp_path / "s.onnx", "static-per-channel")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_onnx(fp32, tmp_path / "s.onnx", "int4")


def test_embedding_rows_are_int8_with_one_scale_per_row_and_give_the_same_table(bert, tmp_path):
    import onnx
    from onnx import numpy_helper

    b = batch()
    with torch.no_grad():
        bert.bert.embeddings.word_embeddings.weight[7] *= 50  # one large row must not coarsen the others
    fp32 = export_onnx(bert, b, tmp_path / "m.onnx")
    rows = quantize_embedding_rows(fp32, tmp_path / "rows.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(rows)).graph.initializer}
    table = bert.bert.embeddings.word_embeddings.weight.detach().numpy()
    name = "model.bert.embeddings.word_embeddings.weight"
    q, scales = weights[f"{name}_int8_rows"], weights[f"{name}_row_scales"]
    assert q.dtype == np.int8 and q.shape == table.shape and scales.shape == (table.shape[0], 1)
    assert name not in weights
    assert np.all(np.abs(q.astype(np.float32) * scales - table) <= scales / 2 + 1e-7)  # half a step, row by row
    np.testing.assert_allclose(OnnxClassifier(rows).logits(b["input_ids"], b["attention_mask"]),
                               logits(bert, b).numpy(), atol=0.02)
    with pytest.raises(ValueError, match="no initializer"):  # its table is already rewritten
        quantize_embedding_rows(rows, tmp_path / "again.onnx")


def test_prune_by_importance_keeps_the_asked_counts_and_refuses_impossible_ones(bert):
    counts = prune_by_importance(bert, [batch()], heads=5, neurons=40)
    assert sum(counts["heads"]) == 5 and min(counts["heads"]) >= 1 and counts["neurons"] == [40, 40]
    assert counts == {"heads": head_counts(bert), "neurons": neuron_counts(bert)}
    counts = prune_by_importance(bert, [batch()], heads=2, neurons=10)  # a second step on the pruned model
    assert counts == {"heads": [1, 1], "neurons": [10, 10]}
    with pytest.raises(ValueError, match="keep between"):
        prune_by_importance(bert, [batch()], heads=1, neurons=5)  # fewer heads than layers
    with pytest.raises(ValueError, match="keep between"):
        prune_by_importance(bert, [batch()], heads=2, neurons=11)  # more neurons than a layer has


def test_state_dict_size_in_memory_equals_the_file(bert, tmp_path):
    # the same bytes: torch.save names the archive after the file, "archive" in memory
    assert state_dict_size_mb(bert) == state_dict_size_mb(bert, tmp_path / "archive.pt")
