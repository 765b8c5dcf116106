"""Per-layer activation statistics, gathered while harvesting and kept with the cache.

Training normalises inputs from these (E‖x‖ = √d) without a pass over the data. They are
accumulated as plain sums per sequence on the device, summed per block in float64 on the
host, stored one row per block (so a resumed harvest reproduces them exactly) and reduced
over the committed blocks when the cache is finished.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# Columns after the d columns of Σx: Σ‖x‖, Σ‖x‖², finite rows, non-finite values.
EXTRA = 4


def width(d: int) -> int:
    """Length of one statistics row for a residual of width d."""
    return d + EXTRA


@torch.no_grad()
def sequence_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums of one batch's residuals, one row per sequence, computed where ``x`` lives.

    x: (B, T, d) any float dtype → (B, d + 4) float32: Σx over the sequence's finite rows,
    Σ‖x‖, Σ‖x‖², number of finite rows, number of non-finite values. Rows holding a
    non-finite value are left out of the sums so one bad row cannot poison the statistics.

    A row is finite iff its fp32 norm is: an inf/nan makes Σx² inf/nan. The converse is exact
    for fp16 (Σx² ≤ d·65504² cannot overflow fp32); a finite bf16/fp32 row with ‖x‖ ≳ 1.8e19
    overflows and is left out like a non-finite one (its values still count as finite).
    Σ‖x‖² is summed from the squared fp32 norms (each within 2 ulp of the Σx² it came from).

    Passes over x, bytes per fp16 element (the plain float() copy, isfinite, all, where, pow
    and their sums moved ~39 in 9 full-size kernels): the fp32 norms (read 2; CUDA upcasts
    fp16/bf16 inside the reduction), then on CUDA, where nothing may wait for the host, the
    masked Σx (where in x's dtype: read 2 + write 2; sum: read 2) and the finite count
    (isfinite: read 2 + write 1; sum: read 1): 12 in 5 kernels. On the CPU, where looking at
    the rows costs no wait, Σx (read 2) and work on the bad rows only; there torch upcasts
    each reduction's input through a transient fp32 copy (+8 each).
    """
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # (B, T)
    row_ok = torch.isfinite(norms)  # (B, T)
    if x.device.type == "cpu":
        sum_x, nonfinite = _sums_of_gathered_rows(x, row_ok)
    else:
        sum_x, nonfinite = _sums_of_masked_rows(x, row_ok)
    norms = torch.where(row_ok, norms, 0.0)
    return torch.cat(
        [
            sum_x,  # (B, d)
            norms.sum(dim=1, keepdim=True),  # (B, 1)
            norms.square().sum(dim=1, keepdim=True),  # (B, 1)
            row_ok.sum(dim=1, keepdim=True, dtype=torch.float32),  # (B, 1)
            nonfinite.unsqueeze(1),  # (B, 1)
        ],
        dim=1,
    )


def _sums_of_masked_rows(x: torch.Tensor, row_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, d) Σx over the finite rows and (B,) non-finite values, with no data-dependent step."""
    sum_x = torch.where(row_ok.unsqueeze(-1), x, 0).sum(dim=1, dtype=torch.float32)  # x's dtype
    finite_values = torch.isfinite(x).flatten(1).sum(dim=1)  # (B,) int64: exact
    return sum_x, (x.shape[1] * x.shape[2] - finite_values).float()


def _sums_of_gathered_rows(x: torch.Tensor, row_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as _sums_of_masked_rows, reading the non-finite rows only (on the CPU)."""
    sum_x = torch.sum(x, dim=1, dtype=torch.float32)  # (B, d): right for sequences of finite rows
    nonfinite = torch.zeros(x.shape[0], dtype=torch.float32)
    seq, pos = torch.nonzero(~row_ok, as_tuple=True)  # the non-finite rows, usually none
    if len(seq):  # every non-finite value lies in one of these rows
        nonfinite.index_add_(0, seq, (~torch.isfinite(x[seq, pos])).sum(dim=-1, dtype=torch.float32))
        bad = torch.unique(seq)
        sum_x[bad] = torch.where(row_ok[bad].unsqueeze(-1), x[bad], 0).sum(dim=1, dtype=torch.float32)
    return sum_x, nonfinite


def nonfinite_count(row: np.ndarray) -> int:
    """Non-finite values recorded in a statistics row (or rows: (..., d + 4))."""
    return int(np.asarray(row)[..., -1].sum())


class LayerStats(NamedTuple):
    """What training needs to know about one layer's activations."""

    mean: np.ndarray
    """(d,) float64: mean activation over finite rows."""
    mean_norm: float
    """E‖x‖ over finite rows."""
    mean_sq_norm: float
    """E‖x‖² over finite rows."""
    rows: int
    """Finite rows counted."""
    nonfinite: int
    """Non-finite values seen (the harvest refuses any unless told to count them)."""

    @classmethod
    def reduce(cls, rows: np.ndarray) -> LayerStats:
        """rows: (n, d + 4) float64 sums (per block) → the layer's statistics."""
        total = np.asarray(rows, dtype=np.float64).sum(axis=0)
        d = total.shape[0] - EXTRA
        n = max(total[d + 2], 1.0)
        return cls(total[:d] / n, total[d] / n, total[d + 1] / n, int(total[d + 2]),
                   int(total[d + 3]))

    def to_json(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "mean_norm": self.mean_norm,
                "mean_sq_norm": self.mean_sq_norm, "rows": self.rows,
                "nonfinite": self.nonfinite}

    @classmethod
    def from_json(cls, data: dict) -> LayerStats:
        return cls(np.asarray(data["mean"], dtype=np.float64), float(data["mean_norm"]),
                   float(data["mean_sq_norm"]), int(data["rows"]), int(data["nonfinite"]))


def per_layer(sums: np.ndarray, layers: tuple[int, ...]) -> dict[int, LayerStats]:
    """Layer → its statistics, from per-block sums: (blocks, n_layers, d + 4) float64."""
    return {layer: LayerStats.reduce(sums[:, i]) for i, layer in enumerate(layers)}
