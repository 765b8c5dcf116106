"""The loss-floor fit: recovers a known power law, predicts held-back points, refuses too little data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from saecache.core.settings import field_docs, rule_of
from saecache.report.lossfloor import FitOptions, LossFloorFit, fit_loss_floor, train_curve
from saecache.train.runfolder import RunFolder

L_INF, A, ALPHA = 0.05, 2000.0, 0.5


def power_law(tokens: np.ndarray) -> np.ndarray:
    return L_INF + A * tokens ** (-ALPHA)


TOKENS = np.linspace(1e6, 3e8, 200)


def fit_run(run_dir: str | Path, metric: str = "loss", skip: float = 0.1,
            cutoff: float = 0.6) -> LossFloorFit:
    """Fit the train ``metric`` curve of the run in ``run_dir`` (its ``metrics.jsonl``)."""
    run = RunFolder(run_dir)
    tokens, values = train_curve(run.metrics_lines(), metric)
    return fit_loss_floor(tokens, values, skip=skip, cutoff=cutoff, run=run.name, metric=metric)


def test_recovers_a_noiseless_power_law():
    fit = fit_loss_floor(TOKENS, power_law(TOKENS))
    assert fit.l_inf == pytest.approx(L_INF, rel=0.05)
    assert fit.a == pytest.approx(A, rel=0.05)
    assert fit.alpha == pytest.approx(ALPHA, rel=0.05)
    assert fit.holdout_mape < 0.01 and fit.holdout_max_ape < 0.01  # percent
    assert fit.rmse < 1e-9


def test_window_is_after_the_warm_up_and_before_the_cut_off():
    fit = fit_loss_floor(TOKENS, power_law(TOKENS), skip=0.1, cutoff=0.6)
    assert fit.train_tokens.min() > 0.1 * TOKENS[-1]
    assert fit.train_tokens.max() <= 0.6 * TOKENS[-1] < fit.holdout_tokens.min()
    assert len(fit.train_tokens) + len(fit.holdout_tokens) == np.sum(TOKENS > 0.1 * TOKENS[-1])
    assert fit.final_tokens == TOKENS[-1]
    assert fit.final_predicted == pytest.approx(fit.final_measured, rel=1e-6)


def test_one_percent_noise_still_predicts_the_later_points():
    rng = np.random.default_rng(0)
    noisy = power_law(TOKENS) * (1 + 0.01 * rng.standard_normal(len(TOKENS)))
    fit = fit_loss_floor(TOKENS, noisy)
    # L∞ and α trade off against each other under noise; the prediction stays close
    assert fit.l_inf == pytest.approx(L_INF, rel=0.3)
    assert fit.alpha == pytest.approx(ALPHA, rel=0.15)
    assert fit.holdout_mape < 2.0
    clean = power_law(fit.holdout_tokens)
    assert np.max(np.abs(fit.predict(fit.holdout_tokens) / clean - 1)) < 0.03


def test_constraints_hold_on_a_rising_curve():
    rising = 0.1 + 1e-9 * TOKENS  # A ≥ 0 forbids a decaying fit: the best is flat, A = 0
    fit = fit_loss_floor(TOKENS, rising)
    assert fit.a >= 0 and fit.l_inf >= 0 and 0 < fit.alpha <= 3


def test_too_few_points_raises_naming_the_run():
    tokens = np.array([1e3, 2e3, 3e3, 4e3, 8e3, 1e4])  # 3 points in (10%, 60%]
    with pytest.raises(ValueError, match="layer05-relu-x32.*only 3 mse points"):
        fit_loss_floor(tokens, power_law(tokens), run="layer05-relu-x32")


def test_no_points_raises():
    with pytest.raises(ValueError, match="no mse points"):
        fit_loss_floor([], [], run="r")


def test_bad_window_raises():
    with pytest.raises(ValueError, match="skip < cutoff"):
        fit_loss_floor(TOKENS, power_law(TOKENS), skip=0.7, cutoff=0.6)


def test_fit_run_reads_the_chosen_metric(tmp_path):
    lines = [{"split": "train", "tokens": int(t), "loss": 2 * v, "fvu": float(v), "mse": v / 2}
             for t, v in zip(TOKENS, power_law(TOKENS))]
    lines.insert(3, {"split": "heldout", "tokens": int(TOKENS[3]), "fvu": 9.0, "snapshot": "x"})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"half')
    fit = fit_run(tmp_path, metric="fvu")
    assert fit.metric == "fvu" and fit.run == tmp_path.name
    assert fit.l_inf == pytest.approx(L_INF, rel=0.05)
    assert fit_run(tmp_path).l_inf == pytest.approx(2 * L_INF, rel=0.05)


def test_train_curve_rejects_unknown_metric():
    with pytest.raises(ValueError, match="not one of loss, mse, fvu"):
        train_curve([], "accuracy")


# ---- FitOptions: the report's --metric, --cutoff and --skip -----------------------------------


def test_fit_options_defaults_ranges_and_help():
    assert FitOptions() == FitOptions(metric="mse", cutoff=0.6, skip=0.1)  # as the demo
    rules = {f.name: rule_of(f) for f in dataclasses.fields(FitOptions)}
    assert rules["metric"].choices == ("loss", "mse", "fvu")
    assert (rules["cutoff"].min, rules["cutoff"].min_open, rules["cutoff"].max) == (0, True, 1)
    assert (rules["skip"].min, rules["skip"].max, rules["skip"].max_open) == (0, 1, False)
    assert field_docs(FitOptions) == {
        "metric": "Training curve the loss-floor fit uses (mse/fvu suit adaptive-L1 runs better).",
        "cutoff": "Fit the curve up to this fraction of tokens and predict the rest.",
        "skip": "Leave out this fraction of tokens at the start (warm-up)."}
    with pytest.raises(dataclasses.FrozenInstanceError):
        FitOptions().metric = "mse"


@pytest.mark.parametrize("values, message", [
    ({"metric": "accuracy"}, "--metric is 'accuracy': use one of loss, mse, fvu"),
    ({"cutoff": 0.0}, "--cutoff must be above 0"),
    ({"cutoff": 1.5}, "--cutoff must be at most 1"),
    ({"skip": -0.1}, "--skip must be at least 0"),
    ({"skip": float("nan")}, "--skip must be a finite number"),
])
def test_fit_options_refuse_values_out_of_range(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        FitOptions(**values)
    assert FitOptions(cutoff=1.0, skip=0.0).cutoff == 1.0  # the closed ends are allowed
