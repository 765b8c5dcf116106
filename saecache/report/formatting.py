"""How the report writes numbers: in table cells, heatmap cells and on token axes."""

from __future__ import annotations

import math

MISSING = "—"  # a value not measured


def number(value) -> float:
    """A JSON value as a float; NaN when it is not a number."""
    return float(value) if isinstance(value, (int, float)) else float("nan")


def fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """``value × scale`` formatted with ``spec``; MISSING for None, NaN or an infinity."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value * scale:{spec}}{suffix}"


def format_tokens(n: float) -> str:
    """Compact token count for axes and tables: 49152 → 49.2K, 3e8 → 300M, 1.5e9 → 1.5B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"
