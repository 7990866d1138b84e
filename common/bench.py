"""Measurements: wall time (warm-up, interleaved rounds, median and quartiles), peak memory, FLOPs.

Contenders are timed in interleaved rounds (``time_interleaved``), with the CPU thread count
fixed (``fixed_threads``); a sweep over sizes re-measures points that break a curve the theory
says is monotone (``timed_sweep``).

Peak memory is the peak of bytes the call allocated *on top of* what was live before it:
on CUDA from the caching allocator's statistics, on the CPU from the profiler's record of
every allocation and free made by PyTorch (so it counts tensors, not the process RSS).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Timing:
    """Seconds per call over ``repeats`` timed calls (after untimed warm-up calls).

    ``q1``/``q3``: the quartiles; ``iqr = q3 - q1`` is the spread reported beside the median.
    """

    median: float
    mean: float
    stdev: float
    minimum: float
    maximum: float
    repeats: int
    q1: float = float("nan")
    q3: float = float("nan")
    samples: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        if not samples:
            raise ValueError("no timing samples")
        q1, q3 = (float(q) for q in np.quantile(samples, [0.25, 0.75]))
        return cls(median=statistics.median(samples), mean=statistics.fmean(samples),
                   stdev=statistics.stdev(samples) if len(samples) > 1 else 0.0, minimum=min(samples),
                   maximum=max(samples), repeats=len(samples), q1=q1, q3=q3, samples=list(samples))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "samples"} | {"iqr": self.iqr}


def ratio_spread(numerator: Timing, denominator: Timing) -> tuple[float, float]:
    """A time ratio and its spread: the ratio of medians, and the IQR of the ratios of the rounds'
    samples (paired by round, as ``time_interleaved`` takes them)."""
    ratios = np.asarray(numerator.samples) / np.asarray(denominator.samples)
    q1, q3 = np.quantile(ratios, [0.25, 0.75])
    return numerator.median / denominator.median, float(q3 - q1)


@contextlib.contextmanager
def fixed_threads(threads: int):
    """Run the block with ``threads`` intra-op CPU threads, then restore the previous count."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_interleaved(calls: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1,
                     device: torch.device | str | None = None) -> dict[str, Timing]:
    """Time each call in rounds that call each of them once, in turn, so a machine that speeds up
    or slows down affects them all alike. ``warmup`` untimed rounds come first.

    Returns one ``Timing`` per call (median, quartiles, and the per-round samples).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    if not calls:
        raise ValueError("calls is empty: nothing to time")
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + rounds):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: Timing.of(values) for name, values in samples.items()}


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 5,
              device: torch.device | str | None = None) -> Timing:
    """Time ``fn()`` alone; CUDA work is synchronised before each clock read. To compare
    contenders, use ``time_interleaved``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing.of(times)


def non_monotone(values: Sequence[float], tolerance: float = 0.05) -> list[int]:
    """Indices i where ``values[i]`` falls below ``values[i - 1]`` by more than ``tolerance`` (relative):
    points of a sweep that break a curve the theory says cannot fall."""
    return [i for i in range(1, len(values)) if values[i] < values[i - 1] * (1 - tolerance)]


@dataclass
class Sweep:
    """Timings of several contenders over a swept size (e.g. sequence length)."""

    points: list
    timings: dict[str, list[Timing]]
    remeasured: list[tuple[str, object]]  # (contender, point) timed again because the curve fell
    violations: list[tuple[str, object]]  # still falling after the retries: reported, not hidden

    def medians(self, name: str) -> list[float]:
        return [t.median for t in self.timings[name]]

    def iqrs(self, name: str) -> list[float]:
        return [t.iqr for t in self.timings[name]]


def timed_sweep(calls_at: Callable[[object], dict[str, Callable[[], object]]], points: Sequence,
                rounds: int = 7, warmup: int = 1, retries: int = 2, tolerance: float = 0.05,
                monotone: Iterable[str] | None = None, device: torch.device | str | None = None) -> Sweep:
    """Time the contenders that ``calls_at(point)`` returns at each point, interleaved; then, where
    the median time of a contender named in ``monotone`` (default: all) falls from one point to the
    next, time both points again (up to ``retries`` times) and keep the new values. Points that
    still fall are listed in ``violations``.
    """
    points = list(points)
    per_point = [time_interleaved(calls_at(p), rounds, warmup, device) for p in points]
    names = list(per_point[0])
    checked = names if monotone is None else list(monotone)
    remeasured: list[tuple[str, object]] = []

    def falls() -> list[tuple[str, int]]:
        return [(n, i) for n in checked for i in non_monotone([t[n].median for t in per_point], tolerance)]

    for _ in range(retries):
        offending = sorted({j for _, i in falls() for j in (i - 1, i)})
        if not offending:
            break
        for j in offending:
            per_point[j] = time_interleaved(calls_at(points[j]), rounds, warmup, device)
            remeasured += [(n, points[j]) for n in checked]
    timings = {n: [t[n] for t in per_point] for n in names}
    return Sweep(points, timings, remeasured, [(n, points[i]) for n, i in falls()])


@contextlib.contextmanager
def native_stderr_silenced():
    """Send the process's file descriptor 2 to /dev/null for the duration of the block.

    The profiler's native code prints a "profiler_start"/"profiler_stop" line to fd 2 on
    every use, which no logging level turns off; it would fill a notebook's outputs.
    Python-level errors raised inside the block still propagate normally.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by PyTorch during ``fn()`` above what was allocated before."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    with native_stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                          profile_memory=True, record_shapes=False) as prof:
        fn()
    # Each allocation is booked on the op that made it (its self memory, > 0), each free
    # on a "[memory]" event (< 0); replaying them in time order gives the live bytes.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` counted by ``torch.utils.flop_counter``.

    A multiply-add counts as two FLOPs; matmuls, convolutions and attention kernels are
    counted, element-wise operations are not.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def throughput(items: int, seconds: float) -> float:
    """Items per second."""
    return items / seconds if seconds > 0 else float("nan")
