"""The `saecache` command line: parses options, builds a config, calls the stage. Nothing else."""

from __future__ import annotations

import json
import logging
import sys

import click

from saecache import __version__
from saecache.core.errors import SaecacheError
from saecache.core.units import parse_count


class Count(click.ParamType):
    """A token count: 300M, 1.5B, 100K or 300_000_000."""

    name = "count"

    def convert(self, value, param, ctx):
        try:
            return parse_count(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class OneLineErrors(click.Group):
    """Every user error ends as one line on stderr and a non-zero exit, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.ClickException as err:
            click.echo(f"saecache: error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except SaecacheError as err:
            click.echo(f"saecache: error: {err}", err=True)
            sys.exit(1)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("saecache: interrupted; re-run the same command to resume", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


def _storage_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--storage-option")
        options[key] = value
    return options


def _check_device(device: str) -> str:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise click.BadParameter(f"{device!r} is not a torch device", param_hint="--device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{device!r} asked for but CUDA is not available here; use --device cpu",
                                 param_hint="--device")
    return device


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


@cli.command()
@click.argument("cache")
@click.option("--model", default="EleutherAI/pythia-410m", show_default=True,
              help="Hugging Face model id or local folder.")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              show_default=True, help="dtype the model runs in; residuals are stored as float16.")
@click.option("--dataset", default=None, help="Hub dataset id (streamed) or a local .jsonl/.txt/"
              ".parquet file, folder or saved dataset. [default: monology/pile-uncopyrighted]")
@click.option("--dataset-config", default=None, help="Dataset configuration name.")
@click.option("--split", default="train", show_default=True, help="Dataset split.")
@click.option("--dataset-revision", default=None, help="Dataset revision on the Hub.")
@click.option("--text-field", default="text", show_default=True, help="Column holding the text.")
@click.option("--tokens", type=Count(), default="300M", show_default=True, help="Token budget.")
@click.option("--ctx", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Tokens per sequence.")
@click.option("--layers", default="all", show_default=True, help="Blocks to store: all, 0-23, 0,5,10.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward pass (keep it the same when resuming for identical bytes).")
@click.option("--device", default=None, help="torch device. [default: cuda if available, else cpu]")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Target rows per residual chunk (rounded down to whole sequences).")
@click.option("--compression", type=click.Choice(["none", "zstd"]), default="none", show_default=True,
              help="Compression before the crc32c checksum (fp16 residuals gain ~1.08×).")
@click.option("--writer-threads", type=click.IntRange(min=1), default=4, show_default=True,
              help="Threads encoding and writing chunks.")
@click.option("--buffers", type=click.IntRange(min=1), default=3, show_default=True,
              help="Host buffers in flight (memory = buffers × layers × rows/chunk × d × 2 bytes).")
@click.option("--allow-nonfinite", is_flag=True, help="Store and count non-finite residuals "
              "instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache at CACHE and start over.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@storage_option
def harvest(cache, dataset, dataset_config, split, dataset_revision, text_field, device,
            storage_option, **options):
    """Tokenise DATASET and write every chosen layer's residuals into CACHE.

    Re-running the same command resumes; a different model, dataset, ctx, layer set or
    token budget against an existing CACHE is refused.
    """
    from saecache.harvest.corpus import DEFAULT_DATASET, DatasetSpec
    from saecache.harvest.loop import HarvestConfig, default_device, harvest as run_harvest
    from saecache.core.units import format_count

    spec = DatasetSpec(dataset or DEFAULT_DATASET, dataset_config, split, dataset_revision, text_field)
    try:
        cfg = HarvestConfig(cache=cache, dataset=spec, device=_check_device(device or default_device()),
                            storage_options=_storage_options(storage_option), **options)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    result = run_harvest(cfg)
    rate = result.tokens_harvested / result.seconds if result.seconds else 0.0
    click.echo(f"harvested {format_count(result.tokens_harvested)} tokens × "
               f"{len(result.cache.layout.layers)} layers in {result.seconds:.1f} s "
               f"({rate:,.0f} tok/s, {result.bytes_written / max(result.seconds, 1e-9) / 1e6:,.0f} MB/s) "
               f"→ {cache}", err=True)


@cli.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@storage_option
def info(cache, as_json, storage_option):
    """Provenance, progress, bytes on disk and per-layer statistics of CACHE."""
    from saecache.storage.cache import Cache
    from saecache.storage.info import describe, format_info

    description = describe(Cache.open(cache, storage_options=_storage_options(storage_option)))
    click.echo(json.dumps(description, indent=2) if as_json else format_info(description))


@cli.command()
@click.argument("cache")
@click.option("--threads", type=click.IntRange(min=1), default=4, show_default=True,
              help="Chunks read in parallel.")
@storage_option
def verify(cache, threads, storage_option):
    """Read every chunk of CACHE, check its checksum and count non-finite values."""
    from saecache.storage.cache import Cache
    from saecache.storage.verify import verify as run_verify

    report = run_verify(Cache.open(cache, storage_options=_storage_options(storage_option)), threads)
    for problem in report.problems:
        click.echo(f"BAD {problem}", err=True)
    counts = ", ".join(f"layer {layer}: {n}" for layer, n in report.nonfinite.items() if n) or "none"
    click.echo(f"read {report.chunks_read} chunks ({report.bytes_read / 2**30:.3f} GiB); "
               f"non-finite values: {counts}")
    if not report.ok:
        raise SaecacheError(f"{len(report.problems)} bad chunk(s) in {cache}, first: {report.problems[0]}")
    click.echo("ok")


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(parse_count(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--snapshots") from None


@cli.command()
@click.argument("cache")
@click.option("--layer", "layers", type=click.IntRange(min=0), multiple=True, required=True,
              help="Layer to train (repeatable: layers train one after another in this process).")
@click.option("--out", default="runs", show_default=True, help="RUNS folder; one sub-folder per run.")
@click.option("--arch", type=click.Choice(["relu", "topk"]), default="relu", show_default=True,
              help="relu: L1 penalty weighted by decoder norms; topk: TopK with AuxK.")
@click.option("--expansion", type=click.IntRange(min=1), default=32, show_default=True, help="F = expansion × d.")
@click.option("--l1", multiple=True, default=("3e-4",), show_default=True,
              help="relu: one run per value: 3e-4 (fixed) or adaptive:150[:start] (target L0).")
@click.option("--k", multiple=True, type=click.IntRange(min=1), help="topk: one run per k.")
@click.option("--tokens", type=Count(), default="300M", show_default=True, help="Training tokens per run.")
@click.option("--snapshots", default=None, help="Token counts at which to save a snapshot; final is "
              "always saved. [default: those of 50M,100M,150M,200M,250M below --tokens]")
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Tokens per step.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Adam learning rate.")
@click.option("--lr-warmup", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Fraction of steps of learning-rate warm-up.")
@click.option("--lr-decay", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Fraction of steps, at the end, of linear decay to 0.")
@click.option("--l1-warmup", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Fraction of steps over which the L1 coefficient ramps up.")
@click.option("--grad-clip", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Gradient-norm clipping threshold.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the initialisation and batch order.")
@click.option("--device", default=None, help="torch device. [default: cuda if available, else cpu]")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="tf32", show_default=True,
              help="fp32, tf32 matmuls, or bf16 autocast.")
@click.option("--dead-window", type=Count(), default="10M", show_default=True,
              help="Tokens without firing after which a feature counts as dead.")
@click.option("--log-every", type=click.IntRange(min=1), default=100, show_default=True, help="Steps per metrics line.")
@click.option("--checkpoint-every", type=Count(), default="10M", show_default=True, help="Tokens between checkpoints.")
@click.option("--mix-chunks", type=click.IntRange(min=1), default=8, show_default=True,
              help="Chunks whose rows are shuffled together.")
@click.option("--reader-threads", type=click.IntRange(min=1), default=8, show_default=True, help="Chunk-reading threads.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@storage_option
def train(cache, layers, snapshots, device, storage_option, **options):
    """Train SAEs on --layer of CACHE; all runs of a layer share one read pass of the cache.

    Re-running the same command resumes from the last checkpoint; an existing run with other
    settings is refused.
    """
    from saecache.harvest.loop import default_device
    from saecache.train.loop import SNAPSHOTS, TrainConfig, train as run_train

    if snapshots is None:
        snapshots = tuple(s for s in SNAPSHOTS if s < options["tokens"])
    else:
        snapshots = _counts(snapshots)
    try:
        cfg = TrainConfig(cache=cache, layers=tuple(dict.fromkeys(layers)), snapshots=snapshots,
                          device=_check_device(device or default_device()),
                          storage_options=_storage_options(storage_option), **options)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    for run in run_train(cfg):
        click.echo(f"{run.paths.dir}: {run.summary()}")


@cli.command(name="eval")
@click.argument("runs")
@click.option("--model", default=None, help="Model to splice into. [default: the cache's model]")
@click.option("--cache", default=None, help="Cache with the held-out tokens. [default: from run.json]")
@click.option("--snapshot", default="final", show_default=True, help="final, all, or a name such as 50M.")
@click.option("--max-seqs", type=click.IntRange(min=1), default=None,
              help="Held-out sequences to use. [default: all]")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward.")
@click.option("--device", default=None, help="torch device. [default: cuda if available, else cpu]")
@storage_option
def eval_(runs, device, storage_option, **options):
    """CE loss recovered, KL, L0, MSE, FVU, dead/dense fractions of each run in RUNS,
    spliced into the model on the cache's held-out sequences; written to eval.json."""
    from saecache.evaluate.runs import EvalConfig, evaluate_runs
    from saecache.harvest.loop import default_device

    cfg = EvalConfig(runs=runs, device=_check_device(device or default_device()),
                     storage_options=_storage_options(storage_option), **options)
    for run, data in evaluate_runs(cfg).items():
        for name, r in data["snapshots"].items():
            click.echo(f"{run.name} {name}: CE loss recovered {r['ce_loss_recovered']:.3f} "
                       f"(clean {r['ce_clean']:.3f}, SAE {r['ce_spliced']:.3f}, zero {r['ce_zero']:.3f}), "
                       f"KL {r['kl']:.4f}, L0 {r['l0']:.1f}, FVU {r['fvu']:.4f}, "
                       f"dead {100 * r['dead_fraction']:.1f}%, dense {100 * r['dense_fraction']:.1f}%")


@cli.command()
@click.argument("runs")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the report.")
@click.option("--metric", type=click.Choice(["loss", "mse", "fvu"]), default="loss", show_default=True,
              help="Training curve the loss-floor fit uses (mse/fvu suit adaptive-L1 runs better).")
@click.option("--cutoff", type=click.FloatRange(0, 1, min_open=True), default=0.6, show_default=True,
              help="Fit the curve up to this fraction of tokens and predict the rest.")
@click.option("--skip", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Leave out this fraction of tokens at the start (warm-up).")
def report(runs, out, metric, cutoff, skip):
    """Plots (per-layer heatmap, curves for all layers, predicted vs measured loss floor), an
    index.html and a Markdown summary of the runs in RUNS."""
    from saecache.report.report import write_report

    click.echo(f"wrote {write_report(runs, out, metric=metric, cutoff=cutoff, skip=skip)}")


@cli.command()
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


@cli.command()
@click.option("--out", default="saecache-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the tiny model and the demo cache.")
@click.option("--device", default=None, help="torch device. [default: cuda if available, else cpu]")
def demo(out, device):
    """The whole pipeline offline, on a tiny built-in GPT-NeoX and a bundled text sample."""
    from saecache.demo.demo import run_demo
    from saecache.harvest.loop import default_device

    click.echo(run_demo(out, _check_device(device or default_device())))


def main() -> None:
    cli()
