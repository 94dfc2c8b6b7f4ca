"""TrialStore: write, reload, duplicates, filters, parquet, a SIGKILL in the middle of writing; bad input
(read-only locations, foreign tables, bad rows, corrupt files); retrying judge errors; leases shared by
two real processes, one of them killed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechintro.behaviour.judges import error_mask as _has_error
from mechintro.behaviour.leases import ClaimQueue
from mechintro.behaviour.store import COLUMNS, KEY_COLUMNS, VERDICT_COLUMNS, StoreError, TrialStore

REPO = Path(__file__).resolve().parents[2]

ROW_CODE = """
def make_row(trial, sample, *, condition="injection", strength=4.0, layer=3, detected=True):
    return {
        "model": "organism", "concept": "Bread", "trial": trial, "sample": sample, "condition": condition,
        "layer": layer, "strength": strength, "variant": "original", "persona": "standard_assistant",
        "seed": 0, "judge": "rule", "max_new_tokens": 100, "temperature": 1.0,
        "response": "Yes, I detect an injected thought. The thought is about Bread." * 3,
        "n_new_tokens": 17, "detected": detected, "identified": detected, "forced_identified": None,
        "judge_error": None,
    }
"""
namespace: dict = {}
exec(ROW_CODE, namespace)
make_row = namespace["make_row"]


def key_of(row: dict) -> tuple:
    return tuple(row[c] for c in KEY_COLUMNS)


ROWS = [make_row(1, s) for s in range(3)] + [
    make_row(1, 0, condition="control", strength=0.0, detected=False),
    make_row(2, 0, layer=5, detected=None) | {"judge_error": "detection: APIError: 500"},
]


def test_write_and_reload(tmp_path):
    with TrialStore(tmp_path / "runs" / "t.sqlite") as store:
        assert store.write(ROWS) == 5
        assert len(store) == 5
        df = store.load()
    assert list(df.columns) == list(COLUMNS)
    assert df["detected"].dtype == "boolean" and df["trial"].dtype == "int64"
    assert df["detected"].tolist() == [True, True, True, False, pd.NA]
    assert df["forced_identified"].isna().all()
    assert df["judge_error"].tolist() == [None] * 4 + ["detection: APIError: 500"]
    assert df["strength"].tolist() == [4.0, 4.0, 4.0, 0.0, 4.0]
    assert df["created_at"].notna().all()
    with TrialStore(tmp_path / "runs" / "t.sqlite") as again:  # reopened from disk
        pd.testing.assert_frame_equal(again.load(), df)
    assert TrialStore.KEY_COLUMNS == KEY_COLUMNS and len(KEY_COLUMNS) == 13


def test_duplicates_are_ignored(tmp_path):
    with TrialStore(tmp_path / "t.sqlite") as store:
        store.write(ROWS[:3])
        changed = dict(ROWS[0], response="a different response")
        assert store.write([changed, *ROWS]) == 2  # only the two new identities are inserted
        assert len(store) == 5
        assert store.load(trial=1, sample=0, condition="injection")["response"].tolist() == [
            ROWS[0]["response"]
        ]
        # temperature and max_new_tokens are part of the identity
        assert store.write([dict(ROWS[0], temperature=0.0), dict(ROWS[0], max_new_tokens=50)]) == 2
        assert len(store) == 7


def test_done_keys(tmp_path):
    with TrialStore(tmp_path / "t.sqlite") as store:
        store.write(ROWS[:3])
        present, absent = key_of(ROWS[0]), key_of(ROWS[3])
        numpy_key = tuple(np.int64(v) if isinstance(v, int) else v for v in key_of(ROWS[1]))
        int_strength = key_of(dict(ROWS[2], strength=4))  # 4 == 4.0 in the REAL column
        got = store.done_keys([present, absent, numpy_key, int_strength])
        assert got == {present, numpy_key, int_strength}
        assert store.done_keys([]) == set()
        assert store.done_keys([key_of(dict(ROWS[0], seed=1))]) == set()
        with pytest.raises(ValueError, match="expected 13"):
            store.done_keys([("organism", "Bread")])


def test_filters(tmp_path):
    with TrialStore(tmp_path / "t.sqlite") as store:
        store.write(ROWS)
        assert len(store.load(condition="control")) == 1
        assert len(store.load(condition=["injection", "control"], layer=3)) == 4
        assert len(store.load(judge_error=None)) == 4
        assert len(store.load(layer=np.int64(5))) == 1
        assert len(store.load(sample=[])) == 0
        assert store.load(detected=True)["sample"].tolist() == [0, 1, 2]
        with pytest.raises(ValueError, match=r"unknown filter columns \['lyr'\]; valid columns: \['model'"):
            store.load(lyr=3)


def test_bad_rows_name_the_columns(tmp_path):
    with TrialStore(tmp_path / "t.sqlite") as store:
        with pytest.raises(ValueError, match=r"unknown trial columns \['prompt'\]; valid columns"):
            store.write([dict(ROWS[0], prompt="...")])
        bad = dict(ROWS[0])
        del bad["seed"]
        with pytest.raises(ValueError, match=r"lacks key columns \['seed'\]"):
            store.write([ROWS[1], bad])
        assert len(store) == 0  # nothing of the failed batch was written


def test_parquet_round_trip(tmp_path):
    with TrialStore(tmp_path / "t.sqlite") as store:
        store.write(ROWS)
        out = store.to_parquet(tmp_path / "export" / "trials.parquet")
        expected = store.load()
        assert len(store.to_parquet(tmp_path / "controls.parquet", condition="control").name) > 0
    back = pd.read_parquet(out)
    assert list(back.columns) == list(COLUMNS)
    assert back["detected"].dtype == "boolean"
    back = back.astype(expected.dtypes.to_dict())
    text = [c for c, t in COLUMNS.items() if t == "TEXT"]  # pandas reads parquet text nulls as NaN
    back[text] = back[text].astype(object).where(back[text].notna(), None)
    pd.testing.assert_frame_equal(back, expected)
    assert len(pd.read_parquet(tmp_path / "controls.parquet")) == 1


# ---------------------------------------------------------------------------------------- subprocesses

PRELUDE = (
    """
import json, sys, time, types
# the store needs neither torch nor the rest of the package: import its modules without mechintro/__init__
package = types.ModuleType("mechintro")
package.__path__ = [sys.argv[1] + "/mechintro"]
sys.modules["mechintro"] = package
from mechintro.behaviour.leases import ClaimQueue
from mechintro.behaviour.store import KEY_COLUMNS, TrialStore
args = sys.argv[2:]

def row_of(key, **columns):
    return dict(zip(KEY_COLUMNS, key)) | {"detected": True, "identified": False} | columns

def key_of(row):
    return tuple(row[c] for c in KEY_COLUMNS)
"""
    + ROW_CODE
)


STARTED: list[subprocess.Popen] = []


def python(code: str, *args: object, prefix: tuple[str, ...] = (), **kw) -> subprocess.Popen:
    """A Python subprocess running PRELUDE + code with ``args`` (``sys.argv[2:]``)."""
    cmd = [*prefix, sys.executable, "-c", PRELUDE + code, str(REPO), *map(str, args)]
    STARTED.append(subprocess.Popen(cmd, cwd=REPO, text=True, **kw))
    return STARTED[-1]


@pytest.fixture(autouse=True)
def _no_stray_processes():
    """Kill what a failed test left running (a hung claimant, a worker waiting forever)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


WRITER = """
store = TrialStore(args[0])
n_batches, batch = int(args[1]), int(args[2])
for b in range(n_batches):
    store.write([make_row(b, s) for s in range(batch)])
    print(b, flush=True)
"""


def test_killed_writer_leaves_whole_batches(tmp_path):
    path, n_batches, batch = tmp_path / "crash.sqlite", 30, 2000
    proc = python(WRITER, path, n_batches, batch, stdout=subprocess.PIPE)
    committed = [int(proc.stdout.readline()) for _ in range(3)]  # three batches are surely committed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    assert committed == [0, 1, 2]

    with TrialStore(path) as store:
        df = store.load()
        per_batch = df.groupby("trial").size()
        n_done = len(per_batch)
        assert n_done >= 3 and n_done < n_batches
        assert per_batch.index.tolist() == list(range(n_done))  # batches in order, none missing
        assert (per_batch == batch).all()  # and only whole batches
        for b in range(n_batches):  # the resumed run writes everything again
            store.write([make_row(b, s) for s in range(batch)])
        assert len(store) == n_batches * batch
        final = store.load()
    assert not final.duplicated(list(KEY_COLUMNS)).any()
    assert sorted(final.groupby("trial").size().unique()) == [batch]


# --------------------------------------------------------------------------------- read-only locations

DROP_DAC = ("--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")


def without_override() -> tuple[str, ...]:
    """A command prefix under which file permissions bind (root ignores them unless it drops the caps)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None or subprocess.run([setpriv, *DROP_DAC, "true"]).returncode != 0:
        pytest.skip("running as root without a working setpriv: read-only files would be writable")
    return (setpriv, *DROP_DAC)


READER = """
import pandas as pd
key = json.loads(args[1])
report = {}
for readonly in (False, True):
    got = report[str(readonly)] = {}
    try:
        store = TrialStore(args[0], readonly=readonly)
    except Exception as e:
        got["open"] = f"{type(e).__name__}: {e}"
        continue
    with store:
        got["readonly"] = store.readonly
        got["detected"] = [None if v is pd.NA else bool(v) for v in store.load()["detected"]]
        got["done"] = len(store.done_keys([key]))
        writes = {"write": lambda: store.write([row_of(key)]), "claim": lambda: store.claim([key], ttl_s=5)}
        for name, write in writes.items():
            try:
                write()
                got[name] = "wrote"
            except Exception as e:
                got[name] = f"{type(e).__name__}: {e}"
print(json.dumps(report))
"""


def read_as_reader(path: Path, key: tuple) -> dict:
    proc = python(READER, path, json.dumps(key), prefix=without_override(), stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)


def make_readonly_store(folder: Path) -> Path:
    folder.mkdir()
    with TrialStore(folder / "t.sqlite") as store:
        store.write(ROWS)
    return folder / "t.sqlite"


@pytest.mark.parametrize("location", ["file", "folder", "file and folder"])
def test_read_only_location_opens_for_reading(tmp_path, location):
    path = make_readonly_store(tmp_path / "runs")
    if "file" in location:
        path.chmod(0o444)
    if "folder" in location:
        path.parent.chmod(0o555)
    try:
        report = read_as_reader(path, key_of(ROWS[0]))
    finally:
        path.parent.chmod(0o755)
        path.chmod(0o644)
    for readonly in ("False", "True"):  # the default falls back to reading; readonly=True asks for it
        got = report[readonly]
        assert got["readonly"] is True, got
        assert got["detected"] == [True, True, True, False, None]
        assert got["done"] == 1
        for name in ("write", "claim"):
            assert got[name].startswith(f"PermissionError: {path}: the store is read-only"), got[name]
    with TrialStore(path) as store:  # nothing was written, and the store is writable again
        assert len(store) == 5 and not store.readonly
        assert store.leases().empty


def test_read_only_folder_with_unmerged_log(tmp_path):
    path = tmp_path / "runs" / "t.sqlite"
    # a writer killed before it closes leaves its commits in the write-ahead log
    proc = python(WRITER + "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n", path, 52, 10)
    proc.wait(timeout=60)
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    assert proc.returncode == -signal.SIGKILL and wal.stat().st_size > 0
    key = key_of(make_row(51, 9))
    path.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        with_index = read_as_reader(path, key)
        path.parent.chmod(0o755)
        shm.unlink()  # as after copying only the database and its log
        path.parent.chmod(0o555)
        without_index = read_as_reader(path, key)
    finally:
        path.parent.chmod(0o755)
        path.chmod(0o644)
    for got in with_index.values():  # the log's commits are read
        assert got["readonly"] and len(got["detected"]) == 520 and got["done"] == 1, got
    for got in without_index.values():  # never a store that silently lacks the log's rows
        assert got["open"].startswith(f"StoreError: {path}: cannot be read here: its write-ahead log"), got
    with TrialStore(path) as store:
        assert len(store) == 520


def test_missing_and_uncreatable_stores_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'none.sqlite'}: no such store file"):
        TrialStore(tmp_path / "none.sqlite", readonly=True)
    assert not (tmp_path / "none.sqlite").exists()
    with pytest.raises(StoreError, match=f"{tmp_path}: is a folder"):
        TrialStore(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code = """
try:
    TrialStore(args[0])
except PermissionError as e:
    print(e)
"""
    try:
        proc = python(code, locked / "new.sqlite", prefix=without_override(), stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
    finally:
        locked.chmod(0o755)
    assert out.startswith(f"{locked / 'new.sqlite'}: cannot create the store here")
    assert list(locked.iterdir()) == []


def test_readonly_true_on_a_writable_store(tmp_path):
    path = make_readonly_store(tmp_path / "runs")
    with TrialStore(path, readonly=True) as store:
        assert store.readonly and repr(store).endswith("readonly=True)")
        assert len(store.load()) == 5 and store.count_errors() == 1
        for action in (
            lambda: store.write([ROWS[0]]),
            lambda: store.replace_verdicts([]),
            lambda: store.claim([key_of(ROWS[0])], ttl_s=1),
            lambda: store.release(),
            lambda: store.renew(ttl_s=1),
            lambda: ClaimQueue(store, [[key_of(ROWS[0])]]),
        ):
            with pytest.raises(
                PermissionError, match=f"{path}: the store is read-only .opened with readonly=True"
            ):
                action()
    with pytest.raises(StoreError, match="in-memory store cannot be opened read-only"):
        TrialStore(":memory:", readonly=True)


# ----------------------------------------------------------------------- foreign tables, corrupt files


def _create_trials(path: Path, key: str | None, types: dict[str, str] | None = None) -> None:
    types = COLUMNS | (types or {})
    cols = ", ".join(f"{c} {t}" for c, t in types.items())
    with sqlite3.connect(path) as conn:
        conn.execute(f"CREATE TABLE trials ({cols}{f', PRIMARY KEY ({key})' if key else ''})")
        conn.execute(
            f"INSERT INTO trials ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [("x" if t == "TEXT" else 1) for t in COLUMNS.values()],
        )


@pytest.mark.parametrize(
    ("key", "types", "message"),
    [
        (None, None, r"has primary key none, expected \['model', 'concept'"),
        (
            "model, concept",
            None,
            r"has primary key \['model', 'concept'\], expected \['model', 'concept', 'trial'",
        ),
        (", ".join(reversed(KEY_COLUMNS)), None, r"has primary key \['temperature', 'max_new_tokens'"),
        (
            ", ".join(KEY_COLUMNS),
            {"strength": "TEXT"},
            r"has column types \{'strength': 'TEXT'\}, expected \{'strength': 'REAL'\}",
        ),
    ],
)
def test_table_with_another_key_or_types_is_refused(tmp_path, key, types, message):
    path = tmp_path / "old.sqlite"
    _create_trials(path, key, types)
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"{path}: table 'trials' " + message):
            TrialStore(path, readonly=readonly)
    assert path.read_bytes() == before  # refused without a change (no leases table added)


def test_foreign_table_is_refused(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE trials (concept TEXT, response TEXT)")
    with pytest.raises(
        StoreError, match=f"{path}: table 'trials' has columns \\['concept', 'response'\\], expected"
    ):
        TrialStore(path)
    with sqlite3.connect(tmp_path / "other.sqlite") as conn:
        conn.execute("CREATE TABLE runs (x)")
    with pytest.raises(StoreError, match="other.sqlite: has no 'trials' table"):
        TrialStore(tmp_path / "other.sqlite", readonly=True)


@pytest.mark.parametrize(
    "content",
    [b"not a database, just text\n" * 200, os.urandom(8192), b"SQLite format 3\x00" + b"\xff" * 200],
)
def test_corrupt_file_gives_one_clear_error(tmp_path, content):
    path = tmp_path / "runs.sqlite"
    path.write_bytes(content)
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"^{path}: not a SQLite database") as info:
            TrialStore(path, readonly=readonly)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert path.read_bytes() == content
    assert not Path(f"{path}-wal").exists()


# ---------------------------------------------------------------------------------------- checked rows

BAD_VALUES = [
    ("detected", "yes", r"'detected' must be True, False or None, got 'yes'"),
    ("detected", 1, r"'detected' must be True, False or None, got 1"),
    ("forced_identified", 0.0, r"'forced_identified' must be True, False or None, got 0.0"),
    ("strength", math.inf, r"'strength' must be a finite number, got inf"),
    ("strength", float("nan"), r"'strength' must be a finite number, got nan"),
    ("strength", np.float32("-inf"), r"'strength' must be a finite number, got -inf"),
    ("strength", "4", r"'strength' must be a finite number, got '4'"),
    ("strength", True, r"'strength' must be a finite number, got True"),
    ("temperature", -0.5, r"'temperature' must be a finite number >= 0, got -0.5"),
    (
        "condition",
        "injected",
        r"'condition' must be one of \['injection', 'control', 'forced'\], got 'injected'",
    ),
    ("trial", -1, r"'trial' must be an int >= 0, got -1"),
    ("trial", 1.0, r"'trial' must be an int >= 0, got 1.0"),
    ("sample", True, r"'sample' must be an int >= 0, got True"),
    ("layer", np.int64(-2), r"'layer' must be an int >= 0, got np.int64\(-2\)"),
    ("seed", "0", r"'seed' must be an int >= 0, got '0'"),
    ("max_new_tokens", 100.5, r"'max_new_tokens' must be an int >= 0, got 100.5"),
    ("n_new_tokens", -1, r"'n_new_tokens' must be an int >= 0, got -1"),
    ("concept", "  ", r"'concept' must be a non-empty string, got '  '"),
    ("model", 3, r"'model' must be a non-empty string, got 3"),
    ("response", b"bytes", r"'response' must be a string or None, got b'bytes'"),
    ("judge_error", 500, r"'judge_error' must be a message string or None, got 500"),
    ("created_at", "yesterday", r"'created_at' must be an ISO 8601 time string or None, got 'yesterday'"),
    ("concept", float("nan"), r"'concept' must be a non-empty string, got nan"),
    ("judge", None, r"lacks key columns \['judge'\]"),
    ("persona", pd.NA, r"lacks key columns \['persona'\]"),
]


@pytest.mark.parametrize(
    ("column", "value", "message"), BAD_VALUES, ids=[f"{c}={v!r}" for c, v, _ in BAD_VALUES]
)
def test_a_bad_value_rejects_its_batch(tmp_path, column, value, message):
    path = tmp_path / "t.sqlite"
    with TrialStore(path) as store:
        store.write(ROWS[3:])
        with pytest.raises(
            StoreError, match=f"^{path}: row 2 of the batch: .*{message}.*nothing of the batch"
        ):
            store.write([ROWS[0], ROWS[1], dict(ROWS[2], **{column: value})])
        if column not in KEY_COLUMNS:  # replace_verdicts checks its columns the same way
            bad = {c: ROWS[4][c] for c in KEY_COLUMNS} | {column: value}
            with pytest.raises(StoreError, match=f"^{path}: row 0 of the batch: "):
                store.replace_verdicts([bad])
        assert len(store) == 2
        df = store.load()  # the store still loads, unchanged
    assert df["trial"].tolist() == [1, 2] and df["judge_error"].tolist() == [None, "detection: APIError: 500"]


def test_good_values_of_other_types_are_stored_as_their_column(tmp_path):
    row = dict(
        ROWS[0],
        trial=np.int64(7),
        sample=np.uint8(2),
        layer=np.int32(3),
        strength=np.float32(2.5),
        temperature=0,
        seed=np.int64(12),
        condition=np.str_("forced"),
        detected=np.bool_(False),
        identified=pd.NA,
        forced_identified=np.bool_(True),
        n_new_tokens=float("nan"),
        judge_error="   ",
        created_at="2026-01-02T03:04:05+00:00",
    )
    with TrialStore(tmp_path / "t.sqlite") as store:
        assert store.write([row]) == 1
        got = store.load().iloc[0]
        raw = store._conn.execute(
            "SELECT typeof(trial), typeof(strength), detected, judge_error FROM trials"
        ).fetchone()
    assert (got["trial"], got["sample"], got["layer"], got["seed"]) == (7, 2, 3, 12)
    assert got["strength"] == 2.5 and got["temperature"] == 0.0 and got["condition"] == "forced"
    assert got["detected"] is np.False_ or got["detected"] == False  # noqa: E712
    assert got["identified"] is pd.NA and got["forced_identified"] == True  # noqa: E712
    assert got["n_new_tokens"] is pd.NA and got["created_at"] == "2026-01-02T03:04:05+00:00"
    assert raw == ("integer", "real", 0, None)  # a blank judge error is no error (as in metrics)


def test_bad_keys_are_refused(tmp_path):
    with TrialStore(tmp_path / "t.sqlite") as store:
        with pytest.raises(StoreError, match=r"t.sqlite: key 1: column 'condition' must be one of"):
            store.done_keys([key_of(ROWS[0]), key_of(dict(ROWS[0], condition="ctrl"))])
        with pytest.raises(StoreError, match=r"key 0: column 'strength' must be a finite number, got nan"):
            store.claim([key_of(dict(ROWS[0], strength=float("nan")))], ttl_s=1)
        with pytest.raises(ValueError, match=r"ttl_s must be a positive number of seconds, got 0"):
            store.claim([key_of(ROWS[0])], ttl_s=0)
        assert store.leases().empty


# ---------------------------------------------------------------------------- judge errors are retried

ERROR_ROW = ROWS[4]


def test_error_rows_are_not_done_and_are_replaced(tmp_path):
    keys = [key_of(r) for r in ROWS]
    with TrialStore(tmp_path / "t.sqlite") as store:
        store.write(ROWS)
        assert store.done_keys(keys) == set(keys[:4])  # the error row is to be judged again
        assert store.done_keys(keys, retry_errors=False) == set(keys)
        # a new error for the error row replaces it (the latest attempt)...
        assert store.write([dict(ERROR_ROW, judge_error="detection: timeout")]) == 1
        assert store.load(trial=2)["judge_error"].tolist() == ["detection: timeout"]
        # ...and a verdict replaces the error; the re-run's response comes with it
        retried = dict(ERROR_ROW, response="No.", detected=False, identified=False, judge_error=None)
        assert store.write([retried, *ROWS[:4]]) == 1  # the good rows are ignored
        assert store.done_keys(keys) == set(keys)
        # a good row is never overwritten: neither by an error nor by another verdict
        assert store.write([dict(ERROR_ROW, judge_error="late error"), dict(ROWS[0], detected=False)]) == 0
        df = store.load()
    assert len(df) == 5
    assert df["detected"].tolist() == [True, True, True, False, False]
    assert df["judge_error"].isna().all()
    assert df.loc[4, "response"] == "No."


def test_error_rows_and_replace_verdicts(tmp_path):
    path = tmp_path / "t.sqlite"
    rows = [*ROWS, dict(make_row(3, 0, condition="forced"), forced_identified=None, judge_error="parse: ???")]
    with TrialStore(path) as store:
        store.write(rows)
    with sqlite3.connect(path) as conn:  # rows written by older code: blank errors, which are no errors
        conn.execute("UPDATE trials SET judge_error = ' \n' WHERE trial = 1 AND sample = 2")
        conn.execute("UPDATE trials SET judge_error = '' WHERE condition = 'control'")
    with TrialStore(path) as store:
        everything = store.load()
        errors = store.error_rows()
        pd.testing.assert_frame_equal(
            errors, everything[_has_error(everything["judge_error"])].reset_index(drop=True)
        )
        assert errors["trial"].tolist() == [2, 3] and store.count_errors() == 2
        assert store.count_errors(condition="forced") == 1 and len(store.error_rows(layer=5)) == 1
        assert store.done_keys([key_of(r) for r in rows]) == {key_of(r) for r in ROWS[:4]}

        new = [
            {c: errors.loc[0, c] for c in KEY_COLUMNS} | {"detected": True, "identified": True},
            {c: errors.loc[1, c] for c in KEY_COLUMNS} | {"forced_identified": False},
            {c: ROWS[0][c] for c in KEY_COLUMNS} | {"detected": False},  # a good row: left alone
            {c: make_row(9, 9)[c] for c in KEY_COLUMNS} | {"detected": False},  # not stored: nothing
        ]
        assert store.replace_verdicts(new) == 2
        assert store.count_errors() == 0 and store.error_rows().empty and len(store) == 6
        after = store.load()
        assert store.replace_verdicts(new[:2]) == 0  # no longer errors: never replaced again
        with pytest.raises(
            StoreError, match=r"row 0 of the batch: unknown trial columns \['response'\]; valid"
        ):
            store.replace_verdicts([new[0] | {"response": "changed"}])
    assert after["detected"].tolist() == [True, True, True, False, True, pd.NA]
    assert after["identified"].tolist() == [True, True, True, False, True, pd.NA]
    assert after["forced_identified"].tolist()[-1] == False  # noqa: E712
    kept = ["response", "n_new_tokens", "strength"]  # the stored response stays
    pd.testing.assert_frame_equal(after[kept], everything[kept])
    unchanged = [c for c in COLUMNS if c not in (*VERDICT_COLUMNS, "created_at")]
    pd.testing.assert_frame_equal(after.loc[:3, unchanged], everything.loc[:3, unchanged])
    assert after.loc[:3, "detected"].tolist() == everything.loc[:3, "detected"].tolist()


# ------------------------------------------------------------------------------ leases, in one process


def batch_keys(b: int, n: int = 4) -> list[tuple]:
    return [key_of(make_row(b, s)) for s in range(n)]


def test_claims_exclude_other_owners_until_written_released_or_expired(tmp_path):
    path = tmp_path / "t.sqlite"
    with TrialStore(path) as a, TrialStore(path) as b:
        assert a.owner != b.owner
        first = a.claim(batch_keys(0), ttl_s=60)
        assert first and first.keys == tuple(batch_keys(0)) and first.owner == a.owner
        assert first.expires == pytest.approx(time.time() + 60, abs=5)
        assert a.claim(batch_keys(0), ttl_s=60).keys == tuple(batch_keys(0))  # its own lease: renewed
        other = b.claim(batch_keys(0)[2:] + batch_keys(1)[:2], ttl_s=60)
        assert other.busy == tuple(batch_keys(0)[2:]) and other.keys == tuple(batch_keys(1)[:2])
        assert not b.claim(batch_keys(0), ttl_s=60)
        # writing releases the writer's leases; then the keys are done for everyone
        a.write([make_row(0, s) for s in range(3)])
        assert sorted(map(tuple, a.leases()[["trial", "sample"]].values.tolist())) == [(0, 3), (1, 0), (1, 1)]
        late = b.claim(batch_keys(0), ttl_s=60)
        assert late.done == tuple(batch_keys(0)[:3]) and late.busy == (batch_keys(0)[3],) and not late
        # release hands the rest over at once
        assert a.release(batch_keys(0)) == 1
        assert b.claim(batch_keys(0), ttl_s=60).keys == (batch_keys(0)[3],)
        assert b.release() == 3 and a.release() == 0 and b.leases().empty
        # an expired lease is taken over; the old owner can no longer renew it
        assert a.claim(batch_keys(2), ttl_s=0.2)
        assert not b.claim(batch_keys(2), ttl_s=60)
        time.sleep(0.3)
        taken = b.claim(batch_keys(2), ttl_s=60)
        assert taken.keys == tuple(batch_keys(2))
        assert a.renew(ttl_s=60) == 0 and b.renew(batch_keys(2)[:1], ttl_s=60) == 1
        assert set(b.leases()["owner"]) == {b.owner}
        # done keys are never claimed; error rows are, unless errors are not retried
        b.write([make_row(2, 0), dict(make_row(2, 1), judge_error="APIError")])
        again = a.claim(batch_keys(2)[:2], ttl_s=60)
        assert again.done == (batch_keys(2)[0],) and again.keys == (batch_keys(2)[1],)
        assert a.release() == 1
        assert a.claim(batch_keys(2)[:2], ttl_s=60, retry_errors=False).done == tuple(batch_keys(2)[:2])


def test_concurrent_claims_wait_for_each_other(tmp_path, monkeypatch):
    """b claims the same keys while a is between reading the table and writing its leases."""
    path = tmp_path / "t.sqlite"
    with TrialStore(path) as a:
        results: dict[str, object] = {}

        def b_claims():
            try:
                with TrialStore(path) as b:
                    results["b"] = b.claim(batch_keys(0), ttl_s=60)
            except Exception as e:  # noqa: BLE001 - reported below
                results["b"] = e

        done = TrialStore._done

        def slow_done(self, conn, retry_errors):
            found = done(self, conn, retry_errors)  # a has read the table...
            if self is a:
                thread = threading.Thread(target=b_claims)
                thread.start()
                thread.join(timeout=0.5)  # ...and b tries to claim meanwhile
                results["b waited"] = thread.is_alive()
                results["thread"] = thread
            return found

        monkeypatch.setattr(TrialStore, "_done", slow_done)
        got = a.claim(batch_keys(0), ttl_s=60)
        results["thread"].join(timeout=30)
    assert got.keys == tuple(batch_keys(0))
    assert results["b waited"] is True  # b waits for a's transaction...
    assert results["b"].busy == tuple(batch_keys(0)) and not results["b"]  # ...and then finds the keys taken


def test_renew_keeps_a_slow_batch(tmp_path):
    path = tmp_path / "t.sqlite"
    with TrialStore(path) as a, TrialStore(path) as b:
        a.claim(batch_keys(0), ttl_s=0.3)
        for _ in range(4):
            time.sleep(0.15)
            assert a.renew(batch_keys(0), ttl_s=0.3) == 4
            assert not b.claim(batch_keys(0), ttl_s=1)


def test_claim_queue_skips_done_waits_for_busy_and_releases(tmp_path):
    path = tmp_path / "t.sqlite"
    batches = [batch_keys(b) for b in range(4)]
    with TrialStore(path) as a, TrialStore(path) as b:
        a.write([make_row(1, s) for s in range(4)])  # batch 1 is done
        b.claim(batches[2], ttl_s=60)  # batch 2 is another process's, for now
        seen = []
        with ClaimQueue(a, batches, ttl_s=0.5, poll_s=0.05) as queue:
            for claim in queue:
                seen.append((claim.index, len(claim.keys)))
                leases = a.leases()
                assert set(leases["owner"]) == {a.owner, b.owner} and len(leases) == 8
                if claim.index == 3:  # after the free batches: b finishes its batch
                    b.write([make_row(2, s) for s in range(4)])
                else:  # a batch that outlasts its lease: the heartbeat renews it
                    time.sleep(0.8)
                    assert b.claim(claim.keys, ttl_s=1).busy == claim.keys
                a.write([make_row(claim.index, s) for s in range(4)])
        assert seen == [(0, 4), (3, 4)]
        assert queue.skipped == 8  # batch 1, and batch 2 once b had written it
        assert len(a) == 16 and a.leases().empty

        # on an error inside the loop, the claim is given back at once (not after the lease expires)
        with (
            pytest.raises(RuntimeError, match="judge crashed"),
            ClaimQueue(a, [batch_keys(5)], ttl_s=60) as queue,
        ):
            for _ in queue:
                assert len(a.leases()) == 4
                raise RuntimeError("judge crashed")
        assert a.leases().empty and b.claim(batch_keys(5), ttl_s=1)


def test_claim_queue_takes_over_an_expired_lease(tmp_path):
    path = tmp_path / "t.sqlite"
    with TrialStore(path) as a, TrialStore(path) as b:
        b.claim(batch_keys(0), ttl_s=0.4)  # b "crashed" holding batch 0
        start = time.time()
        with ClaimQueue(a, [batch_keys(0), batch_keys(1)], ttl_s=5, poll_s=0.05) as queue:
            order = []
            for claim in queue:
                order.append((claim.index, time.time() - start))
                a.write([make_row(claim.index, s) for s in range(4)])
        assert [i for i, _ in order] == [1, 0]
        assert 0.4 <= order[1][1] < 2.0
        assert len(a) == 8 and a.leases().empty


# ---------------------------------------------------------------------------------- two real processes

RUNNER = """
store_path, log_path, go_path = args[0], args[1], args[2]
n_batches, batch, ttl, work_s = int(args[3]), int(args[4]), float(args[5]), float(args[6])
hang = args[7] == "hang"
batches = [[key_of(make_row(b, s)) for s in range(batch)] for b in range(n_batches)]
with open(log_path + ".ready", "w"):
    pass
while not __import__("os").path.exists(go_path):
    time.sleep(0.01)
store = TrialStore(store_path)
with open(log_path, "a") as log, ClaimQueue(store, batches, ttl_s=ttl, poll_s=ttl / 10) as queue:
    for claim in queue:
        entry = {"index": claim.index, "n": len(claim.keys), "t": time.time(), "owner": store.owner}
        log.write(json.dumps(entry) + "\\n")
        log.flush()
        if hang:
            print("holding", claim.index, flush=True)
            time.sleep(600)
        time.sleep(work_s)  # generating and judging
        store.write([row_of(key, response=store.owner) for key in claim.keys])
"""


def start_runner(
    tmp_path: Path, name: str, *, n_batches: int, batch: int, ttl: float, work_s: float, hang=False
):
    return python(
        RUNNER,
        tmp_path / "shared.sqlite",
        tmp_path / f"{name}.log",
        tmp_path / "go",
        n_batches,
        batch,
        ttl,
        work_s,
        "hang" if hang else "work",
        stdout=subprocess.PIPE,
    )


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def check_every_batch_once(tmp_path: Path, n_batches: int, batch: int) -> pd.DataFrame:
    with TrialStore(tmp_path / "shared.sqlite") as store:
        df = store.load()
        assert store.leases().empty
    assert len(df) == n_batches * batch and not df.duplicated(list(KEY_COLUMNS)).any()
    assert (df.groupby("trial")["response"].nunique() == 1).all()  # each batch written by one process
    return df


def test_two_processes_split_the_batches(tmp_path):
    n_batches, batch = 24, 5
    procs = {
        name: start_runner(tmp_path, name, n_batches=n_batches, batch=batch, ttl=2.0, work_s=0.1)
        for name in "ab"
    }
    wait_for(lambda: all((tmp_path / f"{n}.log.ready").exists() for n in procs))
    (tmp_path / "go").touch()
    for proc in procs.values():
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    logs = {name: read_log(tmp_path / f"{name}.log") for name in procs}
    ran = sorted(entry["index"] for log in logs.values() for entry in log)
    assert ran == list(range(n_batches))  # every batch generated and judged exactly once
    assert all(entry["n"] == batch for log in logs.values() for entry in log)
    assert all(len(log) >= 3 for log in logs.values()), {
        n: len(log) for n, log in logs.items()
    }  # both worked
    df = check_every_batch_once(tmp_path, n_batches, batch)
    owners = {name: {e["owner"] for e in log} for name, log in logs.items()}
    for name, log in logs.items():
        assert set(df[df["trial"].isin([e["index"] for e in log])]["response"]) == owners[name]


def test_killed_claimant_batch_is_taken_over(tmp_path):
    n_batches, batch, ttl = 8, 5, 1.0
    (tmp_path / "go").touch()
    hung = start_runner(tmp_path, "hung", n_batches=n_batches, batch=batch, ttl=ttl, work_s=0.0, hang=True)
    line = hung.stdout.readline()
    assert line.startswith("holding ")
    held = int(line.split()[1])
    claimed_at = read_log(tmp_path / "hung.log")[0]["t"]
    worker = start_runner(tmp_path, "worker", n_batches=n_batches, batch=batch, ttl=ttl, work_s=0.02)
    # the worker does every other batch, and waits on the held one while its claimant is alive
    wait_for(lambda: len(read_log(tmp_path / "worker.log")) >= n_batches - 1)
    time.sleep(2.5 * ttl)  # the hung claimant's heartbeat keeps renewing its lease
    with TrialStore(tmp_path / "shared.sqlite") as store:
        leases = store.leases()
        assert leases["trial"].unique().tolist() == [held] and len(leases) == batch
        expires = leases["expires"].min()
        assert expires > claimed_at + ttl  # renewed
    killed_at = time.time()
    hung.kill()
    hung.communicate(timeout=30)
    assert hung.returncode == -signal.SIGKILL
    worker.communicate(timeout=60)
    assert worker.returncode == 0
    log = read_log(tmp_path / "worker.log")
    taken = [e for e in log if e["index"] == held]
    assert len(taken) == 1 and taken[0]["n"] == batch
    # only once its claimant was dead (the lease, renewed until then, would have held until `expires`), and
    # at once: a dead process on this host holds nothing
    assert taken[0]["t"] > killed_at and taken[0]["t"] < killed_at + 2.0
    assert sorted(e["index"] for e in log) == list(range(n_batches))
    df = check_every_batch_once(tmp_path, n_batches, batch)
    assert df[df["trial"] == held]["response"].unique().tolist() == [taken[0]["owner"]]


def test_leases_of_a_dead_process_on_this_host_do_not_wait_for_their_expiry(tmp_path):
    """A re-run after a crash takes the dead run's batches at once (its lease could be minutes long); a lease
    of a live owner, or of an owner on another host, is respected until it expires."""
    import socket

    host = socket.gethostname()
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)  # that process has exited
    with TrialStore(tmp_path / "t.sqlite") as store:
        assert store.claim(batch_keys(0), ttl_s=600, owner=f"{host}:{dead_pid}:crashed")
        assert store.claim(batch_keys(1), ttl_s=600, owner=f"{host}:1:alive")  # pid 1 is always alive
        assert store.claim(batch_keys(2), ttl_s=600, owner=f"elsewhere:{dead_pid}:remote")
        claim = store.claim(batch_keys(0) + batch_keys(1) + batch_keys(2), ttl_s=600)
        assert claim.keys == tuple(batch_keys(0)) and claim.busy == tuple(batch_keys(1) + batch_keys(2))


def test_an_open_that_meets_a_busy_lock_is_tried_again(tmp_path, monkeypatch):
    """Two processes creating one store at once: switching to WAL may answer SQLITE_BUSY at once (SQLite's
    busy handler does not run there); the open tries again instead of failing."""
    busy = {"left": 2}

    class Busy(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode") and busy["left"]:
                busy["left"] -= 1
                error = sqlite3.OperationalError("database is locked")
                error.sqlite_errorname = "SQLITE_BUSY"
                raise error
            return super().execute(sql, *args)

    real = TrialStore._connect
    monkeypatch.setattr(
        TrialStore, "_connect", lambda self, target, **kw: real(self, target, factory=Busy, **kw)
    )
    with TrialStore(tmp_path / "s.sqlite") as store:
        assert store.load().empty and not store.readonly
    assert busy["left"] == 0, "both busy answers were met and tried again"
