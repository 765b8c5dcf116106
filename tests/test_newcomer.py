"""A newcomer's first hour (issue 12): paths that travel, messages that say what to do, a model
card whose commands reproduce the run, help in pipeline order.

One workspace is made as the README's user makes it: `saecache harvest` and `saecache train`
run in a folder with relative paths (w/model, w/cache.zarr, w/runs); the real processes then
run from other folders."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saecache.cli import PIPELINE, cli
from saecache.core.progress import Progress, format_rate
from saecache.core.units import format_count, format_tokens, parse_count
from saecache.demo.tiny import DEMO_TEXT
from saecache.storage.provenance import ancestors, resolve_model
from saecache.train.config import TrainConfig
from saecache.train.runfolder import RunFolder
from tests.test_cli import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
HARVEST = ["--model", "w/model", "--dataset", "w/text.txt", "--tokens", "1024", "--ctx", "32",
           "--chunk-rows", "128", "--dtype", "float32", "--layers", "1", "--device", "cpu",
           "--no-progress"]
# every option the issue names, away from its default
TRAIN = ["--layer", "1", "--expansion", "2", "--tokens", "768", "--batch-size", "32",
         "--mix-chunks", "2", "--log-every", "5", "--dead-window", "1K", "--seed", "7",
         "--snapshots", "256,512", "--lr", "1e-3", "--heldout-rows", "64", "--device", "cpu",
         "--no-progress", "--out", "w/runs"]
RUN = "layer01-relu-x2-l1-0.0003"


def saecache(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`saecache ARGS` in a real process started in ``cwd``, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}  # a Hub attempt fails
    return subprocess.run([sys.executable, "-m", "saecache", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model):
    """(folder, train output): harvest and train run inside ``folder`` with relative paths."""
    folder = tmp_path_factory.mktemp("newcomer")
    (folder / "w").mkdir()
    (folder / "w" / "model").symlink_to(tiny_model)
    shutil.copy(DEMO_TEXT, folder / "w" / "text.txt")
    before, warnings = Path.cwd(), logging.Handler(logging.WARNING)
    warnings.records = []
    warnings.emit = warnings.records.append
    logging.getLogger("saecache").addHandler(warnings)
    os.chdir(folder)
    try:
        harvested = invoke("harvest", "w/cache.zarr", *HARVEST)
        assert harvested.exit_code == 0, harvested.output
        trained = invoke("train", "w/cache.zarr", *TRAIN)
        assert trained.exit_code == 0, trained.output
    finally:
        os.chdir(before)
        logging.getLogger("saecache").removeHandler(warnings)
    return folder, trained.output + "".join(f"{r.getMessage()}\n" for r in warnings.records)


# ---- paths that travel ------------------------------------------------------------------------


def test_the_cache_and_run_json_record_absolute_paths(workspace):
    folder, _ = workspace
    record = json.loads((folder / "w" / "runs" / RUN / "run.json").read_text())
    assert record["cache_location"] == str(folder / "w" / "cache.zarr")
    assert record["cache"]["model"] == str(folder / "w" / "model")  # the symlink kept, absolute


def test_eval_from_another_folder_finds_the_model_and_cache_without_the_hub(workspace, tmp_path):
    folder, _ = workspace
    run = folder / "w" / "runs" / RUN
    first = invoke("eval", str(run), "--device", "cpu")  # final first: eval.json has it first
    assert first.exit_code == 0, first.output
    done = saecache("eval", str(run), "--snapshot", "all", "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "huggingface" not in done.stderr.lower()
    printed = [line.split()[1].rstrip(":") for line in done.stdout.splitlines()]
    in_order = [f"sae_layer01_{s}.pt" for s in ("256", "512", "final")]
    assert printed == in_order  # by tokens, final last
    assert list(json.loads((run / "eval.json").read_text())["snapshots"]) == in_order


def test_a_moved_cache_is_named_with_cache_and_checked(workspace, tmp_path, cache_path):
    folder, _ = workspace
    run = tmp_path / "runs" / RUN
    shutil.copytree(folder / "w" / "runs" / RUN, run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "cache_location": str(tmp_path / "gone.zarr")}))
    missing = invoke("eval", str(run), "--device", "cpu")
    assert_one_line_error(missing, "is not at", "gone.zarr", "pass --cache PATH")
    moved = invoke("eval", str(run), "--cache", str(folder / "w" / "cache.zarr"), "--device", "cpu")
    assert moved.exit_code == 0, moved.output
    other = invoke("eval", str(run), "--cache", str(cache_path), "--device", "cpu")
    assert_one_line_error(other, "is not the cache run", "pass the run's cache")


def test_relative_paths_of_earlier_versions_are_found_from_the_folders_above(tmp_path, monkeypatch):
    """saecache before 0.3 wrote paths relative to the working directory of the command:
    they are looked for under the folders holding the cache or run, nearest first."""
    (tmp_path / "demo" / "model").mkdir(parents=True)
    (tmp_path / "demo" / "cache.zarr").mkdir()
    run = tmp_path / "demo" / "runs" / RUN
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "demo" / "runs")  # somewhere else than where it was written
    cache = str(tmp_path / "demo" / "cache.zarr")
    assert resolve_model("demo/model", ancestors(cache)) == str(tmp_path / "demo" / "model")
    assert resolve_model("EleutherAI/pythia-70m", ancestors(cache)) == "EleutherAI/pythia-70m"
    from saecache.train.runfolder import RunRecord

    record = RunRecord.__new__(RunRecord)
    object.__setattr__(record, "cache_location", "demo/cache.zarr")
    assert RunFolder(run).recorded_cache(record) == cache
    object.__setattr__(record, "cache_location", "s3://bucket/cache.zarr")
    assert RunFolder(run).recorded_cache(record) == "s3://bucket/cache.zarr"


def test_a_cache_of_an_earlier_version_with_a_relative_model_resumes_from_elsewhere(
        tiny_model, tmp_path, monkeypatch):
    """A cache that recorded its model as ``w/model`` (relative, before 0.3) is the same
    cache to a harvest run from another folder with the model's absolute path: not refused."""
    import saecache.harvest.prepare as prepare
    from saecache.storage.cache import Cache

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model").symlink_to(tiny_model)
    shutil.copy(DEMO_TEXT, tmp_path / "w" / "text.txt")
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as old:
        old.setattr(prepare, "resolve_model", lambda model: model)  # as saecache 0.2 recorded it
        assert invoke("harvest", "w/cache.zarr", *HARVEST).exit_code == 0
    assert Cache.open("w/cache.zarr").provenance.model == "w/model"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = invoke("harvest", "../w/cache.zarr", *[a if a not in ("w/model", "w/text.txt") else
                                                   str(tmp_path / a) for a in HARVEST])
    assert again.exit_code == 0, again.output
    assert "is already complete" in again.output


# ---- the model card's commands reproduce the run ------------------------------------------------


def test_the_model_cards_commands_reproduce_the_weights_bit_for_bit(workspace, tmp_path):
    folder, _ = workspace
    exported = tmp_path / "export"
    result = invoke("export", str(folder / "w" / "runs" / RUN), "--format", "pt", "--out", str(exported))
    assert result.exit_code == 0, result.output
    card = (exported / "README.md").read_text()
    block = card.split("## Reproducing")[1].split("```bash\n")[1].split("```")[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split()[1] for c in commands] == ["harvest", "train"]
    for needed in ("--chunk-rows 128", "--dtype float32", "--batch-size 32", "--mix-chunks 2",
                   "--log-every 5", "--dead-window 1K", "--seed 7", "--heldout-rows 64"):
        assert needed in block, block
    here = ["--device", "cpu", "--no-progress"]
    script = " && ".join(
        shlex.join([sys.executable, "-m", "saecache", *[a if a != "CACHE" else "cache.zarr"
                                                        for a in shlex.split(c)[1:]], *here]
                   + (["--out", "runs"] if "train" in c.split()[1] else []))
        for c in commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for snapshot in sorted(exported.glob("sae_*.pt")):
        want = torch.load(snapshot, weights_only=True)
        got = torch.load(tmp_path / "runs" / RUN / snapshot.name, weights_only=True)
        assert want["cfg"] == got["cfg"]
        for key, tensor in want.items():
            if isinstance(tensor, torch.Tensor):
                assert tensor.dtype == got[key].dtype and torch.equal(tensor, got[key]), key
    lines = [{k: v for k, v in json.loads(line).items() if k not in _TIMING}
             for line in (tmp_path / "runs" / RUN / "metrics.jsonl").read_text().splitlines()]
    original = [{k: v for k, v in json.loads(line).items() if k not in _TIMING}
                for line in (folder / "w" / "runs" / RUN / "metrics.jsonl").read_text().splitlines()]
    assert lines == original  # the same lines: --log-every and --heldout-rows too


_TIMING = ("tokens_per_s", "data_wait_fraction", "bytes_read", "time")


# ---- messages -----------------------------------------------------------------------------------


def test_a_finished_train_says_already_trained(workspace, caplog):
    folder, first = workspace
    before = Path.cwd()
    os.chdir(folder)
    try:
        with caplog.at_level(logging.WARNING):
            again = invoke("train", "w/cache.zarr", *TRAIN)
    finally:
        os.chdir(before)
    assert "--checkpoint-every" not in caplog.text  # nothing trains: no warning about it
    assert again.exit_code == 0, again.output
    assert "already trained (768 tokens), nothing to do" in again.output
    assert "a larger --tokens and another --out" in again.output
    assert "already trained" not in first


def test_a_checkpoint_interval_longer_than_the_run_is_warned_at_start(workspace):
    _, first = workspace
    (warning,) = [line for line in first.splitlines() if "--checkpoint-every" in line]
    assert warning.startswith("warning: --checkpoint-every 10M is not less than --tokens 768")
    assert "pass a smaller --checkpoint-every" in warning
    short = TrainConfig(cache="c", layers=(1,), tokens=8192, checkpoint_every=4096)
    assert short.checkpoint_warning() is None


def test_reharvesting_a_complete_cache_says_what_to_do(workspace):
    folder, _ = workspace
    before = Path.cwd()
    os.chdir(folder)
    try:
        again = invoke("harvest", "w/cache.zarr", *HARVEST)
        other_chunks = invoke("harvest", "w/cache.zarr", *HARVEST, "--chunk-rows", "256")
    finally:
        os.chdir(before)
    assert again.exit_code == 0, again.output
    assert "is already complete (1,024 tokens × 1 layer): nothing to harvest" in again.output
    assert "harvested 0" not in again.output
    assert_one_line_error(other_chunks, "rows per chunk (--chunk-rows) is 128 in the cache "
                          "(4 sequences of ctx 32), not 256")


def test_info_on_a_runs_folder_says_what_to_run(workspace):
    folder, _ = workspace
    result = invoke("info", str(folder / "w" / "runs"))
    assert_one_line_error(result, "is a RUNS folder (1 run", "saecache report",
                          f"saecache info {folder / 'w' / 'cache.zarr'}")
    assert "choose a new or empty path" not in result.output


def test_token_counts_read_k_as_1000_and_ki_as_1024_and_print_unambiguously():
    assert parse_count("64K") == 64_000 and parse_count("64Ki") == 65_536
    assert parse_count("1.5Mi") == 1_572_864 and parse_count("65,536") == 65_536
    assert format_tokens(65_536) == "65,536" and format_tokens(64_000) == "64K"
    for n in (65_536, 64_000, 1234, 300_000_000):  # what is printed reads back as the same count
        assert parse_count(format_tokens(n)) == n and parse_count(format_count(n)) == n
    with pytest.raises(ValueError, match="Ki = 1,024"):
        parse_count("64KB")


def test_progress_rates_keep_their_digits_and_say_read_or_written():
    assert format_rate(0.3) == "0.30" and format_rate(45.63) == "45.6" and format_rate(12345) == "12,345"
    progress = Progress(100, "layer 1", enabled=False, moved="read")
    progress.update(10, 300_000)
    assert progress.rates().endswith("MB/s read")
    assert Progress(100, "harvest", enabled=False).rates().endswith("MB/s written")


def test_long_documents_are_tokenised_without_the_max_length_warning(tiny_model, caplog):
    from saecache.harvest.models import load_tokenizer
    from saecache.harvest.packing import tokenize_documents

    tokenizer = load_tokenizer(str(tiny_model))
    long = " ".join(["word"] * (tokenizer.model_max_length + 10))
    with caplog.at_level(logging.WARNING):
        ids = list(tokenize_documents(tokenizer, [long]))
    assert len(ids[0]) > tokenizer.model_max_length  # long indeed: packing cuts it to ctx
    assert "Token indices sequence length" not in caplog.text


# ---- help and the exported files ----------------------------------------------------------------


def test_help_lists_commands_in_pipeline_order_with_whole_summaries():
    text = invoke("--help").output
    rows = [line.split() for line in text.split("Commands:")[1].splitlines() if line.strip()]
    names = [row[0] for row in rows]
    assert names == [n for n in PIPELINE if n in cli.commands]
    assert set(cli.commands) <= set(PIPELINE)
    assert all(row[-1].endswith(".") and not row[-1].endswith("...") for row in rows), text


def test_harvest_help_names_the_dataset_as_an_option():
    text = invoke("harvest", "--help").output
    assert "--dataset ID|PATH" in text
    assert "Tokenise DATASET" not in text


def test_exported_safetensors_get_the_umasks_mode(workspace, tmp_path):
    folder, _ = workspace
    out = tmp_path / "saelens"
    result = invoke("export", str(folder / "w" / "runs" / RUN), "--format", "saelens", "--out", str(out))
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
