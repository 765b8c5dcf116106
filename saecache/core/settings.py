"""Config dataclasses as the one source of every default, range and help text.

A stage's config is a dataclass whose fields each carry a one-line docstring (the help text,
read from the source as sparsify's simple_parsing does) and, through :func:`setting`, what
the value must be: a range, a token count, a fixed set of choices. :func:`validate` checks an
instance against that declaration and :mod:`saecache.cli` builds each click option from the
same field, so a default, its range and its help are written once.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import typing
from typing import Any

_META = "saecache"


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value must be (kept in the dataclass field's metadata)."""

    min: float | None = None
    """Smallest allowed value (None: no bound)."""
    max: float | None = None
    """Largest allowed value (None: no bound)."""
    min_open: bool = False
    """The minimum itself is not allowed."""
    max_open: bool = False
    """The maximum itself is not allowed."""
    count: bool = False
    """A token count, written 300M, 1.5B, 100K or 300_000_000 on the command line."""
    choices: tuple[str, ...] | None = None
    """The values allowed (a click.Choice on the command line)."""
    separator: str | None = None
    """A tuple given as one option, its items joined by this (--snapshots 50M,100M)."""
    result: bool = True
    """Whether the value changes what a run computes (False: where or how fast it runs)."""
    flag: str | None = None
    """Option name when it is not --field-name."""
    show: str | None = None
    """Default as the help shows it (e.g. 300M), when not the value itself."""
    metavar: str | None = None
    """What the help calls the value, when not its type (TEXT, INTEGER)."""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` breaks this rule (None: it does not); every number must be finite."""
        if self.choices is not None:
            return None if value in self.choices else f"is {value!r}: use one of {', '.join(self.choices)}"
        if (self.min is None and self.max is None) or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number, not {value!r}"
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)):
            return f"must be {'above' if self.min_open else 'at least'} {self.min:g}, not {value!r}"
        if self.max is not None and (value > self.max or (self.max_open and value == self.max)):
            return f"must be {'below' if self.max_open else 'at most'} {self.max:g}, not {value!r}"
        return None


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            **rule: Any) -> Any:
    """A dataclass field with a :class:`Rule` (``min=1``, ``count=True``, ``choices=(…)``…)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={_META: Rule(**rule)})


def rule_of(field: dataclasses.Field) -> Rule:
    """The field's rule (an empty one for a plain field)."""
    return field.metadata.get(_META, Rule())


def flag_of(field: dataclasses.Field) -> str:
    """``--chunk-rows`` for the field ``chunk_rows``."""
    return rule_of(field).flag or "--" + field.name.replace("_", "-")


def validate(config: Any) -> None:
    """Raise ValueError naming the option and the value of the first field that breaks its rule."""
    whole = _integer_fields(type(config))
    for field in dataclasses.fields(config):
        values = getattr(config, field.name)
        for value in values if isinstance(values, tuple) else (values,):
            problem = rule_of(field).problem(value)
            if problem is None and field.name in whole and isinstance(value, float):
                problem = f"must be a whole number, not {value!r}"
            if problem:
                raise ValueError(f"{flag_of(field)} {problem}")


@functools.cache
def _integer_fields(cls: type) -> frozenset[str]:
    """Fields annotated int, int | None or tuple[int, ...]."""
    hints = typing.get_type_hints(cls)
    return frozenset(name for name, hint in hints.items()
                     if hint is int or int in typing.get_args(hint) and str not in typing.get_args(hint))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → the docstring written under it in the class body (and its bases')."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source: a class made at run time
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_named(cls: type, name: str) -> dataclasses.Field:
    """The dataclass field ``name`` of ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def default_of(field: dataclasses.Field) -> Any:
    """The field's default value (calling its factory); MISSING when it has none."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def result_fields(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that change what it computes (its identity), by name."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if rule_of(f).result and not dataclasses.is_dataclass(getattr(config, f.name))}
