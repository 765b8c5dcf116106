"""The loss-floor plots: ``lossfloor-<family>.png`` (each run's fit and extrapolation) and
``lossfloor-summary.png`` (each usable fit's prediction error at its final tokens, and its floor).
A fit judged unusable (LossFloorFit.unusable) is flagged in red in its subplot title and left out
of the summary plot and its median. See docs/loss-floor.md."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from saecache.report.figures import family_legend, grid, save, series, style_subplot
from saecache.report.formatting import fmt
from saecache.report.runs import RunData

# ---- per run ---------------------------------------------------------------------------------


def plot_loss_floor(family: str, runs: list[RunData], path: Path, metric: str = "mse") -> Path:
    """Write loss_floor_figure as a PNG at ``path``."""
    return save(loss_floor_figure(family, runs, metric), path)


def loss_floor_figure(family: str, runs: list[RunData], metric: str = "mse") -> Figure:
    """Per run (one subplot per layer): measured curve, fitted model, its extrapolation, L∞;
    the legend lists only what some subplot drew."""
    runs = [run for run in runs if run.train]
    fig, axes = grid(max(len(runs), 1), width=3.3, height=2.6)
    drawn: set[str] = set()
    for ax, run in zip(axes, runs):
        drawn |= _draw_fit(ax, run, metric)
    if not runs:
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    fig.supylabel(f"train {metric} (normalised units, log scale)")
    red = "; red: fit unusable" if any(run.fit and run.fit.unusable for run in runs) else ""
    fig.suptitle(f"{family}: loss floor L(T) = L∞ + A·T^(−α) fitted on the dots, predicting the "
                 f"crosses\n(subplot titles: mean absolute % error on the crosses{red})")
    family_legend(fig, {}, [handle for key, handle in _fit_legend().items() if key in drawn])
    return fig


def _draw_fit(ax, run: RunData, metric: str) -> set[str]:
    """Draw one run's curve and fit; returns the _fit_legend keys of what was drawn."""
    tokens, values = series(run.train, metric)
    fit = run.fit
    if fit is None:
        ax.plot(tokens, values, ".", color="0.5", ms=4)
        ax.text(0.5, 0.5, "no fit\n(see the runs table)", transform=ax.transAxes, ha="center",
                va="center")
        style_subplot(ax, f"layer {run.layer:02d}", log=True)
        return {"measured"} if len(tokens) else set()
    drawn = {"fitted", "fit", "cutoff"}
    if run.lr_decay:  # shade the learning-rate decay: the curve bends below the power law there
        ax.axvspan((1 - run.lr_decay) * fit.final_tokens, fit.final_tokens, color="C1", alpha=0.08)
        drawn.add("decay")
    warm = tokens <= fit.skip_tokens
    if warm.any():
        ax.plot(tokens[warm], values[warm], ".", color="0.6", ms=4)
        drawn.add("warm")
    ax.plot(fit.train_tokens, fit.train_values, "o", color="C0", ms=3.5)
    inside = np.geomspace(fit.train_tokens[0], fit.cutoff_tokens, 100)
    ax.plot(inside, fit.predict(inside), "-", color="C0", lw=1.3)
    if len(fit.holdout_tokens):
        ax.plot(fit.holdout_tokens, fit.holdout_values, "x", color="C3", ms=5)
        later = np.geomspace(fit.cutoff_tokens, fit.holdout_tokens[-1], 100)
        ax.plot(later, fit.predict(later), "--", color="C1", lw=1.3)
        drawn |= {"held", "extrapolation"}
    if fit.l_inf > 0:
        ax.axhline(fit.l_inf, color="C2", ls=":", lw=1.2)
        drawn.add("floor")
    ax.axvline(fit.cutoff_tokens, color="0.4", lw=0.8, ls="-.")
    _title_fit(ax, run)
    return drawn


def _title_fit(ax, run: RunData) -> None:
    """``layer 05: MAPE 2.1%``; in red with ``unusable: <why>`` below when the fit is unusable."""
    fit = run.fit
    title = f"layer {run.layer:02d}: MAPE {fmt(fit.holdout_mape, '.1f', suffix='%')}"
    if fit.unusable:
        title += f"\nunusable: {fit.unusable}"
    style_subplot(ax, title, log=True)
    if fit.unusable:
        ax.title.set_color("C3")
        ax.title.set_fontsize(9)


def _fit_legend() -> dict:
    """Every legend entry a fit subplot can draw, by the key _draw_fit reports it with."""
    return {"measured": Line2D([], [], ls="", marker=".", color="0.5", label="measured (no fit)"),
            "warm": Line2D([], [], ls="", marker=".", color="0.6", label="warm-up (skipped)"),
            "fitted": Line2D([], [], ls="", marker="o", ms=4, color="C0", label="fitted points"),
            "held": Line2D([], [], ls="", marker="x", color="C3", label="held back (measured)"),
            "fit": Line2D([], [], color="C0", label="fit"),
            "extrapolation": Line2D([], [], color="C1", ls="--", label="extrapolation (predicted)"),
            "floor": Line2D([], [], color="C2", ls=":", label="floor L∞"),
            "cutoff": Line2D([], [], color="0.4", ls="-.", lw=0.8, label="cut-off"),
            "decay": Patch(color="C1", alpha=0.15, label="learning-rate decay to 0")}


# ---- across runs -----------------------------------------------------------------------------


def usable_fits(runs: list[RunData]) -> tuple[list[RunData], list[RunData]]:
    """(runs with a usable fit, runs whose fit is unusable); runs without a fit are in neither."""
    fitted = [run for run in runs if run.fit is not None]
    return ([run for run in fitted if not run.fit.unusable],
            [run for run in fitted if run.fit.unusable])


def plot_floor_summary(runs: list[RunData], path: Path, metric: str = "mse") -> Path:
    """Write floor_summary_figure as a PNG at ``path``."""
    return save(floor_summary_figure(runs, metric), path)


def floor_summary_figure(runs: list[RunData], metric: str = "mse") -> Figure:
    """Per family, one row per layer with a usable fit: the prediction's error at the run's final
    tokens and where the floor L∞ lies, both as % of the measured final value. The figure's
    height follows the layers, its width the families (up to 4 side by side)."""
    usable, unusable = usable_fits(runs)
    groups: dict[str, list[RunData]] = {}
    for run in sorted(usable, key=lambda r: (r.family, r.layer)):
        groups.setdefault(run.family, []).append(run)
    cols = min(max(len(groups), 1), 4)
    rows = math.ceil(max(len(groups), 1) / cols)
    tallest = max((len(g) for g in groups.values()), default=1)  # rows of the tallest panel
    fig = Figure(figsize=(max(3.4 * cols, 8), 1.5 + rows * (0.8 + 0.22 * tallest)),
                 layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax, (family, group) in zip(axes, groups.items()):
        _draw_summary_family(ax, family, group)
        ax.set_xlabel(f"% of the measured final train {metric}", fontsize=9)
    fig.suptitle(_summary_title(usable, unusable), fontsize=10)
    if not usable:
        axes[0].text(0.5, 0.5, "no usable fit (see the runs table)", ha="center", va="center",
                     transform=axes[0].transAxes)
    else:
        fig.legend(handles=_summary_legend(), loc="outside lower center", ncols=3, fontsize=8)
    return fig


def _draw_summary_family(ax, family: str, group: list[RunData]) -> None:
    """One family's rows: predicted final value (dot) and floor (triangle), in % of measured."""
    for i, run in enumerate(group):
        fit = run.fit
        ax.plot(_percent(fit.final_predicted, fit.final_measured), i, "o", color="C0")
        ax.plot(_percent(fit.l_inf, fit.final_measured), i, "v", color="C2", mfc="none")
    ax.axvline(0, color="0.5", ls="--", lw=1)
    ax.set_yticks(range(len(group)), [f"layer {run.layer:02d}" for run in group],
                  fontsize=8 if len(group) <= 24 else 6)
    ax.set_ylim(len(group) - 0.5, -0.5)
    ax.set_title(family, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.tick_params(axis="x", labelsize=8)


def _percent(value: float, measured: float) -> float:
    """100 · (value − measured) / measured: 0 is a perfect prediction."""
    return 100.0 * (value - measured) / measured if measured else float("nan")


def summary_mapes(usable: list[RunData]) -> np.ndarray:
    """The finite held-back MAPEs of the usable fits (the summary's median is over these)."""
    mapes = np.array([run.fit.holdout_mape for run in usable], dtype=np.float64)
    return mapes[np.isfinite(mapes)]


def _summary_title(usable: list[RunData], unusable: list[RunData]) -> str:
    head = f"Prediction at the final tokens, {len(usable)} usable fit(s)"
    if unusable:
        head += f" ({len(unusable)} unusable left out: {', '.join(run.name for run in unusable[:3])}"
        head += ", …)" if len(unusable) > 3 else ")"
    mapes = summary_mapes(usable)
    if not len(mapes):
        return head
    worst = max(run.fit.holdout_max_ape for run in usable if np.isfinite(run.fit.holdout_max_ape))
    return (f"{head}\nheld-back MAPE: median {np.median(mapes):.1f}%, "
            f"mean {mapes.mean():.1f}%; worst point {worst:.1f}%")


def _summary_legend() -> list:
    return [Line2D([], [], ls="", marker="o", color="C0", label="predicted final value"),
            Line2D([], [], ls="", marker="v", color="C2", mfc="none", label="fitted floor L∞"),
            Line2D([], [], color="0.5", ls="--", label="the measured final value")]
