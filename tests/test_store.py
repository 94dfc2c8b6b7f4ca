"""TrialStore: write, reload, duplicates, filters, parquet, and a SIGKILL in the middle of writing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechintro.store import COLUMNS, KEY_COLUMNS, TrialStore

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


def test_foreign_table_is_refused(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE trials (concept TEXT, response TEXT)")
    with pytest.raises(ValueError, match="expected"):
        TrialStore(path)


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


WRITER = (
    ROW_CODE
    + """
import sys
from mechintro.store import TrialStore

store = TrialStore(sys.argv[1])
n_batches, batch = int(sys.argv[2]), int(sys.argv[3])
for b in range(n_batches):
    store.write([make_row(b, s) for s in range(batch)])
    print(b, flush=True)
"""
)


def test_killed_writer_leaves_whole_batches(tmp_path):
    path, n_batches, batch = tmp_path / "crash.sqlite", 30, 2000
    repo = Path(__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(n_batches), str(batch)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
        env=env,
    )
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
