"""The first cell of every notebook: ``run = start_run("01_causal_sampling", SMOKE, PRESET, SEED, OUT_DIR)``.

It checks the parameters, seeds everything, picks the device and the preset, sets the plot
style, and gives the notebook one object to save figures, results and checkpoints through.

A run's figures and results appear together: ``save_figure`` writes into a staging folder and
``save_results`` moves the figures, then the results file, into place (removing this
notebook's figures that the run did not make). A run that stops early leaves the last complete
run's outputs untouched.
"""

from __future__ import annotations

import inspect
import math
import numbers
import shutil
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from common import train as train_module
from common.fingerprint import fingerprint
from common.plots import save_figure, use_style
from common.results import RunRecord
from common.runtime import RunPaths, pick_device, resolve_preset, run_paths, set_seed


def check_knob(name: str, value: object, kind: type | tuple[type, ...] | None = None,
               choices: Iterable | None = None, low: float | None = None, high: float | None = None,
               allow_none: bool = False) -> object:
    """Refuse a notebook parameter that is not allowed, with a message that says what is.

    ``kind``: the type(s) wanted (``int`` refuses booleans; ``float`` accepts integers);
    ``choices``: the allowed values; ``low``/``high``: inclusive bounds. Returns ``value``.
    """
    if value is None and allow_none:
        return value
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wanted = tuple(numbers.Real if k is float else numbers.Integral if k is int else k for k in kinds)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, wanted):
            names = " or ".join(k.__name__ for k in kinds) + (" or None" if allow_none else "")
            raise ValueError(f"{name} must be {names}, got {value!r} ({type(value).__name__})")
    if choices is not None:
        choices = list(choices)
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if low is not None or high is not None:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{name} must be in [{'-inf' if low is None else low}, "
                             f"{'inf' if high is None else high}], got {value!r}")
    return value


def show_source(obj: object, first: str | None = None, last: str | None = None, max_lines: int = 25) -> str:
    """The key lines of ``obj``'s source for a slide: from the first line containing ``first`` to the
    next line containing ``last`` (both included; default: the whole source), dedented.

    A cell of ``print(show_source(...))`` lines is shown as highlighted code in the slides. Refuses
    more than ``max_lines`` lines, so no slide carries a wall of code.
    """
    lines = inspect.getsource(obj).splitlines()
    start = 0 if first is None else next((i for i, line in enumerate(lines) if first in line), None)
    if start is None:
        raise ValueError(f"no line of {getattr(obj, '__qualname__', obj)} contains {first!r}")
    stop = len(lines) - 1 if last is None else next((i for i in range(start, len(lines)) if last in lines[i]), None)
    if stop is None:
        raise ValueError(f"no line of {getattr(obj, '__qualname__', obj)} after {first!r} contains {last!r}")
    chosen = lines[start:stop + 1]
    if len(chosen) > max_lines:
        raise ValueError(f"{len(chosen)} lines of {getattr(obj, '__qualname__', obj)} selected; at most "
                         f"{max_lines} fit a slide: choose the key lines with first/last")
    return textwrap.dedent("\n".join(chosen))


@dataclass
class Run:
    """One execution of a notebook: its preset, seed, device and output folders."""

    notebook: str
    preset: str
    seed: int
    device: torch.device
    paths: RunPaths
    record: RunRecord
    checkpoints_used: list[Path] = field(default_factory=list)
    committed: bool = False
    started: float = field(default_factory=time.time)

    @property
    def smoke(self) -> bool:
        return self.preset == "smoke"

    @property
    def figure_prefix(self) -> str:
        return self.notebook[:2]

    def save_figure(self, fig: plt.Figure, name: str) -> Path:
        """Stage ``NN_name.png``; it moves to ``figures/`` with the results (``save_results``)."""
        if self.committed:
            raise RuntimeError(f"figure {name!r} saved after save_results: a run's figures and results are "
                               "published together, so save every figure before the results")
        return save_figure(fig, self.paths.staging / "figures", f"{self.figure_prefix}_{name}")

    def checkpoint(self, name: str, *shaped_by: object) -> Path:
        """Path of a resumable training checkpoint, named by a fingerprint of what shaped it.

        ``shaped_by``: the settings (preset dict, model and training configs) and the model or code
        that the checkpoint depends on; the training loop's own code always counts. Change any of
        them and the path changes, so a stale checkpoint is never loaded.
        """
        if not shaped_by:
            raise ValueError(f"checkpoint {name!r}: pass what shapes it (the settings and the model), e.g. "
                             "run.checkpoint('gpt', cfg, model_config, train_config, model)")
        key = fingerprint(self.notebook, self.preset, self.seed, *shaped_by, train_module)
        stem = f"{self.notebook}-{self.preset}-seed{self.seed}-{name}"
        path = self.paths.checkpoints / f"{stem}-{key}.pt"
        stale = [p.name for p in self.paths.checkpoints.glob(f"{stem}-*.pt") if p != path]
        if stale:
            print(f"note: not loading {len(stale)} checkpoint(s) of {name!r} made by other settings or code: "
                  f"{', '.join(sorted(stale))}")
        self.checkpoints_used.append(path)
        return path

    def training_seconds(self) -> dict[str, float]:
        """Training time behind the checkpoints this run used: in all, and in earlier sessions (all of
        a checkpoint this run did not write, the part before the resume of one it resumed)."""
        total = earlier = 0.0
        for path in dict.fromkeys(self.checkpoints_used):
            if path.exists():
                state = train_module.read_checkpoint(path)["state"]
                seconds = state.get("train_seconds", 0.0)
                total += seconds
                earlier += seconds if path.stat().st_mtime < self.started else state.get("resumed_seconds", 0.0)
        return {"train_s": total, "train_s_earlier_sessions": earlier}

    def save_results(self, metrics: dict) -> Path:
        """Publish the run: its staged figures into ``figures/``, then ``results/<notebook>.json``."""
        staged = self.paths.staging / "figures"
        made = {p.name for p in staged.glob("*")} if staged.exists() else set()
        result = self.record.save(metrics, self.paths.staging, extra=self.training_seconds())
        for old in self.paths.figures.glob(f"{self.figure_prefix}_*"):
            if old.is_file() and old.name not in made:
                old.unlink()
        for name in sorted(made):
            (staged / name).replace(self.paths.figures / name)
        final = result.replace(self.paths.results / result.name)
        shutil.rmtree(self.paths.staging, ignore_errors=True)
        self.committed = True
        return final


def start_run(notebook: str, smoke: bool = False, preset: str = "auto", seed: int = 0,
              out_dir: str | Path | None = None, device: str = "auto") -> Run:
    check_knob("SEED", seed, kind=int, low=0)
    check_knob("PRESET", preset, kind=str)
    check_knob("OUT_DIR", out_dir, kind=(str, Path), allow_none=True)
    preset = resolve_preset(preset, smoke)
    device_ = pick_device(device)
    set_seed(seed)
    use_style()
    paths = run_paths(out_dir, preset, notebook)
    shutil.rmtree(paths.staging, ignore_errors=True)  # what an interrupted run of this notebook left
    run = Run(notebook, preset, seed, device_, paths, RunRecord(notebook, preset, seed, device_, paths.results))
    print(f"{notebook}: preset={preset} seed={seed} device={device_} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}\n  figures -> {paths.figures}\n  results -> {paths.results}")
    return run
