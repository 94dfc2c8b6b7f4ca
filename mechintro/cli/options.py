"""Command-line flags derived from frozen dataclass configs, so that a setting, its default and its help are
written once: in the config's field and the docstring under it.

* :func:`field_docs` reads the docstring written under each field.
* :func:`add_config_arguments` adds one flag per field: ``--n-trials`` for ``n_trials``; a bool that defaults
  to False is a switch, one that defaults to True gets ``--no-...``; a ``Literal`` gets its choices; a tuple
  of ints, floats or strings is a comma list. A field's ``metadata`` may give ``cli=False`` (no flag),
  ``flag`` (its name), ``parse`` (the argparse type) and ``metavar``.
* :func:`config_from_args` builds the config back from the parsed namespace, so the config's own checks run
  on what the user typed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any

__all__ = ["add_config_arguments", "config_from_args", "dest_of", "field_docs", "flag_of"]


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
    """The namespace attribute a field's flag writes."""
    return prefix + field.name


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _comma_list(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        words = [w.strip() for w in text.split(",") if w.strip()]
        if not words:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return tuple(cast(w) for w in words)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    parse.__name__ = f"{cast.__name__} list"
    return parse


def _argument(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type ``hint`` (Optional already removed)."""
    meta = field.metadata
    if "parse" in meta:
        return {"type": meta["parse"]}
    if hint is bool:
        return {"action": "store_false" if field.default is True else "store_true"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (tuple, list) or hint in (tuple, list):
        item = next((a for a in args if a is not Ellipsis), str)
        return {"type": _comma_list(item)}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no flag can be derived for field {field.name!r} of type {hint!r}: give metadata parse=")


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
        text = docs.get(field.name, "")
        kwargs["default"] = default
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


def config_from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **overrides: Any) -> Any:
    """The config ``cls`` built from the fields' flags in ``args`` (fields without a flag in ``args`` keep
    their defaults); ``overrides`` set fields the command line does not carry."""
    values = {}
    for field in dataclasses.fields(cls):
        dest = dest_of(field, prefix)
        if hasattr(args, dest):
            values[field.name] = getattr(args, dest)
    values.update(overrides)
    return cls(**values)
