"""The loss-floor plots: ``lossfloor-<family>.png`` (each run's fit and extrapolation) and
``lossfloor-summary.png`` (predicted against measured final loss, every run). See docs/loss-floor.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from saecache.report.figures import (family_colours, family_legend, grid, plain_log_labels, save,
                                     series, style_subplot)
from saecache.report.formatting import fmt
from saecache.report.runs import RunData

# ---- per run ---------------------------------------------------------------------------------


def plot_loss_floor(family: str, runs: list[RunData], path: Path, metric: str = "loss") -> Path:
    """Per run (one subplot per layer): measured curve, fitted model, its extrapolation, L∞."""
    runs = [run for run in runs if run.train]
    fig, axes = grid(max(len(runs), 1), width=3.3, height=2.6)
    for ax, run in zip(axes, runs):
        _draw_fit(ax, run, metric)
    if not runs:
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    fig.supylabel(f"train {metric} (normalised units, log scale)")
    fig.suptitle(f"{family}: loss floor L(T) = L∞ + A·T^(−α) fitted on the dots, predicting the "
                 "crosses\n(subplot titles: mean absolute % error on the crosses)")
    family_legend(fig, {}, _fit_legend())
    return save(fig, path)


def _draw_fit(ax, run: RunData, metric: str) -> None:
    tokens, values = series(run.train, metric)
    fit = run.fit
    if fit is None:
        ax.plot(tokens, values, ".", color="0.5", ms=4)
        ax.text(0.5, 0.5, "no fit\n(see the runs table)", transform=ax.transAxes, ha="center",
                va="center")
        style_subplot(ax, f"layer {run.layer:02d}", log=True)
        return
    if run.lr_decay:  # shade the learning-rate decay: the curve bends below the power law there
        ax.axvspan((1 - run.lr_decay) * fit.final_tokens, fit.final_tokens, color="C1", alpha=0.08)
    warm = tokens <= fit.skip_tokens
    ax.plot(tokens[warm], values[warm], ".", color="0.6", ms=4)
    ax.plot(fit.train_tokens, fit.train_values, "o", color="C0", ms=3.5)
    ax.plot(fit.holdout_tokens, fit.holdout_values, "x", color="C3", ms=5)
    inside = np.geomspace(fit.train_tokens[0], fit.cutoff_tokens, 100)
    ax.plot(inside, fit.predict(inside), "-", color="C0", lw=1.3)
    if len(fit.holdout_tokens):
        later = np.geomspace(fit.cutoff_tokens, fit.holdout_tokens[-1], 100)
        ax.plot(later, fit.predict(later), "--", color="C1", lw=1.3)
    if fit.l_inf > 0:
        ax.axhline(fit.l_inf, color="C2", ls=":", lw=1.2)
    ax.axvline(fit.cutoff_tokens, color="0.4", lw=0.8, ls="-.")
    style_subplot(ax, f"layer {run.layer:02d}: MAPE {fmt(fit.holdout_mape, '.1f', suffix='%')}",
                  log=True)


def _fit_legend() -> list:
    return [Line2D([], [], ls="", marker=".", color="0.6", label="warm-up (skipped)"),
            Line2D([], [], ls="", marker="o", ms=4, color="C0", label="fitted points"),
            Line2D([], [], ls="", marker="x", color="C3", label="held back (measured)"),
            Line2D([], [], color="C0", label="fit"),
            Line2D([], [], color="C1", ls="--", label="extrapolation (predicted)"),
            Line2D([], [], color="C2", ls=":", label="floor L∞"),
            Line2D([], [], color="0.4", ls="-.", lw=0.8, label="cut-off"),
            Patch(color="C1", alpha=0.15, label="learning-rate decay to 0")]


# ---- across runs -----------------------------------------------------------------------------


def plot_floor_summary(runs: list[RunData], path: Path, metric: str = "loss") -> Path:
    """Predicted final loss and floor L∞ against the measured final loss, one point per run."""
    fitted = [run for run in runs if run.fit is not None]
    colours = family_colours(list({run.family for run in fitted}))
    fig = Figure(figsize=(8, 7.5), layout="constrained")
    ax = fig.subplots()
    for run in fitted:
        _draw_summary_point(ax, run, colours[run.family])
    _identity_line(ax, fitted)
    log = _wide_positive_range(fitted)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_labels(ax.xaxis, *ax.get_xlim())
        plain_log_labels(ax.yaxis, *ax.get_ylim())
    scale = ", log scale" if log else ""
    ax.set_xlabel(f"measured final train {metric} (normalised units{scale})")
    ax.set_ylabel(f"predicted train {metric} (normalised units{scale})")
    ax.set_title(_summary_title(fitted), fontsize=10)
    if not fitted:
        ax.text(0.5, 0.5, "no run had enough points for a fit", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=_summary_legend(colours), loc="upper left", fontsize=8)
    return save(fig, path)


def _draw_summary_point(ax, run: RunData, colour: str) -> None:
    fit = run.fit
    ax.plot(fit.final_measured, fit.final_predicted, "o", color=colour)
    ax.plot(fit.final_measured, fit.l_inf, "v", color=colour, mfc="none")
    ax.annotate(f"L{run.layer:02d}", (fit.final_measured, fit.final_predicted), fontsize=7,
                xytext=(3, 3), textcoords="offset points")


def _identity_line(ax, fitted: list[RunData]) -> None:
    values = [v for run in fitted for v in (run.fit.final_measured, run.fit.final_predicted)]
    if values:
        lo, hi = min(values) * 0.8, max(values) * 1.2
        ax.plot([lo, hi], [lo, hi], "--", color="0.5", lw=1)


def _wide_positive_range(fitted: list[RunData]) -> bool:
    """Log axes when every plotted value is > 0 and they span more than a factor of 10."""
    values = [v for run in fitted for v in (run.fit.final_measured, run.fit.final_predicted,
                                            run.fit.l_inf)]
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def _summary_title(fitted: list[RunData]) -> str:
    mapes = np.array([run.fit.holdout_mape for run in fitted], dtype=np.float64)
    mapes = mapes[np.isfinite(mapes)]
    head = f"Predicted vs measured final loss, {len(fitted)} run(s)"
    if not len(mapes):
        return head
    worst = max(run.fit.holdout_max_ape for run in fitted if np.isfinite(run.fit.holdout_max_ape))
    return (f"{head}\nheld-back MAPE: median {np.median(mapes):.1f}%, "
            f"mean {mapes.mean():.1f}%; worst point {worst:.1f}%")


def _summary_legend(colours: dict[str, str]) -> list:
    families = [Line2D([], [], ls="", marker="s", color=c, label=name) for name, c in colours.items()]
    return families + [
        Line2D([], [], ls="", marker="o", color="k", label="predicted at the final tokens"),
        Line2D([], [], ls="", marker="v", color="k", mfc="none", label="fitted floor L∞"),
        Line2D([], [], color="0.5", ls="--", label="y = x (perfect prediction)")]
