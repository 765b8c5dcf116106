"""``curves-loss.png``, ``curves-l0.png``: a train metric against tokens, one subplot per layer.

The legend names each sister-run family with its F; the L0 plot draws each adaptive run's
target L0 (``--l1 adaptive:T``) as a dashed line in the run's colour.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.lines import Line2D

from saecache.report.figures import family_colours, family_legend, grid, save, series, style_subplot
from saecache.report.runs import RunData


def plot_curves(runs: list[RunData], metric: str, ylabel: str, title: str, path: Path,
                log: bool = False) -> Path:
    """Write curves_figure as a PNG at ``path``."""
    return save(curves_figure(runs, metric, ylabel, title, log), path)


def curves_figure(runs: list[RunData], metric: str, ylabel: str, title: str, log: bool = False):
    """One subplot per layer of the train ``metric`` against tokens, sister runs overlaid;
    for ``metric == "l0"`` also the adaptive runs' target L0."""
    runs = [run for run in runs if run.train]
    layers = sorted({run.layer for run in runs})
    colours = family_colours(list({run.family for run in runs}))
    fig, axes = grid(max(len(layers), 1))
    targets: dict[tuple[str, float], str] = {}  # (family, target L0) drawn → its colour
    for ax, layer in zip(axes, layers):
        for run in (r for r in runs if r.layer == layer):
            tokens, values = series(run.train, metric)
            ax.plot(tokens, values, color=colours[run.family], lw=1.4, label=run.family)
            if metric == "l0" and run.target_l0 is not None:  # on top of a topk run's flat L0 = k
                ax.axhline(run.target_l0, color=colours[run.family], ls=(0, (4, 2)), lw=1.6,
                           zorder=3)
                targets[run.family, run.target_l0] = colours[run.family]
        style_subplot(ax, f"layer {layer:02d}", log)
    if not layers:
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    fig.supylabel(ylabel)
    fig.suptitle(title)
    extra = [Line2D([], [], color=colour, ls=(0, (4, 2)), lw=1.6,
                    label=f"target L0 = {target:g} ({family})")
             for (family, target), colour in sorted(targets.items())]
    family_legend(fig, colours, extra, family_labels(runs))
    return fig


def family_labels(runs: list[RunData]) -> dict[str, str]:
    """Family name → "name (F = 32,768)" (F of its runs; "F = 512–1,024" if they differ)."""
    labels = {}
    for family in {run.family for run in runs}:
        features = sorted({run.n_features for run in runs if run.family == family and run.n_features})
        if not features:
            labels[family] = family
        elif len(features) == 1:
            labels[family] = f"{family} (F = {features[0]:,})"
        else:
            labels[family] = f"{family} (F = {features[0]:,}–{features[-1]:,})"
    return labels
