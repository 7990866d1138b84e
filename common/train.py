"""One training loop for every notebook.

AdamW (weight decay on every weight matrix, none on biases, norms and embeddings), linear warm-up then cosine decay,
gradient clipping, periodic evaluation, tqdm progress, bf16 autocast on CUDA, checkpoints
that resume bit-for-bit (model, optimizer, schedule, RNG states), and a clear stop on a
non-finite loss.

The loop is task-agnostic: ``batches(generator)`` returns the next training batch and
``loss_fn(model, batch)`` its loss. ``lm_batches``/``lm_loss``/``evaluate_lm`` are the
language-model versions that most notebooks use.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from common.data import eval_windows, random_windows
from common.runtime import pick_device


@dataclass
class TrainConfig:
    """Optimisation settings. Every field is checked on creation."""

    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    eval_every: int = 200  # 0: only at the end
    log_every: int = 10
    checkpoint_every: int = 0  # also save every this many steps (0: no step-based saves)
    checkpoint_seconds: float = 120.0  # save when this much training time passed since the last save
    seed: int = 0
    device: str = "auto"
    bf16_on_cuda: bool = True

    def __post_init__(self):
        checks = {
            "steps": self.steps >= 1,
            "lr": self.lr > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": 0 <= self.warmup_steps <= self.steps,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "eval_every": self.eval_every >= 0,
            "log_every": self.log_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 0,
            "checkpoint_seconds": self.checkpoint_seconds > 0,
        }
        allowed = {
            "steps": ">= 1", "lr": "> 0", "min_lr_ratio": "in [0, 1]",
            "warmup_steps": f"in [0, steps={self.steps}]", "weight_decay": ">= 0",
            "grad_clip": "> 0 or None", "eval_every": ">= 0", "log_every": ">= 1",
            "checkpoint_every": ">= 0", "checkpoint_seconds": "> 0",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {allowed[name]}, got {getattr(self, name)!r}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def no_weight_decay(*params: nn.Parameter) -> None:
    """Mark parameters that are matrices but not weights (position tables, SSM state matrices,
    attention bias vectors stored as (1, 1, E)): ``make_optimizer`` does not decay them."""
    for p in params:
        p._no_weight_decay = True


def decays(module: nn.Module, param: nn.Parameter) -> bool:
    """Weight decay goes to every weight matrix (dim >= 2: linear layers, experts' stacked
    matrices, factorised projections), not to biases, norms, embeddings or marked parameters."""
    return (param.dim() >= 2 and not isinstance(module, nn.Embedding)
            and not getattr(param, "_no_weight_decay", False))


def make_optimizer(model: nn.Module, config: TrainConfig,
                   param_groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on every weight matrix (see ``decays``).

    ``param_groups`` may hand some parameters their own settings (e.g. an SSM's A and Δ
    with a smaller lr and no decay); each group's ``lr_scale`` multiplies the schedule.
    """
    claimed = {id(p) for g in (param_groups or []) for p in g["params"]}
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in claimed:
                continue
            claimed.add(id(p))
            (decay if decays(module, p) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        *({"lr_scale": 1.0, **g} for g in (param_groups or [])),
    ]
    use_fused = pick_device(config.device).type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                             fused=use_fused)


@dataclass
class TrainState:
    """What a run reports and what a checkpoint restores."""

    step: int = 0
    history: list[dict] = field(default_factory=list)  # one dict per log/eval point
    tokens_seen: int = 0
    train_seconds: float = 0.0  # all training time that produced this state, earlier sessions included
    resumed_seconds: float = 0.0  # the part of it spent before the last resume (0: trained in one go)

    @property
    def last_eval(self) -> dict:
        evals = [h for h in self.history if "eval" in h]
        return evals[-1]["eval"] if evals else {}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, generator: torch.Generator, config: TrainConfig) -> None:
    """Write the checkpoint atomically (a crash mid-write never corrupts the last one)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "config": asdict(config),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    torch.save(payload, partial)
    os.replace(partial, path)


def read_checkpoint(path: str | Path) -> dict:
    """The payload of a checkpoint file, or an error that names the file and what to do."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, empty file, not a checkpoint at all
        raise RuntimeError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {error}). It is probably cut short by an "
            f"interrupted write or a full disk: delete it (or move it aside) and rerun, which retrains it."
        ) from error
    if not isinstance(payload, dict) or not {"model", "optimizer", "state", "config"} <= set(payload):
        raise RuntimeError(f"{path} is not a training checkpoint of common.train (it lacks model/optimizer/state/"
                           f"config); delete it or pass another checkpoint path")
    return payload


RESUMABLE_FIELDS = ("steps", "eval_every", "log_every", "checkpoint_every", "checkpoint_seconds", "device")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, config: TrainConfig) -> TrainState:
    payload = read_checkpoint(path)
    saved = {k: v for k, v in payload["config"].items() if k not in RESUMABLE_FIELDS}
    ours = {k: v for k, v in asdict(config).items() if k in saved}
    saved["betas"] = tuple(saved["betas"])
    if saved != ours:
        raise ValueError(f"checkpoint {path} was made with another TrainConfig ({saved} vs {ours}); "
                         "delete it or use another checkpoint path")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    state = TrainState(**payload["state"])
    state.resumed_seconds = state.train_seconds
    return state


def train(
    model: nn.Module,
    batches: Callable[[torch.Generator], Any],
    config: TrainConfig,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    checkpoint_path: str | Path | None = None,
    param_groups: list[dict] | None = None,
    description: str = "train",
    progress: bool = True,
) -> TrainState:
    """Train ``model`` for ``config.steps`` steps and return the ``TrainState``.

    ``batches(generator)`` returns a batch (tensors or tuples of tensors, moved to the
    device here); ``loss_fn(model, batch)`` returns a scalar loss (default: ``lm_loss``).
    ``evaluate(model)`` returns a dict of metrics, run every ``eval_every`` steps and at
    the end (in eval mode, no grad). With ``checkpoint_path`` the run resumes from the
    checkpoint if one exists, and saves every ``checkpoint_seconds`` of training (and every
    ``checkpoint_every`` steps, if set) and at the end; a finished run is then loaded instead of
    retrained. ``state.train_seconds`` counts the training time of every session that made it.
    """
    loss_fn = loss_fn or lm_loss
    device = pick_device(config.device)
    model.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config, param_groups)
    state = TrainState()
    path = Path(checkpoint_path) if checkpoint_path else None
    if path is not None and path.exists():
        state = load_checkpoint(path, model, optimizer, generator, config)
    else:
        torch.manual_seed(config.seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and config.bf16_on_cuda else nullcontext())

    last_save = state.train_seconds
    bar = tqdm(total=config.steps, initial=state.step, desc=description, disable=not progress,
               mininterval=1.0, leave=False)
    while state.step < config.steps:
        step = state.step
        model.train()
        started = time.perf_counter()
        batch = to_device(batches(generator), device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config) * group["lr_scale"]
        with autocast:
            loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{description}: the loss became {loss.item()} at step {step} (lr {lr_at(step, config):.2e}). "
                "Lower TrainConfig.lr, keep grad_clip on, or check the inputs for NaN/inf."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
                     if config.grad_clip else float("nan"))
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        state.train_seconds += time.perf_counter() - started
        state.tokens_seen += batch_tokens(batch)
        state.step += 1
        bar.update(1)

        record: dict[str, Any] = {}
        if state.step % config.log_every == 0 or state.step == config.steps:
            record = {"step": state.step, "loss": loss.item(), "lr": lr_at(step, config),
                      "grad_norm": grad_norm, "tokens_per_s": state.tokens_seen / state.train_seconds}
            bar.set_postfix(loss=f"{loss.item():.3f}")
        is_last = state.step == config.steps
        if evaluate is not None and (is_last or (config.eval_every and state.step % config.eval_every == 0)):
            record = record or {"step": state.step, "loss": loss.item()}
            record["eval"] = run_eval(model, evaluate)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{f"eval_{k}": f"{v:.3f}" for k, v in
                                                             record["eval"].items() if isinstance(v, float)})
        if record:
            state.history.append(record)
        due = (is_last or state.train_seconds - last_save >= config.checkpoint_seconds
               or (config.checkpoint_every and state.step % config.checkpoint_every == 0))
        if path is not None and due:
            save_checkpoint(path, model, optimizer, state, generator, config)
            last_save = state.train_seconds
    bar.close()
    model.eval()
    return state


@torch.no_grad()
def run_eval(model: nn.Module, evaluate: Callable[[nn.Module], dict]) -> dict:
    was_training = model.training
    model.eval()
    metrics = evaluate(model)
    model.train(was_training)
    return metrics


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch: the elements of its first tensor (B x L for LM inputs)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return first.numel() if isinstance(first, torch.Tensor) else 0


# ---------------------------------------------------------------------------------------
# language modelling


def lm_batches(ids: torch.Tensor, batch_size: int, context_length: int) -> Callable[[torch.Generator], tuple]:
    """Random training windows of a token stream: a ``batches`` function for ``train``."""
    return lambda generator: random_windows(ids, batch_size, context_length, generator)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy plus any auxiliary loss the model reports."""
    x, y = batch
    out = model(x, targets=y)
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


@torch.no_grad()
def evaluate_lm(model: nn.Module, ids: torch.Tensor, context_length: int, batch_size: int = 32,
                max_tokens: int | None = None) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity exp(loss) over consecutive windows of ``ids``.

    Every token of the split (after the first) is predicted once, weighted equally.
    ``max_tokens`` evaluates only the first tokens (for periodic evaluation during training).
    """
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_windows(ids, batch_size, context_length):
        logits = model(x.to(device)).logits
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss)}
