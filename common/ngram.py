"""Count n-gram language models: the floor every neural language model is shown against.

An interpolated n-gram model of order ``n`` predicts token ``w`` after the history ``h`` (the
``n - 1`` tokens before it) by mixing the counts of ``(h, w)`` with the prediction of the
next lower order (history ``h'``, one token shorter), down to a uniform distribution over the
vocabulary. Two classic smoothings:

- **Witten-Bell** (Witten & Bell 1991): the lower order gets the weight of the number of
  distinct tokens seen after ``h``, T(h):

      P(w | h) = (c(h, w) + T(h) P(w | h')) / (c(h) + T(h))

- **interpolated modified Kneser-Ney** (Chen & Goodman 1998): three absolute discounts
  D1, D2, D3+ (by the count of ``(h, w)``), the discounted mass goes to the lower order, and
  the lower orders count *continuations* (in how many distinct contexts a token follows)
  instead of occurrences:

      P(w | h) = max(c(h, w) - D(c(h, w)), 0) / c(h) + gamma(h) P(w | h'),
      gamma(h) = (D1 N1(h) + D2 N2(h) + D3 N3+(h)) / c(h)

A history never seen in training hands its whole mass to the lower order. The stream is one
sequence (line breaks are tokens, as in the neural models): the first token of a test split
is not predicted, every later one is, with as much history as the split offers, which is
how ``common.train.evaluate_lm`` scores a neural model.

All tables are numpy arrays: an n-gram is the id of its (n-1)-gram prefix times V plus its
last token, looked up by binary search, so PTB (0.9M words) or 5M characters fit in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SMOOTHINGS = ("kneser-ney", "witten-bell")
ORDER_NAMES = {1: "unigram", 2: "bigram", 3: "trigram", 4: "4-gram", 5: "5-gram"}


def _as_array(ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token ids must be a 1-D sequence of integers, got shape {array.shape}, dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _lookup(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index of each ``wanted`` key in the sorted ``keys``, or -1 where it is absent."""
    pos = np.searchsorted(keys, wanted)
    pos = np.minimum(pos, len(keys) - 1)
    found = (keys[pos] == wanted) if len(keys) else np.zeros(len(wanted), bool)
    return np.where(found, pos, -1)


def kneser_ney_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """Chen & Goodman's D1, D2, D3+ from the counts-of-counts n1..n4 of one order.

    Y = n1 / (n1 + 2 n2);  D1 = 1 - 2Y n2/n1;  D2 = 2 - 3Y n3/n2;  D3+ = 3 - 4Y n4/n3.
    A corpus too small for some n_c falls back to 0.5, 1.0, 1.5; each D_c stays in [0, c].
    """
    n = [int(np.count_nonzero(counts == c)) for c in (1, 2, 3, 4)]
    if min(n) == 0:
        return 0.5, 1.0, 1.5
    y = n[0] / (n[0] + 2 * n[1])
    d = (1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2])
    return tuple(float(min(max(value, 0.0), c)) for c, value in zip((1, 2, 3), d))


@dataclass
class _Level:
    """The table of one order k: its k-gram keys and the statistics of their (k-1)-gram histories."""

    keys: np.ndarray  # (G,) sorted prefix_id * V + token (order 1: the token itself)
    counts: np.ndarray  # (G,) count used at this order (raw or continuation)
    history_total: np.ndarray  # (H,) c(h): sum of counts with history h
    history_weight: np.ndarray  # (H,) mass handed to the lower order: T(h) or D1 N1 + D2 N2 + D3 N3+
    discounts: tuple[float, float, float] = (0.0, 0.0, 0.0)


class NGramLM:
    """An interpolated count n-gram model over a stream of token ids in ``[0, vocab_size)``.

    >>> lm = NGramLM(order=3, vocab_size=tok.vocab_size).fit(data.train)
    >>> lm.evaluate(data.test)["ppl"]
    """

    def __init__(self, order: int, vocab_size: int, smoothing: str = "kneser-ney"):
        if not isinstance(order, int) or not 1 <= order <= 8:
            raise ValueError(f"order must be an integer in [1, 8], got {order!r}")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
        self.order, self.vocab_size, self.smoothing = order, vocab_size, smoothing
        self.levels: list[_Level] = []

    # -- fitting ------------------------------------------------------------------------------

    def _check_ids(self, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got ids from {ids.min()} to {ids.max()}")

    def fit(self, train_ids: Sequence[int] | np.ndarray | torch.Tensor) -> NGramLM:
        """Count every order on the training stream; returns ``self``."""
        tokens = _as_array(train_ids)
        self._check_ids(tokens)
        if len(tokens) < 2:
            raise ValueError(f"the training stream needs at least 2 tokens, got {len(tokens)}")
        V = self.vocab_size
        # ids[k-1][t]: id of the k-gram ending at position t (-1 where t < k - 1)
        ids = [tokens]
        keys = [np.arange(V, dtype=np.int64)]
        for _ in range(2, self.order + 1):
            prefix = ids[-1][:-1]
            valid = prefix >= 0
            full = prefix * V + tokens[1:]
            level_keys, inverse = np.unique(full[valid], return_inverse=True)
            level_ids = np.full(len(tokens), -1, dtype=np.int64)
            level_ids[1:][valid] = inverse
            ids.append(level_ids)
            keys.append(level_keys)

        raw = [np.bincount(ids[k][ids[k] >= 0], minlength=len(keys[k])) for k in range(self.order)]
        counts = list(raw)
        if self.smoothing == "kneser-ney":
            for k in range(self.order - 1):  # lower orders: distinct left extensions
                longer, shorter = ids[k + 1], ids[k]
                valid = longer >= 0
                _, first = np.unique(longer[valid], return_index=True)
                counts[k] = np.bincount(shorter[valid][first], minlength=len(keys[k]))
        self.levels = [self._level(k, keys[k], counts[k].astype(np.float64), 1 if k == 0 else len(keys[k - 1]))
                       for k in range(self.order)]
        return self

    def _level(self, k: int, keys: np.ndarray, counts: np.ndarray, n_histories: int) -> _Level:
        history = np.zeros(len(keys), dtype=np.int64) if k == 0 else keys // self.vocab_size
        total = np.bincount(history, weights=counts, minlength=n_histories)
        if self.smoothing == "witten-bell":
            weight = np.bincount(history, weights=(counts > 0).astype(np.float64), minlength=n_histories)
            return _Level(keys, counts, total, weight)
        discounts = kneser_ney_discounts(counts[counts > 0])
        per_key = np.select([counts == 1, counts == 2, counts >= 3], discounts, 0.0)
        weight = np.bincount(history, weights=per_key, minlength=n_histories)
        return _Level(keys, counts, total, weight, discounts)

    # -- scoring ------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if not self.levels:
            raise RuntimeError("the model is not fitted: call fit(train_ids) first")

    def _probabilities(self, histories: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
        """P(target | history) for N items; ``histories[k]`` holds each item's (k)-gram history id
        for order k + 1 (-1: unseen or not available), ``histories[0]`` is ignored."""
        V = self.vocab_size
        unigram = self.levels[0]
        total = unigram.history_total[0]
        if self.smoothing == "witten-bell":
            p = (unigram.counts[targets] + unigram.history_weight[0] / V) / (total + unigram.history_weight[0])
        else:
            d = np.select([unigram.counts[targets] == 1, unigram.counts[targets] == 2, unigram.counts[targets] >= 3],
                          unigram.discounts, 0.0)
            p = (np.maximum(unigram.counts[targets] - d, 0) + unigram.history_weight[0] / V) / total
        for k in range(1, self.order):
            level, history = self.levels[k], histories[k]
            known = history >= 0
            known[known] = history[known] < len(level.history_total)
            h = np.where(known, history, 0)
            c_h = np.where(known, level.history_total[h], 0.0)
            active = c_h > 0
            gram = np.where(active, _lookup(level.keys, h * V + targets), -1)
            c_hw = np.where(gram >= 0, level.counts[np.maximum(gram, 0)], 0.0)
            weight = level.history_weight[h]
            safe = np.where(active, c_h, 1.0)
            if self.smoothing == "witten-bell":
                mixed = (c_hw + weight * p) / (safe + weight)
            else:
                d = np.select([c_hw == 1, c_hw == 2, c_hw >= 3], level.discounts, 0.0)
                mixed = (np.maximum(c_hw - d, 0) + weight * p) / safe
            p = np.where(active, mixed, p)
        return p

    def _stream_ids(self, tokens: np.ndarray) -> list[np.ndarray]:
        """Training-table id of the k-gram ending at each position of ``tokens`` (-1: unseen)."""
        V = self.vocab_size
        ids = [tokens]
        for k in range(1, self.order - 1):
            prefix = ids[-1][:-1]
            level_ids = np.full(len(tokens), -1, dtype=np.int64)
            valid = prefix >= 0
            level_ids[1:][valid] = _lookup(self.levels[k].keys, prefix[valid] * V + tokens[1:][valid])
            ids.append(level_ids)
        return ids

    def token_log_probs(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Natural log-probability of every token after the first, given the tokens before it: (N - 1,)."""
        self._require_fitted()
        tokens = _as_array(ids)
        self._check_ids(tokens)
        if len(tokens) < 2:
            raise ValueError(f"a stream to score needs at least 2 tokens, got {len(tokens)}")
        stream = self._stream_ids(tokens)
        # history of order k + 1 for the target at t: the k-gram ending at t - 1
        histories = [np.zeros(len(tokens) - 1, dtype=np.int64)] + [stream[k - 1][:-1] for k in range(1, self.order)]
        return np.log(self._probabilities(histories, tokens[1:]))

    def evaluate(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, float]:
        """Mean loss over a stream: ``nats`` per token, ``bits`` per token and perplexity ``ppl``."""
        nats = float(-self.token_log_probs(ids).mean())
        return {"nats": nats, "bits": nats / math.log(2), "ppl": math.exp(nats)}

    def next_token_probs(self, history: Sequence[int]) -> np.ndarray:
        """The distribution over the whole vocabulary after ``history``: (V,), sums to 1."""
        self._require_fitted()
        tokens = _as_array(history)
        self._check_ids(tokens)
        stream = self._stream_ids(tokens) if len(tokens) else []
        candidates = np.arange(self.vocab_size, dtype=np.int64)
        histories = [np.zeros(self.vocab_size, dtype=np.int64)]
        for k in range(1, self.order):
            known = len(tokens) >= k
            history_id = stream[k - 1][-1] if known else -1
            histories.append(np.full(self.vocab_size, history_id, dtype=np.int64))
        return self._probabilities(histories, candidates)


def reference_levels(train_ids, test_ids, vocab_size: int, orders: Iterable[int] = (1, 2, 3),
                     smoothing: str = "kneser-ney", unit: str = "ppl",
                     cache_dir: str | Path | None = None) -> dict[str, float]:
    """Count n-gram levels of a split, keyed ``unigram``, ``bigram``, ... in the notebook's unit.

    ``unit``: ``ppl`` (perplexity per token), ``bits`` (bits per token: bits per character on a
    character stream) or ``nats`` (per token). With ``cache_dir`` the levels are kept in a JSON
    file named by a hash of both streams and the settings, so a rerun reads them back.
    """
    if unit not in ("ppl", "bits", "nats"):
        raise ValueError(f"unit must be 'ppl', 'bits' or 'nats', got {unit!r}")
    orders = sorted(set(orders))
    if not orders or orders[0] < 1:
        raise ValueError(f"orders must be positive integers, got {orders}")
    train, test = _as_array(train_ids), _as_array(test_ids)
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        for part in (train.tobytes(), test.tobytes(), json.dumps([vocab_size, orders, smoothing, unit]).encode()):
            digest.update(part)
        cache = Path(cache_dir) / f"ngram-levels-{digest.hexdigest()[:16]}.json"
        if cache.exists():
            return json.loads(cache.read_text())
    levels = {}
    for order in orders:
        model = NGramLM(order, vocab_size, smoothing).fit(train)
        levels[ORDER_NAMES.get(order, f"{order}-gram")] = model.evaluate(test)[unit]
    if cache is not None:
        from common.results import write_json

        write_json(cache, levels)
    return levels


def bits_per_char(nats_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Convert a per-token loss (nats) over ``n_tokens`` tokens of a text of ``n_chars`` characters
    into bits per character, so that models with different tokenizers compare on one scale."""
    if n_tokens < 1 or n_chars < 1:
        raise ValueError(f"n_tokens and n_chars must be >= 1, got {n_tokens}, {n_chars}")
    return nats_per_token * n_tokens / (n_chars * math.log(2))
