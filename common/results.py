"""``results/NN_name.json``: the metrics of one run, written atomically.

Schema: ``{"notebook", "preset", "seed", "device", "torch", "wall_s", "metrics": {...}}``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy values and tuples as plain JSON; NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(to_jsonable(payload), handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class RunRecord:
    """Started at the top of a notebook; ``save(metrics)`` writes ``<notebook>.json``.

    ``wall_s`` is the time from creation to the save: this execution of the notebook. Training
    that earlier executions did (checkpoints this one loaded or resumed) is not in it; the
    notebook run adds it as ``train_s_earlier_sessions``.
    """

    def __init__(self, notebook: str, preset: str, seed: int, device: torch.device | str, folder: str | Path):
        self.notebook, self.preset, self.seed = notebook, preset, seed
        self.device, self.folder = str(device), Path(folder)
        self.started = time.perf_counter()

    @property
    def path(self) -> Path:
        return self.folder / f"{self.notebook}.json"

    def save(self, metrics: dict, folder: str | Path | None = None, extra: dict | None = None) -> Path:
        """Write the record into ``folder`` (default: the results folder); returns its path."""
        if not isinstance(metrics, dict) or not metrics:
            raise ValueError(f"metrics must be a non-empty dict, got {type(metrics).__name__}")
        path = (Path(folder) if folder is not None else self.folder) / f"{self.notebook}.json"
        return write_json(path, {
            "notebook": self.notebook,
            "preset": self.preset,
            "seed": self.seed,
            "device": self.device,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "wall_s": round(time.perf_counter() - self.started, 1),
            **(extra or {}),
            "metrics": metrics,
        })


def read_json(path: str | Path) -> dict:
    """A JSON file, or an error that names the file and what is wrong with it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun the notebook that writes it, or restore "
                         f"it with git checkout -- {path.name}") from error


def load_results(folder: str | Path) -> dict[str, dict]:
    """All ``*.json`` results in ``folder``, keyed by notebook name."""
    return {p.stem: read_json(p) for p in sorted(Path(folder).glob("*.json"))}
