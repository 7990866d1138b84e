"""The first cell of every notebook: ``run = start_run("01_causal_sampling", SMOKE, PRESET, SEED, OUT_DIR)``.

It seeds everything, picks the device and the preset, sets the plot style, and gives the
notebook one object to save figures and results through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from common.plots import save_figure, use_style
from common.results import RunRecord
from common.runtime import RunPaths, pick_device, resolve_preset, run_paths, set_seed


@dataclass
class Run:
    """One execution of a notebook: its preset, seed, device and output folders."""

    notebook: str
    preset: str
    seed: int
    device: torch.device
    paths: RunPaths
    record: RunRecord

    @property
    def smoke(self) -> bool:
        return self.preset == "smoke"

    def save_figure(self, fig: plt.Figure, name: str) -> Path:
        """Save as ``figures/NN_name.png`` (NN: the notebook's number)."""
        return save_figure(fig, self.paths.figures, f"{self.notebook[:2]}_{name}")

    def checkpoint(self, name: str) -> Path:
        """Path of a resumable training checkpoint of this notebook, preset and seed."""
        return self.paths.checkpoints / f"{self.notebook}-{self.preset}-seed{self.seed}-{name}.pt"

    def save_results(self, metrics: dict) -> Path:
        """Write ``results/<notebook>.json`` atomically."""
        return self.record.save(metrics)


def start_run(notebook: str, smoke: bool = False, preset: str = "auto", seed: int = 0,
              out_dir: str | Path | None = None, device: str = "auto") -> Run:
    preset = resolve_preset(preset, smoke)
    device_ = pick_device(device)
    set_seed(seed)
    use_style()
    paths = run_paths(out_dir, smoke)
    run = Run(notebook, preset, seed, device_, paths, RunRecord(notebook, preset, seed, device_, paths.results))
    print(f"{notebook}: preset={preset} seed={seed} device={device_} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}\n  figures -> {paths.figures}\n  results -> {paths.results}")
    return run
