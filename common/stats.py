"""Intervals and verdicts: say "A beats B" only when the noise allows it.

- over training seeds: the mean and its Student-t interval (``mean_ci``);
- over test items: bootstrap intervals (``bootstrap_ci``; ``bootstrap_difference``, paired or not);
- accuracies: the Wilson score interval (``wilson_interval``);
- two classifiers on the same items: McNemar's exact test (``mcnemar_exact``);
- ``compare(a, b)``: the difference, its 95 % interval and a verdict ("A better", "B better" or
  "no difference detectable at this budget"), which the notebooks' generated text quotes.

Every function returns plain numbers (an ``Estimate``), so the results JSON can hold them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

NO_DIFFERENCE = "no difference detectable at this budget"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval [low, high] at ``confidence``, from ``n`` values."""

    value: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, point: float = 0.0) -> bool:
        """True when the whole interval lies on one side of ``point``."""
        return bool(self.low > point or self.high < point)

    def to_dict(self) -> dict:
        return {"mean": self.value, "ci": [self.low, self.high], "n": self.n}

    def __format__(self, spec: str) -> str:
        spec = spec or ".3g"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _values(values: Sequence[float], name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty: at least one value is needed")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds non-finite values: {array.tolist()}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean of ``values`` (one per seed) with the Student-t interval mean ± t s / sqrt(n).

    One value has no spread: its interval is infinite, so nothing can be claimed from it.
    """
    _check_confidence(confidence)
    x = _values(values)
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, -math.inf, math.inf, 1, confidence)
    half = scipy_stats.t.ppf(0.5 + confidence / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half, int(x.size), confidence)


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean,
                 confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Estimate:
    """``statistic`` of ``values`` (one per test item) with a percentile bootstrap interval."""
    _check_confidence(confidence)
    x = _values(values)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, x.size, size=(resamples, x.size))
    boot = np.apply_along_axis(statistic, 1, x[draws]) if statistic is not np.mean else x[draws].mean(axis=1)
    low, high = np.quantile(boot, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Estimate(float(statistic(x)), float(low), float(high), int(x.size), confidence)


def bootstrap_difference(a: Sequence[float], b: Sequence[float], paired: bool, confidence: float = 0.95,
                         resamples: int = 10_000, seed: int = 0) -> Estimate:
    """mean(a) - mean(b) with a percentile bootstrap interval.

    ``paired``: a[i] and b[i] are the same item (resampled together); otherwise each sample is
    resampled on its own.
    """
    _check_confidence(confidence)
    x, y = _values(a, "a"), _values(b, "b")
    if paired:
        if x.size != y.size:
            raise ValueError(f"paired samples need the same length, got {x.size} and {y.size}")
        return bootstrap_ci(x - y, confidence=confidence, resamples=resamples, seed=seed)
    rng = np.random.default_rng(seed)
    boot = (x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
            - y[rng.integers(0, y.size, (resamples, y.size))].mean(axis=1))
    low, high = np.quantile(boot, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Estimate(float(x.mean() - y.mean()), float(low), float(high), int(min(x.size, y.size)), confidence)


def t_difference(a: Sequence[float], b: Sequence[float], paired: bool, confidence: float = 0.95) -> Estimate:
    """mean(a) - mean(b) with a Student-t interval: paired (a[i], b[i] share seed i) or Welch's."""
    _check_confidence(confidence)
    x, y = _values(a, "a"), _values(b, "b")
    if paired:
        if x.size != y.size:
            raise ValueError(f"paired samples need the same length, got {x.size} and {y.size}")
        return mean_ci(x - y, confidence)
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return Estimate(diff, -math.inf, math.inf, int(min(x.size, y.size)), confidence)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Estimate(diff, diff, diff, int(min(x.size, y.size)), confidence)
    dof = (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))  # Welch-Satterthwaite
    half = scipy_stats.t.ppf(0.5 + confidence / 2, df=dof) * se
    return Estimate(diff, diff - half, diff + half, int(min(x.size, y.size)), confidence)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """An accuracy k / n with the Wilson score interval (sound near 0 and 1, unlike k/n ± 1.96 se)."""
    _check_confidence(confidence)
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    z = scipy_stats.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return Estimate(p, min(p, low), max(p, high), n, confidence)  # rounding must not put k / n outside


@dataclass(frozen=True)
class McNemar:
    """Two classifiers on the same items: ``only_a`` items only A gets right, ``only_b`` only B."""

    only_a: int
    only_b: int
    p_value: float

    def to_dict(self) -> dict:
        return {"only_a": self.only_a, "only_b": self.only_b, "p_value": self.p_value}


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """McNemar's exact test: under "A and B are equally accurate", the discordant items split
    50/50, so p = P(Binomial(b + c, 1/2) at least as uneven as observed), two-sided."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be 1-D and of the same length, got {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(scipy_stats.binomtest(only_a, discordant, 0.5).pvalue)
    return McNemar(only_a, only_b, p)


@dataclass(frozen=True)
class Comparison:
    """``a - b`` with its interval, and what may be said of it."""

    name_a: str
    name_b: str
    difference: Estimate
    verdict: str
    method: str

    def to_dict(self) -> dict:
        return {"a": self.name_a, "b": self.name_b, "difference": self.difference.value,
                "ci": [self.difference.low, self.difference.high], "verdict": self.verdict, "method": self.method}

    def sentence(self, unit: str = "", spec: str = ".3g") -> str:
        """E.g. "dense - r8: -4.1 [-6.3, -1.9] ppl: dense better"."""
        unit = f" {unit}" if unit else ""
        return f"{self.name_a} - {self.name_b}: {self.difference:{spec}}{unit}: {self.verdict}"


def compare(a: Sequence[float], b: Sequence[float], higher_is_better: bool, paired: bool,
            names: tuple[str, str] = ("A", "B"), method: str = "t", confidence: float = 0.95,
            seed: int = 0) -> Comparison:
    """Compare two samples of a metric and return the difference a - b, its interval and a verdict.

    ``method``: ``"t"`` for a few values per side (training seeds; paired when a[i] and b[i] share
    seed i) or ``"bootstrap"`` for many (test items; paired when they are the same items).
    The verdict names the better side only when the interval excludes 0.
    """
    if method == "t":
        difference = t_difference(a, b, paired, confidence)
    elif method == "bootstrap":
        difference = bootstrap_difference(a, b, paired, confidence, seed=seed)
    else:
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    if not difference.excludes(0.0):
        verdict = NO_DIFFERENCE
    else:
        a_larger = difference.low > 0
        verdict = f"{names[0] if a_larger == higher_is_better else names[1]} better"
    label = f"{'paired' if paired else 'unpaired'} {'Student-t' if method == 't' else 'bootstrap'}"
    return Comparison(names[0], names[1], difference, verdict, label)


def summary(values: Sequence[float], seeds: Sequence[int] | None = None, confidence: float = 0.95) -> dict:
    """The results-file form of a metric over seeds: ``{"mean", "ci", "values", "seeds"}``."""
    estimate = mean_ci(values, confidence)
    out = {"mean": estimate.value, "ci": [estimate.low, estimate.high], "values": [float(v) for v in values]}
    if seeds is not None:
        if len(seeds) != len(values):
            raise ValueError(f"one seed per value: {len(seeds)} seeds for {len(values)} values")
        out["seeds"] = list(seeds)
    return out
