"""What saecache 0.1.0 wrote still works: its cache trains, its runs evaluate to the same figures
and are refused, in one line, for resuming under newer training conventions
(tests/data/saecache-0.1.0, made by make_fixture.py there)."""

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


def test_the_old_cache_trains(old):
    """The cache format is unchanged: 0.1.0's cache trains (the training conventions are
    newer, so the weights differ from the fixture's runs)."""
    result = invoke("train", str(old / "cache.zarr"), *TRAIN, "--out", str(old / "new-runs"))
    assert "sae_layer01_final.pt: held-out FVU" in result.output
    new = tensors(old / "new-runs" / RELU / "sae_layer01_final.pt")
    assert new["cfg"]["l1_anthropic"] == pytest.approx(3e-4 * 16**1.5)
    assert not torch.equal(new["W_enc"], tensors(old / "runs" / RELU / "sae_layer01_final.pt")["W_enc"])


def test_an_old_run_is_refused_in_one_line(old):
    """0.1.0 clipped the per-element loss and started b_dec at 0: its runs cannot resume."""
    before = (old / "runs" / RELU / "sae_layer01_final.pt").read_bytes()
    result = CliRunner().invoke(cli, ["train", str(old / "cache.zarr"), *TRAIN, "--out", str(old / "runs")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "was trained by an earlier saecache whose --l1, --grad-clip and --lr mean other things" in result.output
    assert (old / "runs" / RELU / "sae_layer01_final.pt").read_bytes() == before  # untouched


def test_old_runs_evaluate_to_the_old_figures(old):
    result = invoke("eval", str(old / "runs"), "--model", str(old / "model"), "--cache",
                    str(old / "cache.zarr"), "--snapshot", "all", "--device", "cpu")
    assert result.output == (FIXTURE / "golden" / "eval.txt").read_text()
