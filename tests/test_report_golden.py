"""`write_report` on the runs saecache 0.1.0 wrote: summary.md is what that release's report wrote,
plus what was added since: the λ_Anthropic column (docs/l1-units.md; d·l1 for a 0.1.0 run); F,
dense % and KL (from the release's eval.json) in both tables; the mse fit by default (as the
demo) and the rule for unusable fits (issue 12). Every value the release wrote is unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

from saecache.report.report import write_report

FIXTURE = Path(__file__).parent / "data" / "saecache-0.1.0"
GOLDEN_RUNS = "/tmp/runs-eval"  # where the runs were when 0.1.0 wrote the golden summary


def test_summary_of_release_runs_matches_golden(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURE / "runs", runs)
    write_report(runs, tmp_path / "report")
    summary = (tmp_path / "report" / "summary.md").read_text()
    summary = summary.replace(str(runs), GOLDEN_RUNS)
    summary = summary.replace(f"# saecache report: {runs.name}\n",
                              f"# saecache report: {Path(GOLDEN_RUNS).name}\n", 1)
    assert summary == (FIXTURE / "golden" / "report-summary.md").read_text()
