"""``heatmap-<family>.png``: a family's layers × final metrics, and its table.

Each metric is one column with its own colour scale and its own colour bar (numbers on it).
Darker green means *better* in every column: the colormap is reversed for the metrics where
lower is better (FVU, dead %, dense %, KL), and the colour bar's label says which way is
better. L0 is a choice, not a quality, so it has a neutral (purple) scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, Normalize

from saecache.report.document import Table
from saecache.report.figures import save
from saecache.report.formatting import MISSING, fmt
from saecache.report.runs import RunData

HIGHER, LOWER, NEUTRAL = 1, -1, 0  # which way a metric is better
NEUTRAL_COLOUR = "#e8e8e8"  # a column whose values are all equal and that has no natural range
MISSING_COLOUR = "#ffffff"  # not measured: white, with the MISSING dash


class Column(NamedTuple):
    """One heatmap column: a FinalMetrics field and how it is shown."""

    heading: str
    field: str
    spec: str
    """Format of the value in its cell and table."""
    scale: float
    """Multiplier to the shown value (fractions shown as %)."""
    better: int
    """HIGHER, LOWER or NEUTRAL."""
    bounds: tuple[float, float] | None
    """The metric's natural range, used when all its values are equal; None if unbounded."""

    @property
    def label(self) -> str:
        """The colour bar's label: the metric and which way is better."""
        way = {HIGHER: "higher is better", LOWER: "lower is better", NEUTRAL: "a choice, not a score"}
        return f"{self.heading}\n({way[self.better]})"

    def cmap(self):
        """Light → dark green towards better; purple for a neutral metric."""
        name = {HIGHER: "YlGn", LOWER: "YlGn_r", NEUTRAL: "Purples"}[self.better]
        return colormaps[name]


HEATMAP_COLUMNS = (Column("FVU", "fvu", ".3g", 1.0, LOWER, (0.0, 1.0)),
                   Column("L0", "l0", ".1f", 1.0, NEUTRAL, None),
                   Column("dead %", "dead_fraction", ".1f", 100.0, LOWER, (0.0, 100.0)),
                   Column("dense %", "dense_fraction", ".1f", 100.0, LOWER, (0.0, 100.0)),
                   Column("CE loss recovered", "ce_loss_recovered", ".3f", 1.0, HIGHER, (0.0, 1.0)),
                   Column("KL", "kl", ".3g", 1.0, LOWER, None))


def heatmap_values(runs: list[RunData]) -> np.ndarray:
    """(layers, columns) of the final metrics, scaled as shown (dead in %); NaN where missing."""
    finals = [run.final_metrics() for run in runs]
    return np.array([[getattr(f, c.field) * c.scale for c in HEATMAP_COLUMNS] for f in finals],
                    dtype=np.float64).reshape(len(runs), len(HEATMAP_COLUMNS))


def column_scale(column: Column, values: np.ndarray) -> tuple[object, Normalize]:
    """(colormap, norm) of one column's values: their own min..max; when those are equal (one
    layer), the metric's natural bounds, or — unbounded — a single neutral colour."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if hi > lo:
        return column.cmap(), Normalize(lo, hi)
    if column.bounds is not None:
        return column.cmap(), Normalize(*column.bounds)
    half = abs(lo) * 0.05 or 0.5  # a one-value bar: the value at its centre
    return ListedColormap([NEUTRAL_COLOUR]), Normalize(lo - half, lo + half)


def plot_heatmap(family: str, runs: list[RunData], path: Path) -> Path:
    """Write heatmap_figure as a PNG at ``path``."""
    return save(heatmap_figure(family, runs), path)


def heatmap_figure(family: str, runs: list[RunData]):
    """Layers × metrics, one colour scale and colour bar per metric, sized to both."""
    from matplotlib.figure import Figure

    values = heatmap_values(runs)  # (layers, columns)
    n, m = values.shape
    fig = Figure(figsize=(1.2 + 1.55 * m, 2.4 + 0.3 * max(n, 2)), layout="constrained")
    axes = fig.subplots(1, m, sharey=True, squeeze=False)[0]
    for j, (ax, column) in enumerate(zip(axes, HEATMAP_COLUMNS)):
        _draw_column(fig, ax, column, values[:, j])
    axes[0].set_yticks(range(n), [f"layer {run.layer:02d}" for run in runs],
                       fontsize=9 if n <= 12 else 8)
    sources = sorted({run.final_metrics().source.split(" ")[0] for run in runs})
    fig.suptitle(f"{family}: final metrics by layer (from {', '.join(sources)}; "
                 f"{MISSING} = not measured)\ndarker green = better in every column; each "
                 "column has its own scale", fontsize=10)
    return fig


def _draw_column(fig, ax, column: Column, values: np.ndarray) -> None:
    """One metric: its cells (value written in each), its scale and its colour bar below."""
    cmap, norm = column_scale(column, values)
    cmap = cmap.with_extremes(bad=MISSING_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(values[:, None]), cmap=cmap, norm=norm, aspect="auto")
    for i, value in enumerate(values):
        rgb = cmap(norm(value))[:3] if np.isfinite(value) else (1.0, 1.0, 1.0)
        dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5  # perceived luminance
        ax.text(0, i, fmt(value, column.spec), ha="center", va="center",
                fontsize=9 if len(values) <= 12 else 8, color="white" if dark else "black")
    ax.set_xticks([0], [column.heading], fontsize=9)
    ax.xaxis.tick_top()
    ax.tick_params(axis="y", length=0)
    if not np.isfinite(values).any():  # no scale to show
        ax.set_xlabel(f"{column.heading}:\nnot measured", fontsize=8)
        return
    bar = fig.colorbar(image, ax=ax, location="bottom", ticks=_ticks(column, norm, values),
                       extend=_extend(norm, values), aspect=12, pad=0.01)
    bar.set_label(column.label, fontsize=8)
    bar.ax.set_xticklabels([fmt(t, column.spec) for t in bar.get_ticks()], fontsize=7)


def _ticks(column: Column, norm: Normalize, values: np.ndarray) -> list[float]:
    """Three ticks across the scale; one (the value) on a single-value neutral bar."""
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() == finite.max() and column.bounds is None:
        return [float(finite[0])]
    return list(np.linspace(norm.vmin, norm.vmax, 3))


def _extend(norm: Normalize, values: np.ndarray) -> str:
    """Arrows on the colour bar where values fall outside a fixed range (CE recovered < 0)."""
    finite = values[np.isfinite(values)]
    low, high = bool((finite < norm.vmin).any()), bool((finite > norm.vmax).any())
    return {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
        (low, high), "both")


def heatmap_table(family: str, runs: list[RunData]) -> Table:
    """The numbers of a family's heatmap, with F and where each row comes from."""
    values = heatmap_values(runs)
    rows = [[str(run.layer), fmt(run.n_features, ",.0f")]
            + [fmt(v, c.spec) for v, c in zip(row, HEATMAP_COLUMNS)]
            + [run.final_metrics().source] for run, row in zip(runs, values)]
    return Table(f"{family}: heatmap values",
                 ["layer", "F"] + [c.heading for c in HEATMAP_COLUMNS] + ["source"], rows)
