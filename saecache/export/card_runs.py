"""The model card's sections about the runs: sister runs, held-out metrics, how to reproduce."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields
from typing import TYPE_CHECKING

from saecache import __version__
from saecache.core.settings import default_of, flag_of, rule_of
from saecache.core.units import format_count, format_layers
from saecache.export.runs import ExportRun, sister_families
from saecache.harvest.config import HarvestConfig
from saecache.harvest.corpus import DatasetSpec
from saecache.sae.archs import arch_of
from saecache.train.config import ReaderConfig, TrainConfig

if TYPE_CHECKING:  # types only: the card imports this module
    from saecache.export.card import ModelCard


def layers_text(layers: Iterable[int]) -> str:
    """0–3, 8 for [0, 1, 2, 3, 8]."""
    return format_layers(layers, dash="–", sep=", ")


def sister_runs(card: ModelCard) -> str:
    """Other families trained in the same RUNS folders (the reference card's table)."""
    families = sister_families(r.path.parent for r in card.runs)
    mine = {r.spec.family for r in card.runs}
    if not set(families) - mine:
        return ""
    rows = []
    for family, runs in sorted(families.items()):
        sparsity, target = arch_of(runs[0].spec.arch).table_cells(runs[0].spec)
        here = " (this repository)" if family in mine else ""
        rows.append(f"| {family}{here} | {sparsity} | {target} | "
                    f"{layers_text(r.spec.layer for r in runs)} |")
    return ("## Sister runs (same setup, different sparsity)\n\n"
            "| run | L1 coefficient or k | target | layers |\n| --- | --- | --- | --- |\n"
            + "\n".join(rows))


def metrics(card: ModelCard) -> str:
    """The held-out metrics of each run's last exported snapshot (CE loss recovered when any
    run was evaluated)."""
    rows, any_ce = [], False
    for run in card.runs:
        snap = card.snapshots[run][-1]
        m, ce = run.folder.heldout_line(snap) or {}, run.ce_loss_recovered(snap)
        any_ce |= ce is not None
        rows.append([f"{run.spec.layer}", run.spec.family, snap.label, _num(m.get("fvu"), ".4f"),
                     _num(m.get("l0"), ".1f"), _num(m.get("mse"), ".4g"),
                     _num(m.get("dead_fraction"), ".1%"), _num(ce, ".3f")])
    head = ["layer", "run", "snapshot", "FVU", "L0", "MSE", "dead"]
    head += ["CE loss recovered"] * any_ce
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row[:len(head)]) + " |" for row in rows]
    return ("## Held-out metrics\n\n"
            "Measured when each snapshot was saved, on the cache's last sequences (never "
            "trained on). FVU is the fraction of variance unexplained; MSE is on normalised "
            "activations (E‖x‖ = √d); dead is the fraction of features that never fired on "
            "them" + ("; CE loss recovered from eval.json" if any_ce else "") + ".\n\n"
            + "\n".join(lines))


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def reproducing(card: ModelCard) -> str:
    """The harvest, then one train command per group of runs trained alike: every recorded
    setting that is not its default, as the option that sets it (generated from the configs'
    fields, so a new option is never left out)."""
    groups: dict[str, list[ExportRun]] = {}
    for run in card.runs:
        key = json.dumps([run.spec.family, run.record.train, run.record.logging], sort_keys=True)
        groups.setdefault(key, []).append(run)
    lines = [_harvest_command(card)] + [_train_command(runs) for runs in groups.values()]
    notes = [f"`{flag}` was {value}, which has no option: set it in TrainConfig to reproduce"
             for runs in groups.values() for flag, value in _unreachable(runs[0].record.train)]
    return ("## Reproducing\n\n```bash\n" + "\n".join(lines) + "\n```\n\n"
            + "".join(f"{note}.\n\n" for note in dict.fromkeys(notes))
            + "Every setting is in each run's run.json; the harvest's --batch-size is not recorded "
            f"(on a GPU it can change the last bits of the activations); saecache {__version__}.")


def _harvest_command(card: ModelCard) -> str:
    """`saecache harvest` of the cache, from what the runs recorded of it (only the exported
    layers: each layer's residuals do not depend on the others)."""
    cache = card.cache
    harvest = {"model": card.model, "revision": cache["revision"], "dtype": cache["dtype"],
               "tokens": cache["token_budget"], "ctx": cache["ctx"],
               "layers": format_layers(r.spec.layer for r in card.runs),
               "chunk_rows": cache["seqs_per_block"] * cache["ctx"]}
    dataset = {"id": cache["dataset"], "config": cache["dataset_config"], "split": cache["split"],
               "revision": cache["dataset_revision"], "text_field": cache["text_field"]}
    options = (_options(HarvestConfig, {"model": card.model}, always=("model",))
               + _options(DatasetSpec, dataset, always=("id",))
               + _options(HarvestConfig, harvest, always=("tokens", "ctx"), skip=("model",)))
    return " ".join(["saecache harvest CACHE", *options])


def _train_command(runs: list[ExportRun]) -> str:
    """`saecache train` for runs of one family trained with the same settings."""
    spec, train = runs[0].spec, runs[0].record.train
    layers = " ".join(f"--layer {r.spec.layer}" for r in runs)
    recorded = {**train, **(runs[0].record.logging or {})}
    first = ("arch", "expansion")
    options = _options(TrainConfig, {k: recorded[k] for k in first}, always=first)
    options.append(arch_of(spec.arch).option(spec))
    options += _options(TrainConfig, recorded, always=("tokens",), skip=first)
    options += _options(ReaderConfig, recorded, skip=_NO_OPTION)
    return " ".join([f"saecache train CACHE {layers}", *options])


_NO_OPTION = ("holdout_fraction", "prefetch_groups")
"""ReaderConfig fields that `saecache train` has no option for."""


def _options(cls: type, recorded: dict, always: tuple[str, ...] = (),
             skip: tuple[str, ...] = ()) -> list[str]:
    """``--flag value`` for every field of ``cls`` in ``recorded`` whose value is not its
    default (or is in ``always``), in the order of the fields."""
    options = []
    for field in fields(cls):
        name = field.name
        if name not in recorded or name in skip:
            continue
        value = recorded[name]
        if value == []:  # no snapshots: no option says so (below 50M tokens the default saves none)
            continue
        if name in always or (value is not None and value != default_of(field)):
            options.append(_option(field, value))
    return options


def _option(field, value) -> str:
    rule = rule_of(field)
    if isinstance(value, list):  # --snapshots 16K,32K
        return f"{flag_of(field)} {rule.separator.join(format_count(v) for v in value)}"
    if rule.count and isinstance(value, int):
        return f"{flag_of(field)} {format_count(value)}"
    if isinstance(value, bool):
        return flag_of(field)
    return f"{flag_of(field)} {repr(value) if isinstance(value, float) else value}"


def _unreachable(train: dict) -> list[tuple[str, object]]:
    """Recorded settings that differ from their default but that no option sets."""
    return [(field.name, train[field.name]) for field in fields(ReaderConfig)
            if field.name in _NO_OPTION and field.name in train
            and train[field.name] != default_of(field)]
