import math
import random
from collections import Counter

import pytest

from common.diversity import distinct_n, ngrams, self_bleu, set_distinct_n


def naive_self_bleu(texts, max_n=4, epsilon=0.1):
    """BLEU of each text against the others, written the slow, obvious way."""
    scores = []
    for i, hyp in enumerate(texts):
        refs = [t for j, t in enumerate(texts) if j != i]
        if not hyp:
            scores.append(0.0)
            continue
        logs = 0.0
        for n in range(1, max_n + 1):
            grams = Counter(ngrams(hyp, n))
            total = sum(grams.values())
            if total == 0:
                logs += math.log(epsilon)
                continue
            matched = sum(min(c, max(Counter(ngrams(r, n))[g] for r in refs)) for g, c in grams.items())
            logs += math.log(matched / total if matched else epsilon / total)
        ref_len = min((len(r) for r in refs), key=lambda n: (abs(n - len(hyp)), n))
        bp = 1.0 if len(hyp) >= ref_len else math.exp(1 - ref_len / len(hyp))
        scores.append(bp * math.exp(logs / max_n))
    return sum(scores) / len(scores)


def test_distinct_n_within_one_text():
    assert distinct_n("a b a b".split(), 1) == 0.5
    assert distinct_n("a b a b".split(), 2) == 2 / 3
    assert distinct_n("a".split(), 2) == 0.0


def test_set_distinct_sees_repeats_across_samples():
    text = "the cat sat on the mat".split()
    assert distinct_n(text, 2) == 1.0
    assert set_distinct_n([text, text], 2) == 0.5  # each sample alone has no repeat; the set has
    assert set_distinct_n([text, "a dog ran far away".split()], 2) == 1.0
    assert set_distinct_n([[], []], 2) == 0.0


def test_self_bleu_extremes():
    text = "the cat sat on the mat today".split()
    assert self_bleu([text, text, text]) == pytest.approx(1.0)
    disjoint = [[f"w{k}{i}" for i in range(8)] for k in range(4)]
    assert self_bleu(disjoint) < 0.1


def test_self_bleu_matches_the_naive_definition():
    rng = random.Random(0)
    vocab = "a b c d e f".split()
    for _ in range(30):
        texts = [[rng.choice(vocab) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(2, 6))]
        assert self_bleu(texts) == pytest.approx(naive_self_bleu(texts))


def test_self_bleu_refuses_a_single_text():
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu([["a"]])
