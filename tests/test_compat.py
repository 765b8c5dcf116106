"""What saecache 0.1.0 wrote still works: its cache trains to the same weights, its runs resume
and evaluate to the same figures (tests/data/saecache-0.1.0, made by make_fixture.py there)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saecache.cli import cli

FIXTURE = Path(__file__).resolve().parent / "data" / "saecache-0.1.0"
RELU = "layer01-relu-x2-l1-0.0003"
# The command that trained the fixture's ReLU run (make_fixture.py), on the command line.
TRAIN = ["--layer", "1", "--expansion", "2", "--l1", "3e-4", "--tokens", "512", "--snapshots", "256",
         "--batch-size", "32", "--log-every", "4", "--mix-chunks", "2", "--reader-threads", "1",
         "--dead-window", "128", "--device", "cpu", "--no-progress"]


@pytest.fixture
def old(tmp_path) -> Path:
    """A writable copy of the fixture: model/, cache.zarr/, runs/."""
    for name in ("model", "cache.zarr", "runs"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    return tmp_path


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_old_cache_trains_to_the_old_weights(old):
    invoke("train", str(old / "cache.zarr"), *TRAIN, "--out", str(old / "new-runs"))
    for name in ("sae_layer01_256.pt", "sae_layer01_final.pt"):
        want, got = tensors(old / "runs" / RELU / name), tensors(old / "new-runs" / RELU / name)
        assert want["cfg"] == got["cfg"]
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(want[key], got[key]), (name, key)
    new_lines = (old / "new-runs" / RELU / "metrics.jsonl").read_text().splitlines()
    assert len(new_lines) == len((old / "runs" / RELU / "metrics.jsonl").read_text().splitlines())


def test_an_old_run_resumes_as_finished(old):
    before = (old / "runs" / RELU / "sae_layer01_final.pt").read_bytes()
    result = invoke("train", str(old / "cache.zarr"), *TRAIN, "--out", str(old / "runs"))
    assert "sae_layer01_final.pt: held-out FVU" in result.output
    assert (old / "runs" / RELU / "sae_layer01_final.pt").read_bytes() == before  # nothing retrained


def test_an_old_run_with_other_settings_is_refused(old):
    result = CliRunner().invoke(cli, ["train", str(old / "cache.zarr"), *TRAIN, "--lr", "1e-3",
                                      "--out", str(old / "runs")])
    assert result.exit_code != 0
    assert "exists with other settings (train.lr is 0.0003 there, not 0.001)" in result.output


def test_old_runs_evaluate_to_the_old_figures(old):
    result = invoke("eval", str(old / "runs"), "--model", str(old / "model"), "--cache",
                    str(old / "cache.zarr"), "--snapshot", "all", "--device", "cpu")
    assert result.output == (FIXTURE / "golden" / "eval.txt").read_text()
