"""Loss floor: fit L(T) = L∞ + A·T^(−α) to the early part of a training curve, predict the rest.

T is tokens seen, L the train ``loss`` (or ``mse``/``fvu``) of ``metrics.jsonl``. The fit uses
the points after a warm-up skip (default: the first 10% of the run's tokens) and up to a
cut-off (default: 60%); the later points are held back and predicted, and the prediction's
error on them says how far the floor L∞ can be trusted. FitOptions holds those three settings
(the options of `saecache report`). See docs/loss-floor.md.

numpy only: for a fixed α the model is linear in (L∞, A), so those come from a two-parameter
least squares with L∞ ≥ 0 and A ≥ 0; α ∈ (0, 3] is found by a grid search refined by
golden-section search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from saecache.core.settings import setting, validate

METRICS = ("loss", "mse", "fvu")
MIN_POINTS = 4  # 3 parameters: fewer points leave nothing to judge the fit by
ALPHA_MAX = 3.0
ALPHA_EDGE = 0.01  # α this close to 0 or to ALPHA_MAX: the search hit an end of its range
MAPE_LIMIT = 10.0  # percent: a held-back MAPE above this makes a fit unusable (see unusable)
_ALPHA_GRID = np.linspace(ALPHA_MAX / 600, ALPHA_MAX, 600)  # step 0.005, then refined
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class FitOptions:
    """How the report fits each run's loss floor (see :func:`fit_loss_floor`)."""

    metric: str = setting("mse", choices=METRICS)
    """Training curve the loss-floor fit uses (mse/fvu suit adaptive-L1 runs better)."""
    cutoff: float = setting(0.6, min=0, max=1, min_open=True)
    """Fit the curve up to this fraction of tokens and predict the rest."""
    skip: float = setting(0.1, min=0, max=1)
    """Leave out this fraction of tokens at the start (warm-up)."""

    def __post_init__(self):
        validate(self)


DEFAULTS = FitOptions()


class LossFloorFit(NamedTuple):
    """A fitted L(T) = l_inf + a·T^(−alpha) and how well it predicts the held-back points."""

    run: str
    """Name of the run (its folder) the curve came from."""
    metric: str
    """Which train metric was fitted: loss, mse or fvu."""
    l_inf: float
    """The floor L∞: the value the curve tends to as T → ∞ (same units as the metric)."""
    a: float
    """A, with T in tokens: A·T^(−α) is the part still to be learnt at T."""
    alpha: float
    """The power-law exponent α ∈ (0, 3]; meaningless when a = 0 (a flat fit)."""
    skip_tokens: float
    """Points at or before this many tokens were skipped as warm-up."""
    cutoff_tokens: float
    """Points after the skip and at or before this many tokens were fitted; later ones held back."""
    train_tokens: np.ndarray
    """(n,) tokens of the fitted points."""
    train_values: np.ndarray
    """(n,) measured values of the fitted points."""
    holdout_tokens: np.ndarray
    """(m,) tokens of the held-back points (after the cut-off); may be empty."""
    holdout_values: np.ndarray
    """(m,) measured values of the held-back points."""
    rmse: float
    """Root-mean-square residual on the fitted points (metric units)."""
    holdout_mape: float
    """Mean absolute percentage error of the prediction on the held-back points, in percent
    (4.2 means 4.2%); NaN when nothing was held back."""
    holdout_max_ape: float
    """Largest absolute percentage error on the held-back points, in percent; NaN if none."""

    def predict(self, tokens) -> np.ndarray:
        """L(T) at ``tokens`` (a number or an array of token counts > 0)."""
        t = np.asarray(tokens, dtype=np.float64)
        return self.l_inf + self.a * t ** (-self.alpha)

    @property
    def unusable(self) -> str | None:
        """Why this fit must not be trusted (None when it may): the first rule that holds of

        1. ``a == 0``, a flat fit: the metric did not fall over the fitted window (a rising or
           noisy curve); L∞ is then only the window's mean and predicts nothing;
        2. α within ALPHA_EDGE of 0 or of ALPHA_MAX: the search ran into an end of its range.
           Near 0, T^(−α) is nearly constant over the data, so L∞ and A trade off freely and
           L∞ is not determined; near ALPHA_MAX the curve is a step the power law cannot
           follow (too few or too noisy points);
        3. held-back MAPE > MAPE_LIMIT (10%): the fit's one job is to predict the points it did
           not see; missing them by more than 10% on average, it cannot be trusted further out.
           10% leaves room for the learning-rate decay, which bends the measured curve about
           5% below the power law at the end of a run (docs/loss-floor.md).

        A fit "outside the data" needs no rule of its own: the least squares keeps L∞ inside the
        fitted values, and a prediction that leaves the measured range misses the held-back
        points, which is rule 3. These are the failures the fit can detect from its own data;
        an unusable fit is flagged in its plot and table and left out of the summary's median
        and plot.
        """
        if self.a == 0:
            return f"flat fit, the {self.metric} did not fall"
        if self.alpha < ALPHA_EDGE or self.alpha > ALPHA_MAX - ALPHA_EDGE:
            return f"α = {self.alpha:.3g} at an end of (0, {ALPHA_MAX:g}]"
        if self.holdout_mape > MAPE_LIMIT:
            return f"MAPE {self.holdout_mape:.1f}% > {MAPE_LIMIT:g}%"
        return None

    @property
    def final_tokens(self) -> float:
        """Tokens of the last measured point (held back, or fitted when nothing was held back)."""
        last = self.holdout_tokens if len(self.holdout_tokens) else self.train_tokens
        return float(last[-1])

    @property
    def final_measured(self) -> float:
        """The last measured value of the curve."""
        last = self.holdout_values if len(self.holdout_values) else self.train_values
        return float(last[-1])

    @property
    def final_predicted(self) -> float:
        """The model's value at :attr:`final_tokens`."""
        return float(self.predict(self.final_tokens))


# ---- reading a curve -------------------------------------------------------------------------


def train_curve(lines: list[dict], metric: str = DEFAULTS.metric) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, values) of the ``split == "train"`` lines, sorted by tokens, finite values only."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    points = sorted((line["tokens"], line.get(metric)) for line in lines
                    if line.get("split") == "train" and line.get(metric) is not None)
    tokens = np.array([p[0] for p in points], dtype=np.float64)
    values = np.array([p[1] for p in points], dtype=np.float64)
    keep = np.isfinite(tokens) & np.isfinite(values) & (tokens > 0)
    return tokens[keep], values[keep]


# ---- the fit ---------------------------------------------------------------------------------


def fit_loss_floor(tokens, values, skip: float = DEFAULTS.skip, cutoff: float = DEFAULTS.cutoff,
                   run: str = "run", metric: str = DEFAULTS.metric) -> LossFloorFit:
    """Fit L∞ + A·T^(−α) to the points with skip·T_last < T ≤ cutoff·T_last; predict the rest.

    ``skip`` and ``cutoff`` are fractions of the last point's tokens. Raises ValueError naming
    ``run`` when fewer than 4 points fall in the fitting window.
    """
    if not 0.0 <= skip < cutoff <= 1.0:
        raise ValueError(f"{run}: need 0 ≤ skip < cutoff ≤ 1, got skip={skip}, cutoff={cutoff}")
    tokens, values = _sorted_finite(tokens, values)
    if len(tokens) == 0:
        raise ValueError(f"{run}: no {metric} points to fit a loss floor to")
    skip_tokens, cutoff_tokens = skip * tokens[-1], cutoff * tokens[-1]
    fit = (tokens > skip_tokens) & (tokens <= cutoff_tokens)
    if fit.sum() < MIN_POINTS:
        raise ValueError(
            f"{run}: only {int(fit.sum())} {metric} points between {skip:.0%} and {cutoff:.0%} of "
            f"its {tokens[-1]:,.0f} tokens; a loss-floor fit needs at least {MIN_POINTS} (log "
            "metrics more often with --log-every, or fit with a later cut-off)")
    held = tokens > cutoff_tokens
    l_inf, a, alpha, rmse = _fit(tokens[fit], values[fit])
    predicted = l_inf + a * tokens[held] ** (-alpha)
    mape, max_ape = _percentage_errors(predicted, values[held])
    return LossFloorFit(run, metric, l_inf, a, alpha, float(skip_tokens), float(cutoff_tokens),
                        tokens[fit], values[fit], tokens[held], values[held], rmse, mape, max_ape)


def _sorted_finite(tokens, values) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(tokens, dtype=np.float64).ravel()
    values = np.asarray(values, dtype=np.float64).ravel()
    if tokens.shape != values.shape:
        raise ValueError(f"{len(tokens)} token counts but {len(values)} values")
    keep = np.isfinite(tokens) & np.isfinite(values) & (tokens > 0)
    order = np.argsort(tokens[keep], kind="stable")
    return tokens[keep][order], values[keep][order]


def _fit(tokens: np.ndarray, values: np.ndarray) -> tuple[float, float, float, float]:
    """(L∞, A, α, rmse) minimising the squared error over α ∈ (0, ALPHA_MAX].

    T is divided by its first value t0 so that T^(−α) stays near 1 for every α (no under-
    flow at T = 3e8, α = 3); A is converted back to tokens at the end: A = A' · t0^α.
    """
    t0 = tokens[0]
    scaled = tokens / t0

    def sse(alpha: float) -> float:
        return _linear_fit(scaled ** (-alpha), values)[2]

    errors = np.array([sse(alpha) for alpha in _ALPHA_GRID])
    best = int(np.argmin(errors))
    lo = _ALPHA_GRID[max(best - 1, 0)] if best > 0 else 1e-6
    hi = _ALPHA_GRID[min(best + 1, len(_ALPHA_GRID) - 1)]
    alpha = _golden_section(sse, lo, hi)
    if sse(alpha) > errors[best]:  # the refinement never does worse than the grid
        alpha = float(_ALPHA_GRID[best])
    l_inf, a_scaled, err = _linear_fit(scaled ** (-alpha), values)
    return l_inf, float(a_scaled * t0 ** alpha), alpha, float(np.sqrt(err / len(values)))


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(c, a, sse) minimising Σ(y − c − a·x)² subject to c ≥ 0, a ≥ 0.

    Two variables: the constrained optimum is the unconstrained one if feasible, else the best
    of the faces a = 0 (c = mean y), c = 0 (a = x·y / x·x) and the corner c = a = 0.
    """
    candidates = [(max(float(y.mean()), 0.0), 0.0),
                  (0.0, max(float(x @ y) / float(x @ x), 0.0)),
                  (0.0, 0.0)]
    design = np.stack([np.ones_like(x), x], axis=1)  # (n, 2)
    (c, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    if c >= 0 and a >= 0:
        candidates.insert(0, (float(c), float(a)))
    scored = [(float(np.sum((y - c - a * x) ** 2)), c, a) for c, a in candidates]
    err, c, a = min(scored)
    return c, a, err


def _golden_section(f, lo: float, hi: float, tol: float = 1e-7) -> float:
    """The minimiser of a unimodal f on [lo, hi], to within tol."""
    x1, x2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    f1, f2 = f(x1), f(x2)
    while hi - lo > tol:
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - _GOLDEN * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + _GOLDEN * (hi - lo)
            f2 = f(x2)
    return float((lo + hi) / 2)


def _percentage_errors(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """(mean, max) of 100·|predicted − measured| / |measured|; NaN, NaN for no points."""
    if len(measured) == 0:
        return float("nan"), float("nan")
    ape = 100.0 * np.abs(predicted - measured) / np.maximum(np.abs(measured), 1e-300)
    return float(ape.mean()), float(ape.max())
