"""Benchmark of the GPT core: training throughput and peak memory, SDPA vs explicit attention.

    python scripts/bench_core.py [--steps 30] [--device auto]

The cpu-preset model (d=128, 4 layers, 4 heads, context 128, batch 16) trains on PTB
word-level batches; the same model with ``attention_backend="explicit"`` materialises
softmax(QKᵀ/√d) instead of calling ``F.scaled_dot_product_attention``. Writes
results/00_core_benchmark.json: the number later notebooks compare against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.bench import peak_memory, time_call  # noqa: E402
from common.data import prepare_lm_data, random_windows  # noqa: E402
from common.model import GPT, GPTConfig  # noqa: E402
from common.results import RunRecord  # noqa: E402
from common.runtime import pick_device, set_seed  # noqa: E402
from common.train import TrainConfig, make_optimizer  # noqa: E402


def measure(backend: str, data, device, steps: int, batch: int, context: int) -> dict:
    set_seed(0)
    config = GPTConfig(vocab_size=data.vocab_size, context_length=context, d_model=128, n_layers=4,
                       n_heads=4, dropout=0.1, attention_backend=backend)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, TrainConfig(device=str(device)))
    generator = torch.Generator().manual_seed(0)

    def step():
        x, y = (t.to(device) for t in random_windows(data.train, batch, context, generator))
        loss = model(x, targets=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timing = time_call(step, warmup=3, repeats=steps, device=device)
    return {
        "backend": backend,
        "params": model.num_parameters(),
        "step_s_median": timing.median,
        "step_s_stdev": timing.stdev,
        "tokens_per_s": batch * context / timing.median,
        "peak_memory_mb": peak_memory(step, device) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    device = pick_device(args.device)
    record = RunRecord("00_core_benchmark", "gpu" if device.type == "cuda" else "cpu", 0, device, args.out)
    data = prepare_lm_data("ptb", "word")
    rows = [measure(b, data, device, args.steps, batch=16, context=128) for b in ("sdpa", "explicit")]
    for row in rows:
        print(f"{row['backend']:>8}: {row['tokens_per_s']:7.0f} tokens/s, step {row['step_s_median'] * 1e3:.0f} ms "
              f"(±{row['step_s_stdev'] * 1e3:.0f}), peak {row['peak_memory_mb']:.0f} MB")
    by_backend = {r["backend"]: r for r in rows}
    record.save({
        "model": "GPT d=128, 4 layers, 4 heads, context 128, batch 16, PTB word-level (10k vocab)",
        "params": rows[0]["params"],
        **{f"{b}_tokens_per_s": r["tokens_per_s"] for b, r in by_backend.items()},
        **{f"{b}_peak_memory_mb": r["peak_memory_mb"] for b, r in by_backend.items()},
        "sdpa_speedup": by_backend["sdpa"]["tokens_per_s"] / by_backend["explicit"]["tokens_per_s"],
        "by_backend": by_backend,
    })

if __name__ == "__main__":
    main()
