"""``heatmap-<family>.png``: a family's layers × (FVU, L0, dead %, CE loss recovered), and its table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from saecache.report.document import Table
from saecache.report.figures import save
from saecache.report.formatting import MISSING, fmt
from saecache.report.runs import RunData

# (heading, FinalMetrics field, format, scale): the heatmap's columns, in order
HEATMAP_COLUMNS = (("FVU", "fvu", ".3g", 1.0), ("L0 (features/token)", "l0", ".1f", 1.0),
                   ("dead %", "dead_fraction", ".1f", 100.0),
                   ("CE loss recovered", "ce_loss_recovered", ".3f", 1.0))


def heatmap_values(runs: list[RunData]) -> np.ndarray:
    """(layers, columns) of the final metrics, scaled as shown (dead in %); NaN where missing."""
    finals = [run.final_metrics() for run in runs]
    return np.array([[getattr(f, field) * scale for _, field, _, scale in HEATMAP_COLUMNS]
                     for f in finals], dtype=np.float64)


def plot_heatmap(family: str, runs: list[RunData], path: Path) -> Path:
    """Layers × (FVU, L0, dead %, CE loss recovered), colour normalised per column."""
    values = heatmap_values(runs)  # (layers, 4)
    shades = _normalise_columns(values)  # (layers, 4) in [0, 1], NaN where missing
    fig = Figure(figsize=(8.5, 1.8 + 0.42 * len(runs)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(shades), cmap=_cmap(), vmin=0, vmax=1,
                      aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        _, _, spec, _ = HEATMAP_COLUMNS[j]
        dark = np.isfinite(shades[i, j]) and shades[i, j] < 0.5  # viridis is dark at the bottom
        ax.text(j, i, fmt(value, spec), ha="center", va="center", fontsize=9,
                color="white" if dark else "black")
    ax.set_xticks(range(len(HEATMAP_COLUMNS)), [c[0] for c in HEATMAP_COLUMNS])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(runs)), [f"layer {run.layer:02d}" for run in runs])
    ax.set_ylabel("layer")
    sources = sorted({run.final_metrics().source.split(" ")[0] for run in runs})
    ax.set_title(f"{family}: final metrics by layer (from {', '.join(sources)}; "
                 f"{MISSING} = not measured)", fontsize=10)
    bar = fig.colorbar(image, ax=ax, ticks=[0, 1], shrink=0.8)
    bar.ax.set_yticklabels(["column\nmin", "column\nmax"])
    return save(fig, path)


def _normalise_columns(values: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] by its own min and max (0.5 where they are equal)."""
    out = np.full_like(values, np.nan)
    for j in range(values.shape[1]):
        column = values[:, j]
        finite = np.isfinite(column)
        if finite.any():
            lo, hi = column[finite].min(), column[finite].max()
            out[:, j] = (column - lo) / (hi - lo) if hi > lo else np.where(finite, 0.5, np.nan)
    return out


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: not measured


def heatmap_table(family: str, runs: list[RunData]) -> Table:
    """The numbers of a family's heatmap, with where each row comes from."""
    values = heatmap_values(runs)
    rows = [[str(run.layer)] + [fmt(v, spec) for v, (_, _, spec, _) in zip(row, HEATMAP_COLUMNS)]
            + [run.final_metrics().source] for run, row in zip(runs, values)]
    return Table(f"{family}: heatmap values", ["layer"] + [c[0] for c in HEATMAP_COLUMNS] + ["source"],
                 rows)
