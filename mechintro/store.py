"""TrialStore: every trial in one SQLite table, written as it goes, safe to kill and resume.

One row per trial, keyed by the trial's full identity (:data:`KEY_COLUMNS`). ``write`` inserts a batch in
one transaction with ``INSERT OR IGNORE`` and commits, so a re-run never duplicates a trial and a killed
process loses at most the batch in flight. ``done_keys`` tells a runner which trials it can skip.
The database runs in WAL mode (readers, e.g. a notebook, do not block the writer).

Verdict columns (``detected``, ``identified``, ``forced_identified``) are stored as 0/1/NULL and loaded
as pandas nullable booleans.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["COLUMNS", "KEY_COLUMNS", "TrialStore"]

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
"""The columns that identify a trial (the table's primary key), in the order of ``done_keys`` tuples."""

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

_BOOL_COLUMNS = ("detected", "identified", "forced_identified")


def _schema(table: str, *, temp: bool = False, key_only: bool = False) -> str:
    """CREATE TABLE statement of the trials table (or of a key-only probe table)."""
    names = KEY_COLUMNS if key_only else tuple(COLUMNS)
    cols = ", ".join(f"{c} {COLUMNS[c]}" + (" NOT NULL" if c in KEY_COLUMNS else "") for c in names)
    prefix = "CREATE TEMP TABLE" if temp else "CREATE TABLE"
    return f"{prefix} IF NOT EXISTS {table} ({cols}, PRIMARY KEY ({', '.join(KEY_COLUMNS)}))"


def _sql_value(value: Any) -> Any:
    """A value sqlite3 can bind: numpy scalars to Python, bools to 0/1, NaN/NA to NULL."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class TrialStore:
    """A SQLite file of trials (stdlib sqlite3, WAL mode); use as a context manager or call ``close()``.

    ``TrialStore("runs/organism.sqlite")`` creates the file and the ``trials`` table if needed.
    """

    KEY_COLUMNS = KEY_COLUMNS

    def __init__(self, path: str | Path) -> None:
        """Open (or create) the store at ``path``."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode, commits survive a killed process
        self._conn.execute(_schema("trials"))
        self._conn.commit()
        self._check_schema()

    def _check_schema(self) -> None:
        """Refuse a ``trials`` table whose columns are not ours (an older or foreign file)."""
        found = [row[1] for row in self._conn.execute("PRAGMA table_info(trials)")]
        if found != list(COLUMNS):
            self.close()
            raise ValueError(f"{self.path}: table 'trials' has columns {found}, expected {list(COLUMNS)}")

    def write(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Insert a batch of trials in one transaction and commit; return how many were new.

        Each row needs every key column; other columns may be left out (NULL), except ``created_at``,
        which defaults to now (UTC, ISO 8601). Rows whose key already exists are ignored.
        """
        if not rows:
            return 0
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        values = [self._row_values(row, now) for row in rows]
        placeholders = ", ".join("?" * len(COLUMNS))
        sql = f"INSERT OR IGNORE INTO trials ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        with self._conn:  # one transaction: committed on success, rolled back on error
            before = self._conn.total_changes
            self._conn.executemany(sql, values)
            return self._conn.total_changes - before

    @staticmethod
    def _row_values(row: Mapping[str, Any], now: str) -> tuple[Any, ...]:
        """One row's values in table order; errors name missing key columns or unknown columns."""
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown trial columns {unknown}; valid columns: {list(COLUMNS)}")
        missing = [c for c in KEY_COLUMNS if _sql_value(row.get(c)) is None]
        if missing:
            raise ValueError(f"trial row lacks key columns {missing}; every row needs {list(KEY_COLUMNS)}")
        return tuple(_sql_value(row.get(c, now if c == "created_at" else None)) for c in COLUMNS)

    def done_keys(self, keys: Iterable[Sequence[Any]]) -> set[tuple]:
        """The subset of ``keys`` (tuples in :data:`KEY_COLUMNS` order) already in the store, as given."""
        wanted: dict[tuple, tuple] = {}
        for key in keys:
            key = tuple(key)
            if len(key) != len(KEY_COLUMNS):
                raise ValueError(f"a key has {len(key)} values; expected {len(KEY_COLUMNS)}: {KEY_COLUMNS}")
            wanted[tuple(_sql_value(v) for v in key)] = key
        if not wanted:
            return set()
        match = " AND ".join(f"p.{c} = t.{c}" for c in KEY_COLUMNS)
        with self._conn:
            self._conn.execute(_schema("_probe", temp=True, key_only=True))
            self._conn.execute("DELETE FROM _probe")
            self._conn.executemany(
                f"INSERT OR IGNORE INTO _probe VALUES ({', '.join('?' * len(KEY_COLUMNS))})", list(wanted)
            )
            found = self._conn.execute(
                f"SELECT {', '.join('p.' + c for c in KEY_COLUMNS)} FROM _probe p JOIN trials t ON {match}"
            ).fetchall()
            self._conn.execute("DELETE FROM _probe")
        return {wanted[row] for row in found if row in wanted}

    def load(self, **filters: Any) -> pd.DataFrame:
        """All trials (in insertion order) as a DataFrame, optionally filtered by column values.

        ``load(layer=3)`` keeps rows equal to 3; a list, tuple or set keeps rows in it
        (``load(condition=["injection", "control"])``); ``None`` keeps NULLs.
        """
        unknown = sorted(set(filters) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown filter columns {unknown}; valid columns: {list(COLUMNS)}")
        clauses, params = [], []
        for column, value in filters.items():
            clause, values = _filter(column, value)
            clauses.append(clause)
            params += values
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        cursor = self._conn.execute(f"SELECT {', '.join(COLUMNS)} FROM trials{where} ORDER BY rowid", params)
        df = pd.DataFrame(cursor.fetchall(), columns=list(COLUMNS), dtype=object)
        return _typed(df)

    def to_parquet(self, path: str | Path, **filters: Any) -> Path:
        """Write ``load(**filters)`` to a parquet file; return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.load(**filters).to_parquet(path, index=False)
        return path

    def __len__(self) -> int:
        """Number of trials stored."""
        return self._conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> TrialStore:
        """Use as ``with TrialStore(path) as store: ...``."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on leaving the block."""
        self.close()

    def __repr__(self) -> str:
        """Show the path."""
        return f"TrialStore({str(self.path)!r})"


def _filter(column: str, value: Any) -> tuple[str, list[Any]]:
    """SQL condition and parameters for one ``load`` filter."""
    if value is None:
        return f"{column} IS NULL", []
    if isinstance(value, (list, tuple, set, frozenset)):
        values = [_sql_value(v) for v in value]
        return f"{column} IN ({', '.join('?' * len(values))})" if values else "0", values
    return f"{column} = ?", [_sql_value(value)]


_INT_COLUMNS = [c for c, t in COLUMNS.items() if t == "INTEGER" and c in KEY_COLUMNS]
_NULLABLE_INT_COLUMNS = [
    c for c, t in COLUMNS.items() if t == "INTEGER" and c not in (*KEY_COLUMNS, *_BOOL_COLUMNS)
]
_FLOAT_COLUMNS = [c for c, t in COLUMNS.items() if t == "REAL"]
_TEXT_COLUMNS = [c for c, t in COLUMNS.items() if t == "TEXT"]


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed dtypes whatever the rows: int64 keys, nullable Int64 / boolean, float64, object strings."""
    return df.astype(
        {
            **dict.fromkeys(_INT_COLUMNS, "int64"),
            **dict.fromkeys(_NULLABLE_INT_COLUMNS, "Int64"),
            **dict.fromkeys(_FLOAT_COLUMNS, "float64"),
            **dict.fromkeys(_BOOL_COLUMNS, "boolean"),
            **dict.fromkeys(_TEXT_COLUMNS, "object"),
        }
    )
