"""The GPT core side by side with a nanoGPT-style model and Hugging Face GPT-2, same configuration.

    python scripts/bench_core.py [--rounds 9] [--seeds 0 1 2] [--threads 1] [--device auto]

Three implementations of one decoder (d=128, 4 layers, 4 heads, vocabulary 10,000 (PTB words),
pre-norm, exact GELU, tied head, dropout 0, fused SDPA attention) start from the same weights
(copied from the project's model; their logits are checked equal), then five paths are timed in
interleaved rounds with a fixed thread count:

- training step: forward, loss, backward, AdamW step (batch 16 x context 128);
- full forward: logits at every position (no gradient), what evaluation needs;
- last-position forward: logits of the last position only, what choosing the next token needs
  (the project's ``logits_to_keep=1``, nanoGPT's forward without targets, Hugging Face's
  ``logits_to_keep=1``);
- cached generation: 256 greedy tokens after a 16-token prompt, KV cache, context 512
  (nanoGPT has no cache);
- uncached generation: the same, recomputing the whole sequence at every step.

Also: the project's SDPA attention against its explicit softmax(QKᵀ/√d) path (training step,
peak memory). The whole benchmark is repeated once per seed (models initialised from it).
Writes results/00_core_benchmark.json: medians and IQRs over the rounds of all seeds, and the
ratios project / Hugging Face and project / nanoGPT: the mean over seeds of each seed's ratio of
medians, with its Student-t interval (``ratios_ci``, ``ratios_vs_nanogpt_ci``), and the IQR of the
per-round ratios (``ratios_iqr``). The record's ``seed`` is the first seed; ``seeds`` lists them all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common.bench import Timing, fixed_threads, peak_memory, ratio_spread, time_interleaved  # noqa: E402
from common.data import prepare_lm_data, random_windows  # noqa: E402
from common.generate import generate  # noqa: E402
from common.model import GPT, GPTConfig  # noqa: E402
from common.results import RunRecord  # noqa: E402
from common.runtime import pick_device, set_seed  # noqa: E402
from common.seeds import check_seeds  # noqa: E402
from common.stats import mean_ci  # noqa: E402
from common.train import TrainConfig, make_optimizer  # noqa: E402

BATCH, CONTEXT, GENERATION_CONTEXT, PROMPT, NEW_TOKENS = 16, 128, 512, 16, 256


# -- a nanoGPT-style reference (Karpathy's nanoGPT, model.py), written here -----------------------

class NanoAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), NanoAttention(d, heads), nn.LayerNorm(d)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, layers: int, heads: int):
        super().__init__()
        self.context = context
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.h = nn.ModuleList(NanoBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:  # inference: the last position only, as nanoGPT does
            return self.lm_head(x[:, [-1]]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.context:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx


# -- the same weights in all three -----------------------------------------------------------------

def project_model(vocab: int, context: int, backend: str = "sdpa") -> GPT:
    return GPT(GPTConfig(vocab_size=vocab, context_length=context, d_model=128, n_layers=4, n_heads=4,
                         dropout=0.0, attention_backend=backend))


def nano_from(model: GPT) -> NanoGPT:
    c = model.config
    nano = NanoGPT(c.vocab_size, c.context_length, c.d_model, c.n_layers, c.n_heads)
    state = {"wte.weight": model.token_embedding.weight, "wpe.weight": model.position_embedding.weight,
             "ln_f.weight": model.decoder.norm.weight, "ln_f.bias": model.decoder.norm.bias}
    for i, block in enumerate(model.decoder.blocks):
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attention.qkv", "attn.c_attn"),
                             ("attention.out", "attn.c_proj"), ("feed_forward.up", "c_fc"),
                             ("feed_forward.down", "c_proj")):
            module = block.get_submodule(ours)
            state[f"h.{i}.{theirs}.weight"], state[f"h.{i}.{theirs}.bias"] = module.weight, module.bias
    state["lm_head.weight"] = model.token_embedding.weight
    nano.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return nano


def hugging_face_from(model: GPT):
    """GPT-2 (``transformers``) with the project's weights; its Conv1D keeps weights as (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.d_model,
                                    n_layer=c.n_layers, n_head=c.n_heads, activation_function="gelu",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=None,
                                    attn_implementation="sdpa"))
    state = {"transformer.wte.weight": model.token_embedding.weight,
             "transformer.wpe.weight": model.position_embedding.weight,
             "transformer.ln_f.weight": model.decoder.norm.weight, "transformer.ln_f.bias": model.decoder.norm.bias}
    for i, block in enumerate(model.decoder.blocks):
        prefix = f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            module = block.get_submodule(ours)
            state[prefix + theirs + ".weight"], state[prefix + theirs + ".bias"] = module.weight, module.bias
        for ours, theirs in (("attention.qkv", "attn.c_attn"), ("attention.out", "attn.c_proj"),
                             ("feed_forward.up", "mlp.c_fc"), ("feed_forward.down", "mlp.c_proj")):
            module = block.get_submodule(ours)
            state[prefix + theirs + ".weight"], state[prefix + theirs + ".bias"] = module.weight.t(), module.bias
    state["lm_head.weight"] = model.token_embedding.weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()},
                                             strict=False)
    if unexpected or [k for k in missing if not k.endswith("attn.bias")]:
        raise RuntimeError(f"GPT-2 weight copy incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def same_logits(model: GPT, nano: NanoGPT, hf, idx: torch.Tensor) -> dict[str, float]:
    """Largest |logit difference| of nanoGPT and GPT-2 from the project's model on ``idx``."""
    with torch.no_grad():
        ours = model(idx).logits
        nano_logits = nano(idx, targets=idx)[0]
        hf_logits = hf(idx).logits
    return {"nanogpt": (ours - nano_logits).abs().max().item(), "hugging_face": (ours - hf_logits).abs().max().item()}


def hugging_face_greedy(hf, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """``NEW_TOKENS`` greedy tokens; the explicit mask keeps a token 0 in the prompt from counting as padding."""
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=0)


# -- the timed paths -------------------------------------------------------------------------------

def training_steps(models: dict[str, nn.Module], data, device) -> dict:
    """One closure per model: a training step (forward, loss, backward, AdamW) on a fresh batch."""
    calls = {}
    for name, model in models.items():
        model.train()
        optimizer = make_optimizer(model, TrainConfig(device=str(device)))
        generator = torch.Generator().manual_seed(0)

        def step(model=model, optimizer=optimizer, generator=generator, name=name):
            x, y = (t.to(device) for t in random_windows(data.train, BATCH, CONTEXT, generator))
            if name == "hugging_face":  # targets are already shifted: the loss on the logits as the others do
                loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
            elif name == "nanogpt":
                loss = model(x, targets=y)[1]
            else:
                loss = model(x, targets=y).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        calls[name] = step
    return calls


def inference_calls(model: GPT, nano: NanoGPT, hf, idx: torch.Tensor, prompt: torch.Tensor) -> dict:
    for m in (model, nano, hf):
        m.eval()
    grad_off = torch.no_grad()

    def run(fn):
        def call():
            with grad_off:
                fn()
        return call

    return {
        "forward_full": {"project": run(lambda: model(idx)), "nanogpt": run(lambda: nano(idx, targets=idx)),
                         "hugging_face": run(lambda: hf(idx))},
        "forward_last": {"project": run(lambda: model(idx, logits_to_keep=1)), "nanogpt": run(lambda: nano(idx)),
                         "hugging_face": run(lambda: hf(idx, logits_to_keep=1))},
        "generate_cached": {
            "project": lambda: generate(model, prompt, NEW_TOKENS, temperature=0, use_cache=True),
            "hugging_face": run(lambda: hugging_face_greedy(hf, prompt, use_cache=True))},
        "generate_uncached": {
            "project": lambda: generate(model, prompt, NEW_TOKENS, temperature=0, use_cache=False),
            "nanogpt": lambda: nano.generate(prompt, NEW_TOKENS),
            "hugging_face": run(lambda: hugging_face_greedy(hf, prompt, use_cache=False))},
    }


def summarise(timings: dict) -> dict:
    return {name: {"median_ms": 1e3 * t.median, "iqr_ms": 1e3 * t.iqr} for name, t in timings.items()}


def measure(seed: int, data, rounds: int, device: torch.device) -> tuple[dict, dict]:
    """Every path and both attention backends timed once, with models initialised from ``seed``.

    Returns ``(paths, checks)``: ``paths[path][implementation]`` and ``paths["attention_backends"][backend]``
    are ``Timing``s; ``checks`` holds the logit differences, the greedy-token match and the peak memory.
    """
    set_seed(seed)
    trained = {"project": project_model(data.vocab_size, CONTEXT).to(device)}
    trained["nanogpt"] = nano_from(trained["project"]).to(device)
    trained["hugging_face"] = hugging_face_from(trained["project"]).to(device)
    idx = data.test[: BATCH * CONTEXT].view(BATCH, CONTEXT).to(device)
    checks = {"max_logit_difference": same_logits(trained["project"], trained["nanogpt"],
                                                  trained["hugging_face"], idx),
              "params": trained["project"].num_parameters()}
    paths = {"train_step": time_interleaved(training_steps(trained, data, device), rounds, 1, device)}

    set_seed(seed)
    model = project_model(data.vocab_size, GENERATION_CONTEXT).to(device)
    nano, hf = nano_from(model).to(device), hugging_face_from(model).to(device)
    prompt = data.test[:PROMPT][None].to(device)
    check = generate(model, prompt, NEW_TOKENS, temperature=0)
    checks["greedy_tokens_equal_hugging_face"] = bool(torch.equal(check, hugging_face_greedy(hf, prompt, True)))
    for path, calls in inference_calls(model, nano, hf, idx, prompt).items():
        paths[path] = time_interleaved(calls, rounds, 1, device)
        print(f"seed {seed} {path}: " + ", ".join(f"{n} {1e3 * t.median:.1f} ms" for n, t in paths[path].items()),
              flush=True)

    set_seed(seed)
    backends = {b: project_model(data.vocab_size, CONTEXT, b).to(device) for b in ("sdpa", "explicit")}
    backend_steps = training_steps(backends, data, device)
    paths["attention_backends"] = time_interleaved(backend_steps, rounds, 1, device)
    checks["peak_memory_mb"] = {b: peak_memory(step, device) / 2**20 for b, step in backend_steps.items()}
    return paths, checks


def seed_ratio(per_seed: list[dict], path: str, numerator: str, denominator: str):
    """Time ratio ``numerator / denominator`` on ``path``: one ratio of medians per seed, their mean with
    its Student-t interval (``Estimate``)."""
    return mean_ci([ratio_spread(run[path][numerator], run[path][denominator])[0] for run in per_seed])


def pooled(per_seed: list[dict]) -> dict:
    """The seeds' timings of each path and implementation as one ``Timing`` (rounds of all seeds)."""
    return {path: {name: Timing.of([x for run in per_seed for x in run[path][name].samples])
                   for name in per_seed[0][path]}
            for path in per_seed[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per path and seed (>= 7)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one repeat of the whole benchmark per seed, with models initialised from it (>= 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    if args.rounds < 7:
        raise SystemExit(f"--rounds must be >= 7 (the protocol's minimum), got {args.rounds}")
    try:
        seeds = check_seeds(args.seeds)
    except ValueError as error:
        raise SystemExit(f"--seeds: {error}") from None
    if len(seeds) < 2:
        raise SystemExit(f"--seeds needs at least two seeds for an interval, got {seeds}")
    device = pick_device(args.device)
    record = RunRecord("00_core_benchmark", "gpu" if device.type == "cuda" else "cpu", seeds[0], device, args.out)
    data = prepare_lm_data("ptb", "word")
    with fixed_threads(args.threads):
        runs = [measure(seed, data, args.rounds, device) for seed in seeds]
    per_seed, checks = [paths for paths, _ in runs], [c for _, c in runs]
    paths = pooled(per_seed)
    backends = paths.pop("attention_backends")
    results: dict = {
        "model": "GPT d=128, 4 layers, 4 heads, vocabulary 10,000 (PTB words), dropout 0, fused SDPA",
        "threads": args.threads, "dropout": 0.0, "rounds": args.rounds, "seeds": seeds,
        "shapes": {"train_batch": BATCH, "train_context": CONTEXT, "prompt": PROMPT,
                   "new_tokens": NEW_TOKENS, "generation_context": GENERATION_CONTEXT},
        "max_logit_difference": {name: max(c["max_logit_difference"][name] for c in checks)
                                 for name in checks[0]["max_logit_difference"]},
        "greedy_tokens_equal_hugging_face": all(c["greedy_tokens_equal_hugging_face"] for c in checks),
        "attention_backends": {b: {"step_ms": 1e3 * t.median, "iqr_ms": 1e3 * t.iqr,
                                   "tokens_per_s": BATCH * CONTEXT / t.median,
                                   "peak_memory_mb": max(c["peak_memory_mb"][b] for c in checks)}
                               for b, t in backends.items()},
        "paths": {path: summarise(timings) for path, timings in paths.items()},
    }
    ratio_keys = {"train_step": "train_vs_hf", "forward_full": "forward_full_vs_hf",
                  "forward_last": "forward_last_vs_hf", "generate_cached": "generate_cached_vs_hf",
                  "generate_uncached": "generate_uncached_vs_hf"}
    results["ratios"], results["ratios_ci"], results["ratios_iqr"] = {}, {}, {}
    for path, key in ratio_keys.items():  # the interval is over seeds, the IQR over the rounds of all seeds
        estimate = seed_ratio(per_seed, path, "project", "hugging_face")
        results["ratios"][key], results["ratios_ci"][key] = estimate.value, [estimate.low, estimate.high]
        results["ratios_iqr"][key] = ratio_spread(paths[path]["project"], paths[path]["hugging_face"])[1]
    results["ratios_vs_nanogpt"], results["ratios_vs_nanogpt_ci"] = {}, {}
    for path in ("train_step", "forward_full", "forward_last", "generate_uncached"):
        estimate = seed_ratio(per_seed, path, "project", "nanogpt")
        results["ratios_vs_nanogpt"][path] = estimate.value
        results["ratios_vs_nanogpt_ci"][path] = [estimate.low, estimate.high]
    results["cached_tokens_per_s"] = {n: NEW_TOKENS / t.median for n, t in paths["generate_cached"].items()}
    results["params"] = checks[0]["params"]
    for key, ratio in results["ratios"].items():
        low, high = results["ratios_ci"][key]
        print(f"{key}: project / Hugging Face = {ratio:.2f} [{low:.2f}, {high:.2f}] over seeds {seeds}")
    print(f"results -> {record.save(results)}")


if __name__ == "__main__":
    main()
