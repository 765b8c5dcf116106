"""What exactly was read: a fingerprint of the model's weights and a hash of its whole tokenizer.

A Hub model is named by the commit its files resolved to (``config._commit_hash``). A local
folder can change under the same path, so its fingerprint is a sha256 over the sorted relative
names and sha256s of its weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, their
``*.index.json``) and ``config.json``. Hashing 800 MB of weights takes seconds, so each file's
sha256 is kept in ``fingerprints.json`` under the user cache folder ($SAECACHE_CACHE_DIR, else
$XDG_CACHE_HOME/saecache, else ~/.cache/saecache), keyed by its absolute path and reused while
its size and mtime_ns are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from saecache.core.atomic import write_json

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_SUFFIXES = tuple(f"{suffix}.index.json" for suffix in WEIGHT_SUFFIXES)
# Tokenizer attributes that change what text encodes to, beyond its serialised pipeline.
ENCODING_SETTINGS = ("add_bos_token", "add_eos_token", "add_prefix_space",
                     "clean_up_tokenization_spaces", "do_lower_case", "split_special_tokens",
                     "legacy", "padding_side", "truncation_side")


def fingerprint_cache_dir() -> Path:
    """Where saecache keeps what it computed once for this user."""
    if folder := os.environ.get("SAECACHE_CACHE_DIR"):
        return Path(folder)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "saecache"


def model_fingerprint(name: str, config) -> str | None:
    """``sha256:…`` over a local folder's weights and config, ``commit:…`` for a Hub model,
    None when neither is known."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder_fingerprint(folder)
    commit = getattr(config, "_commit_hash", None)
    return f"commit:{commit}" if commit else None


def weight_files(folder: Path) -> list[Path]:
    """The files whose bytes are the model: weights, their indexes and config.json."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES + INDEX_SUFFIXES)))


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the sorted (relative name, file sha256) of :func:`weight_files`."""
    known_path = fingerprint_cache_dir() / "fingerprints.json"
    known = _read_known(known_path)
    digest, changed = hashlib.sha256(), False
    for file in weight_files(folder):
        key, stat = str(file.resolve()), file.stat()
        entry = known.get(key)
        if not entry or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
            log.info("sha256 of %s", file)
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(file)}
            known[key], changed = entry, True
        digest.update(json.dumps([str(file.relative_to(folder)), entry["sha256"]]).encode())
    if changed:
        try:
            write_json(known_path, known)
        except OSError as err:  # a read-only home: the hash is only recomputed next time
            log.warning("could not keep weight hashes in %s: %s", known_path, err)
    return "sha256:" + digest.hexdigest()


def _read_known(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of everything that decides how text becomes ids: a fast tokenizer's serialised
    pipeline (``backend_tokenizer.to_str()``: model, merges, normaliser, pre-tokeniser, added
    tokens), else its vocabulary, plus special and added tokens and encoding settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "pipeline": backend.to_str() if backend is not None else
        sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added": {str(i): repr(t) for i, t in sorted(tokenizer.added_tokens_decoder.items())},
        "settings": {k: getattr(tokenizer, k, None) for k in ENCODING_SETTINGS},
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
