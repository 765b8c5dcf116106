"""`saecache import`: stage one's alternative — a cache from activations made elsewhere.

    import_activations(cfg)
      ├─ read every file's header: (tokens, d), dtype and --ctx checked before anything is written
      ├─ sha256 of every file, streamed: the provenance ("imported") an existing cache must match
      ├─ create the cache; write `tokens`: the --tokens-file ids, or zeros (tokenizer "none")
      └─ for each pending block: read its rows of every layer (a slice, never the whole file),
           cast to float16 refusing non-finite or overflowing values, per-sequence sums → HostBuffer
           write chunks + commit on worker threads                                        (writer)

The cache is an ordinary one (same layout, checksums, commit record and statistics), so info,
verify and train read it unchanged; only eval, which splices an SAE into a model, needs real
token ids (:func:`has_token_ids`). A token count that is not a multiple of --ctx is refused,
never trimmed: a wrong --ctx would otherwise pass silently.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import closing
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from saecache import __version__
from saecache.core.errors import SaecacheError
from saecache.core.progress import Progress
from saecache.core.settings import setting, validate
from saecache.harvest.capture import HostBuffer
from saecache.harvest.config import COMPRESSIONS
from saecache.harvest.tensorfiles import TensorFile, open_tensor
from saecache.harvest.writer import BlockWriter
from saecache.storage import stats
from saecache.storage.cache import Cache
from saecache.storage.layout import DEFAULT_CHUNK_ROWS, CacheLayout
from saecache.storage.location import location_of
from saecache.storage.provenance import Provenance
from saecache.storage.space import bytes_to_write, check_space

log = logging.getLogger(__name__)

IMPORTED = "imported"
"""The model, architecture, blocks and split an imported cache records."""
NO_TOKEN_IDS = "none"
"""The tokenizer (and vocab_hash) of a cache imported without --tokens-file: `tokens` holds zeros."""
FLOATS = ("float16", "bfloat16", "float32")
"""Activation dtypes import takes, narrowest first; the cache stores float16."""
_LAYER_FILE = re.compile(r"^\s*(\d+)\s*=(.+)$")


def has_token_ids(provenance: Provenance) -> bool:
    """Whether a cache's `tokens` are real token ids (False: imported without any, all zeros)."""
    return provenance.tokenizer != NO_TOKEN_IDS


@dataclass
class ImportConfig:
    """Everything `saecache import` needs; the CLI builds it, import_activations() runs it."""

    cache: str
    """Where the cache goes: a folder or an fsspec URL."""
    ctx: int = setting(min=1)
    """Tokens per sequence: row r of a file is token r % ctx of sequence r // ctx."""
    activations: str | None = None
    """The one (tokens, d) file of layer 0 (the positional ACTIVATIONS)."""
    layer_files: tuple[str, ...] = setting((), flag="--layer")
    """L=FILE: layer L's (tokens, d) activations, instead of ACTIVATIONS (repeatable)."""
    tokens_file: str | None = None
    """Token ids, (tokens,) or (n_seq, ctx) integers. [default: none: tokens are zeros, no CE loss]"""
    chunk_rows: int = setting(DEFAULT_CHUNK_ROWS, min=1)
    """Target rows per residual chunk (rounded down to whole sequences)."""
    compression: str = setting("none", choices=COMPRESSIONS)
    """Compression before the crc32c checksum (fp16 residuals gain ~1.08×)."""
    writer_threads: int = setting(4, min=1)
    """Threads encoding and writing chunks."""
    buffers: int = setting(3, min=1)
    """Blocks in flight (memory = buffers × layers × rows/chunk × d × 2 bytes)."""
    overwrite: bool = False
    """Delete an existing cache at CACHE and start over."""
    no_space_check: bool = setting(False, result=False)
    """Start even when the disk at CACHE has less free space than the import will write."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a URL cache."""
    progress: bool | None = None
    """Progress bar [default: on a terminal]."""

    def __post_init__(self):
        validate(self)
        if (self.activations is None) == (not self.layer_files):
            raise ValueError("give one ACTIVATIONS file (it is layer 0) or --layer L=FILE for each "
                             "layer" + (", not both" if self.layer_files else ""))
        self.files()  # a malformed --layer is refused now

    def files(self) -> dict[int, str]:
        """Layer → the file (FILE or FILE.safetensors:NAME) holding it, in ascending layer order."""
        if self.activations is not None:
            return {0: self.activations}
        files: dict[int, str] = {}
        for text in self.layer_files:
            match = _LAYER_FILE.match(text)
            if not match:
                raise ValueError(f"--layer {text!r} is not L=FILE: write e.g. --layer 5=acts5.npy")
            layer = int(match.group(1))
            if layer in files:
                raise ValueError(f"--layer {layer} is given twice ({files[layer]}, {match.group(2)})")
            files[layer] = match.group(2).strip()
        return dict(sorted(files.items()))


@dataclass
class ImportResult:
    """What an import did."""

    cache: Cache
    tokens_imported: int
    """Tokens whose residuals this invocation wrote (0 when the cache was already complete)."""
    bytes_written: int
    """Residual bytes this invocation wrote (before codecs)."""
    seconds: float
    """Wall time of the read-and-write loop."""
    was_complete: bool = False
    """The cache was complete already: nothing was read or written."""


class BadValue(SaecacheError):
    """A value the cache cannot hold; the files can never make a complete cache."""


def import_activations(cfg: ImportConfig) -> ImportResult:
    """Create (or resume, or find complete) the cache at ``cfg.cache`` from the files."""
    files = {layer: open_tensor(text) for layer, text in cfg.files().items()}
    ids = open_tensor(cfg.tokens_file) if cfg.tokens_file else None
    layout = layout_of(cfg, files, ids)
    n_seq = files[layout.layers[0]].shape[0] // cfg.ctx
    provenance = provenance_of(files, ids, n_seq * cfg.ctx)
    where = location_of(cfg.cache, cfg.storage_options)
    if cfg.overwrite:
        where.check_removable()  # a symbolic link is refused before anything is touched
    with where.lock():  # one writer at a time, from before anything is created or removed
        return _import_locked(cfg, provenance, layout, files, ids, n_seq)


def _import_locked(cfg: ImportConfig, provenance: Provenance, layout: CacheLayout,
                   files: dict[int, TensorFile], ids: TensorFile | None, n_seq: int) -> ImportResult:
    cache = _open_or_create(cfg, provenance, layout)
    if cache.complete:
        return ImportResult(cache, 0, 0, 0.0, was_complete=True)
    try:
        if not cache.tokens_done:
            _write_tokens(cache, ids, n_seq)
        result = _write_blocks(cfg, cache, files)
    except BadValue:  # leave nothing behind that could never be finished
        Cache.remove(cfg.cache, cfg.storage_options)
        raise
    cache.finalize()
    return result


# ---- before anything is written ----------------------------------------------------------


def layout_of(cfg: ImportConfig, files: dict[int, TensorFile], ids: TensorFile | None) -> CacheLayout:
    """The cache's layout; one-line refusals for shapes, dtypes and a --ctx that do not fit."""
    n_tokens, d = _check_activations(files)
    if n_tokens % cfg.ctx:
        raise SaecacheError(
            f"{next(iter(files.values())).label} holds {n_tokens} tokens, not a whole number of --ctx "
            f"{cfg.ctx} sequences (remainder {n_tokens % cfg.ctx}): give the ctx the activations were "
            f"made with, or trim the files to {n_tokens - n_tokens % cfg.ctx} tokens")
    if ids is not None:
        _check_ids(ids, n_tokens, cfg.ctx)
    return CacheLayout(ctx=cfg.ctx, d=d, layers=tuple(files), n_seq=0, compression=cfg.compression,
                       seqs_per_block=CacheLayout.seqs_per_block_for(cfg.ctx, cfg.chunk_rows))


def _check_activations(files: dict[int, TensorFile]) -> tuple[int, int]:
    """(tokens, d) shared by every file: each must be a non-empty 2-D float array of one shape."""
    first = next(iter(files.values()))
    for layer, file in files.items():
        name = f"{file.label} (layer {layer})"
        if len(file.shape) != 2 or 0 in file.shape:
            raise SaecacheError(f"{name} holds a {_shape(file.shape)} array: import takes "
                                "(tokens, d) activations")
        if file.dtype not in FLOATS:
            raise SaecacheError(f"{name} holds {file.dtype} values: import takes {', '.join(FLOATS)}"
                                " (cast it, e.g. x.astype(np.float32))")
        if file.shape != first.shape:
            raise SaecacheError(f"{name} is {_shape(file.shape)} but {first.label} is "
                                f"{_shape(first.shape)}: every layer needs the same (tokens, d)")
    return first.shape


def _check_ids(ids: TensorFile, n_tokens: int, ctx: int) -> None:
    """The token ids must be integers, one per activation row: (tokens,) or (n_seq, ctx)."""
    if not ids.dtype.startswith(("int", "uint")):
        raise SaecacheError(f"--tokens-file {ids.label} holds {ids.dtype} values: token ids are integers")
    if ids.shape not in ((n_tokens,), (n_tokens // ctx, ctx)):
        raise SaecacheError(f"--tokens-file {ids.label} is {_shape(ids.shape)}: the activations need "
                            f"({n_tokens},) or ({n_tokens // ctx}, {ctx}) token ids")


def _shape(shape: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, shape))}{',' * (len(shape) == 1)})"


def provenance_of(files: dict[int, TensorFile], ids: TensorFile | None, n_tokens: int) -> Provenance:
    """"imported", with every file's name and sha256 as the dataset (what a re-run must match)
    and the files' dtype (the widest, if they differ) as the model's."""
    named = {f"{layer:02d}": file for layer, file in files.items()} | ({"tokens": ids} if ids else {})
    digests: dict = {}  # one hash per file, however many tensors are taken from it
    for file in named.values():
        if file.path not in digests:
            log.info("sha256 of %s", file.path)
            digests[file.path] = file.sha256()
    dataset = "; ".join(f"{key}={file.label} sha256:{digests[file.path]}" for key, file in named.items())
    return Provenance(
        model=IMPORTED, revision=None, dtype=max((f.dtype for f in files.values()), key=FLOATS.index),
        architecture=IMPORTED, blocks=IMPORTED, n_layers=max(files) + 1,
        tokenizer=IMPORTED if ids else NO_TOKEN_IDS, vocab_hash=NO_TOKEN_IDS, eos_token_id=-1,
        dataset=f"{IMPORTED}:{dataset}", dataset_config=None, split=IMPORTED, dataset_revision=None,
        text_field=NO_TOKEN_IDS, token_budget=n_tokens, saecache_version=__version__,
    )


def _open_or_create(cfg: ImportConfig, provenance: Provenance, layout: CacheLayout) -> Cache:
    """The existing cache if it holds these files (refused in one line if not), else a new one."""
    where = location_of(cfg.cache, cfg.storage_options)
    if where.exists() and not cfg.overwrite:
        cache = Cache.open(cfg.cache, writable=True, storage_options=cfg.storage_options)
        diffs = cache.provenance.differences(provenance) + cache.layout.differences(layout)
        if diffs:  # as Cache.check_matches, in an import's words
            raise SaecacheError(f"cache at {cfg.cache} differs from this import: {diffs[0]}; re-run "
                                "with the cache's files and settings to resume, --overwrite to start "
                                "over, or choose another CACHE")
        if cache.complete:
            return cache
        committed = cache.committed() if cache.tokens_done else None
        _check_space(cfg, bytes_to_write(cache.layout, provenance.token_budget, committed))
        if removed := where.clean_partials():
            log.info("removed %d partial chunk files left by an interrupted import", removed)
        return cache
    reclaimed = where.size() if where.exists() else 0  # --overwrite deletes the old cache first
    _check_space(cfg, bytes_to_write(layout, provenance.token_budget, None), reclaimed)
    if where.exists():
        Cache.remove(cfg.cache, cfg.storage_options)  # refuses anything that is not a cache
    return Cache.create(cfg.cache, provenance, layout, storage_options=cfg.storage_options)


def _check_space(cfg: ImportConfig, needed: int, reclaimed: int = 0) -> None:
    if not cfg.no_space_check:
        check_space(location_of(cfg.cache, cfg.storage_options), needed, "import", reclaimed, hint="")


# ---- writing ------------------------------------------------------------------------------


def _write_tokens(cache: Cache, ids: TensorFile | None, n_seq: int) -> None:
    """Fill `tokens` (the ids, or zeros) and `source` (-1: no documents known) block by block."""
    layout = replace(cache.layout, n_seq=n_seq)
    tokens, source = cache.create_token_arrays(n_seq)
    for block in range(layout.n_blocks):
        seqs = layout.block_seqs(block)
        tokens[seqs.start:seqs.stop] = _token_ids(ids, seqs, layout.ctx)  # (s, ctx) int32
        source[seqs.start:seqs.stop] = np.full((len(seqs), 2), -1, dtype=np.int64)
    cache.finish_tokens(n_seq)


def _token_ids(ids: TensorFile | None, seqs: range, ctx: int) -> np.ndarray:
    """(len(seqs), ctx) int32 token ids of sequences ``seqs``; refuses ids outside int32."""
    if ids is None:
        return np.zeros((len(seqs), ctx), dtype=np.int32)
    per_row = ctx if len(ids.shape) == 1 else 1  # (tokens,) or (n_seq, ctx)
    values = ids.rows(seqs.start * per_row, seqs.stop * per_row).long().reshape(len(seqs), ctx)
    bad = (values < 0) | (values > np.iinfo(np.int32).max)
    if bool(bad.any()):
        seq, pos = bad.nonzero()[0].tolist()
        raise BadValue(f"--tokens-file {ids.label}: token id {int(values[seq, pos])} of sequence "
                       f"{seqs.start + seq} (position {pos}) is not a token id (0 to 2^31 - 1)")
    return values.int().numpy()


def _write_blocks(cfg: ImportConfig, cache: Cache, files: dict[int, TensorFile]) -> ImportResult:
    """Read, check and write every uncommitted block; each commits once all its chunks are in."""
    layout = cache.layout
    pending = [int(b) for b in np.flatnonzero(~cache.committed())]
    buffers = [HostBuffer.allocate(len(files), layout.seqs_per_block, layout.ctx, layout.d, pin=False)
               for _ in range(cfg.buffers)]
    writer = BlockWriter(cache, buffers, cfg.writer_threads)
    tokens = sum(len(layout.block_seqs(b)) for b in pending) * layout.ctx
    with closing(Progress(tokens, "import", cfg.progress)) as progress, writer:
        for block in pending:
            buffer = writer.acquire()  # waits while every buffer is still being written
            _fill(buffer, files, layout, block)
            writer.submit(buffer, block, [block])
            progress.update(len(layout.block_seqs(block)) * layout.ctx, writer.bytes_written)
    return ImportResult(cache, tokens, writer.bytes_written, progress.seconds)


def _fill(buffer: HostBuffer, files: dict[int, TensorFile], layout: CacheLayout, block: int) -> None:
    """One block of every layer into ``buffer``: float16 rows and per-sequence sums."""
    rows, n_seq = layout.block_rows(block), len(layout.block_seqs(block))
    n = rows.stop - rows.start
    for index, (layer, file) in enumerate(files.items()):
        h = _float16(file.rows(rows.start, rows.stop), file, layer, rows.start)  # (n, d) fp16
        buffer.resid[index, :n] = h
        buffer.sums[index, :n_seq] = stats.sequence_sums(h.view(n_seq, layout.ctx, layout.d))


def _float16(x: torch.Tensor, file: TensorFile, layer: int, row0: int) -> torch.Tensor:
    """x (n, d) as float16 (no copy if it is already); refuses a value float16 cannot hold."""
    h = x.to(torch.float16)
    finite = torch.isfinite(h)  # (n, d)
    if bool(finite.all()):
        return h
    row, col = (~finite).nonzero()[0].tolist()
    value = float(x[row, col])
    where = f"{file.label} (layer {layer}) row {row0 + row}, column {col}"
    if math.isfinite(value):
        raise BadValue(f"{where}: {value:g} overflows float16 (largest {torch.finfo(torch.float16).max:g}), "
                       "which the cache stores: rescale the activations")
    raise BadValue(f"{where} is {value}: the cache holds finite values only; fix or drop those rows")
