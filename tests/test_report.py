"""`write_report` on run folders built by hand (synthetic metrics.jsonl), and on the demo's runs."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from saecache.core.errors import SaecacheError
from saecache.report.report import write_report
from saecache.train.runfolder import snapshot_name

FAMILY = "relu-x32-l1-0.0003"
SISTER = "relu-x32-adaptive-l0-150"
LONE = "topk-x32-k64"
TOKENS = 4_000_000
SPECS = {FAMILY: {"arch": "relu", "l1": 3e-4}, SISTER: {"arch": "relu", "l1": 5e-4, "target_l0": 150.0},
         LONE: {"arch": "topk", "k": 64}}
"""The run.json spec of each family (its folder name is RunSpec.name)."""


def make_run(root: Path, family: str, layer: int, *, points: int = 40, metrics: bool = True,
             evaluation: dict | None = None, folder: str | None = None) -> Path:
    """A run folder: run.json, a power-law metrics.jsonl with LR decay in the last 20%, eval.json."""
    run = root / (folder or f"layer{layer:02d}-{family}")
    run.mkdir(parents=True)
    spec = {"layer": layer, "expansion": 32, "l1": None, "target_l0": None, "k": None, **SPECS[family]}
    config = {"spec": spec, "train": {"lr_decay": 0.2}, "cache": {"model": "tiny-neox", "d": 1024}, "scale": 1.0,
              "cache_location": "cache.zarr"}
    (run / "run.json").write_text(json.dumps(config))
    if metrics:
        lines = _train_lines(layer, points) + _heldout_lines(layer)
        (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if evaluation is not None:
        (run / "eval.json").write_text(json.dumps({"model": "tiny", "snapshots": evaluation}))
    return run


def _train_lines(layer: int, points: int) -> list[dict]:
    tokens = np.linspace(TOKENS / points, TOKENS, points)
    decay = np.clip((tokens / TOKENS - 0.8) / 0.2, 0, 1)  # the LR decay bends the curve down
    loss = (0.02 * (layer + 1) + 40 * tokens ** -0.5) * (1 - 0.05 * decay)
    return [{"split": "train", "step": i + 1, "tokens": int(t), "loss": float(v), "mse": float(v),
             "fvu": float(v) / 2, "l0": 100 + layer + 50 * float(np.exp(-t / 1e6)),
             "dead_fraction": 0.0, "lr": 3e-4} for i, (t, v) in enumerate(zip(tokens, loss))]


def _heldout_lines(layer: int) -> list[dict]:
    snaps = [(TOKENS // 2, snapshot_name(layer, TOKENS // 2)), (TOKENS, snapshot_name(layer, None))]
    return [{"split": "heldout", "tokens": t, "snapshot": name, "mse": 0.01 * (layer + 1),
             "fvu": 0.011 * (layer + 1), "l0": 100.0 + layer, "dead_fraction": 0.01 * layer,
             "rows": 2048} for t, name in snaps]


def eval_record(fvu: float, ce: float) -> dict:
    return {"tokens_seen": TOKENS, "ce_clean": 3.0, "ce_spliced": 3.2, "ce_zero": 9.0,
            "ce_loss_recovered": ce, "kl": 0.1, "l0": 77.0, "mse": 0.5, "fvu": fvu,
            "dead_fraction": 0.25, "dense_fraction": 0.0, "tokens": 4096}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """Two sister families on 6 layers, a one-layer family, eval.json on two runs, a run with no
    metrics and one with too few points; returns the report's folder."""
    runs = tmp_path_factory.mktemp("runs")
    for layer in range(6):
        evaluation = {snapshot_name(layer, None): eval_record(0.1234, 0.875)} if layer < 2 else None
        make_run(runs, FAMILY, layer, evaluation=evaluation)
        make_run(runs, SISTER, layer)
    make_run(runs, LONE, 3, points=4)
    make_run(runs, LONE, 7, metrics=False)
    out = tmp_path_factory.mktemp("report")
    assert write_report(runs, out) == out / "index.html"
    return out


class Links(HTMLParser):
    """Every href and src in a page."""

    def __init__(self):
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("href", "src")]


def links(page: Path) -> list[str]:
    parser = Links()
    parser.feed(page.read_text())
    return parser.targets


def test_every_png_is_written_and_linked(report):
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"curves-loss.png", "curves-l0.png", "lossfloor-summary.png",
            f"heatmap-{FAMILY}.png", f"heatmap-{SISTER}.png", f"heatmap-{LONE}.png",
            f"lossfloor-{FAMILY}.png", f"lossfloor-{SISTER}.png"} <= set(pngs)
    for name in pngs:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report / name).stat().st_size > 5000
    targets = links(report / "index.html")
    assert all((report / t).is_file() for t in targets), targets
    assert set(pngs) <= set(targets)
    assert not any(t.startswith(("/", "file:")) for t in targets)  # relative links only


def test_summary_lists_every_run(report):
    summary = (report / "summary.md").read_text()
    assert "14 run(s)" in summary and "(13 with metrics) on tiny-neox" in summary
    names = [f"layer{l:02d}-{f}" for l in range(6) for f in (FAMILY, SISTER)]
    for name in names + [f"layer03-{LONE}", f"layer07-{LONE}"]:
        assert f"| {name} |" in summary
    for png in report.glob("*.png"):
        assert f"]({png.name})" in summary


def test_eval_values_appear_in_the_heatmap_table(report):
    summary = (report / "summary.md").read_text()
    table = summary.split(f"**{FAMILY}: heatmap values**")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for layer in ("0", "1"):  # from eval.json: FVU 0.1234, L0 77, dead 25%, dense 0, CE 0.875, KL 0.1
        assert "| 32,768 | 0.123 | 77.0 | 25.0 | 0.0 | 0.875 | 0.1 | eval.json (sae_layer" in rows[layer]
    assert "| 32,768 | 0.044 | 103.0 | 3.0 | — | — | — | held-out |" in rows["3"]  # held-out line
    assert "0.875" in (report / "index.html").read_text()
    assert "saecache eval" in summary  # CE missing for the others, and how to add it


def test_run_without_metrics_or_too_few_points_is_reported_not_fatal(report):
    summary = (report / "summary.md").read_text()
    row7 = next(l for l in summary.splitlines() if l.startswith(f"| layer07-{LONE} |"))
    assert "no metrics yet" in row7
    assert f"layer07-{LONE}" in summary.split("Left out (no metrics yet):")[1].splitlines()[0]
    row3 = next(l for l in summary.splitlines() if l.startswith(f"| layer03-{LONE} |"))
    assert "no loss-floor fit: only 2 mse points" in row3  # mse: the default metric


def test_fits_are_tabulated(report):
    summary = (report / "summary.md").read_text()
    row = next(l for l in summary.splitlines() if l.startswith(f"| layer05-{FAMILY} |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4] == "32,768"  # F = 32 × 1024
    l_inf, alpha, mape = float(cells[13]), float(cells[14]), float(cells[15].rstrip("%"))
    assert l_inf == pytest.approx(0.12, rel=0.2) and alpha == pytest.approx(0.5, rel=0.2)
    assert 0 < mape < 5  # the LR decay pulls the measured loss below the prediction


def test_a_single_run_folder_is_a_report(tmp_path):
    run = make_run(tmp_path / "runs", FAMILY, 12)
    index = write_report(run, tmp_path / "out")
    assert f"layer12-{FAMILY}" in (tmp_path / "out" / "summary.md").read_text()
    assert all((index.parent / t).is_file() for t in links(index))


def test_no_runs_is_one_clear_error(tmp_path):
    with pytest.raises(SaecacheError, match="no runs in .*run.json"):
        write_report(tmp_path, tmp_path / "out")
    with pytest.raises(SaecacheError, match="is not a folder"):
        write_report(tmp_path / "missing", tmp_path / "out")


def test_eval_without_final_snapshot_uses_the_latest(tmp_path):
    early = {snapshot_name(2, TOKENS // 2): {**eval_record(0.5, 0.625), "tokens_seen": TOKENS // 2}}
    make_run(tmp_path / "runs", FAMILY, 2, evaluation=early)
    write_report(tmp_path / "runs", tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "0.625" in summary and "no final snapshot; showing sae_layer02_2M.pt" in summary


def test_family_comes_from_run_json_and_from_the_folder_name_without_it(tmp_path):
    make_run(tmp_path / "runs", FAMILY, 4, folder="renamed-by-hand")
    broken = make_run(tmp_path / "runs", LONE, 6)
    (broken / "run.json").write_text("{not json")
    write_report(tmp_path / "runs", tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"| renamed-by-hand | 4 | {FAMILY} |" in summary
    row = next(l for l in summary.splitlines() if l.startswith(f"| layer06-{LONE} |"))
    assert row.startswith(f"| layer06-{LONE} | 6 | {LONE} |")
    assert "run.json unreadable (" in row and "); layer taken from the folder name" in row
    assert (tmp_path / "out" / f"heatmap-{FAMILY}.png").is_file()


def test_fit_options_are_checked(tmp_path):
    make_run(tmp_path / "runs", FAMILY, 1)
    with pytest.raises(ValueError, match="--metric is 'accuracy'"):
        write_report(tmp_path / "runs", tmp_path / "out", metric="accuracy")
    write_report(tmp_path / "runs", tmp_path / "out", metric="fvu", skip=0.2, cutoff=0.9)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "fitted to the train fvu between 20% and 90% of each run's tokens" in summary


# ---- on a real demo output -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_runs(demo) -> Path:
    """The demo's two sister runs on layer 1 (trained and evaluated for real on CPU)."""
    return demo[0] / "runs"


def test_report_of_the_demo(demo_runs, tmp_path):
    index = write_report(demo_runs, tmp_path / "report")
    summary = (tmp_path / "report" / "summary.md").read_text()
    for run in demo_runs.iterdir():
        assert f"| {run.name} |" in summary
    assert "CE loss recovered is missing" not in summary  # the demo runs saecache eval
    targets = links(index)
    assert len([t for t in targets if t.endswith(".png")]) >= 6
    assert all((index.parent / t).is_file() and (index.parent / t).stat().st_size for t in targets)
