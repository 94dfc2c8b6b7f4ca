"""TrialStore: every trial in one SQLite table, written as it goes, safe to kill, resume, retry and share.

One row per trial, keyed by the trial's full identity (:data:`KEY_COLUMNS`, the table's primary key).

* **Written batch by batch.** ``write`` stores a batch in one transaction, so a killed process loses at most
  the batch in flight. A row whose key is stored already is ignored, unless the stored row carries a judge
  error: then the new row replaces it. A good row is never overwritten.
* **Checked before it is written.** Every value is checked against its column (a name, an int >= 0, a
  finite number, a known condition, True/False/None for verdicts...). One bad row rejects its whole batch
  with an error naming the file, the row and the column, so nothing malformed reaches the table.
* **Resume and retry.** ``done_keys`` tells a runner which trials it can skip. With ``retry_errors=True``
  (the default) a row with a judge error is not done, so a re-run judges it again. ``error_rows`` and
  ``replace_verdicts`` re-judge stored responses without generating them again.
* **Shared by several processes.** A runner ``claim``s a batch's keys before running it. A claim is a
  lease per trial key in a ``leases`` table, held by an owner id until an expiry, and taken in one
  ``BEGIN IMMEDIATE`` transaction, so two processes never both get a key. Writing the rows releases their
  leases. A live claimant renews its leases (``renew``, or the heartbeat of a
  :class:`~mechintro.behaviour.leases.ClaimQueue`); a crashed one's leases expire and another process takes
  them over. :class:`~mechintro.behaviour.leases.ClaimQueue` runs that loop over a run's batches.
  Leases assume the processes share one clock and a file system with working locks (one machine).
* **Read-only locations.** ``TrialStore(path, readonly=True)``, or a file that cannot be written, opens for
  reading only; anything that writes then raises :class:`PermissionError` naming the file. In a folder
  where SQLite cannot create its ``-shm`` file the store is read as immutable (exact as long as nobody
  writes it meanwhile); a store whose write-ahead log still holds commits is then refused, never read
  without them.

The database runs in WAL mode (readers, e.g. a notebook, do not block the writer). Verdict columns
(``detected``, ``identified``, ``forced_identified``) are stored as 0/1/NULL and loaded as pandas nullable
booleans. A file that is not a SQLite database, or whose ``trials`` table has other columns, types or
primary key, is refused at open with a :class:`StoreError` naming the file.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from mechintro.behaviour.rows import (
    BOOL_COLUMNS,
    COLUMNS,
    KEY_COLUMNS,
    VERDICT_COLUMNS,
    key_values,
    row_values,
    sql_value,
)

__all__ = [
    "COLUMNS",
    "KEY_COLUMNS",
    "VERDICT_COLUMNS",
    "Claim",
    "StoreError",
    "TrialStore",
    "check_seconds",
    "opened_store",
]


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`TrialStore.claim` for one batch of keys; true when some keys were granted."""

    keys: tuple[tuple, ...]
    """Keys now leased to ``owner`` (as given, in the order given): run these, then write their rows."""
    done: tuple[tuple, ...]
    """Keys already stored (without a judge error, when errors are retried): nothing to do."""
    busy: tuple[tuple, ...]
    """Keys leased to another owner whose lease has not expired: try again later."""
    owner: str
    """Who holds ``keys``."""
    expires: float
    """When the lease on ``keys`` lapses unless renewed (seconds since the epoch, ``time.time()``)."""
    index: int | None = None
    """Position of the batch in the list given to a :class:`~mechintro.behaviour.leases.ClaimQueue` (None
    for a direct claim)."""

    def __bool__(self) -> bool:
        return bool(self.keys)


class StoreError(ValueError):
    """A store file that cannot be used as it is (not SQLite, a foreign table), or a row it refuses."""


_TIMEOUT_S = 30.0
"""How long a statement waits for another process's write lock before failing."""
_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
"""sqlite error names that mean another connection holds the lock for now."""

_LEASE_COLUMNS = {"owner": "TEXT", "expires": "REAL", "claimed_at": "REAL"}
"""The ``leases`` table: the key columns, then these."""

_CANNOT_WRITE = {"SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"}
"""Error names (prefixes) that mean the file is there but this process may not write it."""


def _schema(table: str, extra: Mapping[str, str], *, temp: bool = False) -> str:
    """CREATE TABLE statement: the key columns (NOT NULL, the primary key) and then ``extra`` columns."""
    types = {c: COLUMNS[c] for c in KEY_COLUMNS} | dict(extra)
    cols = ", ".join(f"{c} {t}" + (" NOT NULL" if c in KEY_COLUMNS else "") for c, t in types.items())
    prefix = "CREATE TEMP TABLE" if temp else "CREATE TABLE"
    return f"{prefix} IF NOT EXISTS {table} ({cols}, PRIMARY KEY ({', '.join(KEY_COLUMNS)}))"


_TRIALS_SCHEMA = _schema("trials", {c: t for c, t in COLUMNS.items() if c not in KEY_COLUMNS})
_LEASES_SCHEMA = _schema("leases", {c: f"{t} NOT NULL" for c, t in _LEASE_COLUMNS.items()})
_PROBE_SCHEMA = _schema("_probe", {}, temp=True)
_LIST = ", ".join


def _is_error(table: str = "trials") -> str:
    """SQL: the row of ``table`` carries a judge error (a non-blank message, as in
    mechintro.behaviour.metrics)."""
    return f"({table}.judge_error IS NOT NULL AND trim({table}.judge_error, ' ' || char(9, 10, 13)) != '')"


def _match(a: str, b: str) -> str:
    return " AND ".join(f"{a}.{c} = {b}.{c}" for c in KEY_COLUMNS)


def _has_trials(conn: sqlite3.Connection) -> bool:
    """Whether the database has a ``trials`` table (the first read: a non-database fails here)."""
    return (
        conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trials'").fetchone()
        is not None
    )


def _errorname(error: sqlite3.Error) -> str:
    return getattr(error, "sqlite_errorname", "") or ""


def _new_owner() -> str:
    """A fresh owner id: host, process and a random suffix (two stores in one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _is_dead_here(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer exists (it crashed or was killed), so
    its leases need not wait for their expiry. Owners on other hosts, or still alive, are not dead."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


class TrialStore:
    """A SQLite file of trials (stdlib sqlite3, WAL mode); use as a context manager or call ``close()``.

    ``TrialStore("runs/organism.sqlite")`` creates the file and its tables if needed; ``":memory:"`` is a
    private in-memory store. ``readonly=True`` opens an existing file for reading only; a file (or folder)
    this process cannot write is opened that way too (``store.readonly`` says which happened).
    """

    KEY_COLUMNS = KEY_COLUMNS

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        """Open (or create) the store at ``path``."""
        self.path = Path(path)
        self.owner = _new_owner()
        """The owner id of this store's claims (one per TrialStore object)."""
        self.readonly = bool(readonly)
        """True when the store was opened for reading only."""
        self._why_readonly = "opened with readonly=True" if readonly else ""
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = self._open_readonly() if self.readonly else self._open()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------- opening

    @property
    def shared(self) -> bool:
        """Whether other processes can open this store (a file, not ``":memory:"``)."""
        return str(self.path) != ":memory:"

    def _connect(self, target: str | Path, **kw: Any) -> sqlite3.Connection:
        return sqlite3.connect(target, timeout=_TIMEOUT_S, isolation_level=None, **kw)

    def _open(self) -> sqlite3.Connection:
        """A read-write connection with both tables; falls back to read-only for an unwritable file."""
        existed = self.path.exists()
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder; a TrialStore is a SQLite file")
        if self.shared and not existed:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise PermissionError(
                    f"{self.path}: cannot create the store's folder: {e.strerror}"
                ) from None
        if existed and self.shared and not os.access(self.path, os.W_OK):
            self.readonly, self._why_readonly = True, "this process may not write the file"
            return self._open_readonly()
        deadline = time.monotonic() + _TIMEOUT_S
        while True:
            try:
                return self._open_writable()
            except sqlite3.DatabaseError as e:
                # Two processes creating one store at once: switching to WAL can answer SQLITE_BUSY at once,
                # without SQLite's busy handler, so the open is tried again until the store's timeout.
                if _errorname(e).startswith(_BUSY) and time.monotonic() < deadline:
                    time.sleep(0.02 + 0.05 * secrets.randbelow(100) / 100)
                    existed = self.path.exists()
                    continue
                if existed and _errorname(e).startswith(tuple(_CANNOT_WRITE)):
                    self.readonly, self._why_readonly = True, f"this process cannot write here: {e}"
                    return self._open_readonly()
                raise self._open_error(e, existed=existed) from None

    def _open_writable(self) -> sqlite3.Connection:
        """One try at a read-write connection in WAL mode with both tables (closed again on any error)."""
        conn = self._connect(self.path)
        try:
            if _has_trials(conn):  # a foreign file is refused before anything in it changes
                self._check_schema(conn)
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode, commits survive a killed process
            with _transaction(conn):
                conn.execute(_TRIALS_SCHEMA)
                conn.execute(_LEASES_SCHEMA)
            return conn
        except BaseException:
            conn.close()
            raise

    def _open_readonly(self) -> sqlite3.Connection:
        """A read-only connection; ``immutable`` where SQLite cannot make its shared-memory file here."""
        if not self.shared:
            raise StoreError("an in-memory store cannot be opened read-only: it would always be empty")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such store file (a read-only store must exist)")
        uri, conn = self.path.absolute().as_uri(), None
        try:
            conn = self._connect(f"{uri}?mode=ro", uri=True)
            return self._checked_readonly(conn)
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            if not _errorname(e).startswith(tuple(_CANNOT_WRITE)):
                raise self._open_error(e, existed=True) from None
            wal = Path(f"{self.path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise StoreError(
                    f"{self.path}: cannot be read here: its write-ahead log {wal.name} holds commits that "
                    f"SQLite can only read by creating {self.path.name}-shm, and this folder is not "
                    f"writable. Open the store once where it is writable (that folds the log in), or copy "
                    f"the folder."
                ) from None
        conn = self._connect(f"{uri}?mode=ro&immutable=1", uri=True)  # no log: the file is the whole store
        try:
            return self._checked_readonly(conn)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise self._open_error(e, existed=True) from None

    def _checked_readonly(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        """``conn`` if it reads a trials table of ours (sqlite3 errors propagate; StoreError closes it)."""
        try:
            if not _has_trials(conn):
                raise StoreError(f"{self.path}: has no 'trials' table; it is not a TrialStore")
            self._check_schema(conn)
        except StoreError:
            conn.close()
            raise
        return conn

    def _open_error(self, error: sqlite3.DatabaseError, *, existed: bool) -> Exception:
        name = _errorname(error)
        if name == "SQLITE_NOTADB":
            return StoreError(f"{self.path}: not a SQLite database ({error}); a TrialStore is a SQLite file")
        if not existed and name.startswith("SQLITE_CANTOPEN"):
            return PermissionError(f"{self.path}: cannot create the store here ({error})")
        return StoreError(f"{self.path}: cannot open the store ({name or type(error).__name__}: {error})")

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Refuse a ``trials`` table that is not ours: other columns, types or primary key."""
        info = conn.execute("PRAGMA table_info(trials)").fetchall()
        found = [row[1] for row in info]
        if found != list(COLUMNS):
            raise StoreError(f"{self.path}: table 'trials' has columns {found}, expected {list(COLUMNS)}")
        types = {row[1]: row[2].upper() for row in info if row[2].upper() != COLUMNS[row[1]]}
        if types:
            expected = {c: COLUMNS[c] for c in types}
            raise StoreError(f"{self.path}: table 'trials' has column types {types}, expected {expected}")
        key = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5] > 0]
        if key != list(KEY_COLUMNS):
            raise StoreError(
                f"{self.path}: table 'trials' has primary key {key or 'none'}, expected {list(KEY_COLUMNS)}; "
                f"without it the store would keep duplicate trials. Write its rows into a new TrialStore "
                f"(which drops duplicates) and use that."
            )

    # ------------------------------------------------------------------------------------------- writing

    def check_writable(self) -> None:
        """Raise :class:`PermissionError` naming the file when this store is read-only."""
        self._writable()

    def _writable(self) -> sqlite3.Connection:
        if self.readonly:
            raise PermissionError(f"{self.path}: the store is read-only ({self._why_readonly}); cannot write")
        return self._conn

    def _checked(self, rows: Sequence[Mapping[str, Any]], columns: tuple[str, ...]) -> list[tuple]:
        """Every row's checked values, or a StoreError naming the file, the row and the problem."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        values = []
        for i, row in enumerate(rows):
            try:
                values.append(row_values(row, columns=columns, defaults={"created_at": now}))
            except ValueError as e:
                raise StoreError(
                    f"{self.path}: row {i} of the batch: {e}; nothing of the batch was written"
                ) from None
        return values

    def write(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Store a batch of trials in one transaction; return how many rows were added or replaced.

        Each row needs every key column; other columns may be left out (NULL), except ``created_at``, which
        defaults to now (UTC, ISO 8601). A row whose key is stored already is ignored, unless the stored row
        carries a judge error: then the new row replaces it. Writing releases this store's leases on the
        rows' keys. Every value is checked first: one bad row raises a :class:`StoreError` (naming the row
        and column) and nothing of the batch is written.
        """
        conn = self._writable()
        if not rows:
            return 0
        values = self._checked(rows, tuple(COLUMNS))
        others = _LIST(f"{c} = excluded.{c}" for c in COLUMNS if c not in KEY_COLUMNS)
        sql = (
            f"INSERT INTO trials ({_LIST(COLUMNS)}) VALUES ({_LIST('?' * len(COLUMNS))}) "
            f"ON CONFLICT ({_LIST(KEY_COLUMNS)}) DO UPDATE SET {others} WHERE {_is_error()}"
        )
        with _transaction(conn):
            changed = conn.executemany(sql, values).rowcount
            self._drop_leases(conn, [v[: len(KEY_COLUMNS)] for v in values], owner=self.owner)
        return changed

    def replace_verdicts(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Replace the verdicts of stored rows that carry a judge error; return how many were replaced.

        Each row holds the key columns and the new verdict columns (:data:`VERDICT_COLUMNS`: ``detected``,
        ``identified``, ``forced_identified``, ``judge_error``; one left out becomes NULL), and optionally
        ``created_at`` (default now). The response is kept. A stored row without a judge error is never
        changed, nor is a key that is not stored. Releases this store's leases on the rows' keys.
        """
        conn = self._writable()
        if not rows:
            return 0
        columns = (*KEY_COLUMNS, *VERDICT_COLUMNS, "created_at")
        values = self._checked(rows, columns)
        n = len(KEY_COLUMNS)
        sets = _LIST(f"{c} = ?" for c in columns[n:])
        where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
        with _transaction(conn):
            changed = conn.executemany(
                f"UPDATE trials SET {sets} WHERE {where} AND {_is_error()}", [v[n:] + v[:n] for v in values]
            ).rowcount
            self._drop_leases(conn, [v[:n] for v in values], owner=self.owner)
        return changed

    # ------------------------------------------------------------------------------------------- reading

    def _probe(self, conn: sqlite3.Connection, keys: Iterable[Sequence[Any]]) -> dict[tuple, tuple]:
        """Fill the temporary ``_probe`` table with ``keys``; return {stored form: key as given}."""
        wanted: dict[tuple, tuple] = {}
        for i, key in enumerate(keys):
            try:
                wanted[key_values(key)] = tuple(key)
            except ValueError as e:
                raise StoreError(f"{self.path}: key {i}: {e}") from None
        conn.execute(_PROBE_SCHEMA)
        conn.execute("DELETE FROM _probe")
        conn.executemany(
            f"INSERT OR IGNORE INTO _probe VALUES ({_LIST('?' * len(KEY_COLUMNS))})", list(wanted)
        )
        return wanted

    def _probed(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> set[tuple]:
        """Stored-form keys of ``_probe`` rows selected by ``sql`` (``p`` is the probe table).

        Joins are written ``_probe p CROSS JOIN table``, which makes SQLite loop over the probed keys and
        look each up by primary key; left to itself it scans the whole trials table for every batch.
        """
        return set(conn.execute(f"SELECT {_LIST('p.' + c for c in KEY_COLUMNS)} {sql}", params).fetchall())

    def _done(self, conn: sqlite3.Connection, retry_errors: bool) -> set[tuple]:
        error = f" AND NOT {_is_error('t')}" if retry_errors else ""
        return self._probed(conn, f"FROM _probe p CROSS JOIN trials t ON {_match('p', 't')}{error}")

    def done_keys(self, keys: Iterable[Sequence[Any]], *, retry_errors: bool = True) -> set[tuple]:
        """The subset of ``keys`` (tuples in :data:`KEY_COLUMNS` order) that is done, as given.

        A key is done when its row is stored, and (with ``retry_errors``, the default) carries no judge
        error: an error row is to be judged again.
        """
        wanted = self._probe(self._conn, keys)
        if not wanted:
            return set()
        found = self._done(self._conn, retry_errors)
        self._conn.execute("DELETE FROM _probe")
        return {wanted[key] for key in found}

    def load(self, **filters: Any) -> pd.DataFrame:
        """All trials (in insertion order) as a DataFrame, optionally filtered by column values.

        ``load(layer=3)`` keeps rows equal to 3; a list, tuple or set keeps rows in it
        (``load(condition=["injection", "control"])``); ``None`` keeps NULLs.
        """
        return self._select(filters)

    def error_rows(self, **filters: Any) -> pd.DataFrame:
        """The trials that carry a judge error (``load``'s filters apply): what a re-judge works on."""
        return self._select(filters, where=_is_error())

    def count_errors(self, **filters: Any) -> int:
        """How many trials (``load``'s filters apply) carry a judge error."""
        clause, params = self._where(filters, where=_is_error())
        return self._conn.execute(f"SELECT COUNT(*) FROM trials{clause}", params).fetchone()[0]

    def _where(self, filters: Mapping[str, Any], *, where: str = "") -> tuple[str, list[Any]]:
        unknown = sorted(set(filters) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown filter columns {unknown}; valid columns: {list(COLUMNS)}")
        clauses, params = [where] if where else [], []
        for column, value in filters.items():
            clause, values = _filter(column, value)
            clauses.append(clause)
            params += values
        return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params

    def _select(self, filters: Mapping[str, Any], *, where: str = "") -> pd.DataFrame:
        clause, params = self._where(filters, where=where)
        cursor = self._conn.execute(f"SELECT {_LIST(COLUMNS)} FROM trials{clause} ORDER BY rowid", params)
        df = pd.DataFrame(cursor.fetchall(), columns=list(COLUMNS), dtype=object)
        try:
            return _typed(df)
        except (TypeError, ValueError) as e:  # only a file written by other code can get here
            raise StoreError(f"{self.path}: a stored value does not fit its column's type: {e}") from None

    def to_parquet(self, path: str | Path, **filters: Any) -> Path:
        """Write ``load(**filters)`` to a parquet file; return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.load(**filters).to_parquet(path, index=False)
        return path

    # ------------------------------------------------------------------------------------------- leases

    def claim(
        self,
        keys: Iterable[Sequence[Any]],
        *,
        ttl_s: float,
        owner: str | None = None,
        retry_errors: bool = True,
    ) -> Claim:
        """Lease the keys of one batch that are neither done nor leased by another live owner.

        In one ``BEGIN IMMEDIATE`` transaction: keys that are done (as :meth:`done_keys` with
        ``retry_errors``) go to ``claim.done``; keys leased to another owner until later than now go to
        ``claim.busy``; every other key is leased to ``owner`` (default: ``self.owner``) for ``ttl_s``
        seconds and goes to ``claim.keys``. An expired lease is taken over, and so is the lease of a process
        on this host that no longer exists (a re-run after a crash does not wait for the expiry). The claim is
        true when
        ``claim.keys`` is not empty: then run those trials and ``write`` their rows (which releases them),
        renewing the lease (:meth:`renew`) if the work may outlast ``ttl_s``.
        """
        conn = self._writable()
        owner = owner or self.owner
        ttl_s = check_seconds("ttl_s", ttl_s)
        with _transaction(conn):
            now = time.time()
            live = conn.execute("SELECT DISTINCT owner FROM leases WHERE expires > ?", (now,)).fetchall()
            dead = [(o,) for (o,) in live if o != owner and _is_dead_here(o)]
            conn.executemany("UPDATE leases SET expires = 0 WHERE owner = ?", dead)  # a crashed run's batches
            wanted = self._probe(conn, keys)
            done = self._done(conn, retry_errors)
            leased = f"FROM _probe p CROSS JOIN leases l ON {_match('p', 'l')}"
            busy = self._probed(conn, f"{leased} WHERE l.owner != ? AND l.expires > ?", (owner, now))
            granted = [k for k in wanted if k not in done and k not in busy]
            conn.execute("DELETE FROM leases WHERE expires <= ?", (now,))
            conn.executemany(
                f"INSERT OR REPLACE INTO leases ({_LIST((*KEY_COLUMNS, *_LEASE_COLUMNS))}) "
                f"VALUES ({_LIST('?' * (len(KEY_COLUMNS) + len(_LEASE_COLUMNS)))})",
                [(*k, owner, now + ttl_s, now) for k in granted],
            )
            conn.execute("DELETE FROM _probe")
        given, granted = list(wanted.items()), set(granted)
        return Claim(
            keys=tuple(key for k, key in given if k in granted),
            done=tuple(key for k, key in given if k in done),
            busy=tuple(key for k, key in given if k in busy),
            owner=owner,
            expires=now + ttl_s,
        )

    def renew(
        self, keys: Iterable[Sequence[Any]] | None = None, *, ttl_s: float, owner: str | None = None
    ) -> int:
        """Extend ``owner``'s leases (on ``keys``, default all) to now + ``ttl_s``; return how many.

        A lease that another owner has taken over after it expired is not renewed (it is no longer
        ``owner``'s), so a count below the number of keys held says the work is now someone else's.
        """
        conn = self._writable()
        owner, ttl_s = owner or self.owner, check_seconds("ttl_s", ttl_s)
        with _transaction(conn):
            if keys is None:
                sql, params = "UPDATE leases SET expires = ? WHERE owner = ?", (time.time() + ttl_s, owner)
                return conn.execute(sql, params).rowcount
            self._probe(conn, keys)
            renewed = conn.execute(
                f"UPDATE leases SET expires = ? WHERE owner = ? AND EXISTS "
                f"(SELECT 1 FROM _probe p WHERE {_match('p', 'leases')})",
                (time.time() + ttl_s, owner),
            ).rowcount
            conn.execute("DELETE FROM _probe")
            return renewed

    def release(self, keys: Iterable[Sequence[Any]] | None = None, *, owner: str | None = None) -> int:
        """Drop ``owner``'s leases (on ``keys``, default all), so others can claim them now; return how
        many."""
        conn = self._writable()
        owner = owner or self.owner
        with _transaction(conn):
            if keys is None:
                return conn.execute("DELETE FROM leases WHERE owner = ?", (owner,)).rowcount
            return self._drop_leases(conn, [key_values(k) for k in keys], owner=owner)

    @staticmethod
    def _drop_leases(conn: sqlite3.Connection, keys: list[tuple], *, owner: str) -> int:
        where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
        sql = f"DELETE FROM leases WHERE owner = ? AND {where}"
        return conn.executemany(sql, [(owner, *k) for k in keys]).rowcount

    def leases(self) -> pd.DataFrame:
        """The leases held now, live or expired: key columns, owner, expires, claimed_at (epoch seconds)."""
        names = [*KEY_COLUMNS, *_LEASE_COLUMNS]
        exists = self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'leases'").fetchone()
        rows = (
            self._conn.execute(f"SELECT {_LIST(names)} FROM leases ORDER BY rowid").fetchall()
            if exists
            else []
        )
        return pd.DataFrame(rows, columns=names)

    # ------------------------------------------------------------------------------------------- the rest

    def __len__(self) -> int:
        """Number of trials stored."""
        return self._conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> TrialStore:
        """Use as ``with TrialStore(path) as store: ...``."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on leaving the block."""
        self.close()

    def __repr__(self) -> str:
        """Show the path (and read-only)."""
        return f"TrialStore({str(self.path)!r}{', readonly=True' if self.readonly else ''})"


@contextmanager
def opened_store(store: TrialStore | str | Path | None) -> Iterator[TrialStore]:
    """The given store; a store opened (and closed) here for a path; an in-memory one for None."""
    if isinstance(store, TrialStore):
        yield store
        return
    opened = TrialStore(":memory:" if store is None else store)
    try:
        yield opened
    finally:
        opened.close()


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (take the write lock now, waiting for another writer) ... ``COMMIT``, or
    ``ROLLBACK`` on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def check_seconds(name: str, value: Any) -> float:
    """A lease length or poll interval: a positive, finite number of seconds.

    The one check here that :func:`mechintro.core.validate.positive_number` also makes: the store and its
    leases import neither torch nor the rest of the package (``core.validate`` imports torch), so that a
    process that only shares a store starts fast.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _filter(column: str, value: Any) -> tuple[str, list[Any]]:
    """SQL condition and parameters for one ``load`` filter."""
    if value is None:
        return f"{column} IS NULL", []
    if isinstance(value, (list, tuple, set, frozenset)):
        values = [sql_value(v) for v in value]
        return f"{column} IN ({_LIST('?' * len(values))})" if values else "0", values
    return f"{column} = ?", [sql_value(value)]


_INT_COLUMNS = [c for c, t in COLUMNS.items() if t == "INTEGER" and c in KEY_COLUMNS]
_NULLABLE_INT_COLUMNS = [
    c for c, t in COLUMNS.items() if t == "INTEGER" and c not in (*KEY_COLUMNS, *BOOL_COLUMNS)
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
            **dict.fromkeys(BOOL_COLUMNS, "boolean"),
            **dict.fromkeys(_TEXT_COLUMNS, "object"),
        }
    )
