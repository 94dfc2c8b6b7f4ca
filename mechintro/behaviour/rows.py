"""The trials table's columns and the checks every value passes before it is written (used by store.py).

A value is checked against its column's kind and turned into what sqlite3 binds: numpy scalars become
Python ones, booleans 0/1, a missing value (None, pandas NA, NaN in a nullable column) NULL. A value of the
wrong kind raises :class:`ValueError` naming the column, the valid values and the value given; the store
adds the file and the row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from mechintro.core.settings import CONDITIONS

KEY_COLUMNS: tuple[str, ...] = (
    "model",
    "concept",
    "trial",
    "sample",
    "condition",
    "layer",
    "strength",
    "variant",
    "persona",
    "seed",
    "judge",
    "max_new_tokens",
    "temperature",
)
"""The columns that identify a trial (the table's primary key), in the order of key tuples."""

COLUMNS: dict[str, str] = {
    "model": "TEXT",
    "concept": "TEXT",
    "trial": "INTEGER",
    "sample": "INTEGER",
    "condition": "TEXT",
    "layer": "INTEGER",
    "strength": "REAL",
    "variant": "TEXT",
    "persona": "TEXT",
    "seed": "INTEGER",
    "judge": "TEXT",
    "max_new_tokens": "INTEGER",
    "temperature": "REAL",
    "response": "TEXT",
    "n_new_tokens": "INTEGER",
    "detected": "INTEGER",
    "identified": "INTEGER",
    "forced_identified": "INTEGER",
    "judge_error": "TEXT",
    "created_at": "TEXT",
}
"""Every column of the ``trials`` table and its SQLite type, in table order."""

BOOL_COLUMNS = ("detected", "identified", "forced_identified")
"""Verdict columns: True / False / None, stored as 0 / 1 / NULL."""

VERDICT_COLUMNS = (*BOOL_COLUMNS, "judge_error")
"""What a judge decides about a stored response (what ``replace_verdicts`` may change)."""

_KIND: dict[str, str] = {
    "model": "name",
    "concept": "name",
    "trial": "count",
    "sample": "count",
    "condition": "condition",
    "layer": "count",
    "strength": "number",
    "variant": "name",
    "persona": "name",
    "seed": "count",
    "judge": "name",
    "max_new_tokens": "count",
    "temperature": "non-negative number",
    "response": "text",
    "n_new_tokens": "count",
    "detected": "bool",
    "identified": "bool",
    "forced_identified": "bool",
    "judge_error": "error",
    "created_at": "time",
}

_EXPECTED = {
    "name": "a non-empty string",
    "condition": f"one of {list(CONDITIONS)}",
    "count": "an int >= 0",
    "number": "a finite number",
    "non-negative number": "a finite number >= 0",
    "text": "a string or None",
    "bool": "True, False or None",
    "error": "a message string or None",
    "time": "an ISO 8601 time string or None",
}


def is_missing(value: Any, *, nan: bool = True) -> bool:
    """None or pandas NA (and, with ``nan``, a float NaN): a NULL in the table."""
    if value is None or value is pd.NA:
        return True
    return nan and isinstance(value, (float, np.floating)) and math.isnan(value)


def missing_keys(row: Mapping[str, Any]) -> list[str]:
    """The key columns that ``row`` lacks or leaves None / NA."""
    return [c for c in KEY_COLUMNS if is_missing(row.get(c), nan=False)]


def _bad(column: str, value: Any) -> ValueError:
    return ValueError(f"column {column!r} must be {_EXPECTED[_KIND[column]]}, got {value!r}")


def check_value(column: str, value: Any) -> Any:
    """``value`` as sqlite3 binds it for ``column``; ValueError naming the column if it does not fit."""
    kind = _KIND[column]
    if is_missing(value, nan=column not in KEY_COLUMNS):
        if column in KEY_COLUMNS:
            raise ValueError(f"key column {column!r} is missing; every row needs {list(KEY_COLUMNS)}")
        return None
    if kind in ("name", "text", "error", "time", "condition"):
        if not isinstance(value, str) or (kind == "name" and not value.strip()):
            raise _bad(column, value)
        if kind == "condition" and value not in CONDITIONS:
            raise _bad(column, value)
        if kind == "time":
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise _bad(column, value) from None
        value = str(value)
        return None if kind == "error" and not value.strip() else value  # a blank error is no error
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise _bad(column, value)
        return int(bool(value))
    if kind == "count":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise _bad(column, value)
        return int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _bad(column, value)
    value = float(value)
    if not math.isfinite(value) or (kind == "non-negative number" and value < 0):
        raise _bad(column, value)
    return value


def row_values(row: Mapping[str, Any], *, columns: tuple[str, ...], defaults: Mapping[str, Any]) -> tuple:
    """``row``'s checked values of ``columns``, in that order; a column left out takes its default."""
    if not isinstance(row, Mapping):
        raise ValueError(f"a trial row must be a mapping of column -> value, got {type(row).__name__}")
    unknown = sorted(set(row) - set(columns))
    if unknown:
        raise ValueError(f"unknown trial columns {unknown}; valid columns: {list(columns)}")
    missing = missing_keys(row)
    if missing:
        raise ValueError(f"trial row lacks key columns {missing}; every row needs {list(KEY_COLUMNS)}")
    return tuple(check_value(c, row[c] if c in row else defaults.get(c)) for c in columns)


def key_values(key: Any) -> tuple:
    """A key tuple (:data:`KEY_COLUMNS` order), checked, as the table stores it (so 4 and 4.0 match)."""
    key = tuple(key)
    if len(key) != len(KEY_COLUMNS):
        raise ValueError(f"a key has {len(key)} values; expected {len(KEY_COLUMNS)}: {KEY_COLUMNS}")
    return tuple(check_value(c, v) for c, v in zip(KEY_COLUMNS, key, strict=True))


def sql_value(value: Any) -> Any:
    """A value sqlite3 can bind, unchecked (``load`` filters): numpy scalars to Python, bools to 0/1, NA to
    NULL."""
    if is_missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return int(value) if isinstance(value, bool) else value
