"""`saecache report RUNS --out DIR`: plots and tables of a folder of training runs.

Writes into DIR, for the runs under RUNS (folders holding ``run.json``; RUNS may be one run):

- ``heatmap-<family>.png``: per run family, layers × (FVU, L0, dead %, dense %, CE loss
  recovered, KL), each metric with its own colour bar, darker green = better;
- ``curves-loss.png``, ``curves-l0.png``: training curves, one subplot per layer, sister runs
  overlaid;
- ``lossfloor-<family>.png``: per run, the fitted L∞ + A·T^(−α), its extrapolation and the
  measured later points; ``lossfloor-summary.png``: each usable fit's prediction error and
  floor at its final tokens (unusable fits flagged and left out, see LossFloorFit.unusable);
- ``summary.md`` (Markdown tables) and ``index.html`` (the plots and the same tables, relative
  links, no Python needed to open it).

A *family* is the runs that differ only in layer (see saecache.report.runs).
"""

from __future__ import annotations

import re
from pathlib import Path

from saecache.core.atomic import atomic_write, check_folder
from saecache.report.curves import plot_curves
from saecache.report.document import Section, Table, render_html, render_markdown
from saecache.report.floor import plot_floor_summary, plot_loss_floor, usable_fits
from saecache.report.formatting import MISSING, fmt, format_tokens, number
from saecache.report.heatmap import heatmap_table, plot_heatmap
from saecache.report.lossfloor import ALPHA_MAX, DEFAULTS, MAPE_LIMIT, FitOptions
from saecache.report.runs import EVAL_HINT, RunData, families, load_run
from saecache.train.runfolder import EVAL_FILE, find_runs


def write_report(runs_dir: str | Path, out: str | Path, *, metric: str = DEFAULTS.metric,
                 skip: float = DEFAULTS.skip, cutoff: float = DEFAULTS.cutoff) -> Path:
    """Write the plots, summary.md and index.html of the runs in ``runs_dir`` into ``out``.

    ``metric``, ``skip`` and ``cutoff`` choose the loss-floor fit (see FitOptions).
    Returns the path of index.html.
    """
    runs_dir, out = Path(runs_dir), check_folder(out)
    options = FitOptions(metric=metric, cutoff=cutoff, skip=skip)
    runs = [load_run(folder, options) for folder in find_runs(runs_dir)]
    out.mkdir(parents=True, exist_ok=True)
    title = f"saecache report: {runs_dir.resolve().name}"
    sections = _build(runs, out, runs_dir, options)
    markdown, page = render_markdown(title, sections), render_html(title, sections)
    atomic_write(out / "summary.md", lambda f: f.write(markdown.encode()))
    atomic_write(out / "index.html", lambda f: f.write(page.encode()))
    return out / "index.html"


def _build(runs: list[RunData], out: Path, runs_dir: Path, options: FitOptions) -> list[Section]:
    """Draw every plot into ``out`` and return the sections that show them."""
    groups = families(runs)
    with_metrics = [run for group in groups.values() for run in group]
    sections = [Section("Summary", _overview(runs, runs_dir), [], [runs_table(runs)])]
    for family, group in groups.items():
        name = f"heatmap-{_slug(family)}.png"
        plot_heatmap(family, group, out / name)
        sections.append(Section(f"Family {family}", [], [(name, f"{family}: final metrics by layer")],
                                [heatmap_table(family, group)]))
    sections.append(_curves_section(with_metrics, out))
    sections.append(_floor_section(groups, out, options))
    return sections


def _slug(text: str) -> str:
    """``text`` safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# ---- the sections ----------------------------------------------------------------------------


def _overview(runs: list[RunData], runs_dir: Path) -> list[str]:
    skipped = [run.name for run in runs if not run.has_metrics]
    evaluated = sum(run.eval is not None for run in runs)
    models = sorted({run.model for run in runs if run.model})
    text = [f"{len(runs)} run(s) in {runs_dir} ({len(runs) - len(skipped)} with metrics) on "
            f"{', '.join(models) or 'an unknown model'}; families: {', '.join(families(runs)) or 'none'}."]
    if skipped:
        text.append(f"Left out (no metrics yet): {', '.join(skipped)}.")
    if evaluated < len(runs):
        text.append(f"CE loss recovered is missing for {len(runs) - evaluated} run(s) (no "
                    f"{EVAL_FILE}): {EVAL_HINT}; the heatmaps show held-out metrics for them.")
    return text


def runs_table(runs: list[RunData]) -> Table:
    """One row per run: F, final held-out metrics, dense %, CE loss recovered and KL (eval.json),
    the loss-floor fit, notes."""
    headers = ["run", "layer", "family", "tokens", "F", "λ_Anthropic", "held-out FVU",
               "held-out L0", "held-out MSE", "dead %", "dense %", "CE loss recovered", "KL",
               "fitted L∞", "α", "held-back MAPE", "notes"]
    rows = []
    for run in sorted(runs, key=lambda r: (r.family, r.layer)):
        h, fit, e = run.final_heldout, run.fit, run.eval or {}
        rows.append([run.name, str(run.layer), run.family,
                     format_tokens(run.tokens) if run.tokens is not None else MISSING,
                     fmt(run.n_features, ",.0f"), fmt(number(run.l1_anthropic), ".3g"),
                     fmt(number(h.get("fvu")), ".4g"), fmt(number(h.get("l0")), ".1f"),
                     fmt(number(h.get("mse")), ".4g"),
                     fmt(number(h.get("dead_fraction")), ".1f", 100.0),
                     fmt(number(e.get("dense_fraction")), ".1f", 100.0),
                     fmt(number(e.get("ce_loss_recovered")), ".3f"), fmt(number(e.get("kl")), ".3g"),
                     fmt(fit.l_inf if fit else None, ".4g"),
                     fmt(fit.alpha if fit and fit.a > 0 else None, ".3f"),  # a = 0: α is moot
                     fmt(fit.holdout_mape if fit else None, ".1f", suffix="%"),
                     "; ".join(run.notes)])
    return Table("Runs (held-out metrics from the last snapshot of metrics.jsonl; dense %, CE loss "
                 f"recovered and KL from {EVAL_FILE})", headers, rows)


def _curves_section(runs: list[RunData], out: Path) -> Section:
    plot_curves(runs, "loss", "train loss (normalised units, log scale)",
                "Training loss by layer (sister runs overlaid)", out / "curves-loss.png", log=True)
    plot_curves(runs, "l0", "L0 (active features per token)", "L0 by layer (sister runs overlaid)",
                out / "curves-l0.png")
    return Section("Training curves", [], [("curves-loss.png", "train loss per layer"),
                                           ("curves-l0.png", "L0 per layer")], [])


def _floor_section(groups: dict[str, list[RunData]], out: Path, options: FitOptions) -> Section:
    metric = options.metric
    figures = [("lossfloor-summary.png", "each usable fit's predicted final value and floor, as % "
                "of the measured final value")]
    for family, group in groups.items():
        name = f"lossfloor-{_slug(family)}.png"
        plot_loss_floor(family, group, out / name, metric)
        figures.append((name, f"{family}: fit and extrapolation per layer"))
    runs = [run for group in groups.values() for run in group]
    plot_floor_summary(runs, out / "lossfloor-summary.png", metric)
    text = [f"L(T) = L∞ + A·T^(−α) is fitted to the train {metric} between {options.skip:.0%} and "
            f"{options.cutoff:.0%} of each run's tokens; the later points are predicted and compared "
            "with what was measured (MAPE: mean absolute percentage error). The last steps "
            "(--lr-decay, 20% by default; shaded) decay the learning rate to 0, which bends the "
            "measured curve below the power law: the prediction over-estimates the final loss "
            "there. See docs/loss-floor.md.",
            f"A fit is unusable when it is flat (A = 0), its α is at an end of (0, {ALPHA_MAX:g}], "
            f"or its held-back MAPE exceeds {MAPE_LIMIT:g}%; unusable fits are marked in red and "
            "in the runs table's notes, and left out of the summary plot and its median."]
    unusable = usable_fits(runs)[1]
    if unusable:
        text.append("Unusable: " + "; ".join(f"{run.name} ({run.fit.unusable})" for run in unusable)
                    + ".")
    return Section("Loss floor", text, figures, [])
