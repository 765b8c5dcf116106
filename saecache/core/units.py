"""Token counts as people write them: ``300M``, ``1.5B``, ``100K``, ``64Ki``, ``300_000_000``.

One convention everywhere: K, M, B (or G) and T are decimal (K = 1,000), Ki, Mi, Gi and Ti are
binary (Ki = 1,024). Counts are printed with decimal suffixes only when exact (``50M``), else in
full (``65,536``), so that a printed count is never read with the other convention.
"""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
_PATTERN = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([KMBGT]i?)?\s*$", re.IGNORECASE)


def parse_count(text: str | int) -> int:
    """``"1.5B"`` → 1_500_000_000, ``"64Ki"`` → 65_536, ``"65,536"`` → 65_536. Raises
    ValueError naming the text if it is not a count."""
    if isinstance(text, int):
        return text
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a count: write 300M, 1.5B, 100K (K = 1,000), 64Ki "
                         "(Ki = 1,024) or 300_000_000")
    number, suffix = match.groups()
    value = float(number.replace("_", "").replace(",", "")) * _SUFFIXES[(suffix or "").upper()]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of tokens")
    return int(value)


def format_count(n: int) -> str:
    """The shortest exact spelling in file names and commands: 50_000_000 → ``50M``, 100_000
    → ``100K``, 65_536 → ``65536`` (decimal suffixes only: a snapshot's name never changes)."""
    for suffix in ("T", "B", "M", "K"):
        scale = _SUFFIXES[suffix]
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def format_tokens(n: int) -> str:
    """A count in a message: ``50M`` when a decimal suffix is exact, else ``65,536`` in full."""
    text = format_count(n)
    return text if not text.isdigit() else f"{n:,}"


def format_layers(layers, dash: str = "-", sep: str = ",") -> str:
    """[0, 1, 2, 5] → ``0-2,5`` (the inverse of :func:`parse_layers`)."""
    spans: list[list[int]] = []
    for layer in sorted(set(layers)):
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return sep.join(f"{a}" if a == b else f"{a}{dash}{b}" for a, b in spans)


def parse_layers(text: str | None, n_layers: int) -> tuple[int, ...]:
    """``"all"``/None → every layer; ``"0-3,8"`` → (0, 1, 2, 3, 8). Checks the range."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return tuple(range(n_layers))
    layers: set[int] = set()
    for part in str(text).split(","):
        bounds = part.strip().split("-")
        if not all(b.strip().isdigit() for b in bounds) or len(bounds) > 2:
            raise ValueError(f"--layers {text!r} is not a layer list: write all, 0-23 or 0,5,10")
        lo, hi = int(bounds[0]), int(bounds[-1])
        layers.update(range(lo, hi + 1))
    bad = [layer for layer in sorted(layers) if layer >= n_layers]
    if bad or not layers:
        raise ValueError(
            f"layer {bad[0] if bad else text} is out of range: the model has {n_layers} blocks "
            f"(0-{n_layers - 1})"
        )
    return tuple(sorted(layers))


def format_coefficient(x: float) -> str:
    """3e-4 rather than 0.0003, as the model card writes coefficients; always exact (the text
    reads back as the same float), so that a command written with it reproduces a run."""
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:g}" if float(f"{x:g}") == x else repr(x)
    for digits in range(1, 18):
        mantissa, exponent = f"{x:.{digits}e}".split("e")
        text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        if float(text) == x:
            return text
    return repr(x)
