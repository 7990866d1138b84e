"""Diversity of generated text: within one sample, and across the samples drawn for one prompt.

- ``distinct_n`` (Li et al. 2016): unique n-grams / all n-grams of **one** text; 1 means that no
  n-gram repeats inside the text. It says nothing about whether two samples are the same text.
- ``set_distinct_n``: the same ratio over the n-grams of **all** samples of a set pooled together;
  identical samples pull it down even when each one alone has no repetition.
- ``self_bleu`` (Zhu et al. 2018, Texygen): the mean BLEU of each sample against the other samples
  of the set as references; 1 means every sample is made of n-grams of the others, 0 means the
  samples share nothing. Low self-BLEU = diverse set.

Texts are lists of tokens (words); the caller chooses the tokenization.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of one text, in order (empty when the text is shorter than ``n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def closest_length(length: int, references: Sequence[int]) -> int:
    """The reference length closest to a hypothesis of ``length`` tokens (ties: the shorter), BLEU's r."""
    return min(references, key=lambda n: (abs(n - length), n))


def brevity_penalty(length: int, reference: int) -> float:
    """BLEU's BP = min(1, exp(1 - r / c)), c = ``length`` hypothesis tokens, r = ``reference`` tokens."""
    return 1.0 if length >= reference else math.exp(1 - reference / max(length, 1))


def distinct_n(tokens: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams of one text (0 when it has no n-gram)."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def set_distinct_n(texts: Sequence[Sequence[str]], n: int) -> float:
    """Unique n-grams / all n-grams over the pooled n-grams of every text of the set (0 if none)."""
    grams = [g for tokens in texts for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[Sequence[str]], max_n: int = 4, epsilon: float = 0.1) -> float:
    """Mean BLEU-``max_n`` of each text against all the other texts of the set as references.

    Clipped n-gram precisions (a hypothesis n-gram counts at most as often as it occurs in the
    reference that holds it most often), geometric mean over n = 1..max_n, brevity penalty
    against the reference length closest to the hypothesis length. A precision with no match is
    smoothed to ``epsilon`` / (number of n-grams) (Chen & Cherry 2014, method 1), so a set with
    nothing in common scores near 0 rather than exactly 0. Needs at least two texts.
    """
    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 texts, got {len(texts)}")
    if max_n < 1 or epsilon <= 0:
        raise ValueError(f"need max_n >= 1 and epsilon > 0, got max_n={max_n}, epsilon={epsilon}")
    counts = [[Counter(ngrams(tokens, n)) for n in range(1, max_n + 1)] for tokens in texts]
    # for each n-gram: the largest and second-largest count over the texts, and which text has the largest,
    # so that "the largest count among the *other* texts" costs one look-up
    best: list[dict[tuple, tuple[int, int, int]]] = [{} for _ in range(max_n)]
    for index, per_n in enumerate(counts):
        for level, counter in enumerate(per_n):
            table = best[level]
            for gram, c in counter.items():
                top, second, owner = table.get(gram, (0, 0, -1))
                table[gram] = (c, top, index) if c > top else (top, max(second, c), owner)
    lengths = [len(tokens) for tokens in texts]
    scores = []
    for index, per_n in enumerate(counts):
        length = lengths[index]
        if length == 0:
            scores.append(0.0)
            continue
        log_precision = 0.0
        for level, counter in enumerate(per_n):
            total = sum(counter.values())
            if total == 0:  # shorter than n: this order carries no evidence, smoothed like a miss
                log_precision += math.log(epsilon)
                continue
            matched = 0
            for gram, c in counter.items():
                top, second, owner = best[level][gram]
                matched += min(c, second if owner == index else top)
            log_precision += math.log(matched / total if matched else epsilon / total)
        reference = closest_length(length, [n for j, n in enumerate(lengths) if j != index])
        scores.append(brevity_penalty(length, reference) * math.exp(log_precision / max_n))
    return sum(scores) / len(scores)
