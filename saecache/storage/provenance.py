"""What a cache was made from, saved in its attributes and checked before it is used."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Fields that identify the data; a difference in any of them makes a different cache.
# (label in messages, field name)
_IDENTITY = (
    ("model", "model"),
    ("model revision", "revision"),
    ("model dtype", "dtype"),
    ("tokenizer vocabulary", "vocab_hash"),
    ("dataset", "dataset"),
    ("dataset config", "dataset_config"),
    ("dataset split", "split"),
    ("dataset revision", "dataset_revision"),
    ("text field", "text_field"),
    ("token budget", "token_budget"),
    ("model weights", "model_fingerprint"),
    ("tokenizer", "tokenizer_hash"),
)
# Identity fields that caches written before saecache 0.2 lack: None there means unknown,
# never a difference, and they are left out of what such a cache says of itself.
_OPTIONAL = ("model_fingerprint", "tokenizer_hash")


@dataclass(frozen=True)
class Provenance:
    """The model, tokenizer and data behind a cache."""

    model: str
    """Hub id, or the absolute path of a local folder (relative, as given, before saecache 0.3)."""
    revision: str | None
    """Model revision asked for (None: the default branch)."""
    dtype: str
    """dtype the model ran in (float16, bfloat16, float32)."""
    architecture: str
    """The model class, e.g. GPTNeoXForCausalLM."""
    blocks: str
    """Dotted path of the module list whose outputs are stored, e.g. gpt_neox.layers."""
    n_layers: int
    """Blocks in the model."""
    tokenizer: str
    """Where the tokenizer came from (the model's own)."""
    vocab_hash: str
    """sha256 of the tokenizer's vocabulary, to catch a different tokenizer under one name."""
    eos_token_id: int
    """Token that joins documents."""
    dataset: str
    """Hub dataset id, or the absolute path of a local file or folder."""
    dataset_config: str | None
    """Dataset configuration name (``name=`` of load_dataset)."""
    split: str
    """Dataset split."""
    dataset_revision: str | None
    """Dataset revision asked for."""
    text_field: str
    """Column holding the text."""
    token_budget: int
    """Tokens asked for (``--tokens``); the cache may hold fewer if the data ran out."""
    model_commit: str | None = None
    """Resolved commit of a Hub model, when known (recorded, not compared)."""
    saecache_version: str = ""
    """saecache version that created the cache (recorded, not compared)."""
    model_fingerprint: str | None = None
    """What the weights were: ``commit:<sha>`` of a Hub model, or ``sha256:…`` over a local
    folder's weight files and config.json (None: unknown, a cache from saecache 0.1)."""
    tokenizer_hash: str | None = None
    """sha256 of the whole tokenizer: vocabulary, merges, normaliser, pre-tokeniser, special
    and added tokens, and the settings that change encoding (None: unknown)."""

    def differences(self, requested: Provenance) -> list[str]:
        """Human-readable differences on identity fields: 'model: A (cache) vs B'."""
        return [
            f"{label} is {getattr(self, name)!r} in the cache, not {getattr(requested, name)!r}"
            for label, name in _IDENTITY
            if self._differs(requested, name)
        ]

    def weights_change(self, requested: Provenance) -> str | None:
        """'the model at /p with weights sha256:1a2b…, which now holds sha256:3c4d…' when the
        same model name now has other weights, else None (also when either is unknown)."""
        if self.model != requested.model or not self._differs(requested, "model_fingerprint"):
            return None
        kind = "commit" if self.model_fingerprint.startswith("commit:") else "weights"
        then, now = (_short(f) for f in (self.model_fingerprint, requested.model_fingerprint))
        holds = "resolves to" if kind == "commit" else "holds"
        return f"the model at {self.model} with {kind} {then}, which now {holds} {now}"

    def _differs(self, requested: Provenance, name: str) -> bool:
        mine, theirs = getattr(self, name), getattr(requested, name)
        if name in _OPTIONAL and (mine is None or theirs is None):
            return False  # unknown on one side: not a difference
        return mine != theirs

    def identity(self) -> dict:
        """The identity fields by name: what a run trained on this cache records of it."""
        return {name: getattr(self, name) for _, name in _IDENTITY
                if name not in _OPTIONAL or getattr(self, name) is not None}

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _OPTIONAL or v is not None}

    @classmethod
    def from_json(cls, data: dict) -> Provenance:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _short(fingerprint: str) -> str:
    """``sha256:1a2b3c4d5e6f…`` or a commit's ``1a2b3c4d5e6f…``: enough to tell two apart."""
    kind, _, digest = fingerprint.partition(":")
    short = f"{digest[:12]}…" if len(digest) > 12 else digest
    return short if kind == "commit" else f"{kind}:{short}"


def resolve_model(model: str, bases: Iterable[Path] = ()) -> str:
    """``model`` as ``from_pretrained`` must be given it from any working directory: a local
    folder as an absolute path, anything else (a Hub id) unchanged.

    A relative path, as saecache before 0.3 recorded it (relative to the working directory of
    the harvest, which is not known), is looked for under each of ``bases`` in turn (the
    folders that held the cache: the harvest ran in one of them), then the working directory."""
    return resolve_recorded(model, bases) or model


def resolve_recorded(text: str, bases: Iterable[Path] = ()) -> str | None:
    """The absolute path of the existing folder ``text`` names, looked for under ``bases``
    then the working directory when relative (None: no such folder)."""
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [Path(base) / path for base in bases] + [path]
    found = next((c for c in candidates if c.is_dir()), None)
    return os.path.abspath(found) if found is not None else None


def ancestors(location: str) -> list[Path]:
    """The folders holding a local ``location``, nearest first ([] for a URL)."""
    if "://" in location:
        return []
    return list(Path(os.path.abspath(location)).parents)
