"""Count n-gram models: proper distributions, hand-computed values, unseen words and histories."""

import math

import numpy as np
import pytest

from common.ngram import NGramLM, bits_per_char, kneser_ney_discounts, reference_levels

TINY = [0, 1, 0, 1, 0, 2]  # vocabulary of 4: token 3 is never seen


@pytest.mark.parametrize("smoothing", ["witten-bell", "kneser-ney"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one_for_random_histories(smoothing, order):
    rng = np.random.default_rng(order)
    train = rng.integers(0, 12, size=3_000) * (rng.random(3_000) < 0.9)  # skewed, some ids unseen
    lm = NGramLM(order, vocab_size=15, smoothing=smoothing).fit(train)
    for _ in range(20):
        history = rng.integers(0, 15, size=int(rng.integers(0, 6))).tolist()
        probs = lm.next_token_probs(history)
        assert probs.shape == (15,)
        assert np.all(probs > 0)
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_witten_bell_by_hand():
    lm = NGramLM(2, vocab_size=4, smoothing="witten-bell").fit(TINY)
    # unigram: counts 3, 2, 1, 0 over N = 6 tokens of T = 3 types: P(w) = (c(w) + T / V) / (N + T)
    unigram = np.array([3.75, 2.75, 1.75, 0.75]) / 9
    np.testing.assert_allclose(lm.next_token_probs([]), unigram)
    # after 0: c = 3, T = 2, c(0, 1) = 2;  after 1: c = 2, T = 1, c(1, 3) = 0
    p_1_after_0 = (2 + 2 * unigram[1]) / (3 + 2)
    p_3_after_1 = (0 + 1 * unigram[3]) / (2 + 1)
    np.testing.assert_allclose(lm.token_log_probs([0, 1, 3]), np.log([p_1_after_0, p_3_after_1]))
    # a history never seen in training (token 3) hands everything to the unigram
    np.testing.assert_allclose(lm.next_token_probs([3]), unigram)


def test_kneser_ney_by_hand():
    lm = NGramLM(2, vocab_size=4, smoothing="kneser-ney").fit(TINY)
    # continuation counts of the unigram level: 0, 1, 2 each follow one distinct token; 3 none.
    # Counts-of-counts too small for Chen & Goodman's estimate: D = 0.5, 1.0, 1.5.
    unigram = np.array([0.5 + 1.5 / 4, 0.5 + 1.5 / 4, 0.5 + 1.5 / 4, 1.5 / 4]) / 3
    np.testing.assert_allclose(lm.next_token_probs([]), unigram)
    # after 0: c(0, 1) = 2 (D2 = 1), c(0, 2) = 1 (D1 = 0.5), c(0) = 3, gamma(0) = 1.5 / 3
    expected = {1: (2 - 1.0 + 1.5 * unigram[1]) / 3, 2: (1 - 0.5 + 1.5 * unigram[2]) / 3,
                0: 1.5 * unigram[0] / 3, 3: 1.5 * unigram[3] / 3}
    np.testing.assert_allclose(lm.next_token_probs([0]), [expected[w] for w in range(4)])


def test_discounts_follow_chen_and_goodman():
    counts = np.array([1] * 40 + [2] * 20 + [3] * 10 + [4] * 5 + [9] * 3)
    y = 40 / (40 + 2 * 20)
    expected = (1 - 2 * y * 20 / 40, 2 - 3 * y * 10 / 20, 3 - 4 * y * 5 / 10)
    assert kneser_ney_discounts(counts) == pytest.approx(expected)


@pytest.mark.parametrize("smoothing", ["witten-bell", "kneser-ney"])
def test_unseen_words_and_histories_get_finite_loss(smoothing):
    lm = NGramLM(3, vocab_size=6, smoothing=smoothing).fit([0, 1, 2, 0, 1, 2, 0, 1])
    log_probs = lm.token_log_probs([5, 4, 0, 1, 5, 2])  # 4, 5 never seen, nor any history with them
    assert log_probs.shape == (5,)
    assert np.all(np.isfinite(log_probs)) and np.all(log_probs < 0)
    # a seen trigram is more likely than an unseen word
    assert lm.next_token_probs([0, 1])[2] > 10 * lm.next_token_probs([0, 1])[5]


def test_higher_orders_learn_a_markov_source():
    """A second-order Markov chain: the trigram is near the source's entropy, far below the unigram."""
    rng = np.random.default_rng(0)
    V = 6
    table = rng.dirichlet(np.full(V, 0.2), size=(V, V))
    stream = [0, 1]
    for _ in range(60_000):
        stream.append(int(rng.choice(V, p=table[stream[-2], stream[-1]])))
    train, test = np.array(stream[:50_000]), np.array(stream[50_000:])
    levels = reference_levels(train, test, V, orders=(1, 2, 3), unit="nats")
    entropy = -np.mean([math.log(table[test[t - 2], test[t - 1], test[t]]) for t in range(2, len(test))])
    assert levels["unigram"] > levels["bigram"] > levels["trigram"]
    assert levels["trigram"] == pytest.approx(entropy, abs=0.02)


def test_reference_levels_cache_round_trip(tmp_path):
    train, test = [0, 1, 2, 0, 1, 2, 0, 2], [0, 1, 2, 1]
    first = reference_levels(train, test, 3, orders=(1, 2), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ngram-levels-*.json"))) == 1
    assert reference_levels(train, test, 3, orders=(1, 2), cache_dir=tmp_path) == first
    assert set(first) == {"unigram", "bigram"}


def test_bits_per_char_converts_a_token_loss():
    # 100 tokens at ln 2 nats each = 100 bits over 400 characters = 0.25 bits per character
    assert bits_per_char(math.log(2), 100, 400) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="n_chars"):
        bits_per_char(1.0, 10, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(order=0, vocab_size=3), "order"),
    (dict(order=2, vocab_size=0), "vocab_size"),
    (dict(order=2, vocab_size=3, smoothing="laplace"), "smoothing"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NGramLM(**kwargs)


def test_bad_streams_are_refused():
    lm = NGramLM(2, vocab_size=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        lm.evaluate([0, 1])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        lm.fit([0, 1, 7])
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        lm.fit(np.array([0.5, 1.0]))
    lm.fit([0, 1, 2, 1])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lm.evaluate([1])
