"""Stage two: SAEs from the cache, sister runs in one read pass, snapshots, resume, refusals."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saecache.cli import cli
from saecache.sae.model import SAE
from saecache.storage.cache import Cache
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.loop import train
from tests.test_cli import assert_one_line_error
from tests.test_resume import kill_when

LAYER = 1
BASE = dict(layers=(LAYER,), expansion=4, tokens=60000, snapshots=(20000,), lr=1e-3, log_every=50,
            checkpoint_every=5000, device="cpu", dead_window=10000, progress=False)
READER = dict(batch_size=128, mix_chunks=4, threads=2)


def config(cache, out, **changes) -> TrainConfig:
    reader = ReaderConfig(**{**READER, **changes.pop("reader", {})})
    return TrainConfig(cache=str(cache), out=str(out), reader=reader, **{**BASE, **changes})


def lines(run, split="train") -> list[dict]:
    return [json.loads(l) for l in run.folder.metrics.read_text().splitlines()
            if json.loads(l)["split"] == split]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def sisters(train_cache, tmp_path_factory):
    """A fixed and an adaptive run trained together on layer 1."""
    out = tmp_path_factory.mktemp("runs")
    return out, train(config(train_cache, out, l1=("3e-4", "adaptive:32")))


def test_loss_falls(sisters):
    _, (fixed, _) = sisters
    train_lines = lines(fixed)
    assert train_lines[-1]["loss"] < 0.2 * train_lines[0]["loss"]
    assert train_lines[-1]["fvu"] < train_lines[0]["fvu"]


def test_the_adaptive_run_reaches_its_target_l0(sisters):
    _, (_, adaptive) = sisters
    heldout = lines(adaptive, "heldout")[-1]
    assert abs(heldout["l0"] - 32) <= 0.2 * 32, heldout
    fixed_l0 = lines(sisters[1][0], "heldout")[-1]["l0"]
    assert fixed_l0 > 2 * heldout["l0"]  # the controller did something


def test_metrics_lines_have_the_documented_fields(sisters):
    _, (fixed, _) = sisters
    line = lines(fixed)[0]
    for key in ("tokens", "mse", "fvu", "l0", "dead_fraction", "dead_window_tokens",
                "l1_coefficient", "lr", "tokens_per_s", "data_wait_fraction", "bytes_read"):
        assert key in line, key
    assert line["tokens"] == 50 * 128
    assert 0 <= line["data_wait_fraction"] <= 1
    assert [l["snapshot"] for l in lines(fixed, "heldout")] == ["sae_layer01_20K.pt", "sae_layer01_final.pt"]


def test_snapshots_load_with_weights_only_and_work_on_raw_activations(sisters, train_cache):
    _, (fixed, _) = sisters
    for name in ("sae_layer01_20K.pt", "sae_layer01_final.pt"):
        state = load(fixed.folder.dir / name)
        assert state["W_enc"].shape == (64, 256) and state["W_dec"].shape == (256, 64)
        assert state["b_enc"].shape == (256,) and state["b_dec"].shape == (64,)
        cfg = state["cfg"]
        assert (cfg["arch"], cfg["d"], cfg["F"], cfg["layer"], cfg["l1"]) == ("relu", 64, 256, 1, 3e-4)
        assert cfg["apply_b_dec_to_input"] is False and "k" in cfg and cfg["tokens_seen"] > 0
    # the final snapshot on raw activations = the trained SAE on normalised ones, rescaled
    cache = Cache.open(str(train_cache))
    x = torch.from_numpy(cache.resid(LAYER)[:512]).float()  # (512, 64) raw
    scale = math.sqrt(64) / cache.layer_stats(LAYER).mean_norm
    raw = SAE.from_snapshot(load(fixed.folder.dir / "sae_layer01_final.pt"))
    torch.testing.assert_close(raw(x).x_hat * scale, fixed.trainer.sae(x * scale).x_hat, rtol=1e-4, atol=1e-4)
    f = state["W_enc"], state["b_enc"]  # the documented forward pass, by hand
    acts = torch.relu(x @ f[0] + f[1])
    torch.testing.assert_close(acts @ state["W_dec"] + state["b_dec"], raw(x).x_hat)


def test_sister_runs_see_the_same_batches_as_when_trained_alone(sisters, train_cache, tmp_path):
    out, (fixed, adaptive) = sisters
    alone = train(config(train_cache, tmp_path))[0]  # the 3e-4 run, alone
    for name in ("sae_layer01_20K.pt", "sae_layer01_final.pt"):
        a, b = load(alone.folder.dir / name), load(fixed.folder.dir / name)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(a[key], b[key]), key
    # one read pass however many runs share it
    assert lines(alone)[-1]["bytes_read"] == lines(fixed)[-1]["bytes_read"] == lines(adaptive)[-1]["bytes_read"]


def test_topk_keeps_exactly_k_features(train_cache, tmp_path):
    run, = train(config(train_cache, tmp_path, arch="topk", k=(8,), tokens=20000, snapshots=()))
    assert lines(run, "heldout")[-1]["l0"] == pytest.approx(8, abs=0.01)
    assert lines(run)[-1]["loss"] < lines(run)[0]["loss"]
    assert load(run.folder.dir / "sae_layer01_final.pt")["cfg"]["k"] == 8


def test_several_layers_train_in_one_invocation(train_cache, tmp_path):
    runs = train(config(train_cache, tmp_path, layers=(0, 2), tokens=2560, snapshots=()))
    assert sorted(r.folder.dir.name for r in runs) == ["layer00-relu-x4-l1-0.0003", "layer02-relu-x4-l1-0.0003"]
    assert all((r.folder.dir / f"sae_layer{r.spec.layer:02d}_final.pt").exists() for r in runs)


def command(cache, out) -> list[str]:
    return [sys.executable, "-m", "saecache", "train", str(cache), "--layer", "1", "--out", str(out),
            "--expansion", "4", "--l1", "3e-4", "--l1", "adaptive:32", "--tokens", "30000",
            "--snapshots", "10K", "--batch-size", "128", "--lr", "1e-3", "--checkpoint-every", "1280",
            "--device", "cpu", "--reader-threads", "2", "--log-every", "20", "--no-progress"]


def final_weights(out: Path) -> list[torch.Tensor]:
    return [t for run in sorted(out.iterdir()) for name in ("sae_layer01_10K.pt", "sae_layer01_final.pt")
            for t in load(run / name).values() if isinstance(t, torch.Tensor)]


@pytest.fixture(scope="module")
def uninterrupted(train_cache, tmp_path_factory) -> Path:
    whole = tmp_path_factory.mktemp("whole")
    subprocess.run(command(train_cache, whole), check=True, capture_output=True)
    return whole


@pytest.mark.parametrize("at_step", [10, 150])
def test_kill_9_then_rerun_ends_with_the_same_weights(train_cache, uninterrupted, tmp_path, at_step):
    out = tmp_path / "killed"
    ckpt = out / "layer01-relu-x4-l1-0.0003" / "checkpoints"
    proc = subprocess.Popen(command(train_cache, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, lambda: ckpt.exists() and any(
        int(p.stem[4:]) >= at_step for p in ckpt.glob("step*.pt")))
    assert not (out / "layer01-relu-x4-l1-0.0003" / "sae_layer01_final.pt").exists()
    rerun = subprocess.run(command(train_cache, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    for a, b in zip(final_weights(uninterrupted), final_weights(out), strict=True):
        assert torch.equal(a, b)
    for run in ("layer01-relu-x4-l1-0.0003", "layer01-relu-x4-adaptive-l0-32"):
        tokens = lambda o: [json.loads(l)["tokens"] for l in (o / run / "metrics.jsonl").read_text().splitlines()]
        assert tokens(out) == tokens(uninterrupted)


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("args, needles", [
    (["--layer", "7"], ["layer 7 is not in the cache", "0, 1, 2"]),
    (["--layer", "1", "--tokens", "10M"], ["--tokens 10M is more than", "training tokens"]),
    (["--layer", "1", "--l1", "lots"], ["--l1 'lots' is not a coefficient"]),
    (["--layer", "1", "--l1", "adaptive:x"], ["--l1 'adaptive:x'"]),
    (["--layer", "1", "--tokens", "10K", "--snapshots", "20K"], ["--snapshots 20K is not below --tokens 10K"]),
    (["--layer", "1", "--arch", "topk"], ["--k"]),
])
def test_bad_arguments_give_one_line(train_cache, tmp_path, args, needles):
    result = run_cli("train", train_cache, "--out", tmp_path / "runs", "--device", "cpu", *args)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_existing_run_with_other_settings_is_refused_untouched(sisters, tmp_path):
    out, (fixed, _) = sisters
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    before = sorted((p.name, p.stat().st_size) for p in copy.rglob("*"))
    result = run_cli("train", fixed.cfg.cache, "--out", copy, "--layer", 1, "--expansion", 4,
                     "--tokens", 60000, "--snapshots", "20K", "--batch-size", 128, "--lr", "2e-3",
                     "--dead-window", 10000, "--mix-chunks", 4, "--device", "cpu", "--no-progress")
    assert_one_line_error(result, "exists with other settings", "lr is 0.001 there, not 0.002")
    assert sorted((p.name, p.stat().st_size) for p in copy.rglob("*")) == before


def test_a_cache_that_is_not_complete_is_refused(train_cache, tmp_path):
    copy = tmp_path / "cache.zarr"
    shutil.copytree(train_cache, copy)
    (copy / "blocks" / "committed" / "c" / "3").unlink()
    cache = Cache.open(str(copy), writable=True)
    cache._update(complete=False)
    result = run_cli("train", copy, "--out", tmp_path / "runs", "--layer", 1, "--device", "cpu")
    assert_one_line_error(result, "not complete (31/32 blocks)")


def test_resuming_against_a_cache_with_other_provenance_is_refused(sisters, tmp_path):
    out, (fixed, _) = sisters
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    record_path = copy / fixed.folder.dir.name / "run.json"
    record = json.loads(record_path.read_text())
    record["cache"]["dataset"] = "/elsewhere/other-text.txt"  # as if trained on another cache
    record_path.write_text(json.dumps(record))
    result = run_cli("train", fixed.cfg.cache, "--out", copy, "--layer", 1, "--expansion", 4,
                     "--tokens", 60000, "--snapshots", "20K", "--batch-size", 128, "--lr", "1e-3",
                     "--dead-window", 10000, "--mix-chunks", 4, "--device", "cpu", "--no-progress")
    assert_one_line_error(result, "cache.dataset is '/elsewhere/other-text.txt' there")
