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
    """The harvest, then one train command per group of runs trained alike."""
    cache = card.cache
    lines = [f"saecache harvest CACHE --model {card.model} --dataset {cache['dataset']} "
             f"--tokens {format_count(cache['token_budget'])} --ctx {cache['ctx']}"]
    groups: dict[str, list[ExportRun]] = {}
    for run in card.runs:
        key = json.dumps([run.spec.family, run.record.train], sort_keys=True)
        groups.setdefault(key, []).append(run)
    lines += [_train_command(runs) for runs in groups.values()]
    return ("## Reproducing\n\n```bash\n" + "\n".join(lines) + "\n```\n\n"
            f"Every setting is in each run's run.json; saecache {__version__}.")


def _train_command(runs: list[ExportRun]) -> str:
    """`saecache train` for runs of one family trained with the same settings."""
    spec, train = runs[0].spec, runs[0].record.train
    layers = " ".join(f"--layer {r.spec.layer}" for r in runs)
    snaps = ",".join(format_count(s) for s in train.get("snapshots", []))
    return " ".join([f"saecache train CACHE {layers} --arch {spec.arch} --expansion {spec.expansion}",
                     arch_of(spec.arch).option(spec), f"--tokens {format_count(train['tokens'])}",
                     f"--snapshots {snaps}" if snaps else "", *_other_options(train)]).replace("  ", " ")


_SHOWN = ("arch", "expansion", "tokens", "snapshots")  # written first, above


def _other_options(train: dict) -> list[str]:
    """Every other setting of run.json's train record that is not its default, as an option."""
    options = []
    for cls in (TrainConfig, ReaderConfig):
        for field in fields(cls):
            if field.name in _SHOWN or field.name not in train:
                continue
            value, default = train[field.name], default_of(field)
            if value != default:
                options.append(f"{flag_of(field)} {_value(field, value)}")
    return options


def _value(field, value) -> str:
    if rule_of(field).count and isinstance(value, int):
        return format_count(value)
    return repr(value) if isinstance(value, float) else str(value)
