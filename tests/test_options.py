"""Each default, range and help text is written once, in the config field: the command line's
options are built from them (saecache.core.options) and the configs check the same ranges."""

from __future__ import annotations

import dataclasses

import click
import pytest

from saecache.cli import cli
from saecache.core.options import build
from saecache.core.settings import default_of, field_docs, flag_of, rule_of
from saecache.core.units import format_count
from saecache.evaluate.runs import EvalConfig
from saecache.harvest.config import HarvestConfig
from saecache.harvest.corpus import DatasetSpec
from saecache.report.lossfloor import FitOptions
from saecache.train.config import ReaderConfig, TrainConfig

COMMANDS = {"harvest": (HarvestConfig, DatasetSpec), "train": (TrainConfig, ReaderConfig),
            "eval": (EvalConfig,), "report": (FitOptions,)}


def options_of(command: str) -> dict[str, click.Option]:
    return {p.opts[0]: p for p in cli.commands[command].params if isinstance(p, click.Option)}


def built_fields(command: str):
    """(config class, field, its option) for every option built from a field."""
    options = options_of(command)
    for cls in COMMANDS[command]:
        for field in dataclasses.fields(cls):
            nested = dataclasses.is_dataclass(default_of(field))  # built from its own fields
            if flag_of(field) in options and not nested:
                yield cls, field, options[flag_of(field)]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_options_take_default_and_help_from_the_field(command):
    found = list(built_fields(command))
    assert len(found) >= 3
    for cls, field, option in found:
        docs = field_docs(cls)[field.name]
        assert option.help.startswith(docs), (command, field.name)
        if field.default_factory is not dataclasses.MISSING or default_of(field) in (None, dataclasses.MISSING):
            assert option.default in (None, ()), field.name  # decided at run time, or required
            continue
        default, rule = default_of(field), rule_of(field)
        if rule.count and isinstance(default, int):
            assert option.default == format_count(default), field.name
        elif not isinstance(default, tuple) and not isinstance(default, bool):
            assert option.default == default, field.name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_option_ranges_are_the_fields_rules(command):
    for _, field, option in built_fields(command):
        rule = rule_of(field)
        if isinstance(option.type, (click.IntRange, click.FloatRange)):
            assert (option.type.min, option.type.max) == (rule.min, rule.max), field.name
            assert option.type.min_open == rule.min_open, field.name
        if rule.choices is not None:
            assert tuple(option.type.choices) == rule.choices, field.name


def test_build_nests_the_reader_and_leaves_factories_alone():
    cfg = build(TrainConfig, {"reader_batch_size": 128, "reader_threads": 2, "tokens": 4096,
                              "layers": (1,), "device": None, "lr": None}, cache="c")
    assert cfg.reader == ReaderConfig(batch_size=128, threads=2)
    assert cfg.device in ("cpu", "cuda") and cfg.lr is None
    assert cfg.snapshots == ()  # the card's snapshots below --tokens: none below 4096


def test_a_config_with_its_own_defaults_is_valid():
    cfg = TrainConfig(cache="c", layers=(0,), tokens=10_000_000)
    assert cfg.snapshots == () and cfg.batch_size == 4096
    assert TrainConfig(cache="c", layers=(0,)).snapshots == (50_000_000, 100_000_000, 150_000_000,
                                                             200_000_000, 250_000_000)


@pytest.mark.parametrize("changes, flag", [({"lr": float("nan")}, "--lr"), ({"grad_clip": -1.0}, "--grad-clip"),
                                           ({"lr_warmup": float("inf")}, "--lr-warmup"),
                                           ({"expansion": 0}, "--expansion"), ({"tokens": 2.5}, "--tokens"),
                                           ({"arch": "gated"}, "--arch"), ({"l1": ("nan",)}, "--l1")])
def test_configs_refuse_what_the_options_would(changes, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(cache="c", layers=(0,), **changes)
