"""A progress bar with throughput on a terminal; silent when output is not a TTY."""

from __future__ import annotations

import sys
import time

import click


class Progress:
    """Counts tokens (and bytes written) against a total, showing rates on a terminal."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.start = time.perf_counter()
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
        return f"{self.tokens / seconds:,.0f} tok/s  {self.bytes / seconds / 1e6:,.0f} MB/s written"

    def update(self, tokens: int, bytes_total: int | None = None) -> None:
        """Add ``tokens`` done; ``bytes_total`` is the running count of bytes written."""
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
