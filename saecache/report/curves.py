"""``curves-loss.png``, ``curves-l0.png``: a train metric against tokens, one subplot per layer."""

from __future__ import annotations

from pathlib import Path

from saecache.report.figures import family_colours, family_legend, grid, save, series, style_subplot
from saecache.report.runs import RunData


def plot_curves(runs: list[RunData], metric: str, ylabel: str, title: str, path: Path,
                log: bool = False) -> Path:
    """One subplot per layer of the train ``metric`` against tokens, sister runs overlaid."""
    runs = [run for run in runs if run.train]
    layers = sorted({run.layer for run in runs})
    colours = family_colours(list({run.family for run in runs}))
    fig, axes = grid(max(len(layers), 1))
    for ax, layer in zip(axes, layers):
        for run in (r for r in runs if r.layer == layer):
            tokens, values = series(run.train, metric)
            ax.plot(tokens, values, color=colours[run.family], lw=1.4, label=run.family)
        style_subplot(ax, f"layer {layer:02d}", log)
    if not layers:
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    fig.supylabel(ylabel)
    fig.suptitle(title)
    family_legend(fig, colours)
    return save(fig, path)
