"""Matplotlib helpers the report's plots share: subplot grids, axes, legends, saving a PNG.

Figures are made with ``matplotlib.figure.Figure`` and rendered by Agg: no pyplot, no global
state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from saecache.core.atomic import atomic_write
from saecache.report.formatting import format_tokens, number

GRID_COLUMNS = 6  # 24 layers → a 4 × 6 grid
MIN_WIDTH = 9.0  # inches: room for the title and legend of a one-layer grid


def grid(n: int, width: float = 3.1, height: float = 2.4) -> tuple[Figure, list]:
    """A figure with n subplots in rows of GRID_COLUMNS; unused cells are hidden."""
    cols = min(GRID_COLUMNS, n)
    rows = math.ceil(n / cols)
    size = (max(width * cols + 0.6, MIN_WIDTH), height * rows + 1.6)
    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[max(n - cols, 0):n]:  # the lowest subplot of each column
        ax.set_xlabel("tokens seen", fontsize=9)
    return fig, list(axes[:n])


def save(fig: Figure, path: Path) -> Path:
    """Render with Agg and write the PNG atomically."""
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


def series(lines: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, values) of ``metric`` in metrics lines, where it is a finite number."""
    tokens = np.array([line["tokens"] for line in lines], dtype=np.float64)
    values = np.array([number(line.get(metric)) for line in lines], dtype=np.float64)
    keep = np.isfinite(values)
    return tokens[keep], values[keep]


def family_colours(names: list[str]) -> dict[str, str]:
    """One colour per family, by sorted name."""
    palette = [f"C{i}" for i in range(10)]
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}


def style_subplot(ax, title: str, log: bool) -> None:
    """Title, token x axis, optional log y axis, grid and small tick labels."""
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_tokens(x)))
    if log:
        ax.set_yscale("log")
        plain_log_labels(ax.yaxis, *ax.get_ylim())
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=8)


def plain_log_labels(axis, lo: float, hi: float) -> None:
    """Plain labels on a log axis (0.2, not 2×10⁻¹); short ranges also label 2 and 5 × 10ⁿ
    (and 3 × 10ⁿ within one decade) so that every subplot shows at least one value."""
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    ratio = hi / lo if lo > 0 else np.inf
    if ratio < 100:
        axis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0) if ratio < 10 else (2.0, 5.0)))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(NullFormatter())


def family_legend(fig: Figure, colours: dict[str, str], extra: list | None = None,
                  labels: dict[str, str] | None = None) -> None:
    """A legend below the subplots: a line per family (``labels[name]`` if given), then ``extra``
    handles; no legend when there is nothing to name."""
    labels = labels or {}
    handles = [Line2D([], [], color=c, lw=2, label=labels.get(name, name))
               for name, c in colours.items()]
    handles += extra or []
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3),
                   title="sister runs" if colours else None, fontsize=9)
