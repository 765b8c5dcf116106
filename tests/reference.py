"""Plain reference implementations that the library's fast paths are tested against.

The textbook definitions (docs: "Correctness is checked against a plain reference"): each
computes its metric directly from its formula over all rows at once, in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    """t as float64 rows (N, last dim)."""
    return t.reshape(-1, t.shape[-1]).to(torch.float64)


def _sq_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ_n ||x_n − x̂_n||² (float64 scalar tensor)."""
    return (_rows(x) - _rows(x_hat)).pow(2).sum()


def _total_variance(x: Tensor) -> Tensor:
    """Σ_n ||x_n − mean_n(x)||² (float64 scalar tensor)."""
    rows = _rows(x)
    return (rows - rows.mean(dim=0)).pow(2).sum()


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean squared error: mean over N rows and d dims of (x − x̂)², Σ||x − x̂||² / (N·d)."""
    return (_sq_error(x, x_hat) / x.numel()).item()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: Σ_n ||x_n − x̂_n||² / Σ_n ||x_n − x̄||², x̄ = mean_n(x).

    0 for a perfect reconstruction, 1 for x̂ = x̄; NaN when x has no variance (all rows equal).
    """
    den = _total_variance(x)
    return (_sq_error(x, x_hat) / den).item() if den > 0 else float("nan")


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance explained: 1 − fvu(x, x̂)."""
    return 1.0 - fvu(x, x_hat)


def l0(acts: Tensor) -> float:
    """Mean over rows of the number of nonzero activations: count_nonzero(acts) / N."""
    rows = acts.reshape(-1, acts.shape[-1]).shape[0]
    return torch.count_nonzero(acts).item() / rows


def default_aux_k(cfg) -> int:
    """The AuxK width of Gao et al.: min(F // 2, d // 2), at least 1."""
    return max(1, min(cfg.n_features // 2, cfg.d // 2))


def load_saelens_folder(path) -> tuple[dict, dict[str, Tensor]]:
    """(cfg.json as a dict, {W_enc, W_dec, b_enc, b_dec}) of an exported SAELens folder, read
    by the names SAELens gives them (sae_lens.constants SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    return cfg, load_file(str(path / "sae_weights.safetensors"))


@torch.no_grad()
def reference_sequence_sums(x: torch.Tensor) -> torch.Tensor:
    """The plain implementation sequence_sums replaced (an fp32 copy and ~12 passes)."""
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
