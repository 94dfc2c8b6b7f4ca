"""Command-line flags derived from frozen dataclass configs, so that a setting, its default and its help are
written once: in the config's field and the docstring under it.

* :func:`field_docs` reads the docstring written under each field.
* :func:`add_config_arguments` adds one flag per field: ``--n-trials`` for ``n_trials``; a bool that defaults
  to False is a switch, one that defaults to True gets ``--no-...``; a ``Literal`` gets its choices; a float
  is a finite number; a tuple of ints, floats or strings is a comma list.
* A field's ``metadata`` may give ``cli=False`` (no flag), ``flag`` (its name), ``dest`` (the namespace
  attribute it writes), ``negate=True`` (a bool whose flag says the opposite: ``--quiet`` sets
  ``progress=False``), ``help`` (the flag's help, when the field's docstring does not read as one),
  ``parse`` (the argparse type: a callable, or the name of one in :data:`PARSERS`) and ``metavar``.
* :func:`config_from_args` builds the config back from the parsed namespace, so the config's own checks run
  on what the user typed.

The small argparse types the commands share (:func:`positive_int`, :func:`finite_float`, comma lists...)
live here too.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any

__all__ = [
    "PARSERS",
    "add_config_arguments",
    "config_from_args",
    "dest_of",
    "field_docs",
    "finite_float",
    "flag_of",
    "float_list",
    "int_list",
    "name_list",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "strength_arg",
]


# ----------------------------------------------------------------------------------------------- types


def _numbers(text: str, cast: type) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__}s, got {text!r}") from None
    if cast is float and not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated ints."""
    return _numbers(text, int)


def float_list(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers."""
    return _numbers(text, float)


def name_list(text: str) -> list[str]:
    """An argparse type: comma-separated names (blanks dropped)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused)."""
    return _numbers(text, float)[0] if text.strip() else float(text)


def strength_arg(text: str) -> float | str:
    """An argparse type: a finite number, or the name of an operating point (``default``, ``saturated``...)
    resolved once the model's spec is known (:meth:`mechintro.core.models.ModelSpec.resolve_strength`)."""
    try:
        return finite_float(text)
    except (argparse.ArgumentTypeError, ValueError):
        if text.replace("_", "").isalpha() and text.lower() not in ("nan", "inf", "infinity"):
            return text
        raise argparse.ArgumentTypeError(
            f"expected a finite number or an operating point name, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


PARSERS: Mapping[str, Callable[[str], Any]] = {
    "count": positive_int,
    "non_negative": non_negative_int,
    "finite": finite_float,
    "positive": positive_float,
    "strength": strength_arg,
}
"""Argparse types a config field names in its ``metadata["parse"]`` (so a config needs no CLI import)."""


# ----------------------------------------------------------------------------------------------- fields


@cache
def field_docs(cls: type) -> Mapping[str, str]:
    """Field name -> the docstring written under it in ``cls``'s body (and its bases'), joined to one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_of(field: dataclasses.Field) -> str:
    """The flag of a field: its ``metadata["flag"]``, else ``--`` and the name with dashes (``--no-`` for a
    bool that defaults to True)."""
    if "flag" in field.metadata:
        return field.metadata["flag"]
    name = field.name.replace("_", "-")
    is_bool = field.type in (bool, "bool")
    return f"--no-{name}" if is_bool and field.default is True else f"--{name}"


def dest_of(field: dataclasses.Field, prefix: str = "") -> str:
    """The namespace attribute a field's flag writes: its ``metadata["dest"]``, else its name."""
    return prefix + field.metadata.get("dest", field.name)


def _parser_of(field: dataclasses.Field) -> Callable[[str], Any]:
    parse = field.metadata["parse"]
    if isinstance(parse, str):
        if parse not in PARSERS:
            raise ValueError(f"field {field.name!r}: unknown parse {parse!r}; valid: {sorted(PARSERS)}")
        return PARSERS[parse]
    return parse


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _comma_list(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        words = [w.strip() for w in text.split(",") if w.strip()]
        if not words:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return tuple(cast(w) for w in words)
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    parse.__name__ = f"{'float' if cast is finite_float else cast.__name__} list"
    return parse


def _argument(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type ``hint`` (Optional already removed)."""
    meta = field.metadata
    if "parse" in meta:
        return {"type": _parser_of(field)}
    if hint is bool:
        stores = not field.default if meta.get("negate") else field.default
        return {"action": "store_false" if stores is True else "store_true"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (tuple, list) or hint in (tuple, list):
        item = next((a for a in args if a is not Ellipsis), str)
        return {"type": _comma_list(finite_float if item is float else item)}
    if hint is float:
        return {"type": finite_float}
    if hint in (int, str):
        return {"type": hint}
    raise TypeError(f"no flag can be derived for field {field.name!r} of type {hint!r}: give metadata parse=")


def _plain(text: str) -> str:
    """A field's docstring as plain help text: roles name their target (``~`` keeps its last part) and
    double backquotes are dropped."""
    text = re.sub(r":\w+:`(~?)([^`]+)`", lambda m: m[2].rsplit(".", 1)[-1] if m[1] else m[2], text)
    return text.replace("``", "")


def _default_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def _config_fields(cls: type, only: Iterable[str] | None, exclude: Iterable[str]) -> list[dataclasses.Field]:
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    names = {f.name for f in fields}
    for name in [*(only or ()), *exclude]:
        if name not in names:
            raise ValueError(f"{cls.__name__} has no field {name!r} with a flag; valid: {sorted(names)}")
    wanted = None if only is None else set(only)
    return [f for f in fields if f.name not in set(exclude) and (wanted is None or f.name in wanted)]


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    prefix: str = "",
) -> list[str]:
    """Add one flag per field of the dataclass ``cls`` (``only`` these, none of ``exclude``) and return the
    fields' names.

    ``defaults`` replaces a field's default on this command line; the help text is the field's docstring
    and the default. Values are parsed with the field's type; the config's own checks run when
    :func:`config_from_args` builds it.
    """
    hints = _hints(cls)
    docs = field_docs(cls)
    defaults = dict(defaults or {})
    added = []
    for field in _config_fields(cls, only, exclude):
        hint = hints[field.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(inner) == 1:
            hint = inner[0]
        default = defaults.get(field.name, _field_default(field))
        kwargs = _argument(field, hint)
        text = _plain(field.metadata.get("help", docs.get(field.name, "")))
        kwargs["default"] = not default if field.metadata.get("negate") else default
        if "action" not in kwargs:
            if "metavar" in field.metadata:
                kwargs["metavar"] = field.metadata["metavar"]
            text = f"{text} (default: {_default_text(default)})" if default is not None else text
        parser.add_argument(
            flag_of(field), dest=dest_of(field, prefix), help=text.replace("%", "%%"), **kwargs
        )
        added.append(field.name)
    return added


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def config_from_args(
    cls: type,
    args: argparse.Namespace,
    *,
    prefix: str = "",
    only: Iterable[str] | None = None,
    **overrides: Any,
) -> Any:
    """The config ``cls`` built from the fields' flags in ``args`` (fields without a flag in ``args`` keep
    their defaults; with ``only``, only those fields are read from ``args``); ``overrides`` set fields the
    command line does not carry."""
    values = {}
    wanted = None if only is None else set(only)
    for field in dataclasses.fields(cls):
        if wanted is not None and field.name not in wanted:
            continue
        dest = dest_of(field, prefix)
        if hasattr(args, dest):
            value = getattr(args, dest)
            values[field.name] = not value if field.metadata.get("negate") else value
    values.update(overrides)
    return cls(**values)
