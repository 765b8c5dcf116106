"""Reconstruction and sparsity metrics, and which features fire.

Every function takes rows of activations: x and x̂ (N, d), acts (N, F); leading dimensions other
than the last are flattened into rows. Sums are taken in float64 so that batches of millions
of values in float16/bfloat16/float32 do not lose precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    """t as float64 rows (N, last dim)."""
    return t.reshape(-1, t.shape[-1]).to(torch.float64)


def fire_counts(acts: Tensor) -> Tensor:
    """(F,) int64: the rows of acts (N, F) on which each feature is nonzero (one comparison and
    one reduction over acts; CUDA's count_nonzero makes the (N, F) bool mask on the way). Its
    sum is the batch's nonzero count, N·L0: one call serves every count a step needs."""
    return torch.count_nonzero(acts.reshape(-1, acts.shape[-1]), dim=0)


class FiringStats:
    """Which of F features fired, counted on the device without host syncs in :meth:`update`.

    Two counters per feature:

    * the clock, ``tokens_since_fired``: the tokens in the batches after the last batch in which
      the feature fired (all tokens seen if it never fired). It advances in whole batches, so
      it is a lower bound on the tokens since the feature actually last fired, by less than
      one batch. :meth:`reset_counts` leaves it alone.
    * ``fire_counts``: tokens on which the feature fired since construction or the last
      :meth:`reset_counts` (``tokens_counted`` tokens).
    """

    def __init__(self, n_features: int, device=None):
        if n_features < 1:
            raise ValueError(f"n_features must be at least 1, got {n_features}")
        self.n_features = n_features
        self.tokens_since_fired = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.fire_counts = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.tokens_seen = 0
        """Tokens seen since construction (the clock's horizon)."""
        self.tokens_counted = 0
        """Tokens seen since the last :meth:`reset_counts` (the denominator of frequencies)."""

    def update(self, acts: Tensor) -> None:
        """Count one batch of activations acts (N, F); a feature fires where its act is nonzero."""
        if acts.shape[-1] != self.n_features:
            raise ValueError(f"acts have {acts.shape[-1]} features, expected {self.n_features}")
        rows = acts.reshape(-1, self.n_features)
        self.add_counts(fire_counts(rows), rows.shape[0])

    def add_counts(self, counts: Tensor, n: int) -> None:
        """Count one batch of n rows from its :func:`fire_counts` (F,) int64: the trainer
        counts each step's activations once and shares the counts with the metrics."""
        if counts.shape != (self.n_features,):
            raise ValueError(f"fire counts have shape {tuple(counts.shape)}, expected "
                             f"({self.n_features},)")
        self.fire_counts += counts
        self.tokens_since_fired += n
        self.tokens_since_fired.masked_fill_(counts > 0, 0)
        self.tokens_seen += n
        self.tokens_counted += n

    def dead_mask(self, window_tokens: int) -> Tensor:
        """(F,) bool: features whose clock reached `window_tokens` (no firing in that window).

        A feature that never fired is dead once at least `window_tokens` tokens have been seen;
        before that no feature is dead, as none can yet have gone a whole window without firing.
        """
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be at least 1, got {window_tokens}")
        # a window beyond int64 is one no clock reaches (and would overflow the comparison)
        return self.tokens_since_fired >= min(window_tokens, torch.iinfo(torch.int64).max)

    def dead_fraction(self, window_tokens: int) -> float:
        """Fraction of features in :meth:`dead_mask` (0.0 until `window_tokens` tokens are seen)."""
        return self.dead_mask(window_tokens).double().mean().item()

    def frequencies(self) -> Tensor:
        """(F,) float64: fire_counts / tokens_counted, the fraction of tokens each fired on."""
        return self.fire_counts.double() / max(self.tokens_counted, 1)

    def dense_fraction(self, threshold: float = 0.1) -> float:
        """Fraction of features firing on more than `threshold` of tokens counted (0.0 if none)."""
        return (self.frequencies() > threshold).double().mean().item()

    def reset_counts(self) -> None:
        """Zero the fire counts and `tokens_counted`; the since-last-fired clock keeps running."""
        self.fire_counts.zero_()
        self.tokens_counted = 0

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: CPU tensors and ints (weights_only-loadable)."""
        return {"n_features": self.n_features, "tokens_seen": self.tokens_seen,
                "tokens_counted": self.tokens_counted,
                "tokens_since_fired": self.tokens_since_fired.cpu().clone(),
                "fire_counts": self.fire_counts.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`, keeping this object's device."""
        if state["n_features"] != self.n_features:
            raise ValueError(f"firing stats are for {state['n_features']} features, "
                             f"expected {self.n_features}")
        device = self.fire_counts.device
        self.tokens_since_fired = state["tokens_since_fired"].to(device, torch.int64).clone()
        self.fire_counts = state["fire_counts"].to(device, torch.int64).clone()
        self.tokens_seen = int(state["tokens_seen"])
        self.tokens_counted = int(state["tokens_counted"])


class MetricsSummary(NamedTuple):
    """Metrics over every row given to a :class:`RunningMetrics` since its last reset."""

    tokens: int
    """Rows (tokens) accumulated."""
    mse: float
    """Mean over rows and dims of (x − x̂)²."""
    fvu: float
    """Σ||x − x̂||² / Σ||x − x̄||², x̄ the mean of all the rows (not of each batch)."""
    explained_variance: float
    """1 − fvu."""
    l0: float
    """Mean nonzero activations per row (NaN if no acts were given)."""


class RunningMetrics:
    """mse, fvu and l0 pooled over several batches, as if computed on all their rows at once.

    Accumulates float64 sums on the device (no host sync until :meth:`summary`). The total
    variance comes from Σ||x||² − N·||x̄||², so fvu is over the pooled rows, not a mean of
    per-batch fvus.
    """

    _SUMS = ("_sq_err", "_sum_x", "_sum_sq_x", "_nonzero")  # float64 tensors on the device, or None

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self._acts_rows = 0
        self._sq_err = self._sum_x = self._sum_sq_x = self._nonzero = None

    def update(self, x: Tensor, x_hat: Tensor, acts: Tensor | None = None,
               nonzero: Tensor | None = None) -> None:
        """Add a batch: x, x̂ (N, d) and optionally acts (N, F), or instead of acts their
        ``nonzero`` count (a scalar tensor, e.g. the sum of :func:`fire_counts`: no second pass
        over acts)."""
        rows = _rows(x)  # (N, d) float64, made once per batch
        sq_err, sum_x = (rows - _rows(x_hat)).pow(2).sum(), rows.sum(dim=0)  # Σ||x − x̂||², (d,)
        sum_sq_x = rows.pow(2).sum()
        if self._sq_err is None:
            self._sq_err, self._sum_x, self._sum_sq_x = sq_err, sum_x, sum_sq_x
        else:
            self._sq_err, self._sum_x = self._sq_err + sq_err, self._sum_x + sum_x
            self._sum_sq_x = self._sum_sq_x + sum_sq_x
        self.tokens += rows.shape[0]
        if acts is not None:
            nonzero = torch.count_nonzero(acts)
        if nonzero is not None:
            self._nonzero = nonzero if self._nonzero is None else self._nonzero + nonzero
            self._acts_rows += rows.shape[0]  # acts has a row per row of x

    def summary(self) -> MetricsSummary:
        """The pooled metrics (NaNs before any update)."""
        nan = float("nan")
        if self.tokens == 0:
            return MetricsSummary(0, nan, nan, nan, nan)
        n, d = self.tokens, self._sum_x.shape[0]
        den = (self._sum_sq_x - self._sum_x.pow(2).sum() / n).item()  # Σ||x − x̄||²
        sq_err = self._sq_err.item()
        fvu_ = sq_err / den if den > 0 else nan
        l0_ = self._nonzero.item() / self._acts_rows if self._acts_rows else nan
        return MetricsSummary(n, sq_err / (n * d), fvu_, 1.0 - fvu_, l0_)

    def state_dict(self) -> dict:
        """The sums so far (CPU tensors, weights_only-loadable): a run resumed between two
        metrics lines writes the next line as if it had never stopped."""
        sums = {name: getattr(self, name) for name in self._SUMS if getattr(self, name) is not None}
        return {"tokens": self.tokens, "acts_rows": self._acts_rows,
                **{name: value.cpu().clone() for name, value in sums.items()}}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore a :meth:`state_dict`, its sums on ``device``."""
        self.reset()
        self.tokens, self._acts_rows = int(state["tokens"]), int(state["acts_rows"])
        for name in self._SUMS:
            if name in state:
                setattr(self, name, state[name].to(device).clone())
