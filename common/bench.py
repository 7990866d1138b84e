"""Measurements: wall time (warm-up, repeats, median and spread), peak memory, FLOPs.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Timing:
    """Seconds per call over ``repeats`` timed calls (after ``warmup`` untimed ones)."""

    median: float
    mean: float
    stdev: float
    minimum: float
    maximum: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def time_interleaved(calls: dict[str, Callable[[], object]], rounds: int = 5,
                     device: torch.device | str | None = None) -> dict[str, float]:
    """Median seconds of each call, measured in rounds that call each of them once, in turn,
    so a machine that speeds up or slows down affects them all alike. One untimed round
    warms up."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds + 1):
        for name, call in calls.items():
            seconds = time_call(call, warmup=0, repeats=1, device=device).median
            if round_index:
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 5,
              device: torch.device | str | None = None) -> Timing:
    """Time ``fn()``; CUDA work is synchronised before each clock read."""
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
    return Timing(
        median=statistics.median(times),
        mean=statistics.fmean(times),
        stdev=statistics.stdev(times) if len(times) > 1 else 0.0,
        minimum=min(times),
        maximum=max(times),
        repeats=repeats,
    )


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
