"""Device choice, seeds, presets and the output folders of one notebook run."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PRESETS = ("smoke", "cpu", "gpu")
REFERENCE_PRESET = "cpu"  # the preset whose outputs are committed and shown in the README
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def build_dir() -> Path:
    """Scratch space (smoke outputs, checkpoints, staging): ``$TRANSFORMER_FAMILY_BUILD`` or ``build/``."""
    return Path(os.environ.get("TRANSFORMER_FAMILY_BUILD", PROJECT_ROOT / "build"))


def pick_device(name: str = "auto") -> torch.device:
    """Return the requested device; ``"auto"`` picks cuda > mps > cpu."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'")
        return device
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
    """``SMOKE`` wins; ``"auto"`` is ``"gpu"`` when CUDA is present, else ``"cpu"``.

    The ``gpu`` preset needs CUDA: on a machine without it, it would run for hours on the CPU,
    so it is refused.
    """
    if not isinstance(smoke, bool):
        raise ValueError(f"SMOKE must be True or False, got {smoke!r} ({type(smoke).__name__}); "
                         "with papermill pass -p SMOKE True (a Python literal, not a string)")
    if smoke:
        return "smoke"
    if preset == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"PRESET must be 'auto' or one of {PRESETS}, got {preset!r}")
    if preset == "gpu" and not torch.cuda.is_available():
        raise ValueError("PRESET='gpu' needs a CUDA device and none is available here (it would run for hours "
                         "on the CPU); use PRESET='cpu' or 'auto'")
    return preset


@dataclass(frozen=True)
class RunPaths:
    """Where one run writes.

    ``figures`` and ``results`` hold what the notebook reports (written there only when the run
    saves its results: until then they wait in ``staging``), ``checkpoints`` the training state
    (resumable), ``cache`` what any run may reuse (fetched wheels, embeddings, generated data).
    """

    figures: Path
    results: Path
    checkpoints: Path
    cache: Path
    staging: Path


def run_paths(out_dir: str | os.PathLike | None, preset: str, notebook: str = "run") -> RunPaths:
    """Output folders of a run of ``preset``.

    Without ``out_dir``: the reference preset (cpu) writes the project's ``figures/`` and
    ``results/``; the gpu preset their ``gpu/`` subfolders; a smoke run ``build/smoke/``, so it
    never overwrites the committed reference outputs.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    build = build_dir()
    if out_dir not in (None, ""):
        root = Path(out_dir).resolve()
        figures, results, scratch = root / "figures", root / "results", root
    elif preset == "smoke":
        root = build / "smoke"
        figures, results, scratch = root / "figures", root / "results", root
    else:
        sub = "" if preset == REFERENCE_PRESET else preset
        figures, results, scratch = PROJECT_ROOT / "figures" / sub, PROJECT_ROOT / "results" / sub, build
    from common.assets import cache_dir

    paths = RunPaths(figures=figures, results=results, checkpoints=scratch / "checkpoints", cache=cache_dir(),
                     staging=scratch / "staging" / f"{notebook}-{preset}")
    for folder in (paths.figures, paths.results, paths.checkpoints, paths.cache):
        folder.mkdir(parents=True, exist_ok=True)
    return paths
