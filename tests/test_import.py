"""saecache import: activations made elsewhere become an ordinary cache, bit for bit, or one line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

from saecache.harvest.importer import NO_TOKEN_IDS, has_token_ids
from saecache.storage.cache import Cache
from tests.conftest import tree_digest
from tests.test_cli import assert_one_line_error, run

CTX, D, N_SEQ = 16, 8, 64  # 1024 tokens
CHUNK_ROWS = 128  # 8 sequences per block → 8 blocks


def activations(seed: int = 0, n_tokens: int = N_SEQ * CTX, dtype=np.float32) -> np.ndarray:
    """(tokens, d) residual-like values: a mean offset and a scale per dimension."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_tokens, D)) * rng.uniform(0.5, 4, D) + rng.uniform(-2, 2, D)
    return x.astype(dtype)


def import_(*args) -> object:
    return run("import", *args, "--ctx", CTX, "--chunk-rows", CHUNK_ROWS, "--writer-threads", 2,
               "--no-progress")


def resid(cache, layer: int = 0) -> np.ndarray:
    return zarr.open_group(cache, mode="r")[f"resid/{layer:02d}"][:]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fp16_file(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, activations(dtype=np.float16))
    return path


# ---- round trips ------------------------------------------------------------------------------


def test_float16_comes_back_bit_for_bit_as_an_ordinary_cache(tmp_path, fp16_file):
    cache = tmp_path / "cache.zarr"
    result = import_(fp16_file, cache)
    assert result.exit_code == 0, result.output
    assert "imported 1,024 tokens × 1 layer in" in result.output
    stored = resid(cache)
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored.view(np.uint16), np.load(fp16_file).view(np.uint16))
    opened = Cache.open(str(cache))
    assert opened.complete and opened.layout.n_seq == N_SEQ and opened.layout.seqs_per_block == 8
    p = opened.provenance
    assert (p.model, p.architecture, p.tokenizer, p.token_budget) == ("imported", "imported", NO_TOKEN_IDS, 1024)
    assert p.dataset == f"imported:00=acts.npy sha256:{sha256(fp16_file)}"
    assert not has_token_ids(p)
    group = zarr.open_group(cache, mode="r")
    assert not group["tokens"][:].any() and (group["source"][:] == -1).all()


def test_float32_is_stored_as_its_float16_cast(tmp_path):
    x = activations()
    np.save(tmp_path / "acts.npy", x)
    assert import_(tmp_path / "acts.npy", tmp_path / "cache").exit_code == 0
    np.testing.assert_array_equal(resid(tmp_path / "cache"), x.astype(np.float16))
    assert Cache.open(str(tmp_path / "cache")).provenance.dtype == "float32"


def test_bfloat16_safetensors_named_tensor_is_stored_as_its_float16_cast(tmp_path):
    x = torch.from_numpy(activations()).to(torch.bfloat16)
    path = tmp_path / "acts.safetensors"
    save_file({"resid": x, "other": torch.zeros(3)}, str(path))
    result = import_(f"{path}:resid", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(resid(tmp_path / "cache"), x.to(torch.float16).numpy())
    assert "acts.safetensors:resid sha256:" in Cache.open(str(tmp_path / "cache")).provenance.dataset


def test_several_layers_their_statistics_verify_and_info(tmp_path):
    xs = {0: activations(0).astype(np.float16), 2: activations(1).astype(np.float16)}
    np.save(tmp_path / "l0.npy", xs[0])
    save_file({"blocks.2": torch.from_numpy(xs[2])}, str(tmp_path / "l2.safetensors"))
    cache = tmp_path / "cache"
    result = import_(cache, "--layer", f"2={tmp_path / 'l2.safetensors'}", "--layer", f"0={tmp_path / 'l0.npy'}")
    assert result.exit_code == 0, result.output
    opened = Cache.open(str(cache))
    assert opened.layout.layers == (0, 2)
    for layer, x in xs.items():
        np.testing.assert_array_equal(resid(cache, layer), x)
        stats, x64 = opened.layer_stats(layer), x.astype(np.float64)
        np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.mean_norm, np.linalg.norm(x64, axis=1).mean(), rtol=1e-5)
        np.testing.assert_allclose(stats.mean_sq_norm, (x64 ** 2).sum(1).mean(), rtol=1e-5)
        assert (stats.rows, stats.nonfinite) == (N_SEQ * CTX, 0)
    checked = run("verify", cache)
    assert checked.exit_code == 0 and checked.output.strip().endswith("ok"), checked.output
    info = json.loads(run("info", cache, "--json").output)
    assert info["progress"]["complete"] and info["layout"]["layers"] == [0, 2]


@pytest.mark.parametrize("shape", [(N_SEQ * CTX,), (N_SEQ, CTX)])
def test_token_ids_are_stored(tmp_path, fp16_file, shape):
    ids = np.random.default_rng(3).integers(0, 50_000, size=shape).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    result = import_(fp16_file, tmp_path / "cache", "--tokens-file", tmp_path / "ids.npy")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "cache", mode="r")["tokens"][:],
                                  ids.reshape(N_SEQ, CTX))
    provenance = Cache.open(str(tmp_path / "cache")).provenance
    assert has_token_ids(provenance) and f"tokens=ids.npy sha256:{sha256(tmp_path / 'ids.npy')}" in provenance.dataset


# ---- re-running ---------------------------------------------------------------------------------


def test_a_rerun_says_complete_other_files_are_refused_overwrite_replaces(tmp_path, fp16_file):
    cache = tmp_path / "cache"
    assert import_(fp16_file, cache).exit_code == 0
    before = tree_digest(cache)
    again = import_(fp16_file, cache)
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    other = tmp_path / "other.npy"
    np.save(other, activations(seed=9, dtype=np.float16))
    assert_one_line_error(import_(other, cache), "differs from this import: dataset is 'imported:00=acts.npy sha256:", "--overwrite")
    assert tree_digest(cache) == before
    assert import_(other, cache, "--overwrite").exit_code == 0
    np.testing.assert_array_equal(resid(cache), np.load(other))


def test_an_interrupted_import_resumes(tmp_path, fp16_file):
    cache = tmp_path / "cache"
    assert import_(fp16_file, cache).exit_code == 0
    opened = Cache.open(str(cache), writable=True)
    opened.array("blocks/committed")[3] = 0  # as if killed before block 3 committed
    opened._update(complete=False)
    (next(cache.glob("resid/00/c/3/*"))).unlink()
    result = import_(fp16_file, cache)
    assert result.exit_code == 0 and "imported 128 tokens" in result.output, result.output
    np.testing.assert_array_equal(resid(cache), np.load(fp16_file))
    assert run("verify", cache).exit_code == 0


# ---- refusals, one line each --------------------------------------------------------------------


def _write(tmp_path, name: str, array) -> str:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(array, str(path))
    else:
        np.save(path, array)
    return str(path)


def with_value(value: float, row: int = 700) -> np.ndarray:
    x = activations()
    x[row, 3] = value
    return x


@pytest.mark.parametrize("name, array, needles", [
    ("a.npy", np.zeros((4, 16, D), np.float32), ["(4, 16, 8) array", "(tokens, d)"]),
    ("a.npy", np.zeros(1024, np.float32), ["(1024,) array"]),
    ("a.npy", np.zeros((1024, D)), ["float64 values", "float16, bfloat16, float32"]),
    ("a.npy", np.zeros((1024, D), np.int32), ["int32 values"]),
    ("a.npy", with_value(np.nan), ["row 700, column 3 is nan", "finite values only"]),
    ("a.npy", with_value(-np.inf), ["row 700, column 3 is -inf"]),
    ("a.npy", with_value(7e4), ["row 700, column 3: 70000 overflows float16", "65504"]),
    ("a.npy", activations(n_tokens=1000), ["1000 tokens", "--ctx 16", "remainder 8", "992"]),
    ("a.safetensors", {"x": torch.zeros(1024, D), "y": torch.zeros(2)}, ["holds 2 tensors (x, y)", ":NAME"]),
])
def test_bad_activations_are_one_line_and_leave_no_cache(tmp_path, name, array, needles):
    result = import_(_write(tmp_path, name, array), tmp_path / "cache")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("files, needles", [
    ({"missing.npy": None}, ["missing.npy: no such file"]),
    ({"a.pt": b"\x80\x02"}, [".pt is not a format", ".npy or .safetensors"]),
    ({"a.npy": b"garbage, not an array"}, ["is not a .npy file"]),
    ({"a.safetensors": b"garbage, not an array"}, ["is not a readable .safetensors file"]),
])
def test_missing_and_unreadable_files_are_one_line(tmp_path, files, needles):
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    assert_one_line_error(import_(tmp_path / next(iter(files)), tmp_path / "cache"), *needles)
    assert not (tmp_path / "cache").exists()


def test_layers_of_different_shapes_are_one_line(tmp_path):
    a = _write(tmp_path, "a.npy", activations())
    b = _write(tmp_path, "b.npy", activations(n_tokens=512))
    result = import_(tmp_path / "cache", "--layer", f"0={a}", "--layer", f"1={b}")
    assert_one_line_error(result, "b.npy (layer 1) is (512, 8) but a.npy is (1024, 8)")


@pytest.mark.parametrize("args, needles", [
    ([], ["give one ACTIVATIONS file"]),
    (["x.npy", "--layer", "1=y.npy"], ["not both"]),
    (["x.npy", "y.npy"], ["got 2 ACTIVATIONS files"]),
    (["--layer", "five=y.npy"], ["--layer 'five=y.npy' is not L=FILE"]),
    (["--layer", "1=y.npy", "--layer", "1=z.npy"], ["--layer 1 is given twice"]),
])
def test_bad_command_lines_are_one_line(tmp_path, args, needles):
    assert_one_line_error(import_(*args, tmp_path / "cache"), *needles)


@pytest.mark.parametrize("ids, needles", [
    (np.zeros(1000, np.int64), ["is (1000,)", "(1024,) or (64, 16)"]),
    (np.zeros(1024, np.float32), ["float32 values", "integers"]),
    (np.full(1024, -5, np.int64), ["token id -5 of sequence 0 (position 0)"]),
])
def test_bad_token_ids_are_one_line(tmp_path, fp16_file, ids, needles):
    result = import_(fp16_file, tmp_path / "cache", "--tokens-file", _write(tmp_path, "ids.npy", ids))
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "cache").exists()


# ---- stage two on an imported cache ---------------------------------------------------------------


def test_train_runs_on_it_and_eval_says_ce_loss_needs_token_ids(tmp_path, fp16_file):
    np.save(tmp_path / "big.npy", activations(n_tokens=4096, dtype=np.float16))
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    assert import_(tmp_path / "big.npy", cache).exit_code == 0
    trained = run("train", cache, "--layer", 0, "--out", runs, "--expansion", 2, "--tokens", 2048,
                  "--snapshots", "1K", "--batch-size", 128, "--device", "cpu", "--reader-threads", 1,
                  "--log-every", 4, "--no-progress")
    assert trained.exit_code == 0, trained.output
    (folder,) = [p for p in runs.iterdir() if p.is_dir()]
    assert (folder / "sae_layer00_final.pt").exists() and (folder / "sae_layer00_1K.pt").exists()
    assert_one_line_error(run("eval", runs, "--device", "cpu"), "imported without token ids",
                          "CE loss needs them", "--tokens-file")
    np.save(tmp_path / "ids.npy", np.zeros(4096, np.int64))
    with_ids = tmp_path / "with-ids"
    assert import_(tmp_path / "big.npy", with_ids, "--tokens-file", tmp_path / "ids.npy").exit_code == 0
    # another import (with token ids) is another cache: --cache is checked to be the run's own
    assert_one_line_error(run("eval", runs, "--cache", with_ids, "--device", "cpu"),
                          "is not the cache run", "its dataset is")
    runs_with_ids = tmp_path / "runs-with-ids"
    assert run("train", with_ids, "--layer", 0, "--out", runs_with_ids, "--expansion", 2, "--tokens",
               1024, "--batch-size", 128, "--device", "cpu", "--reader-threads", 1,
               "--no-progress").exit_code == 0
    assert_one_line_error(run("eval", runs_with_ids, "--device", "cpu"), "pass --model")


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_files_are_read_one_block_of_rows_at_a_time(tmp_path, monkeypatch, suffix):
    from saecache.harvest import tensorfiles

    x = activations(dtype=np.float16)
    path = _write(tmp_path, "acts" + suffix, {"x": torch.from_numpy(x)} if suffix == ".safetensors" else x)
    reader = tensorfiles.FORMATS[suffix]
    reads = []
    original = reader.rows

    def rows(self, start, stop):
        reads.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(reader, "rows", rows)
    assert import_(path, tmp_path / "cache").exit_code == 0
    assert reads == [CHUNK_ROWS] * (N_SEQ * CTX // CHUNK_ROWS)  # never the whole file
    np.testing.assert_array_equal(resid(tmp_path / "cache"), x)
