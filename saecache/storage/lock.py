"""The writer's lock of a cache on object storage: a lease object ``saecache.lock``.

There is no flock on S3, so a writer puts a small JSON object under the cache's prefix, with
a conditional put (``If-None-Match: *``: s3fs's ``pipe_file(mode="create")``), so that of two
writers starting together exactly one creates it; the other reads it and is refused, naming
the holder. A heartbeat thread rewrites the lease every ``RENEW_S`` seconds; one not renewed
for ``EXPIRE_S`` seconds belongs to a writer that died and is taken over (with a log line).
A clean exit deletes it.

Where the filesystem has no conditional put (fsspec's default ``pipe_file(mode="create")``
checks for the object, then writes it), the writer reads its lease back after writing and
gives up if another writer's replaced it: this narrows the race to the time between two
requests but cannot close it (docs/architecture.md). Readers on object storage take no lock:
they are refused while a live lease names a writer, and a writer cannot see them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from zarr.core.sync import sync as run
from zarr.storage import FsspecStore

from saecache.core.lock import LOCK_NAME, Holder, refusal

log = logging.getLogger(__name__)

RENEW_S = 10.0
"""Seconds between two renewals of a held lease."""
EXPIRE_S = 60.0
"""A lease not renewed for this long is stale: its writer is gone."""


class Lease:
    """The lease object of the cache behind ``store``; ``what`` names it in messages."""

    def __init__(self, store: FsspecStore, what: str, expire_s: float = EXPIRE_S,
                 renew_s: float = RENEW_S):
        self.fs, self.what = store.fs, what
        self.path = f"{store.path}/{LOCK_NAME}"
        self.expire_s, self.renew_s = expire_s, renew_s

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lease for the ``with`` block, renewed by a heartbeat thread."""
        me = Holder.me()
        self._take(me)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(me, stop), daemon=True,
                                name="saecache-lease")
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            run(self.fs._rm_file(self.path))

    @contextmanager
    def shared(self) -> Iterator[None]:
        """A reader: refused while a live lease names a writer; holds nothing itself."""
        current, renewed = self._read()
        if current is not None and not self._stale(renewed):
            raise refusal(self.what, current, writing=True)
        yield

    # ---- the lease object ----------------------------------------------------------------

    def _take(self, me: Holder) -> None:
        """Create the lease, or take over a stale one; refuses a live one in one line."""
        if self._create(me):
            return
        current, renewed = self._read()
        if current is not None and not self._stale(renewed):
            raise refusal(self.what, current, writing=True)
        if current is not None:
            log.warning("%s: took over the stale lease of %s, not renewed for %.0f s", self.what,
                        current, time.time() - renewed)
        run(self.fs._rm_file(self.path))
        if not self._create(me):  # another writer took it over first
            raise refusal(self.what, self._read()[0], writing=True)

    def _create(self, me: Holder) -> bool:
        """Put the lease if there is none (False if there is), then read it back: with a store
        that checks and then writes, a writer that lost the race finds the other's lease."""
        try:
            run(self.fs._pipe_file(self.path, self._body(me), mode="create"))
        except FileExistsError:
            return False
        return self._read()[0] == me

    def _read(self) -> tuple[Holder | None, float]:
        """(holder, time last renewed) of the lease; (None, 0) when there is none."""
        try:
            text = run(self.fs._cat_file(self.path)).decode(errors="replace")
        except FileNotFoundError:
            return None, 0.0
        holder = Holder.parse(text)
        renewed = _renewed(text)
        return holder, renewed if renewed is not None else 0.0

    def _stale(self, renewed: float) -> bool:
        return time.time() - renewed > self.expire_s

    def _body(self, me: Holder) -> bytes:
        return json.dumps({**me.to_json(), "renewed": time.time(), "expire_s": self.expire_s}).encode()

    def _heartbeat(self, me: Holder, stop: threading.Event) -> None:
        while not stop.wait(self.renew_s):
            try:
                run(self.fs._pipe_file(self.path, self._body(me)))
            except OSError as err:  # a missed renewal is retried; expiry is six of them away
                log.warning("%s: could not renew the lease (%s)", self.what, err)


def _renewed(text: str) -> float | None:
    try:
        return float(json.loads(text)["renewed"])
    except (ValueError, KeyError, TypeError):
        return None

