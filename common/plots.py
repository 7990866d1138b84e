"""One plot style for every notebook, and ``save_figure``."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns

PALETTE = "colorblind"


def use_style() -> None:
    """Seaborn's whitegrid theme with the colour-blind palette, readable on slides."""
    sns.set_theme(style="whitegrid", palette=PALETTE, context="notebook")
    matplotlib.rcParams.update({
        "figure.figsize": (7.0, 4.2),
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.titleweight": "bold",
    })


def save_figure(fig: plt.Figure, folder: str | Path, name: str, formats: tuple[str, ...] = ("png",)) -> Path:
    """Save ``fig`` as ``folder/name.png`` (and any other ``formats``); return the PNG path.

    Writes to a temporary file first, so an interrupted save never leaves half a figure.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        partial = folder / f".{name}.{fmt}.part"
        fig.savefig(partial, format=fmt)
        partial.replace(path)
        paths.append(path)
    return paths[0]
