"""Device choice, seeds, presets and the output folders of one notebook run."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PRESETS = ("smoke", "cpu", "gpu")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def pick_device(name: str = "auto") -> torch.device:
    """Return the requested device; ``"auto"`` picks cuda > mps > cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_preset(preset: str = "auto", smoke: bool = False) -> str:
    """``SMOKE`` wins; ``"auto"`` is ``"gpu"`` when CUDA is present, else ``"cpu"``."""
    if smoke:
        return "smoke"
    if preset == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"PRESET must be 'auto' or one of {PRESETS}, got {preset!r}")
    return preset


@dataclass(frozen=True)
class RunPaths:
    """Where one run writes.

    ``figures`` and ``results`` hold what the notebook reports, ``checkpoints`` the
    training state of this run (resumable), ``cache`` what any run may reuse (fetched
    wheels, embeddings, generated datasets).
    """

    root: Path
    figures: Path
    results: Path
    checkpoints: Path
    cache: Path


def run_paths(out_dir: str | os.PathLike | None, smoke: bool) -> RunPaths:
    """Output folders of a run.

    The reference run writes into the project (``figures/``, ``results/``); a smoke run
    writes into ``build/smoke`` unless ``out_dir`` is given, so it never overwrites the
    committed reference outputs.
    """
    if out_dir in (None, ""):
        root = PROJECT_ROOT / "build" / "smoke" if smoke else PROJECT_ROOT
    else:
        root = Path(out_dir).resolve()
    scratch = PROJECT_ROOT / "build" if root == PROJECT_ROOT else root
    paths = RunPaths(
        root=root,
        figures=root / "figures",
        results=root / "results",
        checkpoints=scratch / "checkpoints",
        cache=PROJECT_ROOT / "build" / "cache",
    )
    for folder in (paths.figures, paths.results, paths.checkpoints, paths.cache):
        folder.mkdir(parents=True, exist_ok=True)
    return paths
