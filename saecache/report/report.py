"""`saecache report RUNS --out DIR`: plots and tables of a folder of training runs.

Writes into DIR, for the runs under RUNS (folders holding ``run.json``; RUNS may be one run):

- ``heatmap-<family>.png``: per run family, layers × (FVU, L0, dead %, CE loss recovered);
- ``curves-loss.png``, ``curves-l0.png``: training curves, one subplot per layer, sister runs
  overlaid;
- ``lossfloor-<family>.png``: per run, the fitted L∞ + A·T^(−α), its extrapolation and the
  measured later points; ``lossfloor-summary.png``: predicted vs measured final loss, all runs;
- ``summary.md`` (Markdown tables) and ``index.html`` (the plots and the same tables, relative
  links, no Python needed to open it).

A *family* is the runs that differ only in layer: the folder name without its ``layerLL-``.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from saecache.core.errors import SaecacheError
from saecache.report.lossfloor import ALPHA_MAX, LossFloorFit, fit_loss_floor, train_curve
from saecache.train.runfolder import RunPaths, atomic_write, read_metrics, read_json, snapshot_name

GRID_COLUMNS = 6  # 24 layers → a 4 × 6 grid
MIN_WIDTH = 9.0  # inches: room for the title and legend of a one-layer grid
_LAYER_PREFIX = re.compile(r"^layer(\d+)-(.+)$")
_MISSING = "—"
_EVAL_HINT = "run `saecache eval RUNS` to add it"


_NAMES = RunPaths(Path())  # run file names are computed in RunPaths only
CONFIG_FILE, METRICS_FILE, EVAL_FILE = _NAMES.config.name, _NAMES.metrics.name, _NAMES.eval.name


class FitOptions(NamedTuple):
    """How the loss floor is fitted (see saecache.lossfloor.fit_loss_floor)."""

    metric: str = "loss"
    """Train metric to fit: loss, mse or fvu."""
    skip: float = 0.1
    """Fraction of the run's tokens skipped as warm-up."""
    cutoff: float = 0.6
    """Fraction of the run's tokens up to which points are fitted; later ones are predicted."""


# ---- one run's data --------------------------------------------------------------------------


class FinalMetrics(NamedTuple):
    """A run's end-of-training numbers as the heatmap shows them."""

    fvu: float
    l0: float
    mse: float
    dead_fraction: float
    ce_loss_recovered: float
    """NaN without eval.json."""
    source: str
    """Where they come from: ``eval.json (sae_layer05_final.pt)`` or ``held-out``."""


class RunData(NamedTuple):
    """What the report knows about one run folder."""

    name: str
    """Folder name, e.g. layer05-relu-x32-l1-0.0003."""
    dir: Path
    family: str
    """Folder name without its layerLL- prefix: the sister-run family."""
    layer: int
    """Layer from run.json (from the folder name if run.json is unreadable; -1 if neither)."""
    model: str | None
    """The model whose residuals the SAE was trained on (run.json's cache.model)."""
    lr_decay: float | None
    """Fraction of steps, at the end, over which the learning rate decays to 0."""
    train: list[dict]
    """metrics.jsonl lines with split == train, by tokens."""
    heldout: list[dict]
    """metrics.jsonl lines with split == heldout, by tokens."""
    eval_snapshot: str | None
    """The eval.json snapshot used (the final one if evaluated), or None."""
    eval: dict | None
    """Its eval.json record: ce_loss_recovered, fvu, l0, mse, dead_fraction, …"""
    fit: LossFloorFit | None
    """Loss-floor fit of the train loss, or None (see notes)."""
    notes: tuple[str, ...]
    """Why something is missing, for the reader of the report."""

    @property
    def has_metrics(self) -> bool:
        return bool(self.train or self.heldout)

    @property
    def tokens(self) -> int | None:
        """Tokens trained so far (the last metrics line), None without metrics."""
        lines = self.train + self.heldout
        return max(line["tokens"] for line in lines) if lines else None

    @property
    def final_heldout(self) -> dict:
        """The last held-out metrics line ({} if none)."""
        return self.heldout[-1] if self.heldout else {}

    def final_metrics(self) -> FinalMetrics:
        """eval.json's values when present, else the last held-out line's; NaN where neither."""
        if self.eval is not None:
            source, values = f"eval.json ({self.eval_snapshot})", self.eval
        else:
            source, values = "held-out", self.final_heldout
        return FinalMetrics(*(_number(values.get(key)) for key in
                              ("fvu", "l0", "mse", "dead_fraction", "ce_loss_recovered")), source)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def find_runs(runs_dir: Path) -> list[Path]:
    """RUNS itself if it is a run folder, else its sub-folders holding run.json, by name."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise SaecacheError(f"{runs_dir} is not a folder: give the RUNS folder of `saecache train --out`")
    if (runs_dir / CONFIG_FILE).exists():
        return [runs_dir]
    runs = sorted(p for p in runs_dir.iterdir() if (p / CONFIG_FILE).is_file())
    if not runs:
        raise SaecacheError(f"no runs in {runs_dir}: expected sub-folders holding {CONFIG_FILE} "
                            "(the --out folder of `saecache train`)")
    return runs


def load_run(run_dir: Path, options: FitOptions = FitOptions()) -> RunData:
    """Read run.json, metrics.jsonl and eval.json of one run and fit its loss floor."""
    notes: list[str] = []
    match = _LAYER_PREFIX.match(run_dir.name)
    family = match.group(2) if match else run_dir.name
    layer, model, lr_decay = _read_config(run_dir, int(match.group(1)) if match else -1, notes)
    train, heldout = _read_lines(run_dir, notes)
    eval_snapshot, record = _read_eval(run_dir, layer, notes)
    fit = _fit(run_dir.name, train, options, notes)
    return RunData(run_dir.name, run_dir, family, layer, model, lr_decay, train, heldout,
                   eval_snapshot, record, fit, tuple(notes))


def _read_config(run_dir: Path, layer: int, notes: list[str]) -> tuple[int, str | None, float | None]:
    """(layer, model, lr_decay) from run.json; ``layer`` (from the folder name) if unreadable."""
    try:
        config = read_json(run_dir / CONFIG_FILE)
        lr_decay = config.get("train", {}).get("lr_decay")
        return int(config["spec"]["layer"]), config.get("cache", {}).get("model"), lr_decay
    except (SaecacheError, KeyError, TypeError, ValueError, AttributeError) as err:
        notes.append(f"{CONFIG_FILE} unreadable ({err}); layer taken from the folder name")
        return layer, None, None


def _read_lines(run_dir: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    path = run_dir / METRICS_FILE
    lines = read_metrics(path) if path.is_file() else []
    lines = [line for line in lines if isinstance(line.get("tokens"), (int, float))]
    train = sorted((l for l in lines if l.get("split") == "train"), key=lambda l: l["tokens"])
    heldout = sorted((l for l in lines if l.get("split") == "heldout"), key=lambda l: l["tokens"])
    if not lines:
        notes.append(f"no metrics yet ({METRICS_FILE} missing or empty): left out of the plots")
    elif not heldout:
        notes.append("no held-out snapshot yet")
    return train, heldout


def _read_eval(run_dir: Path, layer: int, notes: list[str]) -> tuple[str | None, dict | None]:
    """(snapshot name, record) of the final snapshot in eval.json, else of its latest one."""
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return None, None
    try:
        snapshots = read_json(path)["snapshots"]
        name = snapshot_name(layer, None)
        if name not in snapshots:
            name = max(snapshots, key=lambda n: snapshots[n].get("tokens_seen", 0))
            notes.append(f"{EVAL_FILE} has no final snapshot; showing {name}")
        return name, snapshots[name]
    except (SaecacheError, KeyError, TypeError, ValueError, AttributeError) as err:
        notes.append(f"{EVAL_FILE} unreadable ({err}); {_EVAL_HINT}")
        return None, None


def _fit(name: str, train: list[dict], options: FitOptions, notes: list[str]) -> LossFloorFit | None:
    if not train:
        return None
    try:
        fit = fit_loss_floor(*train_curve(train, options.metric), skip=options.skip,
                             cutoff=options.cutoff, run=name, metric=options.metric)
    except ValueError as err:
        notes.append(f"no loss-floor fit: {str(err).removeprefix(name + ': ')}")
        return None
    if fit.a == 0:
        notes.append(f"flat loss-floor fit: the {options.metric} did not fall over the fitted window")
    elif fit.alpha >= ALPHA_MAX - 1e-3:
        notes.append(f"α at its bound {ALPHA_MAX:g}: too few or too noisy points to trust L∞")
    return fit


def families(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Runs with metrics grouped by family (sorted), each family's runs by layer."""
    groups: dict[str, list[RunData]] = {}
    for run in sorted(runs, key=lambda r: (r.family, r.layer)):
        if run.has_metrics:
            groups.setdefault(run.family, []).append(run)
    return groups


# ---- formatting ------------------------------------------------------------------------------


def format_tokens(n: float) -> str:
    """Compact token count for axes and tables: 49152 → 49.2K, 3e8 → 300M, 1.5e9 → 1.5B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or not math.isfinite(value):
        return _MISSING
    return f"{value * scale:{spec}}{suffix}"


# (heading, FinalMetrics field, format, scale): the heatmap's columns, in order
HEATMAP_COLUMNS = (("FVU", "fvu", ".3g", 1.0), ("L0 (features/token)", "l0", ".1f", 1.0),
                   ("dead %", "dead_fraction", ".1f", 100.0),
                   ("CE loss recovered", "ce_loss_recovered", ".3f", 1.0))


def _heatmap_values(runs: list[RunData]) -> np.ndarray:
    """(layers, columns) of the final metrics, scaled as shown (dead in %); NaN where missing."""
    finals = [run.final_metrics() for run in runs]
    return np.array([[getattr(f, field) * scale for _, field, _, scale in HEATMAP_COLUMNS]
                     for f in finals], dtype=np.float64)


def _token_axis(ax) -> None:
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_tokens(x)))


def _family_colours(names: list[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}


def _grid(n: int, width: float = 3.1, height: float = 2.4) -> tuple[Figure, list]:
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


def _save(fig: Figure, path: Path) -> Path:
    """Render with Agg and write the PNG atomically."""
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# ---- plots -----------------------------------------------------------------------------------


def plot_heatmap(family: str, runs: list[RunData], path: Path) -> Path:
    """Layers × (FVU, L0, dead %, CE loss recovered), colour normalised per column."""
    values = _heatmap_values(runs)  # (layers, 4)
    shades = _normalise_columns(values)  # (layers, 4) in [0, 1], NaN where missing
    fig = Figure(figsize=(8.5, 1.8 + 0.42 * len(runs)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(shades), cmap=_cmap(), vmin=0, vmax=1,
                      aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        _, _, spec, _ = HEATMAP_COLUMNS[j]
        dark = np.isfinite(shades[i, j]) and shades[i, j] < 0.5  # viridis is dark at the bottom
        ax.text(j, i, _fmt(value, spec), ha="center", va="center", fontsize=9,
                color="white" if dark else "black")
    ax.set_xticks(range(len(HEATMAP_COLUMNS)), [c[0] for c in HEATMAP_COLUMNS])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(runs)), [f"layer {run.layer:02d}" for run in runs])
    ax.set_ylabel("layer")
    sources = sorted({run.final_metrics().source.split(" ")[0] for run in runs})
    ax.set_title(f"{family}: final metrics by layer (from {', '.join(sources)}; "
                 f"{_MISSING} = not measured)", fontsize=10)
    bar = fig.colorbar(image, ax=ax, ticks=[0, 1], shrink=0.8)
    bar.ax.set_yticklabels(["column\nmin", "column\nmax"])
    return _save(fig, path)


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


def plot_curves(runs: list[RunData], metric: str, ylabel: str, title: str, path: Path,
                log: bool = False) -> Path:
    """One subplot per layer of the train ``metric`` against tokens, sister runs overlaid."""
    runs = [run for run in runs if run.train]
    layers = sorted({run.layer for run in runs})
    colours = _family_colours(list({run.family for run in runs}))
    fig, axes = _grid(max(len(layers), 1))
    for ax, layer in zip(axes, layers):
        for run in (r for r in runs if r.layer == layer):
            tokens, values = _series(run.train, metric)
            ax.plot(tokens, values, color=colours[run.family], lw=1.4, label=run.family)
        _style_subplot(ax, f"layer {layer:02d}", log)
    if not layers:
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    fig.supylabel(ylabel)
    fig.suptitle(title)
    _family_legend(fig, colours)
    return _save(fig, path)


def _series(lines: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.array([line["tokens"] for line in lines], dtype=np.float64)
    values = np.array([_number(line.get(metric)) for line in lines], dtype=np.float64)
    keep = np.isfinite(values)
    return tokens[keep], values[keep]


def _style_subplot(ax, title: str, log: bool) -> None:
    ax.set_title(title, fontsize=10)
    _token_axis(ax)
    if log:
        _log_y(ax)
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=8)


def _log_y(ax) -> None:
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis, *ax.get_ylim())


def _plain_log_labels(axis, lo: float, hi: float) -> None:
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


def _family_legend(fig: Figure, colours: dict[str, str], extra: list | None = None) -> None:
    handles = [Line2D([], [], color=c, lw=2, label=name) for name, c in colours.items()]
    handles += extra or []
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3),
                   title="sister runs" if colours else None, fontsize=9)


def plot_loss_floor(family: str, runs: list[RunData], path: Path, metric: str = "loss") -> Path:
    """Per run (one subplot per layer): measured curve, fitted model, its extrapolation, L∞."""
    runs = [run for run in runs if run.train]
    fig, axes = _grid(max(len(runs), 1), width=3.3, height=2.6)
    for ax, run in zip(axes, runs):
        _draw_fit(ax, run, metric)
    if not runs:
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    fig.supylabel(f"train {metric} (normalised units, log scale)")
    fig.suptitle(f"{family}: loss floor L(T) = L∞ + A·T^(−α) fitted on the dots, predicting the "
                 "crosses\n(subplot titles: mean absolute % error on the crosses)")
    _family_legend(fig, {}, _fit_legend())
    return _save(fig, path)


def _draw_fit(ax, run: RunData, metric: str) -> None:
    tokens, values = _series(run.train, metric)
    fit = run.fit
    if fit is None:
        ax.plot(tokens, values, ".", color="0.5", ms=4)
        ax.text(0.5, 0.5, "no fit\n(see the runs table)", transform=ax.transAxes, ha="center",
                va="center")
        _style_subplot(ax, f"layer {run.layer:02d}", log=True)
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
    _style_subplot(ax, f"layer {run.layer:02d}: MAPE {_fmt(fit.holdout_mape, '.1f', suffix='%')}",
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


def plot_floor_summary(runs: list[RunData], path: Path, metric: str = "loss") -> Path:
    """Predicted final loss and floor L∞ against the measured final loss, one point per run."""
    fitted = [run for run in runs if run.fit is not None]
    colours = _family_colours(list({run.family for run in fitted}))
    fig = Figure(figsize=(8, 7.5), layout="constrained")
    ax = fig.subplots()
    for run in fitted:
        _draw_summary_point(ax, run, colours[run.family])
    _identity_line(ax, fitted)
    log = _wide_positive_range(fitted)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_labels(ax.xaxis, *ax.get_xlim())
        _plain_log_labels(ax.yaxis, *ax.get_ylim())
    scale = ", log scale" if log else ""
    ax.set_xlabel(f"measured final train {metric} (normalised units{scale})")
    ax.set_ylabel(f"predicted train {metric} (normalised units{scale})")
    ax.set_title(_summary_title(fitted), fontsize=10)
    if not fitted:
        ax.text(0.5, 0.5, "no run had enough points for a fit", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=_summary_legend(colours), loc="upper left", fontsize=8)
    return _save(fig, path)


def _summary_legend(colours: dict[str, str]) -> list:
    families_ = [Line2D([], [], ls="", marker="s", color=c, label=name) for name, c in colours.items()]
    return families_ + [
        Line2D([], [], ls="", marker="o", color="k", label="predicted at the final tokens"),
        Line2D([], [], ls="", marker="v", color="k", mfc="none", label="fitted floor L∞"),
        Line2D([], [], color="0.5", ls="--", label="y = x (perfect prediction)")]


def _wide_positive_range(fitted: list[RunData]) -> bool:
    """Log axes when every plotted value is > 0 and they span more than a factor of 10."""
    values = [v for run in fitted for v in (run.fit.final_measured, run.fit.final_predicted,
                                            run.fit.l_inf)]
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


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


def _summary_title(fitted: list[RunData]) -> str:
    mapes = np.array([run.fit.holdout_mape for run in fitted], dtype=np.float64)
    mapes = mapes[np.isfinite(mapes)]
    head = f"Predicted vs measured final loss, {len(fitted)} run(s)"
    if not len(mapes):
        return head
    worst = max(run.fit.holdout_max_ape for run in fitted if np.isfinite(run.fit.holdout_max_ape))
    return (f"{head}\nheld-back MAPE: median {np.median(mapes):.1f}%, "
            f"mean {mapes.mean():.1f}%; worst point {worst:.1f}%")


# ---- the document ----------------------------------------------------------------------------


class Table(NamedTuple):
    """A table shown in both summary.md and index.html."""

    caption: str
    headers: list[str]
    rows: list[list[str]]


class Section(NamedTuple):
    """A heading with paragraphs, figures (PNG file name, caption) and tables."""

    title: str
    paragraphs: list[str]
    figures: list[tuple[str, str]]
    tables: list[Table]


def runs_table(runs: list[RunData]) -> Table:
    """One row per run: final held-out metrics, CE loss recovered, the loss-floor fit, notes."""
    headers = ["run", "layer", "family", "tokens", "held-out FVU", "held-out L0", "held-out MSE",
               "dead %", "CE loss recovered", "fitted L∞", "α", "held-back MAPE", "notes"]
    rows = []
    for run in sorted(runs, key=lambda r: (r.family, r.layer)):
        h, fit = run.final_heldout, run.fit
        ce = run.eval.get("ce_loss_recovered") if run.eval else None
        rows.append([run.name, str(run.layer), run.family,
                     format_tokens(run.tokens) if run.tokens is not None else _MISSING,
                     _fmt(_number(h.get("fvu")), ".4g"), _fmt(_number(h.get("l0")), ".1f"),
                     _fmt(_number(h.get("mse")), ".4g"),
                     _fmt(_number(h.get("dead_fraction")), ".1f", 100.0),
                     _fmt(_number(ce), ".3f"),
                     _fmt(fit.l_inf if fit else None, ".4g"),
                     _fmt(fit.alpha if fit and fit.a > 0 else None, ".3f"),  # a = 0: α is moot
                     _fmt(fit.holdout_mape if fit else None, ".1f", suffix="%"),
                     "; ".join(run.notes)])
    return Table("Runs (held-out metrics from the last snapshot of metrics.jsonl)", headers, rows)


def heatmap_table(family: str, runs: list[RunData]) -> Table:
    """The numbers of a family's heatmap, with where each row comes from."""
    values = _heatmap_values(runs)
    rows = [[str(run.layer)] + [_fmt(v, spec) for v, (_, _, spec, _) in zip(row, HEATMAP_COLUMNS)]
            + [run.final_metrics().source] for run, row in zip(runs, values)]
    return Table(f"{family}: heatmap values", ["layer"] + [c[0] for c in HEATMAP_COLUMNS] + ["source"],
                 rows)


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
                    f"{EVAL_FILE}): {_EVAL_HINT}; the heatmaps show held-out metrics for them.")
    return text


def _curves_section(runs: list[RunData], out: Path) -> Section:
    plot_curves(runs, "loss", "train loss (normalised units, log scale)",
                "Training loss by layer (sister runs overlaid)", out / "curves-loss.png", log=True)
    plot_curves(runs, "l0", "L0 (active features per token)", "L0 by layer (sister runs overlaid)",
                out / "curves-l0.png")
    return Section("Training curves", [], [("curves-loss.png", "train loss per layer"),
                                           ("curves-l0.png", "L0 per layer")], [])


def _floor_section(groups: dict[str, list[RunData]], out: Path, options: FitOptions) -> Section:
    metric = options.metric
    figures = [("lossfloor-summary.png", "predicted vs measured final loss, all runs")]
    for family, group in groups.items():
        name = f"lossfloor-{_slug(family)}.png"
        plot_loss_floor(family, group, out / name, metric)
        figures.append((name, f"{family}: fit and extrapolation per layer"))
    plot_floor_summary([run for group in groups.values() for run in group],
                       out / "lossfloor-summary.png", metric)
    text = [f"L(T) = L∞ + A·T^(−α) is fitted to the train {metric} between {options.skip:.0%} and "
            f"{options.cutoff:.0%} of each run's tokens; the later points are predicted and compared "
            "with what was measured (MAPE: mean absolute percentage error). The last steps "
            "(--lr-decay, 20% by default; shaded) decay the learning rate to 0, which bends the "
            "measured curve below the power law: the prediction over-estimates the final loss "
            "there. See docs/loss-floor.md."]
    return Section("Loss floor", text, figures, [])


def render_markdown(title: str, sections: list[Section]) -> str:
    """summary.md: headings, paragraphs, image links and pipe tables."""
    parts = [f"# {title}\n"]
    for section in sections:
        parts.append(f"## {section.title}\n")
        parts += [f"{p}\n" for p in section.paragraphs]
        parts += [f"![{caption}]({name})\n" for name, caption in section.figures]
        for table in section.tables:
            parts.append(f"**{table.caption}**\n")
            parts.append(_markdown_table(table))
    return "\n".join(parts)


def _markdown_table(table: Table) -> str:
    def row(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(table.headers), "|" + "---|" * len(table.headers)] + [row(r) for r in table.rows]
    return "\n".join(lines) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    """index.html: one self-contained page; PNGs by relative link."""
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{e(section.title)}</h2>")
        body += [f"<p>{e(p)}</p>" for p in section.paragraphs]
        body += [f'<figure><a href="{e(name)}"><img src="{e(name)}" alt="{e(caption)}"></a>'
                 f"<figcaption>{e(caption)}</figcaption></figure>" for name, caption in section.figures]
        body += [_html_table(table) for table in section.tables]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.headers)
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table.rows)
    return f"<table><caption>{e(table.caption)}</caption><tr>{head}</tr>{rows}</table>"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1500px}"
        "img{max-width:100%;border:1px solid #ddd}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,td:last-child{text-align:left}"
        "caption{text-align:left;font-weight:bold;padding:4px 0}")


def write_report(runs_dir: str | Path, out: str | Path, *, metric: str = "loss", skip: float = 0.1,
                 cutoff: float = 0.6) -> Path:
    """Write the plots, summary.md and index.html of the runs in ``runs_dir`` into ``out``.

    ``metric``, ``skip`` and ``cutoff`` choose the loss-floor fit (see saecache.report.lossfloor).
    Returns the path of index.html.
    """
    runs_dir, out = Path(runs_dir), Path(out)
    options = FitOptions(metric, skip, cutoff)
    runs = [load_run(path, options) for path in find_runs(runs_dir)]
    out.mkdir(parents=True, exist_ok=True)
    title = f"saecache report: {runs_dir.resolve().name}"
    sections = _build(runs, out, runs_dir, options)
    markdown, page = render_markdown(title, sections), render_html(title, sections)
    atomic_write(out / "summary.md", lambda f: f.write(markdown.encode()))
    atomic_write(out / "index.html", lambda f: f.write(page.encode()))
    return out / "index.html"
