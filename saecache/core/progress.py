"""A progress bar with throughput on a terminal; silent when output is not a TTY."""

from __future__ import annotations

import sys
import time

import click


class Progress:
    """Counts tokens (and bytes moved) against a total, showing rates on a terminal.

    ``moved`` says what the bytes are: ``written`` (a harvest) or ``read`` (training)."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, moved: str = "written"):
        self.start, self.moved = time.perf_counter(), moved
        self.tokens = 0
        self.bytes = 0
        on = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if on:
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr,
                                         item_show_func=lambda _: self.rates(), show_pos=True)
            self.bar.__enter__()

    def rates(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return (f"{format_rate(self.tokens / seconds)} tok/s  "
                f"{format_rate(self.bytes / seconds / 1e6)} MB/s {self.moved}")

    def update(self, tokens: int, bytes_total: int | None = None) -> None:
        """Add ``tokens`` done; ``bytes_total`` is the running count of bytes moved."""
        self.tokens += tokens
        if bytes_total is not None:
            self.bytes = bytes_total
        if self.bar is not None:
            self.bar.update(tokens, current_item=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def format_rate(x: float) -> str:
    """A rate with the digits that mean something: ``12,345``, ``45.6``, ``0.31`` (never 0 for
    0.3)."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"
