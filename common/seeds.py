"""Several training seeds of one experiment, each checkpointed, summarised with intervals.

    runs = run_seeds(lambda seed, path: train_and_score(seed, path), seeds=[0, 1, 2],
                     checkpoint_for=lambda seed: run.checkpoint(f"dense-seed{seed}", cfg, config, seed))
    runs.summary("ppl")  # {"mean", "ci", "values", "seeds"} for the results file
    compare(runs.values("ppl"), other.values("ppl"), higher_is_better=False, paired=True)

Each seed trains (or resumes, or loads when finished) from its own checkpoint, so an interrupted
sweep picks up where it stopped and a finished one costs only its evaluations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.stats import Estimate, mean_ci, summary


def _lookup(metrics: dict, key: str):
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"metric {key!r} not found (have {sorted(metrics)})")
        value = value[part]
    return value


@dataclass
class SeedRuns:
    """The metrics of one experiment per seed (``metrics[i]`` belongs to ``seeds[i]``)."""

    name: str
    seeds: list[int]
    metrics: list[dict]

    def values(self, key: str) -> list[float]:
        """One number per seed; ``key`` may be dotted (``"accuracy.copy"``)."""
        return [float(_lookup(m, key)) for m in self.metrics]

    def estimate(self, key: str) -> Estimate:
        return mean_ci(self.values(key))

    def summary(self, key: str) -> dict:
        return summary(self.values(key), self.seeds)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    return seeds


def run_seeds(train_one: Callable[[int, Path | None], dict], seeds: Sequence[int],
              checkpoint_for: Callable[[int], Path] | None = None, name: str = "run",
              verbose: bool = True) -> SeedRuns:
    """Call ``train_one(seed, checkpoint_path)`` for each seed and collect the metrics it returns.

    ``checkpoint_for(seed)`` names each seed's checkpoint (e.g. ``run.checkpoint``); the training
    function passes it to ``common.train.train`` so each seed resumes on its own.
    """
    seeds = check_seeds(seeds)
    metrics = []
    for seed in seeds:
        started = time.perf_counter()
        result = train_one(seed, checkpoint_for(seed) if checkpoint_for else None)
        if not isinstance(result, dict):
            raise TypeError(f"{name}: train_one must return a dict of metrics, got {type(result).__name__}")
        metrics.append(result)
        if verbose:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
            print(f"{name} seed {seed}: {shown} ({time.perf_counter() - started:.0f} s)")
    return SeedRuns(name, seeds, metrics)
