"""The command line: one-line errors, nothing lost, info and verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from saecache.cli import cli
from saecache.demo.tiny import DEMO_TEXT
from tests.conftest import CTX, TOKENS, tree_digest


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def harvest_args(cache, model, **changes) -> list[str]:
    options = {"--model": model, "--dataset": DEMO_TEXT, "--tokens": TOKENS, "--ctx": CTX,
               "--chunk-rows": 256, "--batch-size": 4, "--device": "cpu", "--writer-threads": 2}
    options.update(changes)
    return ["harvest", cache, *[str(x) for kv in options.items() for x in kv], "--no-progress"]


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("saecache: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def cache_copy(tmp_path, cache_path) -> Path:
    copy = tmp_path / "cache.zarr"
    shutil.copytree(cache_path, copy)
    return copy


@pytest.mark.parametrize("changes, needle", [
    ({"--ctx": 16}, "ctx is 32 in the cache, not 16"),
    ({"--layers": "0,1"}, "layers"),
    ({"--tokens": "1024"}, "token budget is 2048 in the cache, not 1024"),
    ({"--dtype": "float32"}, "model dtype"),
    ({"--chunk-rows": 512}, "--chunk-rows"),
])
def test_a_mismatched_rerun_is_refused_and_the_cache_untouched(cache_copy, tiny_model, changes, needle):
    before = tree_digest(cache_copy)
    result = run(*harvest_args(cache_copy, tiny_model, **changes))
    assert_one_line_error(result, needle, str(cache_copy), "--overwrite")
    assert tree_digest(cache_copy) == before


def test_another_model_is_refused(cache_copy, tiny_model, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    before = tree_digest(cache_copy)
    assert_one_line_error(run(*harvest_args(cache_copy, other)), "model is", "other-model")
    assert tree_digest(cache_copy) == before


def test_overwrite_starts_over(cache_copy, tiny_model):
    result = run(*harvest_args(cache_copy, tiny_model, **{"--ctx": 16}), "--overwrite")
    assert result.exit_code == 0, result.output
    info = json.loads(run("info", cache_copy, "--json").output)
    assert info["layout"]["ctx"] == 16 and info["progress"]["complete"]


def test_overwrite_never_deletes_a_folder_that_is_not_a_cache(tmp_path, tiny_model):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("hard work")
    result = run(*harvest_args(precious, tiny_model), "--overwrite")
    assert_one_line_error(result, "not a saecache cache")
    assert (precious / "chapter1.tex").read_text() == "hard work"


@pytest.mark.parametrize("changes, needles", [
    ({"--dataset": "/no/such/file.jsonl"}, ["dataset path /no/such/file.jsonl does not exist"]),
    ({"--ctx": 1024}, ["--ctx 1024", "256"]),
    ({"--layers": "0,7"}, ["layer 7 is out of range", "0-2"]),
    ({"--layers": "x"}, ["--layers 'x'"]),
    ({"--tokens": "12Q"}, ["'12Q' is not a count"]),
    ({"--device": "cuda:0"}, ["--device"]),
])
def test_bad_arguments_give_one_line_and_create_nothing(tmp_path, tiny_model, changes, needles):
    cache = tmp_path / "new.zarr"
    assert_one_line_error(run(*harvest_args(cache, tiny_model, **changes)), *needles)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("content, needle", [("", "is empty"),
                                             ('{"text": "too short"}\n', "fewer than --ctx 32 tokens")])
def test_an_empty_dataset_is_refused(tmp_path, tiny_model, content, needle):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    cache = tmp_path / "new.zarr"
    assert_one_line_error(run(*harvest_args(cache, tiny_model, **{"--dataset": empty})), needle)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_missing_model_is_one_line(tmp_path):
    result = run(*harvest_args(tmp_path / "c.zarr", tmp_path / "no-model"))
    assert_one_line_error(result, "model folder", "no-model", "does not exist")


def test_info_reports_provenance_progress_and_stats(cache_path):
    info = json.loads(run("info", cache_path, "--json").output)
    assert info["provenance"]["dataset"] == str(DEMO_TEXT)
    assert info["progress"] == {"tokens_done": True, "blocks_committed": 8, "n_blocks": 8,
                                "tokens_committed": TOKENS, "complete": True}
    assert info["storage"]["resid_bytes_logical"] == TOKENS * 64 * 2 * 3
    assert 0.9 < info["storage"]["compression_ratio"] <= 1.0  # crc32c adds 4 bytes per chunk
    assert set(info["stats"]) == {"00", "01", "02"}
    text = run("info", cache_path).output
    assert "8/8 blocks" in text and "gpt_neox.layers" in text


def test_verify_passes_a_good_cache(cache_path):
    result = run("verify", cache_path)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "non-finite values: none" in result.output


def test_verify_names_a_chunk_with_a_flipped_byte(cache_copy):
    chunk = cache_copy / "resid" / "01" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x10
    chunk.write_bytes(bytes(data))
    result = run("verify", cache_copy)
    assert result.exit_code != 0
    assert "resid/01 chunk (3, 0)" in result.output
    assert "checksum" in result.output.lower() or "unreadable" in result.output


def test_verify_names_a_missing_chunk(cache_copy):
    (cache_copy / "tokens" / "c" / "2" / "0").unlink()
    result = run("verify", cache_copy)
    assert result.exit_code != 0 and "tokens chunk (2, 0): missing" in result.output


def test_info_on_a_folder_without_a_cache(tmp_path):
    assert_one_line_error(run("info", tmp_path / "nothing"), "no saecache cache")


def test_nonfinite_residuals_stop_the_harvest_naming_layer_and_sequence(tmp_path, tiny_model):
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.gpt_neox.layers[1].mlp.dense_4h_to_h.bias.data[5] = 1e6  # inf in float16
    model.save_pretrained(broken)
    shutil.copy(tiny_model / "tokenizer.json", broken)
    shutil.copy(tiny_model / "tokenizer_config.json", broken)
    cache = tmp_path / "c.zarr"
    assert_one_line_error(run(*harvest_args(cache, broken)), "layer 1, sequence 0", "--allow-nonfinite")
    result = run(*harvest_args(cache, broken), "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    info = json.loads(run("info", cache, "--json").output)
    assert info["stats"]["00"]["nonfinite"] == 0
    assert info["stats"]["01"]["nonfinite"] >= TOKENS  # one overflowing dimension per token
    assert f"layer 1: {info['stats']['01']['nonfinite']}" in run("verify", cache).output


def test_demo_runs_offline(demo):
    out, result = demo
    assert result.exit_code == 0, result.output
    assert "32/32 blocks" in result.output and "complete" in result.output
    assert "layer01-relu-x4-l1-0.01: sae_layer01_final.pt: held-out FVU" in result.output
    assert "CE loss recovered" in result.output and "report: " in result.output
    assert "layer01-topk-x4-k16: L0 16.0 of F = 256, FVU" in result.output  # sparse SAEs, with F
    assert (out / "runs" / "layer01-relu-x4-adaptive-l0-16" / "sae_layer01_16K.pt").exists()
    assert (out / "report" / "index.html").exists()
    assert "\r" not in result.output  # no progress bar when not a terminal
