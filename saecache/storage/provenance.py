"""What a cache was made from, saved in its attributes and checked before it is used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

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
)


@dataclass(frozen=True)
class Provenance:
    """The model, tokenizer and data behind a cache."""

    model: str
    """Hub id or local path given to ``from_pretrained``."""
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

    def differences(self, requested: Provenance) -> list[str]:
        """Human-readable differences on identity fields: 'model: A (cache) vs B'."""
        return [
            f"{label} is {getattr(self, name)!r} in the cache, not {getattr(requested, name)!r}"
            for label, name in _IDENTITY
            if getattr(self, name) != getattr(requested, name)
        ]

    def identity(self) -> dict:
        """The identity fields by name: what a run trained on this cache records of it."""
        return {name: getattr(self, name) for _, name in _IDENTITY}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Provenance:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
