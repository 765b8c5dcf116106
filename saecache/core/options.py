"""click options built from config fields, so that a default, its range and its help exist once.

    @config_options(TrainConfig, "tokens", "lr", ...)     # one option per named field
    def train(**values): cfg = build(TrainConfig, values)

A field's flag, type, default, range and help all come from the dataclass (core.settings):
an ``int``/``float`` with a range is a click.IntRange/FloatRange, ``choices`` a click.Choice,
a count accepts 300M, a ``bool`` is a flag, a ``tuple`` a repeatable option (or, with a
separator, one comma-separated value), a ``bool | None`` an on/off pair defaulting to None.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import click

from saecache.core.settings import default_of, field_docs, field_named, flag_of, rule_of
from saecache.core.units import format_count, parse_count


class Count(click.ParamType):
    """A token count: 300M, 1.5B, 100K or 300_000_000."""

    name = "count"

    def convert(self, value, param, ctx):
        try:
            return parse_count(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class Separated(click.ParamType):
    """Items of another type joined by a separator: ``50M,100M`` → (50_000_000, 100_000_000)."""

    def __init__(self, item: click.ParamType, separator: str):
        self.item, self.separator = item, separator
        self.name = f"{item.name}{separator}…"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [part for part in str(value).split(self.separator) if part.strip()]
        return tuple(self.item.convert(part.strip(), param, ctx) for part in parts)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(hint: Any) -> tuple[Any, bool]:
    """(item type, optional) of an annotation: ``int | None`` → (int, True), ``tuple[int, ...]`` → (tuple, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return hint, False


def _item_type(rule, hint) -> click.ParamType | type:
    """The click type of one value of a field."""
    if rule.count:
        return Count()
    if rule.choices is not None:
        return click.Choice(rule.choices)
    kind = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
    bounds = dict(min=rule.min, max=rule.max, min_open=rule.min_open, max_open=rule.max_open)
    if kind is int and (rule.min is not None or rule.max is not None):
        return click.IntRange(**bounds)
    if kind is float and (rule.min is not None or rule.max is not None):
        return click.FloatRange(**bounds)
    return kind if kind in (int, float, str) else str


def _default(rule, default: Any) -> tuple[Any, bool]:
    """(default as click gets it, whether --help shows it): a count as 300M, so it shows so."""
    if default is dataclasses.MISSING or default is None or rule.show is not None:
        return None, False
    if rule.count and isinstance(default, int):
        return format_count(default), True
    if isinstance(default, tuple):
        return (tuple(format_count(v) for v in default) if rule.count else default), bool(default)
    return default, True


def field_option(cls: type, name: str, prefix: str = "", **overrides: Any):
    """The click option of field ``name`` of ``cls``, its value passed as ``prefix + name``
    (``prefix`` is the nested config's field name and ``_``, as :func:`build` expects);
    ``overrides`` replace computed keywords."""
    field = field_named(cls, name)
    rule, (hint, optional) = rule_of(field), _base(_hints(cls)[name])
    required = default_of(field) is dataclasses.MISSING
    default, shown = _default(rule, None if field.default_factory is not dataclasses.MISSING
                              else default_of(field))
    help_text = field_docs(cls).get(name, "")
    if rule.show is not None:
        help_text += f" [default: {rule.show}]"
    kwargs: dict[str, Any] = {"help": help_text, "show_default": shown, "default": default,
                              "required": required}
    decls = [flag_of(field)]
    if hint is bool and optional:  # on/off, None: decided at run time
        decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
    elif hint is bool:
        kwargs.update(is_flag=True, default=bool(default), show_default=False)
    elif typing.get_origin(hint) is tuple and rule.separator is None:
        kwargs.update(multiple=True, type=_item_type(rule, hint))
    else:
        item = _item_type(rule, hint)
        kwargs["type"] = Separated(item, rule.separator) if rule.separator else item
    if rule.metavar is not None:
        kwargs["metavar"] = rule.metavar
    kwargs.update(overrides)
    return click.option(*decls, prefix + name, **kwargs)


def config_options(cls: type, *names: str, prefix: str = ""):
    """Decorator adding the options of fields ``names`` of ``cls``, in that order."""

    def decorate(fn):
        for name in reversed(names):
            fn = field_option(cls, name, prefix)(fn)
        return fn

    return decorate


def build(cls: type, values: dict[str, Any], **fixed: Any):
    """``cls`` from option values: a nested config field ``reader`` is built from the values
    named ``reader_*``; a None value (an option left out whose field has a factory) takes the
    field's default."""
    kwargs = dict(fixed)
    for field in dataclasses.fields(cls):
        if field.name in kwargs:
            continue
        hint = _hints(cls)[field.name]
        if dataclasses.is_dataclass(hint):
            head = field.name + "_"
            kwargs[field.name] = build(hint, {k[len(head):]: v for k, v in values.items()
                                              if k.startswith(head)})
        elif field.name in values and not (values[field.name] is None
                                           and field.default_factory is not dataclasses.MISSING):
            kwargs[field.name] = values[field.name]
    return cls(**kwargs)
