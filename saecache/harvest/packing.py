"""Tokenise documents, join them with EOS and cut the stream into ``ctx``-token sequences.

The stream is doc₀ EOS doc₁ EOS doc₂ EOS …; sequence i is tokens [i·ctx, (i+1)·ctx) of it,
and its *source* is (document index, offset in that document) of its first token, where the
EOS after a document counts as the document's last token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import NamedTuple

import numpy as np

DOCS_PER_BATCH = 512  # documents per call of the fast tokenizer (its batching runs in Rust)


class Sequence(NamedTuple):
    """One packed sequence and where it starts."""

    ids: np.ndarray
    """(ctx,) int32 token ids."""
    doc: int
    """Index of the document holding the first token."""
    offset: int
    """Position of the first token within that document (its EOS included)."""


def tokenize_documents(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, batched for speed."""
    texts = iter(texts)
    while batch := list(islice(texts, DOCS_PER_BATCH)):
        # verbose=False: documents longer than the model's context are expected here; packing cuts them.
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def pack(docs: Iterable[list[int]], ctx: int, eos_id: int, max_seqs: int) -> Iterator[Sequence]:
    """Whole ``ctx``-token sequences from the EOS-joined stream, at most ``max_seqs``."""
    pieces: deque[tuple[np.ndarray, int, int]] = deque()  # (ids, doc, offset) not yet emitted
    buffered = emitted = 0
    for doc, ids in enumerate(docs):
        piece = np.asarray([*ids, eos_id], dtype=np.int32)  # (len + 1,)
        pieces.append((piece, doc, 0))
        buffered += len(piece)
        while buffered >= ctx and emitted < max_seqs:
            yield _take(pieces, ctx)
            buffered -= ctx
            emitted += 1
        if emitted >= max_seqs:  # stop before reading (and tokenising) another document
            return


def _take(pieces: deque[tuple[np.ndarray, int, int]], ctx: int) -> Sequence:
    """Pop the first ``ctx`` tokens off the pending pieces."""
    _, first_doc, first_offset = pieces[0]
    out, need = [], ctx
    while need:
        piece, doc, offset = pieces.popleft()
        out.append(piece[:need])
        if len(piece) > need:  # the rest of this piece starts the next sequence
            pieces.appendleft((piece[need:], doc, offset + need))
        need -= min(need, len(piece))
    return Sequence(np.concatenate(out), first_doc, first_offset)
