"""The side-by-side benchmark compares like with like: the three models compute the same function."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench_core import hugging_face_from, nano_from, project_model  # noqa: E402

from common.generate import generate  # noqa: E402


def test_copied_weights_give_the_same_logits_and_greedy_text():
    torch.manual_seed(0)
    model = project_model(vocab=50, context=32).eval()
    nano, hf = nano_from(model).eval(), hugging_face_from(model)
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        ours = model(idx).logits
        torch.testing.assert_close(nano(idx, targets=idx)[0], ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(idx).logits, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nano(idx)[0], model(idx, logits_to_keep=1).logits, rtol=1e-5, atol=1e-5)
    prompt = torch.zeros(1, 4, dtype=torch.long)  # token 0 as a real token, not padding
    reference = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                            do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 10, temperature=0), reference)
    assert torch.equal(nano.generate(prompt, 10), reference)


def test_seed_ratios_and_pooled_rounds():
    from bench_core import pooled, seed_ratio

    from common.bench import Timing

    per_seed = [{"train_step": {"project": Timing.of([1.0, 1.0, 1.0]), "hugging_face": Timing.of([2.0, 2.0, 2.0])}},
                {"train_step": {"project": Timing.of([3.0, 3.0, 3.0]), "hugging_face": Timing.of([4.0, 4.0, 4.0])}}]
    estimate = seed_ratio(per_seed, "train_step", "project", "hugging_face")
    assert estimate.value == (0.5 + 0.75) / 2 and estimate.low < 0.5 and estimate.high > 0.75
    merged = pooled(per_seed)["train_step"]
    assert merged["project"].samples == [1.0] * 3 + [3.0] * 3 and merged["hugging_face"].median == 3.0
