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
    """
    xf = x.float()  # (B, T, d)
    finite = torch.isfinite(xf)  # (B, T, d)
    row_ok = finite.all(dim=-1, keepdim=True)  # (B, T, 1)
    xf = torch.where(row_ok, xf, 0.0)
    sq_norm = xf.pow(2).sum(dim=-1)  # (B, T)
    return torch.cat(
        [
            xf.sum(dim=1),  # (B, d)
            sq_norm.sqrt().sum(dim=1, keepdim=True),  # (B, 1)
            sq_norm.sum(dim=1, keepdim=True),  # (B, 1)
            row_ok.sum(dim=1, dtype=torch.float32),  # (B, 1)
            (~finite).sum(dim=(1, 2), dtype=torch.float32).unsqueeze(1),  # (B, 1)
        ],
        dim=1,
    )


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
