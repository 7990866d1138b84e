"""One plot style for every notebook, ``save_figure``, reference levels and intervals.

- ``draw_reference_levels``: the count n-gram floors (or any labelled level) as horizontal lines;
- ``plot_with_interval``: means with their intervals, as error bars or a band;
- ``plain_log_ticks``: a log axis labelled with plain numbers (150, 200, 300), also within one decade.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
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


def plain_log_ticks(axis: matplotlib.axis.Axis, subs: Sequence[float] = (1, 1.5, 2, 3, 5, 7)) -> None:
    """Label a log-scaled ``axis`` (``ax.yaxis``, ``ax.xaxis``) at ``subs`` x 10^k with plain numbers: by default
    a range inside one decade gets no label at all, and a wider one only powers of ten such as 10^2."""
    axis.set_major_locator(mticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(mticker.NullFormatter())


LEVEL_STYLES = [(0, (1, 1)), (0, (4, 2)), (0, (6, 2, 1, 2)), (0, (2, 3)), (0, (8, 3))]


def draw_reference_levels(ax: plt.Axes, levels: Mapping[str, float], prefix: str = "count ",
                          keep_limits: bool = True, fmt: str = ".3g") -> None:
    """Horizontal grey lines at reference ``levels`` (e.g. ``{"bigram": 200, "trigram": 189}``),
    each named in the legend with its value. With ``keep_limits`` the axis keeps the data's range,
    and a level outside it is listed in the legend as "off scale" instead of squashing the data.
    """
    low, high = ax.get_ylim()
    for (name, value), style in zip(levels.items(), LEVEL_STYLES * 4):
        where = "" if low <= value <= high or not keep_limits else (" (off scale, above)" if value > high
                                                                    else " (off scale, below)")
        ax.axhline(value, color="0.35", lw=1.1, ls=style, zorder=1, label=f"{prefix}{name}: {value:{fmt}}{where}")
    if keep_limits:
        ax.set_ylim(low, high)


def _interval_arrays(summaries: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means and interval ends from ``{"mean", "ci"}`` dicts, ``Estimate``s or (mean, low, high) tuples."""
    means, lows, highs = [], [], []
    for item in summaries:
        if isinstance(item, Mapping):
            mean, (low, high) = item["mean"], item["ci"]
        elif hasattr(item, "value") and hasattr(item, "low"):
            mean, low, high = item.value, item.low, item.high
        else:
            mean, low, high = item
        means.append(mean)
        lows.append(mean if low is None or not np.isfinite(low) else low)
        highs.append(mean if high is None or not np.isfinite(high) else high)
    return np.array(means, float), np.array(lows, float), np.array(highs, float)


def plot_with_interval(ax: plt.Axes, x: Sequence, summaries: Sequence, label: str | None = None,
                       band: bool = False, **style) -> None:
    """Means with their 95 % intervals at ``x``: error bars (default) or a shaded band.

    An infinite or missing interval (one seed) is drawn as the point alone.
    """
    means, lows, highs = _interval_arrays(summaries)
    x = np.asarray(x)
    if band:
        (line,) = ax.plot(x, means, label=label, **style)
        ax.fill_between(x, lows, highs, color=line.get_color(), alpha=0.2, lw=0)
    else:
        style = {"marker": "o", "capsize": 3, **style}
        ax.errorbar(x, means, yerr=[means - lows, highs - means], label=label, **style)
