"""Several training seeds of one experiment, each checkpointed, summarised with intervals.

    runs = run_seeds(lambda seed, path: train_and_score(seed, path), seeds=[0, 1, 2],
                     checkpoint_for=lambda seed: run.checkpoint(f"dense-seed{seed}", cfg, config, seed))
    runs.summary("ppl")  # {"mean", "ci", "values", "seeds"} for the results file
    compare(runs.values("ppl"), other.values("ppl"), higher_is_better=False, paired=True)

Each seed trains (or resumes, or loads when finished) from its own checkpoint, so an interrupted
sweep picks up where it stopped and a finished one costs only its evaluations.

Several experiments with several seeds each (``run_seed_grid``) can run side by side in ``workers``
forked processes with one thread each: small models at small batches spend most of a step in
per-operation overhead, which a second thread does not shorten but a second process does.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

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
    return run_seed_grid(lambda _, seed, path: train_one(seed, path), [name], seeds,
                         None if checkpoint_for is None else lambda _, seed: checkpoint_for(seed),
                         verbose=verbose)[name]


def run_seed_grid(train_one: Callable[[Hashable, int, Path | None], dict], experiments: Sequence[Hashable],
                  seeds: Sequence[int], checkpoint_for: Callable[[Hashable, int], Path] | None = None,
                  workers: int = 1, verbose: bool = True) -> dict[Hashable, SeedRuns]:
    """``train_one(experiment, seed, checkpoint_path)`` for every experiment and seed -> {experiment: SeedRuns}.

    With ``workers`` > 1 the runs go, in the order given (experiment by experiment), to that many forked
    processes with one thread each (``run_in_processes``); a run's metrics do not depend on how many
    run beside it. With ``workers`` = 1 (and where processes cannot be forked, or CUDA is in use) they
    run one after another in this process, with its thread count.
    """
    seeds = check_seeds(seeds)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    jobs = {(experiment, seed): _seed_job(train_one, experiment, seed,
                                          checkpoint_for(experiment, seed) if checkpoint_for else None)
            for experiment in experiments for seed in seeds}

    def report(key, result, seconds):
        if not isinstance(result, dict):
            raise TypeError(f"{_label(key[0])}: train_one must return a dict of metrics, got {type(result).__name__}")
        if verbose:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
            print(f"{_label(key[0])} seed {key[1]}: {shown} ({seconds:.0f} s)", flush=True)

    if workers > 1 and can_fork():
        results = run_in_processes(jobs, workers, on_done=report)
    else:
        results = {}
        for key, job in jobs.items():
            started = time.perf_counter()
            results[key] = job()
            report(key, results[key], time.perf_counter() - started)
    return {experiment: SeedRuns(_label(experiment), seeds, [results[experiment, seed] for seed in seeds])
            for experiment in experiments}


def _label(experiment: Hashable) -> str:
    """("copying", "mamba") -> "copying mamba"."""
    return " ".join(map(str, experiment)) if isinstance(experiment, tuple) else str(experiment)


def _seed_job(train_one, experiment, seed, path) -> Callable[[], dict]:
    return lambda: train_one(experiment, seed, path)


def side_by_side_workers(device: torch.device) -> int:
    """Workers for ``run_seed_grid``: on a CPU one one-thread process per thread (small models: a step is
    mostly per-operation overhead, which a second thread shortens little); elsewhere 1 (one after another)."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


def can_fork() -> bool:
    """Whether ``run_in_processes`` may fork here: on Linux, before CUDA is initialised (a forked child
    cannot use its parent's CUDA context)."""
    return sys.platform.startswith("linux") and not torch.cuda.is_initialized()


def run_in_processes(jobs: Mapping[Hashable, Callable[[], object]], workers: int,
                     on_done: Callable[[Hashable, object, float], None] | None = None) -> dict:
    """Run each job (a function of no arguments) in its own forked process, at most ``workers`` at a
    time, each with one thread and its output silenced; return {key: result} (results must pickle).

    ``on_done(key, result, seconds)`` is called here as each one finishes. If a job raises, the others
    are stopped and a RuntimeError carries the job's traceback.
    """
    context = multiprocessing.get_context("fork")
    pending, running, results = list(jobs.items()), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                key, job = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(job, send), daemon=True)
                process.start()
                send.close()
                running[receive] = (key, process, time.perf_counter())
            for receive in multiprocessing.connection.wait(list(running)):
                key, process, started = running.pop(receive)
                try:
                    ok, value = receive.recv()
                except EOFError:
                    ok, value = False, "the process ended without a result (killed, or out of memory?)"
                process.join()
                receive.close()
                if not ok:
                    raise RuntimeError(f"run {key!r} failed in its process:\n{value}")
                results[key] = value
                if on_done is not None:
                    on_done(key, value, time.perf_counter() - started)
    finally:
        for _, process, _ in running.values():
            process.terminate()
            process.join()
    return {key: results[key] for key in jobs}


def _child(job: Callable[[], object], send) -> None:
    torch.set_num_threads(1)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            result = job()
        send.send((True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        send.send((False, traceback.format_exc()))
    finally:
        send.close()
