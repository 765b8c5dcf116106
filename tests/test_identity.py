"""What was read is what is resumed: other weights or another tokenizer under the same path are
refused for a complete and a partial cache; a complete cache says so; the weight hashes are
computed once."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from zarr.storage import LocalStore

from saecache.cli import cli
from saecache.core.units import format_tokens
from saecache.demo.tiny import DEMO_TEXT, TinyModelConfig, build_tiny_model
from saecache.harvest import identity
from saecache.harvest.identity import folder_fingerprint
from saecache.harvest.models import load_tokenizer, vocab_hash
from saecache.storage.cache import Cache
from saecache.storage.provenance import Provenance
from saecache.train.loop import run_identity
from tests.conftest import tree_digest
from tests.test_cli import assert_one_line_error


def args(cache: Path, model: Path) -> list[str]:
    return ["harvest", str(cache), "--model", str(model), "--dataset", str(DEMO_TEXT), "--tokens", "2048",
            "--ctx", "32", "--chunk-rows", "256", "--batch-size", "4", "--device", "cpu",
            "--writer-threads", "2", "--buffers", "2", "--no-progress"]


@pytest.fixture
def model(tmp_path, tiny_model) -> Path:
    """A copy of the tiny model that a test may change."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """model.safetensors of the same architecture with another seed."""
    folder = build_tiny_model(tmp_path_factory.mktemp("other") / "model", TinyModelConfig(seed=1))
    return folder / "model.safetensors"


def partial(cache: Path, model: Path, monkeypatch) -> None:
    """A cache whose harvest stopped part-way (the disk filled up), as test_resume makes one."""
    real_set, calls = LocalStore.set, {"n": 0}

    async def set_until_full(self, key, value, *a, **k):
        calls["n"] += 1
        if "resid/" in key and calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(LocalStore, "set", set_until_full)
        m.setattr("saecache.harvest.writer.DIRECT", False)  # zarr's path, where LocalStore.set fails
        assert CliRunner().invoke(cli, args(cache, model)).exit_code == 1
    assert 0 < Cache.open(str(cache)).committed().sum() < 8


@pytest.mark.parametrize("state", ["complete", "partial"])
def test_other_weights_in_the_same_folder_are_refused(tmp_path, model, other_weights, state, monkeypatch):
    cache = tmp_path / "cache.zarr"
    if state == "complete":
        assert CliRunner().invoke(cli, args(cache, model)).exit_code == 0
    else:
        partial(cache, model, monkeypatch)
    was = Cache.open(str(cache)).provenance.model_fingerprint
    assert was == folder_fingerprint(model) and was.startswith("sha256:")
    before = tree_digest(cache)
    shutil.copyfile(other_weights, model / "model.safetensors")  # new weights, same path
    now = folder_fingerprint(model)
    assert now != was
    result = CliRunner().invoke(cli, args(cache, model))
    assert_one_line_error(result, f"cache at {cache} was harvested from the model at {model} with "
                          f"weights {was[:19]}…, which now holds {now[:19]}…",
                          "harvest into another CACHE, or --overwrite")
    assert tree_digest(cache) == before


def test_another_tokenizer_with_the_same_vocabulary_is_refused(tmp_path, model):
    cache = tmp_path / "cache.zarr"
    assert CliRunner().invoke(cli, args(cache, model)).exit_code == 0
    before, vocab = tree_digest(cache), vocab_hash(load_tokenizer(str(model)))
    ids = load_tokenizer(str(model))("The Cat")["input_ids"]
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["add_prefix_space"] = True  # "The" becomes " The": same vocabulary, other ids
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    changed = load_tokenizer(str(model))
    assert vocab_hash(changed) == vocab and changed("The Cat")["input_ids"] != ids
    result = CliRunner().invoke(cli, args(cache, model))
    assert_one_line_error(result, f"cache at {cache} differs from this harvest: tokenizer is 'sha256:")
    assert tree_digest(cache) == before


def test_weight_hashes_are_reused_while_size_and_mtime_are_unchanged(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SAECACHE_CACHE_DIR", str(tmp_path / "user-cache"))
    hashed = []
    real = identity._sha256
    monkeypatch.setattr(identity, "_sha256", lambda path: hashed.append(path.name) or real(path))
    first = folder_fingerprint(model)
    assert sorted(hashed) == ["config.json", "model.safetensors"]  # tokenizer files are not weights
    assert str((model / "model.safetensors").resolve()) in json.loads(
        (tmp_path / "user-cache" / "fingerprints.json").read_text())
    hashed.clear()
    weights = model / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other bytes, same size, mtime put back: only the kept hash can answer
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert folder_fingerprint(model) == first and hashed == []
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: hashed again
    assert folder_fingerprint(model) != first and hashed == ["model.safetensors"]


def test_a_complete_cache_is_already_complete_and_a_missing_chunk_is_one_line(tmp_path, model):
    cache = tmp_path / "cache.zarr"
    assert CliRunner().invoke(cli, args(cache, model)).exit_code == 0
    before = tree_digest(cache)
    again = CliRunner().invoke(cli, args(cache, model))
    assert again.exit_code == 0
    lay = Cache.open(str(cache)).layout
    assert again.output.strip() == (f"cache at {cache} is already complete ({format_tokens(lay.n_tokens)} tokens × "
                                    f"{len(lay.layers)} layers): nothing to harvest; train from it with "
                                    f"saecache train {cache}, or give another CACHE (or --overwrite) to "
                                    "harvest again")
    assert tree_digest(cache) == before
    (cache / "resid" / "02" / "c" / "5" / "0").unlink()  # a committed block's chunk gone
    assert_one_line_error(CliRunner().invoke(cli, args(cache, model)),
                          "resid/02 chunk (5, 0) of block 5 is missing", f"run saecache verify {cache}")


def test_a_cache_without_the_new_fields_is_unknown_not_different(cache_path):
    new = Cache.open(str(cache_path)).provenance
    old_json = {k: v for k, v in new.to_json().items() if k not in ("model_fingerprint", "tokenizer_hash")}
    old = Provenance.from_json(old_json)  # as saecache 0.1.0 wrote it
    assert old.model_fingerprint is None and old.differences(new) == [] and old.weights_change(new) is None
    assert old.to_json() == old_json and "model_fingerprint" not in old.identity()
    other = Provenance.from_json({**new.to_json(), "model_fingerprint": "sha256:" + "0" * 64})
    assert other.differences(new) and other.weights_change(new)


def test_runs_record_the_weights_and_the_tokenizer(cache_path):
    cache = Cache.open(str(cache_path))
    recorded = run_identity(cache, 1)
    assert recorded["model_fingerprint"] == cache.provenance.model_fingerprint
    assert recorded["tokenizer_hash"].startswith("sha256:")
