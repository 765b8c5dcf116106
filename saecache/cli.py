"""The `saecache` command line: parses options, builds a config, calls the stage. Nothing else.

Every option of a stage is built from its config dataclass (saecache.core.options): the
default, the range and the help text of `--tokens` exist once, in TrainConfig or HarvestConfig.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from typing import NoReturn

import click

from saecache import __version__
from saecache.core.atomic import write_failure
from saecache.core.devices import check_device
from saecache.core.errors import SaecacheError
from saecache.core.options import build, config_options
from saecache.evaluate.runs import EvalConfig
from saecache.harvest.config import HarvestConfig
from saecache.harvest.corpus import DatasetSpec
from saecache.harvest.importer import ImportConfig
from saecache.report.lossfloor import FitOptions
from saecache.storage.verify import VERIFY_THREADS
from saecache.train.config import ReaderConfig, TrainConfig


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that every ``finally`` (a harvest's
    BlockWriter.abort, the reader's close, a temporary file's removal) runs as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM handled like SIGINT while a command runs (main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


PIPELINE = ("demo", "harvest", "import", "info", "verify", "train", "eval", "report", "export")
"""The commands in the order they are used, as --help lists them."""


class OneLineErrors(click.Group):
    """Every user error ends as one line on stderr and a non-zero exit, never a traceback.

    Ctrl-C and SIGTERM end with the resume hint and the shell's exit codes, 130 and 143 (128 +
    the signal), after every cleanup has run. --help lists the commands in pipeline order."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in PIPELINE if n in names] + [n for n in names if n not in PIPELINE]

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            with _sigterm_as_interrupt():
                result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.ClickException as err:
            _fail(f"saecache: error: {err.format_message()}", err.exit_code)
        except SaecacheError as err:
            _fail(f"saecache: error: {err}", 1)
        except (click.exceptions.Abort, KeyboardInterrupt) as err:
            terminated = isinstance(err, Terminated) or isinstance(err.__context__, Terminated)
            _fail("saecache: interrupted; re-run the same command to resume",  # click makes Abort of it
                  128 + (signal.SIGTERM if terminated else signal.SIGINT))
        except OSError as err:  # the net behind the stages' own messages: a disk, not a bug
            failure = write_failure(err)
            if failure is None:
                raise
            _fail(f"saecache: error: {failure}", 1)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(line: str, code: int) -> NoReturn:
    """Print the one line and exit with ``code``, once zarr's reads still in flight have
    finished (a refused chunk leaves its siblings running: storage.location.settle)."""
    from saecache.storage.location import settle

    click.echo(line, err=True)
    settle()
    sys.exit(code)


def _storage_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--storage-option")
        options[key] = value
    return options


def _device(device: str | None) -> str:
    try:
        return check_device(device)
    except SaecacheError as err:  # shown as click shows a bad option value
        raise click.BadParameter(str(err).removeprefix("--device "), param_hint="--device") from None


def _config(cls: type, values: dict, **fixed):
    """``cls`` from the options; a ValueError of its checks is a usage error."""
    if "device" in values:
        values["device"] = _device(values["device"])
    if "storage_option" in values:
        fixed["storage_options"] = _storage_options(values.pop("storage_option"))
    try:
        return build(cls, values, **fixed)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


storage_option = click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
                              help="fsspec option for a URL CACHE (repeatable), e.g. endpoint_url=…")


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="saecache")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage is doing.")
def cli(verbose: bool):
    """Harvest a language model's residual streams once into a verified Zarr v3 cache, then
    train, evaluate, report and export sparse autoencoders from it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="saecache: %(message)s")



@cli.command(short_help="Run a model once and cache its residual streams.")
@click.argument("cache")
@config_options(HarvestConfig, "model", "revision", "dtype")
@config_options(DatasetSpec, "id", "config", "split", "revision", "text_field", prefix="dataset_")
@config_options(HarvestConfig, "tokens", "ctx", "layers", "batch_size", "device", "chunk_rows",
                "compression", "writer_threads", "buffers", "allow_nonfinite", "overwrite",
                "no_space_check", "progress")
@storage_option
def harvest(cache, **values):
    """Tokenise the documents of --dataset and write every chosen layer's residuals into CACHE.

    Re-running the same command resumes; a different model, dataset, ctx, layer set or
    token budget against an existing CACHE is refused.
    """
    from saecache.core.progress import format_rate
    from saecache.core.units import format_tokens
    from saecache.harvest.loop import harvest as run_harvest

    cfg = _config(HarvestConfig, values, cache=cache)
    result = run_harvest(cfg)
    n = len(result.cache.layout.layers)
    layers = f"{n} layer{'s' * (n != 1)}"
    if result.was_complete:
        click.echo(f"cache at {cache} is already complete ({format_tokens(result.cache.layout.n_tokens)} "
                   f"tokens × {layers}): nothing to harvest; train from it with saecache "
                   f"train {cache}, or give another CACHE (or --overwrite) to harvest again", err=True)
        return
    seconds = max(result.seconds, 1e-9)
    click.echo(f"harvested {format_tokens(result.tokens_harvested)} tokens × {layers} in "
               f"{result.seconds:.1f} s ({format_rate(result.tokens_harvested / seconds)} tok/s, "
               f"{format_rate(result.bytes_written / seconds / 1e6)} MB/s written) → {cache}", err=True)


@cli.command(name="import", short_help="Write activations made elsewhere into a cache.")
@click.argument("activations", nargs=-1, metavar="[ACTIVATIONS]")
@click.argument("cache")
@config_options(ImportConfig, "ctx", "layer_files", "tokens_file", "chunk_rows", "compression",
                "writer_threads", "buffers", "overwrite", "no_space_check", "progress")
@storage_option
def import_(activations, cache, **values):
    """Write activations made elsewhere into CACHE, as harvest would.

    ACTIVATIONS is layer 0: a .npy or .safetensors file of (tokens, d) float16, bfloat16 or
    float32 values (FILE.safetensors:NAME picks one tensor of several); give several layers
    as --layer L=FILE instead. Row r is token r % ctx of sequence r // ctx. Re-running the same
    command resumes; other files against an existing CACHE are refused.
    """
    from saecache.core.progress import format_rate
    from saecache.core.units import format_tokens
    from saecache.harvest.importer import import_activations

    if len(activations) > 1:
        raise click.UsageError(f"got {len(activations)} ACTIVATIONS files: give one (layer 0), "
                               "or --layer L=FILE for each layer")
    cfg = _config(ImportConfig, values, cache=cache, activations=activations[0] if activations else None)
    result = import_activations(cfg)
    n = len(result.cache.layout.layers)
    layers = f"{n} layer{'s' * (n != 1)}"
    if result.was_complete:
        click.echo(f"cache at {cache} is already complete ({format_tokens(result.cache.layout.n_tokens)} "
                   f"tokens × {layers}): nothing to import", err=True)
        return
    click.echo(f"imported {format_tokens(result.tokens_imported)} tokens × {layers} in "
               f"{result.seconds:.1f} s ({format_rate(result.bytes_written / max(result.seconds, 1e-9) / 1e6)} "
               f"MB/s written) → {cache}", err=True)


@cli.command(short_help="Show what a cache holds and how far its harvest got.")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@storage_option
def info(cache, as_json, storage_option):
    """Provenance, progress, bytes on disk and per-layer statistics of CACHE."""
    from saecache.storage.cache import Cache
    from saecache.storage.info import describe, format_info

    _refuse_runs(cache)
    description = describe(Cache.open(cache, storage_options=_storage_options(storage_option)))
    click.echo(json.dumps(description, indent=2) if as_json else format_info(description))


def _refuse_runs(path: str) -> None:
    """One line saying what to run when ``path`` is a run or RUNS folder, not a cache."""
    from pathlib import Path

    from saecache.train.runfolder import find_runs

    if "://" in path or not Path(path).is_dir() or (Path(path) / "zarr.json").exists():
        return
    try:
        runs = find_runs(path)
    except SaecacheError:
        return  # not runs either: Cache.open says what it is
    one = runs[0].dir == Path(path)
    what = "a run folder" if one else f"a RUNS folder ({len(runs)} run{'s' * (len(runs) != 1)})"
    where = runs[0].recorded_cache(runs[0].record())
    info = f", or saecache info {where} for {'its' if one else 'their'} cache" if where else ""
    raise SaecacheError(f"{path} is {what}, not a cache: see the runs with saecache report {path} "
                        f"--out REPORT{info}")


@cli.command(short_help="Check every chunk of a cache against its checksum.")
@click.argument("cache")
@click.option("--threads", type=click.IntRange(min=1), default=VERIFY_THREADS, show_default=True,
              help="Chunks read in parallel.")
@storage_option
def verify(cache, threads, storage_option):
    """Read every chunk of CACHE, check its checksum and count non-finite values."""
    from saecache.storage.cache import Cache
    from saecache.storage.location import location_of
    from saecache.storage.verify import verify as run_verify

    options = _storage_options(storage_option)
    _refuse_runs(cache)
    with location_of(cache, options).lock(exclusive=False):  # refused while a harvest writes
        report = run_verify(Cache.open(cache, storage_options=options), threads)
    for problem in report.problems:
        click.echo(f"BAD {problem}", err=True)
    counts = ", ".join(f"layer {layer}: {n}" for layer, n in report.nonfinite.items() if n) or "none"
    click.echo(f"read {report.chunks_read} chunks ({report.bytes_read / 2**30:.3f} GiB); "
               f"non-finite values: {counts}")
    if not report.ok:
        raise SaecacheError(f"{len(report.problems)} problem(s) in {cache}, first: {report.problems[0]}")
    click.echo("ok")


@cli.command(short_help="Train sparse autoencoders on layers of a cache.")
@click.argument("cache")
@config_options(TrainConfig, "layers", "out", "arch", "expansion", "l1", "k", "tokens", "snapshots")
@config_options(ReaderConfig, "batch_size", prefix="reader_")
@config_options(TrainConfig, "lr", "lr_warmup", "lr_decay", "l1_warmup", "l0_ramp", "grad_clip")
@config_options(ReaderConfig, "seed", prefix="reader_")
@config_options(TrainConfig, "device", "precision", "dead_window", "aux_k", "aux_coeff", "log_every",
                "checkpoint_every", "heldout_rows")
@config_options(ReaderConfig, "mix_chunks", "threads", prefix="reader_")
@config_options(TrainConfig, "progress")
@storage_option
def train(cache, **values):
    """Train SAEs on --layer of CACHE; all runs of a layer share one read pass of the cache.

    Re-running the same command resumes from the last checkpoint; an existing run with other
    settings is refused.
    """
    from saecache.core.units import format_tokens
    from saecache.train.loop import train as run_train

    cfg = _config(TrainConfig, values, cache=cache)
    for run in run_train(cfg):
        if run.start_step is not None and run.start_step >= cfg.steps:
            click.echo(f"{run.folder.dir}: already trained ({format_tokens(cfg.tokens)} tokens), nothing "
                       f"to do; {run.summary()}; to train longer, give a larger --tokens and another --out")
        else:
            click.echo(f"{run.folder.dir}: {run.summary()}")


@cli.command(name="eval", short_help="Splice SAEs into the model: CE loss recovered, KL, L0, FVU.")
@click.argument("runs")
@config_options(EvalConfig, "model", "cache", "snapshot", "max_seqs", "batch_size", "device")
@storage_option
def eval_(runs, **values):
    """CE loss recovered, KL, L0, MSE, FVU, dead/dense fractions of each run in RUNS,
    spliced into the model on the cache's held-out sequences; written to eval.json."""
    from saecache.evaluate.runs import evaluate_runs

    for run, data in evaluate_runs(_config(EvalConfig, values, runs=runs)).items():
        for name, r in data["snapshots"].items():
            click.echo(f"{run.name} {name}: CE loss recovered {r['ce_loss_recovered']:.3f} "
                       f"(clean {r['ce_clean']:.3f}, SAE {r['ce_spliced']:.3f}, zero {r['ce_zero']:.3f}), "
                       f"KL {r['kl']:.4f}, L0 {r['l0']:.1f}, FVU {r['fvu']:.4f}, "
                       f"dead {100 * r['dead_fraction']:.1f}%, dense {100 * r['dense_fraction']:.1f}%")


@cli.command(short_help="Plots and tables of the runs in a RUNS folder.")
@click.argument("runs")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the report.")
@config_options(FitOptions, "metric", "cutoff", "skip")
def report(runs, out, **values):
    """Plots (per-layer heatmap, curves for all layers, predicted vs measured loss floor), an
    index.html and a Markdown summary of the runs in RUNS."""
    from saecache.report.report import write_report

    fit = _config(FitOptions, values)
    click.echo(f"wrote {write_report(runs, out, metric=fit.metric, cutoff=fit.cutoff, skip=fit.skip)}")


@cli.command(short_help="Write runs as SAELens folders or .pt files, with a model card.")
@click.argument("runs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["saelens", "pt"]), required=True,
              help="saelens: cfg.json + sae_weights.safetensors per layer; pt: sae_layer{LL}_{SNAP}.pt files.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--snapshot", default=None,
              help="Snapshot to export, e.g. final or 50M. [default: saelens final, pt all]")
@click.option("--push", "repo_id", default=None, help="Upload the folder to this Hub repository.")
def export(runs, fmt, out, snapshot, repo_id):
    """Write RUN folders (one family, any layers) as SAELens folders or model-card .pt files,
    with a generated model card; --push uploads them to the Hugging Face Hub."""
    from saecache.export.export import export_pt, export_saelens, push

    if fmt == "pt":
        files = export_pt(runs, out, snapshot, repo_id)
    else:
        files = export_saelens(runs, out, snapshot or "final", repo_id)
    click.echo(f"wrote {len(files)} files to {out}")
    if repo_id:
        click.echo(f"pushed to {push(out, repo_id)}")


@cli.command(short_help="Run the whole pipeline offline on a tiny built-in model.")
@click.option("--out", default="saecache-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the tiny model and the demo cache.")
@click.option("--device", default=None, help="torch device. [default: cuda if available, else cpu]")
def demo(out, device):
    """The whole pipeline offline, on a tiny built-in GPT-NeoX and a bundled text sample."""
    from saecache.demo.demo import run_demo

    click.echo(run_demo(out, _device(device), say=lambda line: click.echo(line, err=True)))


def main() -> None:
    cli()
