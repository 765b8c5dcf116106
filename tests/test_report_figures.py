"""What the report's figures say: per-metric colour bars with numbers and a "better" direction,
one-layer heatmaps that still tell values apart, L0 target lines and F, legends of what is drawn,
unusable loss-floor fits flagged and left out, summary plots sized to their content, and the
runs table's F, dense % and KL. Figures are inspected as matplotlib objects (Agg), not as PNGs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from saecache.report.curves import curves_figure
from saecache.report.floor import floor_summary_figure, loss_floor_figure, usable_fits
from saecache.report.heatmap import (HEATMAP_COLUMNS, HIGHER, LOWER, NEUTRAL, heatmap_figure,
                                      heatmap_table)
from saecache.report.lossfloor import DEFAULTS, MAPE_LIMIT, FitOptions, fit_loss_floor
from saecache.report.report import runs_table, write_report
from saecache.report.runs import load_run
from saecache.train.runfolder import RunFolder, snapshot_name
from tests.test_report import FAMILY, LONE, SISTER, TOKENS, eval_record, make_run

NUMBER = re.compile(r"^−?-?\d+(\.\d+)?(e[+−-]?\d+)?$")


def evaluated(root: Path, family: str, layer: int, fvu: float, ce: float, **extra) -> Path:
    """A run with eval.json on its final snapshot (FVU, CE recovered and ``extra`` fields)."""
    record = {**eval_record(fvu, ce), **extra}
    return make_run(root, family, layer, evaluation={snapshot_name(layer, None): record})


def loaded(*folders: Path):
    return [load_run(RunFolder(folder)) for folder in folders]


def cells(ax) -> list[tuple[str, tuple]]:
    """(text, RGBA) of each cell of a one-column heatmap axes, top to bottom."""
    image = ax.images[0]
    data = image.get_array()[:, 0]  # (layers,) masked where not measured
    return [(text.get_text(), None if np.ma.is_masked(v) else tuple(image.cmap(image.norm(float(v)))))
            for text, v in zip(ax.texts, data)]


def luminance(rgba) -> float:
    return 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]


def colour_bars(fig) -> list:
    """The colour bar axes of a heatmap figure (the ones with an x label), left to right."""
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


# ---- heatmap ---------------------------------------------------------------------------------


def test_every_metric_has_a_colour_bar_with_numbers_and_its_direction(tmp_path):
    runs = loaded(*(evaluated(tmp_path, FAMILY, layer, 0.1 + 0.05 * layer, 0.9 - 0.1 * layer,
                              kl=0.1 * (layer + 1), dense_fraction=0.01 * layer, l0=70.0 + layer)
                      for layer in range(3)))
    fig = heatmap_figure(FAMILY, runs)
    bars = colour_bars(fig)
    assert len(bars) == len(HEATMAP_COLUMNS) == 6
    for bar, column in zip(bars, HEATMAP_COLUMNS):
        ticks = [t.get_text() for t in bar.get_xticklabels()]
        assert len(ticks) >= 2 and all(NUMBER.match(t.replace(",", "")) for t in ticks), ticks
        assert float(ticks[0]) < float(ticks[-1])  # the bar reads left to right, low to high
        way = {HIGHER: "(higher is better)", LOWER: "(lower is better)",
               NEUTRAL: "(a choice, not a score)"}[column.better]
        assert bar.get_xlabel() == f"{column.heading}\n{way}"
    assert "column min" not in " ".join(t.get_text() for ax in fig.axes for t in ax.get_xticklabels())


def test_the_direction_of_each_metric():
    better = {c.heading: c.better for c in HEATMAP_COLUMNS}
    assert better == {"FVU": LOWER, "L0": NEUTRAL, "dead %": LOWER, "dense %": LOWER,
                      "CE loss recovered": HIGHER, "KL": LOWER}


def test_darker_means_better_in_every_scored_column(tmp_path):
    good = evaluated(tmp_path, FAMILY, 0, 0.1, 0.9, kl=0.05, dense_fraction=0.0, dead_fraction=0.0)
    bad = evaluated(tmp_path, FAMILY, 1, 0.5, 0.4, kl=0.8, dense_fraction=0.2, dead_fraction=0.3)
    fig = heatmap_figure(FAMILY, loaded(good, bad))
    for ax, column in zip(fig.axes, HEATMAP_COLUMNS):
        if column.better == NEUTRAL:
            continue
        (_, first), (_, second) = cells(ax)
        assert luminance(first) < luminance(second), column.heading  # layer 0 is better in all


def test_one_layer_heatmap_tells_values_apart_and_writes_them(tmp_path):
    """The old heatmap scaled each column by its own min..max: one layer gave identical cells."""
    a = evaluated(tmp_path / "a", FAMILY, 3, 0.15, 0.95, kl=0.2, dense_fraction=0.01)
    b = evaluated(tmp_path / "b", FAMILY, 3, 0.6, 0.3, kl=0.2, dense_fraction=0.4)
    fig_a, fig_b = heatmap_figure(FAMILY, loaded(a)), heatmap_figure(FAMILY, loaded(b))
    shown_a = [cells(ax)[0] for ax in fig_a.axes if ax.images]
    shown_b = [cells(ax)[0] for ax in fig_b.axes if ax.images]
    assert [text for text, _ in shown_a] == ["0.15", "77.0", "25.0", "1.0", "0.950", "0.2"]
    for column, (_, colour_a), (_, colour_b) in zip(HEATMAP_COLUMNS, shown_a, shown_b):
        if column.bounds is not None and column.heading != "dead %":  # dead 25% in both
            assert colour_a != colour_b, column.heading  # a fixed range: values still differ
    assert len({colour for _, colour in shown_a}) >= 3  # not one colour for every metric
    l0_bar = colour_bars(fig_a)[1]  # L0 has no natural range: one neutral colour, its value
    assert [t.get_text() for t in l0_bar.get_xticklabels()] == ["77.0"]


def test_missing_columns_are_marked_not_scaled(tmp_path):
    run = make_run(tmp_path, LONE, 2)  # no eval.json: no dense %, CE recovered, KL
    fig = heatmap_figure(LONE, loaded(run))
    missing = [ax for ax, c in zip(fig.axes, HEATMAP_COLUMNS) if c.field in
               ("dense_fraction", "ce_loss_recovered", "kl")]
    assert all(cells(ax)[0] == ("—", None) and "not measured" in ax.get_xlabel() for ax in missing)
    assert len(colour_bars(fig)) == 3


def test_heatmap_is_sized_to_layers_and_metrics(tmp_path):
    one = heatmap_figure(FAMILY, loaded(make_run(tmp_path / "1", FAMILY, 0)))
    folders = [make_run(tmp_path / "24", FAMILY, l, points=4) for l in range(24)]  # 4: no fits, fast
    many = heatmap_figure(FAMILY, loaded(*folders))
    (w1, h1), (w24, h24) = one.get_size_inches(), many.get_size_inches()
    assert w1 == w24 and h1 < 4 and h24 > 2 * h1
    assert h24 / 24 >= 0.25  # ≥ 0.25 inch per layer row: the labels stay readable
    labels = [t.get_text() for t in many.axes[0].get_yticklabels()]
    assert labels == [f"layer {l:02d}" for l in range(24)]


# ---- L0 curves -------------------------------------------------------------------------------


def test_l0_curves_draw_the_adaptive_target_and_name_F(tmp_path):
    runs = loaded(make_run(tmp_path, SISTER, 4), make_run(tmp_path, FAMILY, 4))  # target 150; fixed
    fig = curves_figure(runs, "l0", "L0", "L0 by layer")
    flat = [line for line in fig.axes[0].get_lines() if len(set(line.get_ydata())) == 1]
    assert [line.get_ydata()[0] for line in flat] == [150.0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"{SISTER} (F = 32,768)", f"{FAMILY} (F = 32,768)",  # by name
                      f"target L0 = 150 ({SISTER})"]
    loss = curves_figure(runs, "loss", "loss", "loss by layer")  # no targets on a loss plot
    assert not any("target" in t.get_text() for t in loss.legends[0].get_texts())


# ---- loss floor ------------------------------------------------------------------------------


def rising_run(root: Path, layer: int) -> Path:
    """A run whose train mse rises all the way: a power law with A ≥ 0 can only fit it flat."""
    run = make_run(root, LONE, layer)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    for i, line in enumerate(train):
        line["mse"] = line["loss"] = 0.1 + 0.003 * i
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_the_unusable_rules_on_real_fits():
    tokens = np.linspace(1e5, 4e6, 40)
    assert fit_loss_floor(tokens, 0.05 + 30 * tokens ** -0.5).unusable is None
    flat = fit_loss_floor(tokens, 0.1 + 1e-9 * tokens)  # rising: the fit is flat, A = 0
    assert flat.a == 0 and flat.unusable == "flat fit, the mse did not fall"
    jump = 0.05 + 30 * tokens ** -0.5 + np.where(tokens > 0.6 * tokens[-1], 0.05, 0.0)
    missed = fit_loss_floor(tokens, jump)  # falls, but jumps after the cut-off
    assert missed.holdout_mape > MAPE_LIMIT and missed.unusable.startswith("MAPE ")


def test_an_unusable_fit_is_flagged_and_left_out_of_the_summary(tmp_path):
    good = [make_run(tmp_path / "runs", FAMILY, layer) for layer in range(3)]
    bad = rising_run(tmp_path / "runs", 5)
    runs = loaded(*good, bad)
    usable, unusable = usable_fits(runs)
    assert [r.name for r in unusable] == [bad.name] and len(usable) == 3
    fig = floor_summary_figure(runs)
    median = np.median([run.fit.holdout_mape for run in usable])
    title = fig.get_suptitle()
    assert f"median {median:.1f}%" in title and f"1 unusable left out: {bad.name}" in title
    dots = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(dots) == 3  # the unusable run is not drawn
    panel = loss_floor_figure(LONE, loaded(bad))
    assert panel.axes[0].get_title().endswith("unusable: flat fit, the mse did not fall")
    table = runs_table(runs)
    notes = {row[0]: row[-1] for row in table.rows}
    assert notes[bad.name] == "loss-floor fit unusable: flat fit, the mse did not fall"
    assert all("unusable" not in notes[run.name] for run in usable)


def test_floor_legend_lists_only_what_is_drawn(tmp_path):
    short = make_run(tmp_path, LONE, 1, points=2)  # two metrics lines: no fit
    legend = [t.get_text() for t in loss_floor_figure(LONE, loaded(short)).legends[0].get_texts()]
    assert legend == ["measured (no fit)"]
    full = make_run(tmp_path, FAMILY, 2)
    legend = [t.get_text() for t in loss_floor_figure(FAMILY, loaded(full)).legends[0].get_texts()]
    assert "measured (no fit)" not in legend and len(legend) == 8
    record = json.loads((full / "run.json").read_text())
    record["train"]["lr_decay"] = 0.0  # no decay: nothing shaded, no legend entry for it
    (full / "run.json").write_text(json.dumps(record))
    legend = [t.get_text() for t in loss_floor_figure(FAMILY, loaded(full)).legends[0].get_texts()]
    assert "learning-rate decay to 0" not in legend and len(legend) == 7


def test_floor_summary_is_sized_to_its_content(tmp_path):
    one = floor_summary_figure(loaded(make_run(tmp_path / "1", FAMILY, 0)))
    many = loaded(*(make_run(tmp_path / "m", family, layer) for layer in range(8)
                    for family in (FAMILY, SISTER)))
    wide = floor_summary_figure(many)
    (w1, h1), (w2, h2) = one.get_size_inches(), wide.get_size_inches()
    assert h1 < 4 and w1 > 2 * h1  # one run: a short strip, not an 8 × 8 square
    assert h2 > h1 and len([ax for ax in wide.axes if ax.get_visible()]) == 2  # one per family


# ---- tables and defaults ---------------------------------------------------------------------


def test_tables_have_F_dense_and_KL(tmp_path):
    runs = loaded(evaluated(tmp_path, FAMILY, 0, 0.2, 0.8, kl=0.4321, dense_fraction=0.125),
                  make_run(tmp_path, LONE, 1, points=4))  # no eval.json
    table = runs_table(runs)
    first, second = (dict(zip(table.headers, row)) for row in table.rows)
    assert (first["F"], first["dense %"], first["KL"]) == ("32,768", "12.5", "0.432")
    assert (second["F"], second["dense %"], second["KL"]) == ("32,768", "—", "—")
    heat = heatmap_table(FAMILY, runs[:1])
    assert dict(zip(heat.headers, heat.rows[0])) | {"source": ""} == {
        "layer": "0", "F": "32,768", "FVU": "0.2", "L0": "77.0", "dead %": "25.0",
        "dense %": "12.5", "CE loss recovered": "0.800", "KL": "0.432", "source": ""}


def test_report_fits_mse_by_default_like_the_demo(tmp_path):
    assert DEFAULTS.metric == FitOptions().metric == "mse"
    make_run(tmp_path / "runs", FAMILY, 0)
    write_report(tmp_path / "runs", tmp_path / "out")
    assert "fitted to the train mse between" in (tmp_path / "out" / "summary.md").read_text()
