"""Metrics on inputs whose values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference import explained_variance, fvu, l0, mse
from saecache.sae.metrics import FiringStats, MetricsSummary, RunningMetrics

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_HAT = torch.tensor([[1.0, 1.0], [1.0, 4.0]])  # squared errors 0, 1, 4, 0


def test_mse_by_hand():
    assert mse(X, X_HAT) == pytest.approx(5 / 4)
    assert mse(X, X) == 0.0


def test_fvu_and_explained_variance_by_hand():
    # mean row [2, 3]; Σ||x − mean||² = (1 + 1) + (1 + 1) = 4; Σ||x − x̂||² = 5
    assert fvu(X, X_HAT) == pytest.approx(5 / 4)
    assert explained_variance(X, X_HAT) == pytest.approx(-1 / 4)
    assert fvu(X, X) == 0.0 and explained_variance(X, X) == 1.0
    assert fvu(X, X.mean(dim=0).expand_as(X)) == pytest.approx(1.0)


def test_fvu_of_constant_data_is_nan():
    x = torch.ones(3, 2)
    assert math.isnan(fvu(x, x)) and math.isnan(explained_variance(x, x))


def test_l0_by_hand():
    acts = torch.tensor([[0.0, 1.0, 0.0], [2.0, -3.0, 0.0], [0.0, 0.0, 0.0]])
    assert l0(acts) == pytest.approx(1.0)  # (1 + 2 + 0) / 3
    assert l0(acts.reshape(1, 3, 3)) == pytest.approx(1.0)  # leading dims are rows


def test_half_precision_inputs_accumulate_in_float64():
    x = torch.ones(70_000, 1, dtype=torch.float16)  # a float16 sum would overflow at 65504
    zeros = torch.zeros_like(x)
    assert mse(x, zeros) == 1.0
    assert l0(x) == 1.0
    x2 = torch.cat([x, -x])  # mean 0, Σ||x − mean||² = 140_000
    assert fvu(x2, torch.zeros_like(x2)) == 1.0


# ── FiringStats ──────────────────────────────────────────────────────────────────────────────

BATCHES = [  # F = 4, two tokens per batch
    [[1, 0, 0, 0], [0, 0, 0, 0]],  # feature 0 fires
    [[0, 1, 0, 0], [0, 2, 0, 0]],  # feature 1 fires twice
    [[0, 0, 0, 0], [0, 0, 0, 0]],  # nothing
]


def fed(batches=BATCHES) -> FiringStats:
    stats = FiringStats(4)
    for b in batches:
        stats.update(torch.tensor(b, dtype=torch.float32))
    return stats


def test_firing_stats_clock_and_dead_fraction_by_hand():
    stats = fed()
    # tokens since each feature's last firing batch: 0 → 4, 1 → 2, 2 and 3 never → 6 (all seen)
    assert stats.tokens_since_fired.tolist() == [4, 2, 6, 6]
    assert stats.tokens_seen == 6
    assert stats.dead_mask(5).tolist() == [False, False, True, True]
    assert stats.dead_fraction(5) == 0.5
    assert stats.dead_fraction(4) == 0.75  # feature 0 too: silent for the last 4 tokens
    assert stats.dead_fraction(2) == 1.0
    assert stats.dead_fraction(7) == 0.0  # fewer than 7 tokens seen: nothing can be dead yet


def test_never_fired_features_are_dead_only_after_a_window():
    stats = FiringStats(3)
    stats.update(torch.zeros(4, 3))
    assert stats.dead_fraction(5) == 0.0
    stats.update(torch.zeros(1, 3))
    assert stats.dead_fraction(5) == 1.0


def test_firing_stats_dense_fraction_and_reset_by_hand():
    stats = fed()
    assert stats.fire_counts.tolist() == [1, 2, 0, 0]
    # frequencies 1/6, 2/6, 0, 0
    assert stats.dense_fraction(0.1) == 0.5
    assert stats.dense_fraction(0.2) == 0.25
    assert stats.dense_fraction(1 / 3) == 0.0  # strictly more than the threshold
    stats.reset_counts()
    assert stats.dense_fraction(0.0) == 0.0 and stats.tokens_counted == 0
    assert stats.tokens_since_fired.tolist() == [4, 2, 6, 6]  # the clock keeps running
    stats.update(torch.tensor([[0.0, 0, 3, 0], [0, 0, 0, 0]]))
    assert stats.tokens_since_fired.tolist() == [6, 4, 0, 8]
    assert stats.frequencies().tolist() == [0.0, 0.0, 0.5, 0.0]
    assert stats.dense_fraction(0.4) == 0.25


def test_firing_stats_refuses_wrong_width_and_window():
    stats = FiringStats(4)
    with pytest.raises(ValueError, match="features"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="window_tokens"):
        stats.dead_mask(0)


def test_firing_stats_state_dict_round_trip(tmp_path):
    stats = fed()
    stats.reset_counts()
    stats.update(torch.tensor([[0.0, 0, 1, 0]]))
    torch.save(stats.state_dict(), tmp_path / "firing.pt")
    resumed = FiringStats(4)
    resumed.load_state_dict(torch.load(tmp_path / "firing.pt", weights_only=True))
    more = torch.tensor([[0.0, 0, 0, 1], [0, 0, 0, 0]])
    stats.update(more)
    resumed.update(more)
    for key, value in stats.state_dict().items():
        got = resumed.state_dict()[key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
    assert resumed.dead_fraction(3) == stats.dead_fraction(3)
    with pytest.raises(ValueError, match="for 4 features, expected 5"):
        FiringStats(5).load_state_dict(stats.state_dict())


# ── RunningMetrics ───────────────────────────────────────────────────────────────────────────


def test_running_metrics_pool_batches_like_one_big_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=gen) + 4.0
    x_hat = x + 0.3 * torch.randn(30, 5, generator=gen)
    acts = torch.relu(torch.randn(30, 7, generator=gen))
    running = RunningMetrics()
    assert math.isnan(running.summary().mse)
    for rows in (slice(0, 7), slice(7, 20), slice(20, 30)):
        running.update(x[rows], x_hat[rows], acts[rows])
    got = running.summary()
    assert isinstance(got, MetricsSummary) and got.tokens == 30
    assert got.mse == pytest.approx(mse(x, x_hat))
    assert got.fvu == pytest.approx(fvu(x, x_hat))
    assert got.explained_variance == pytest.approx(explained_variance(x, x_hat))
    assert got.l0 == pytest.approx(l0(acts))
    running.reset()
    running.update(X, X_HAT)
    assert running.summary() == pytest.approx(MetricsSummary(2, 5 / 4, 5 / 4, -1 / 4, math.nan),
                                              nan_ok=True)
