"""saecache export: .pt snapshots and SAELens folders, the model card, the Hub push, refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from saecache.core.errors import SaecacheError
from saecache.export.export import export_pt, export_saelens, push
from saecache.export.layout import CARD, transformer_lens_hook
from saecache.sae.model import SAE
from saecache.storage.cache import Cache
from saecache.train.config import ReaderConfig
from saecache.train.reader import read_heldout
from saecache.train.loop import TrainConfig, train
from tests.reference import load_saelens_folder

SNAPSHOT_NAME = re.compile(r"^sae_layer(\d{2})_(\d+[KMBT]?|final)\.pt$")  # the model card's pattern


# ---- fixtures: the demo's two sister runs (relu, layer 1) and one quick TopK run -------------


@pytest.fixture(scope="module")
def demo_dir(demo) -> Path:
    """The folder of the session's `saecache demo` run: its cache and two sister runs."""
    return demo[0]


@pytest.fixture(scope="module")
def fixed_run(demo_dir) -> Path:
    return demo_dir / "runs" / "layer01-relu-x4-l1-0.01"


@pytest.fixture(scope="module")
def adaptive_run(demo_dir) -> Path:
    return demo_dir / "runs" / "layer01-relu-x4-adaptive-l0-16"


@pytest.fixture(scope="module")
def topk_run(demo_dir) -> Path:
    (run,) = train(TrainConfig(cache=str(demo_dir / "cache.zarr"), out=str(demo_dir / "topk-runs"),
                               layers=(1,), arch="topk", k=(8,), expansion=4, tokens=4096,
                               snapshots=(), device="cpu", progress=False,
                               reader=ReaderConfig(batch_size=128, threads=2, mix_chunks=4)))
    return run.folder.dir


@pytest.fixture(scope="module")
def other_layers(demo_dir) -> list[Path]:
    """Short runs of the fixed-L1 family on layers 0 and 2 (snapshots 1024 and final)."""
    runs = train(TrainConfig(cache=str(demo_dir / "cache.zarr"), out=str(demo_dir / "more-runs"),
                             layers=(0, 2), expansion=4, l1=("1e-2",), tokens=2048,
                             snapshots=(1024,), device="cpu", progress=False,
                             reader=ReaderConfig(batch_size=128, threads=2, mix_chunks=4)))
    return [run.folder.dir for run in runs]


@pytest.fixture(scope="module")
def residuals(demo_dir) -> torch.Tensor:
    """(512, d) float32 raw held-out residuals of layer 1: what a snapshot takes."""
    cache = Cache.open(str(demo_dir / "cache.zarr"))
    return read_heldout(cache, 1, ReaderConfig(batch_size=128), 512).float()


def snapshot(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- SAELens' inference forward pass, re-implemented from its cfg.json fields ---------------


def saelens_forward(cfg: dict, state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature acts, reconstruction) as sae_lens StandardSAE / TopKSAE compute them (v6).

    process_sae_in: x - b_dec * apply_b_dec_to_input (no normalisation when "none");
    encode: act(sae_in @ W_enc + b_enc), act = ReLU (standard) or ReLU of the top k (topk,
    pre-activations scaled by ‖W_dec‖ first when rescale_acts_by_decoder_norm);
    decode: acts @ W_dec + b_dec (acts / ‖W_dec‖ first when rescaling).
    """
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    dtype = {"float32": torch.float32}[cfg["dtype"]]
    w = {k: v.to(dtype) for k, v in state.items()}
    sae_in = x.to(dtype) - w["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    norms = w["W_dec"].norm(dim=-1)  # (d_sae,)
    if cfg["architecture"] == "topk":
        if rescale:
            hidden_pre = hidden_pre * norms
        top = hidden_pre.topk(cfg["k"], dim=-1, sorted=False)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    else:
        assert cfg["architecture"] == "standard"
        acts = hidden_pre.relu()
    decoded = (acts / norms if cfg["architecture"] == "topk" and rescale else acts) @ w["W_dec"]
    return acts, decoded + w["b_dec"]


# ---- .pt export ------------------------------------------------------------------------------


def test_pt_export_copies_every_snapshot_under_the_card_naming(fixed_run, tmp_path):
    out = tmp_path / "pt"
    written = export_pt([fixed_run], out, repo_id="someone/demo-saes")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "sae_layer01_16K.pt", "sae_layer01_32K.pt",
                            "sae_layer01_final.pt"])
    assert [p.name for p in written] == ["sae_layer01_16K.pt", "sae_layer01_32K.pt",
                                         "sae_layer01_final.pt", CARD]
    for path in written[:-1]:
        assert SNAPSHOT_NAME.match(path.name)
        assert path.read_bytes() == (fixed_run / path.name).read_bytes()
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["cfg"]["layer"] == 1 and state["W_enc"].shape == (64, 256)
    card = (out / CARD).read_text()
    assert "`sae_layer{LL}_{SNAPSHOT}.pt`" in card
    assert 'repo_id="someone/demo-saes"' in card and 'filename="sae_layer01_final.pt"' in card


def test_pt_export_of_one_snapshot(fixed_run, tmp_path):
    written = export_pt([fixed_run], tmp_path / "pt", snapshot="32k")
    assert [p.name for p in written] == ["sae_layer01_32K.pt", CARD]


def test_pt_export_of_several_layers(fixed_run, other_layers, tmp_path):
    out = tmp_path / "pt"
    written = export_pt([other_layers[1], fixed_run, other_layers[0]], out)
    assert [p.name for p in written] == [
        "sae_layer00_1024.pt", "sae_layer00_final.pt", "sae_layer01_16K.pt", "sae_layer01_32K.pt",
        "sae_layer01_final.pt", "sae_layer02_1024.pt", "sae_layer02_final.pt", CARD]
    card = (out / CARD).read_text()
    assert card_files(card) == folder_files(out)
    for needle in ("| Layers covered | 0–2 (3 layers) |", "7 .pt checkpoints |",
                   "Where LL is the layer index (00, 01, 02)", "--layer 0 --layer 2 --arch relu",
                   "| 0 | relu-x4-l1-0.01 | final |", "| 2 | relu-x4-l1-0.01 | final |"):
        assert needle in card, needle


def test_two_families_of_one_layer_are_refused(fixed_run, adaptive_run, tmp_path):
    for export in (export_pt, export_saelens):
        with pytest.raises(SaecacheError) as err:
            export([fixed_run, adaptive_run], tmp_path / "out")
        assert_one_line(err, "both hold layer 1", "relu-x4-l1-0.01", "relu-x4-adaptive-l0-16")
    assert not (tmp_path / "out").exists()


# ---- SAELens export --------------------------------------------------------------------------


@pytest.mark.parametrize("run_fixture, architecture", [("fixed_run", "standard"),
                                                       ("topk_run", "topk")])
def test_saelens_folder_reconstructs_like_the_snapshot(run_fixture, architecture, request,
                                                       residuals, tmp_path):
    run = request.getfixturevalue(run_fixture)
    out = tmp_path / "saelens"
    export_saelens([run], out)
    folder = out / transformer_lens_hook(1)
    assert folder.name == "blocks.1.hook_resid_post"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg, state = load_saelens_folder(folder)
    assert sorted(state) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert state["W_enc"].shape == (64, 256) and state["W_dec"].shape == (256, 64)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == (architecture, 64, 256)
    assert cfg["normalize_activations"] == "none" and cfg["dtype"] == "float32"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["context_size"] == 64
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    if architecture == "topk":
        assert cfg["k"] == 8 and cfg["apply_b_dec_to_input"] is True
        assert cfg["rescale_acts_by_decoder_norm"] is False
    reference = SAE.from_snapshot(snapshot(run / "sae_layer01_final.pt"))(residuals)
    acts, x_hat = saelens_forward(cfg, state, residuals)
    torch.testing.assert_close(acts, reference.acts)
    torch.testing.assert_close(x_hat, reference.x_hat)
    assert (reference.acts != 0).any()  # the comparison is not between two zero tensors


@pytest.mark.parametrize("run_fixture", ["fixed_run", "topk_run"])
def test_sae_lens_itself_loads_the_folder(run_fixture, request, residuals, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    run = request.getfixturevalue(run_fixture)
    export_saelens([run], tmp_path / "saelens")
    with pytest.warns(UserWarning, match="model_from_pretrained_kwargs"):
        sae = sae_lens.SAE.load_from_disk(tmp_path / "saelens" / "blocks.1.hook_resid_post")
    reference = SAE.from_snapshot(snapshot(run / "sae_layer01_final.pt"))(residuals)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(residuals), reference.acts)
        torch.testing.assert_close(sae(residuals), reference.x_hat)


def test_saelens_export_of_an_earlier_snapshot(fixed_run, tmp_path):
    export_saelens([fixed_run], tmp_path / "s", snapshot="16K")
    cfg, state = load_saelens_folder(tmp_path / "s" / "blocks.1.hook_resid_post")
    assert cfg["metadata"]["saecache"]["snapshot"] == "sae_layer01_16K.pt"
    torch.testing.assert_close(state["W_enc"], snapshot(fixed_run / "sae_layer01_16K.pt")["W_enc"])


# ---- the model card --------------------------------------------------------------------------


def card_files(card: str) -> set[str]:
    """The files the card's "### Files" list names."""
    listing = card.split("### Files", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `([^`]+)`$", listing, flags=re.M))


def folder_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {CARD}


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.mark.parametrize("fmt", ["pt", "saelens"])
def test_card_names_every_file_and_only_those(fmt, fixed_run, tmp_path):
    out = tmp_path / fmt
    (export_pt if fmt == "pt" else export_saelens)([fixed_run], out)
    card = (out / CARD).read_text()
    assert card_files(card) == folder_files(out) != set()
    for name in re.findall(r"sae_layer\d{2}_\w+\.pt|blocks\.\d+\.hook_resid_post/[\w.]+", card):
        assert (out / name).exists() or (fmt == "saelens" and (out / name).parent.is_dir()), name
    meta = front_matter(card)
    assert {"sparse-autoencoder", "saecache"} <= set(meta["tags"])
    assert ("sae_lens" in meta["tags"]) == (fmt == "saelens")
    assert meta["library_name"] == ("saelens" if fmt == "saelens" else "saecache")
    assert "base_model" not in meta  # the demo model is a local folder, not a Hub id


def test_card_contents_metrics_and_sister_runs(fixed_run, tmp_path):
    export_pt([fixed_run], tmp_path / "pt")
    card = (tmp_path / "pt" / CARD).read_text()
    lines = [json.loads(l) for l in (fixed_run / "metrics.jsonl").read_text().splitlines()]
    (final,) = [m for m in lines if m["split"] == "heldout"
                and m["snapshot"] == "sae_layer01_final.pt"]
    assert f"| 1 | relu-x4-l1-0.01 | final | {final['fvu']:.4f} | {final['l0']:.1f} |" in card
    for needle in ("| L1 coefficient | 0.01 (fixed); λ_Anthropic 5.12 (SAELens-standard units) |", "4 → F = 256",
                   "| Hidden dim being modeled | 64 |", "3 — at 16K, 32K tokens, plus final",
                   "49,152", "3 .pt checkpoints (1 layer × 3 snapshots)",
                   "| relu-x4-adaptive-l0-16 | 5e-4 (adaptive) | L0 ≈ 16 | 1 |",
                   "relu-x4-l1-0.01 (this repository)", "weights_only=True",
                   "--l1 0.01 --tokens 49152 --snapshots 16K,32K"):
        assert needle in card, needle
    ce = json.loads((fixed_run / "eval.json").read_text())["snapshots"]["sae_layer01_final.pt"]
    assert f"| {ce['ce_loss_recovered']:.3f} |" in card  # the demo ran saecache eval


def test_card_takes_ce_loss_recovered_from_eval_json(fixed_run, tmp_path):
    run = tmp_path / "runs" / fixed_run.name
    shutil.copytree(fixed_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "eval.json").write_text(json.dumps(
        {"snapshots": {"sae_layer01_final.pt": {"ce_loss_recovered": 0.875}}}))
    export_saelens([run], tmp_path / "out", repo_id="someone/x")
    card = (tmp_path / "out" / CARD).read_text()
    assert "CE loss recovered" in card and "| 0.875 |" in card
    (run / "eval.json").unlink()
    export_saelens([run], tmp_path / "out")
    assert "CE loss recovered" not in (tmp_path / "out" / CARD).read_text()
    assert "Sister runs" not in card  # alone in its RUNS folder
    assert 'SAE.from_pretrained("someone/x", "blocks.1.hook_resid_post")' in card


def test_pythia_card_front_matter_names_the_hub_model(fixed_run, tmp_path):
    run = tmp_path / "runs" / fixed_run.name
    shutil.copytree(fixed_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    record = json.loads((run / "run.json").read_text())
    record["cache"].update(model="EleutherAI/pythia-410m", dataset="monology/pile-uncopyrighted")
    (run / "run.json").write_text(json.dumps(record))
    export_pt([run], tmp_path / "out")
    meta = front_matter((tmp_path / "out" / CARD).read_text())
    assert meta["base_model"] == "EleutherAI/pythia-410m"
    assert meta["datasets"] == ["monology/pile-uncopyrighted"]


# ---- re-export, push, refusals ---------------------------------------------------------------


def test_reexport_replaces_a_previous_export_but_never_foreign_files(fixed_run, topk_run, tmp_path):
    out = tmp_path / "out"
    export_pt([fixed_run], out)
    export_pt([topk_run], out, snapshot="final")  # a previous export: replaced as a whole
    assert folder_files(out) == {"sae_layer01_final.pt"}
    assert "k = 8" in (out / CARD).read_text()
    export_saelens([fixed_run], out)
    assert folder_files(out) == {"blocks.1.hook_resid_post/cfg.json",
                                 "blocks.1.hook_resid_post/sae_weights.safetensors"}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SaecacheError) as err:
        export_pt([fixed_run], out)
    assert_one_line(err, "not empty", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / CARD).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_push_without_network_is_one_line_and_keeps_the_folder(fixed_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    written = export_pt([fixed_run], out, repo_id="someone/demo-saes")
    with pytest.raises(SaecacheError) as err:
        push(out, "someone/demo-saes", token="hf_not_a_token")
    assert_one_line(err, "someone/demo-saes", str(out))
    assert all(p.is_file() for p in written)


def test_push_refuses_a_folder_that_is_not_an_export(fixed_run):
    with pytest.raises(SaecacheError) as err:
        push(fixed_run, "someone/x")
    assert_one_line(err, "not a saecache export")


def assert_one_line(err, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("case, needles", [
    ("empty folder", ["not a saecache run folder (no run.json)"]),
    ("missing", ["does not exist"]),
    ("runs parent", ["is a RUNS folder", "layer01-relu-x4-l1-0.01"]),
    ("no snapshots", ["has no snapshots: train it first"]),
    ("unknown snapshot", ["no snapshot '99K'", "16K, 32K, final"]),
    ("foreign out", ["is not empty and is not a saecache export", "data.csv"]),
    ("out is a file", ["is a file"]),
])
def test_bad_inputs_are_one_line_errors(case, needles, demo_dir, fixed_run, tmp_path):
    run, out, options = fixed_run, tmp_path / "out", {}
    if case == "empty folder":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "missing":
        run = tmp_path / "nowhere"
    elif case == "runs parent":
        run = demo_dir / "runs"
    elif case == "no snapshots":
        run = tmp_path / fixed_run.name
        run.mkdir()
        shutil.copy(fixed_run / "run.json", run)
    elif case == "unknown snapshot":
        options = {"snapshot": "99K"}
    elif case == "foreign out":
        out.mkdir()
        (out / "data.csv").write_text("1,2\n")
    elif case == "out is a file":
        out.write_text("x")
    for export in (export_pt, export_saelens):
        with pytest.raises(SaecacheError) as err:
            export([run], out, **options)
        assert_one_line(err, *needles)
    if case == "foreign out":
        assert (out / "data.csv").read_text() == "1,2\n"


def test_export_command_writes_the_folder_then_fails_to_push_offline(fixed_run, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from saecache.cli import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pt"
    result = CliRunner().invoke(cli, ["export", str(fixed_run), "--format", "pt", "--out", str(out),
                                      "--push", "someone/demo-saes"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines[0] == f"wrote 4 files to {out}"
    assert len(lines) == 2 and lines[1].startswith("saecache: error: ") and "someone/demo-saes" in lines[1]
    assert sorted(p.name for p in out.iterdir()) == [CARD, "sae_layer01_16K.pt", "sae_layer01_32K.pt",
                                                     "sae_layer01_final.pt"]
    result = CliRunner().invoke(cli, ["export", str(fixed_run), "--format", "saelens", "--out",
                                      str(tmp_path / "sl")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sl" / "blocks.1.hook_resid_post" / "cfg.json").exists()
