"""benchmarks/bench_quality.py: its metrics against known answers, and its saecache-only path
end to end on a tiny ground-truth cache (no peer needed; the peer check skips without one)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality as bq  # noqa: E402
import quality_data  # noqa: E402
from quality_peers import Trained  # noqa: E402


# ----------------------------------------------------------------------------- metrics


def test_fvu_is_its_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=gen) * 3 + 5  # a mean offset: FVU is about the variance
    x_hat = x + 0.3 * torch.randn(500, 7, generator=gen)
    xd, hd = x.double(), x_hat.double()
    expected = ((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert bq.pooled_fvu(x, x_hat) == pytest.approx(float(expected), rel=1e-12)
    assert bq.pooled_fvu(x, x) == 0.0
    # predicting the mean explains nothing; predicting zero is worse than that here
    assert bq.pooled_fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, rel=1e-12)
    assert bq.pooled_fvu(x, torch.zeros_like(x)) > 1


def test_mmcs_and_recovered_on_a_hand_made_case():
    true = torch.eye(4)  # four true directions e0..e3
    c = math.cos(math.radians(30))  # cos 30° ≈ 0.866 < 0.9
    decoder = torch.tensor([
        [2.0, 0.0, 0.0, 0.0],              # e0, exactly (norm does not matter)
        [0.0, -1.0, 0.0, 0.0],             # −e1: cosine −1, does not count
        [0.0, 0.95, math.sqrt(1 - 0.95 ** 2), 0.0],  # e1 at 0.95, e2 at 0.312
        [0.0, 0.0, c, 0.5],                # unit norm: e2 at 0.866, e3 at 0.5
        [0.1, 0.0, 0.0, 0.0],              # another e0, shorter
    ])
    best = bq.max_cosines(true, decoder)
    assert best.tolist() == pytest.approx([1.0, 0.95, c, 0.5])
    assert bq.mmcs(true, decoder) == pytest.approx((1.0 + 0.95 + c + 0.5) / 4)
    assert bq.recovered_fraction(true, decoder) == pytest.approx(0.5)  # e0 and e1 only
    assert bq.recovered_fraction(true, decoder, threshold=0.8) == pytest.approx(0.75)


def test_evaluate_counts_l0_dead_and_fvu():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
    decoder = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    def forward(rows):  # a perfect code on the two axes; feature 2 never fires
        acts = torch.stack([rows[:, 0], rows[:, 1], torch.zeros(len(rows))], dim=1)
        return acts @ decoder, acts

    out = bq.evaluate(Trained(forward, decoder), x, directions=np.eye(2, dtype=np.float32))
    assert out["fvu"] == 0.0
    assert out["l0"] == pytest.approx(4 / 3)
    assert out["dead"] == pytest.approx(1 / 3)
    assert out["mmcs"] == pytest.approx(1.0) and out["recovered"] == 1.0


def test_search_interpolates_in_log_log():
    # L0 = 100 · (c / 1e-3)^-1: the target 25 sits at c = 4e-3, between the points
    points = [(math.log(1e-3), math.log(100.0)), (math.log(1e-2), math.log(10.0))]
    assert bq._slope(points) == pytest.approx(-1.0)
    assert bq._interpolate(points, math.log(25.0), -1.0) == pytest.approx(4e-3)
    # outside the points: along the slope, at most 20× from the nearest
    assert bq._interpolate(points, math.log(5.0), -1.0) == pytest.approx(2e-2)
    assert bq._interpolate(points, math.log(1e-6), -1.0) == pytest.approx(0.2)


# ----------------------------------------------------------------------------- end to end


def _args(tmp_path: Path, *extra):
    return bq.parse_args(["--quick", "--peers", "none", "--data", "ground_truth", "--d", "16",
                          "--true-features", "48", "--true-l0", "3", "--expansion", "4", "--tokens", "8192",
                          "--heldout", "2048", "--batch-size", "256", "--chunk-rows", "1024",
                          "--mix-chunks", "2", "--probes", "2", "--full-runs", "1",
                          "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "q.md"),
                          *extra])


def test_ground_truth_cache_holds_its_features(tmp_path):
    data = quality_data.ground_truth(tmp_path, d=16, n_true=48, mean_l0=3, train_tokens=4096,
                                     heldout_tokens=1024, chunk_rows=1024)
    assert data.cache.complete and data.heldout.shape == (1024, 16)
    assert data.directions.shape == (48, 16)
    assert np.allclose(np.linalg.norm(data.directions, axis=1), 1, atol=1e-6)
    stats = data.cache.layer_stats(data.layer)
    # the mean offset holds half of E‖x‖² (fp16 storage and sampling aside)
    assert float(stats.mean @ stats.mean) / stats.mean_sq_norm == pytest.approx(0.5, abs=0.05)
    # the reader holds out exactly the last block
    again = quality_data.ground_truth(tmp_path, d=16, n_true=48, mean_l0=3, train_tokens=4096,
                                      heldout_tokens=1024, chunk_rows=1024)
    assert torch.equal(again.heldout, data.heldout)  # reused, not rebuilt


def test_saecache_only_run_writes_a_table(tmp_path):
    args = _args(tmp_path, "--archs", "all", "--saecache-fixed-l1")
    report = bq.run_all(args, log=lambda s: None)
    results = report["results"]
    assert results and not [r for r in results if r["error"]]
    assert {r["trainer"] for r in results} >= {"saecache"}
    searched = [r for r in results if r["trainer"] == "saecache (fixed --l1)" and r["arch"] == "relu"]
    assert len(searched) == 3 and all(r["setting"].startswith("fixed --l1 ") for r in searched)
    assert {r["target"] for r in results} == {8.0, 16.0, 32.0}  # 16, 32 and d/2
    topk = [r for r in results if r["arch"] == "topk"]
    for r, k in zip(topk, (8, 16, 32)):  # TopK's ReLU may zero some of the k largest
        assert r["setting"] == f"k {k}" and k / 2 < r["metrics"]["l0"] <= k
    for r in results:
        m = r["metrics"]
        assert 0 <= m["dead"] <= 1 and 0 <= m["recovered"] <= 1 and -1 <= m["mmcs"] <= 1
        assert math.isfinite(m["fvu"]) and r["cpu_s"] > 0
    (ds,) = report["datasets"]
    assert ds["prefetch_reader_same"]  # saecache's loop reads the stream the peers are fed
    section = bq.tables(report)
    assert section.startswith(bq.BEGIN) and section.rstrip().endswith(bq.END)
    assert "| topk | 8 | saecache | k 8 |" in section
    bq.write_section(Path(args.out), section)
    doc = Path(args.out)
    doc.write_text("# Title\n\nmethod\n\n" + doc.read_text() + "\nafter\n")
    bq.write_section(doc, section.replace("saecache | k 8", "saecache | k 8 (again)"))
    text = doc.read_text()
    assert text.startswith("# Title\n\nmethod\n\n") and text.endswith("\nafter\n")
    assert text.count(bq.BEGIN) == 1 and "(again)" in text


def test_architectures_come_from_saecache_then_peers():
    from saecache.sae.archs import ARCHS

    class FakePeer:
        def archs(self, d):
            return {"topk": None, "batchtopk": None}

    own = {name: [] for name in ARCHS}
    names = bq.architectures(own, [FakePeer()], "all", 64)
    assert names[:len(ARCHS)] == list(ARCHS) and names.count("topk") == 1
    assert "batchtopk" in names
    assert bq.architectures(own, [FakePeer()], "saecache", 64) == list(ARCHS)
    with pytest.raises(SystemExit):
        bq.architectures(own, [FakePeer()], "nonsense", 64)


def test_a_peer_trains_on_the_same_stream(tmp_path):
    pytest.importorskip("dictionary_learning", reason="dictionary-learning is not installed")
    args = _args(tmp_path, "--peers", "dictionary-learning", "--archs", "topk")
    report = bq.run_all(args, log=lambda s: None)
    rows = [r for r in report["results"] if r["trainer"] == "dictionary-learning"]
    assert rows and not [r for r in rows if r["error"]]
    for r, k in zip(rows, (8, 16, 32)):
        assert r["setting"] == f"k {k}" and k / 2 < r["metrics"]["l0"] <= k
