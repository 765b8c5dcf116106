"""crc32c (Castagnoli) of a buffer, computed with the GIL released.

zarr's crc32c codec uses ``google_crc32c``; version 1.9 releases the GIL only for a ``bytes``
argument, so on a numpy array or a memoryview (what the chunk writer and reader hold: a view
of a pinned host buffer) it serialises every thread of the process. The ``crc32c`` package
(ICRAR; numcodecs' own ``crc32c`` extra) computes the same checksum from any buffer and, with
``gil_release_mode=1``, releases the GIL for the whole computation, so writer and reader
threads checksum in parallel with each other and with the model thread.

Measured on the 2-core development machine (shared, three runs each; 32 MiB uint8 arrays,
GB/s summed over threads):

=====================  ==============  ===============  ==========================
implementation         1 thread        2 threads        a Python thread meanwhile
=====================  ==============  ===============  ==========================
google_crc32c 1.9      8.8 – 10.0      9.6 – 11.2       2.9 – 4.2 M loop steps/s
crc32c 2.9             10.9 – 14.3     13.3 – 14.1      7.7 – 10.6 M loop steps/s
=====================  ==============  ===============  ==========================

(the last column: how far a pure-Python loop on another thread gets while one thread
checksums; with ``time.sleep`` in place of the checksum it gets 8.6 – 14.5.) Both give the
same value for every input (tests/test_chunk_writer.py checks, empty and odd lengths too).

Where ``crc32c`` is not installed (it is a declared dependency, but an environment may lack
it) :func:`crc32c` falls back to ``google_crc32c`` with one logged warning: the same values,
only holding the GIL.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

try:
    import crc32c as _ICRAR
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _ICRAR = None

GIL_FREE = _ICRAR is not None
"""True when :func:`crc32c` releases the GIL (the ``crc32c`` package is importable)."""

_warned = False


def crc32c(buffer, value: int = 0) -> int:
    """The crc32c of ``buffer`` (any C-contiguous buffer: bytes, a numpy array, a memoryview),
    continuing from ``value`` (the crc32c of what came before it; 0 to start)."""
    if _ICRAR is not None:
        return _ICRAR.crc32c(buffer, value, gil_release_mode=1)  # 1: release the GIL always
    return _fallback(buffer, value)


def _fallback(buffer, value: int) -> int:
    global _warned
    import google_crc32c

    if not _warned:
        _warned = True
        log.warning("the crc32c package is not installed: checksums hold the GIL "
                    "(pip install crc32c to let writer and reader threads checksum in parallel)")
    # (bytes,) uint8 over the same memory: google_crc32c refuses a memoryview (it has a
    # release hook), not a numpy array
    data = np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8)
    return google_crc32c.extend(value, data) if value else google_crc32c.value(data)
