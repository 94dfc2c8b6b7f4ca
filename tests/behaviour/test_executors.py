"""The executor layer without Ray: choices, the batch plan, the driver's leases on a shared store, sharded
feature grids merged exactly, and the model fingerprint that guards Ray actors."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
import torch

from mechintro.attribution.sharded import sharded_steering_attribution
from mechintro.behaviour.executors import LocalExecutor, RayExecutor, plan_batches, resolve_executor
from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.plan import SweepConfig, build_prompts, prompt_key, trial_grid
from mechintro.behaviour.store import KEY_COLUMNS, TrialStore
from mechintro.behaviour.trials import sweep
from mechintro.mechanism.features import feature_grid, merge_grids
from mechintro.mechanism.sharded import sharded_feature_grid

torch.set_num_threads(1)

CONCEPTS = ["Bread", "Oceans", "Dust"]
FAST = {"max_new_tokens": 3, "progress": False}


class RecordingJudge:
    """RuleJudge verdicts; records the keys of every judged batch (in order) and runs ``on_call(n)`` first."""

    name = "rule"

    def __init__(self, on_call=None):
        self.batches: list[list[tuple]] = []
        self.on_call = on_call
        self.inner = RuleJudge()

    def judge(self, *, responses, concepts, forced):
        if self.on_call is not None:
            self.on_call(len(self.batches) + 1)
        self.batches.append(list(zip(concepts, forced, strict=True)))
        return self.inner.judge(responses=responses, concepts=concepts, forced=forced)


# ----------------------------------------------------------------------------------------------- choices


def test_executor_choices_and_settings_are_checked(tiny, monkeypatch):
    assert resolve_executor("local") == LocalExecutor()
    assert resolve_executor("ray") == RayExecutor()
    with pytest.raises(ValueError, match=r"unknown executor 'spark'; valid: \['local', 'ray'\]"):
        resolve_executor("spark")
    with pytest.raises(TypeError, match="LocalExecutor or a RayExecutor"):
        resolve_executor(2)
    for bad, match in [
        ({"num_actors": 0}, "num_actors"),
        ({"num_actors": True}, "num_actors"),
        ({"num_gpus": -1}, "num_gpus"),
        ({"num_cpus": float("nan")}, "num_cpus"),
        ({"threads": 0}, "threads"),
        ({"in_flight": 0}, "in_flight"),
        ({"max_actor_restarts": -1}, "max_actor_restarts"),
        ({"model": ""}, "model"),
    ]:
        with pytest.raises(ValueError, match=match):
            RayExecutor(**bad)

    import mechintro.behaviour.batch as batch
    import mechintro.behaviour.executors as executors

    monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(ValueError, match="unknown executor"):
        sweep(tiny, CONCEPTS, layers=[1], strengths=[2.0], n_trials=1, judge=RuleJudge(), executor="spark")
    monkeypatch.setattr(executors.importlib.util, "find_spec", lambda name: None)  # Ray not installed
    with pytest.raises(ImportError, match=r"pip install 'mechintro\[ray\]'"):
        sweep(tiny, CONCEPTS, layers=[1], strengths=[2.0], n_trials=1, judge=RuleJudge(), executor="ray")


# ----------------------------------------------------------------------------------------------- the plan


def test_batches_are_one_layer_full_and_sorted_by_prompt_length(tiny):
    config = SweepConfig(
        layers=[0, 2],
        strengths=[1.0, 4.0],
        variants=["original", "skeptical"],
        personas=["standard_assistant"],
        n_trials=3,
        forced=True,
        controls=True,
        temperature=1.0,
        max_new_tokens=3,
        seed=0,
        trials=[1, 2, 3],
    )
    grid = trial_grid(tiny, CONCEPTS, config, judge=RuleJudge())
    planned = grid.plan()
    prompts = build_prompts(tiny, planned)
    length = {key: len(p.tokens) for key, p in prompts.items()}
    assert len(set(length.values())) >= 3  # the test needs prompts of several lengths
    batches = plan_batches(planned, prompts, layers=[0, 2], batch_size=7)
    flat = [t for b in batches for t in b]
    assert len(flat) == len(planned) and set(flat) == set(planned)  # every trial once
    per_layer = {0: [], 2: []}
    for batch in batches:
        (layer,) = {t.layer for t in batch}
        per_layer[layer].append(batch)
    for layer, rows in per_layer.items():
        n = sum(t.layer == layer for t in planned)
        assert [len(b) for b in rows] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
        lengths = [length[prompt_key(t)] for b in rows for t in b]
        assert lengths == sorted(lengths)
    assert [b[0].layer for b in batches] == sorted(b[0].layer for b in batches)  # layer by layer


# ----------------------------------------------------------------------------------------------- leases


def sweep_kw(path, **kw):
    return {
        "layers": [1],
        "strengths": [4.0],
        "n_trials": 2,
        "batch_size": 2,
        "store": path,
        **FAST,
    } | kw


def planned_keys(tiny, path):
    """Every key of the sweep (run once on a scratch store to learn them)."""
    scratch = path.with_name("scratch.sqlite")
    df = sweep(tiny, CONCEPTS, judge=RuleJudge(), **sweep_kw(scratch))
    return [tuple(row) for row in df[list(KEY_COLUMNS)].itertuples(index=False)], df


def test_keys_another_driver_holds_are_left_to_it(tiny, tmp_path):
    """A live driver holds two trials; this sweep runs everything else, waits, and finds them written by the
    other driver: they are never generated or judged twice."""
    path = tmp_path / "shared.sqlite"
    keys, reference = planned_keys(tiny, path)
    held = keys[:2]
    rows = reference.set_index(list(KEY_COLUMNS)).loc[held].reset_index()
    claimed, done = threading.Event(), threading.Event()

    def other_driver():  # its own connection, in its own thread
        with TrialStore(path) as other:
            assert other.claim(held, ttl_s=60)
            claimed.set()
            time.sleep(1.0)
            other.write(rows.drop(columns="created_at").to_dict("records"))  # its results
            done.set()

    writer = threading.Thread(target=other_driver)
    judge = RecordingJudge()
    writer.start()
    try:
        assert claimed.wait(30)
        df = sweep(tiny, CONCEPTS, judge=judge, **sweep_kw(path, lease_s=2.0))
    finally:
        writer.join()
    assert done.is_set()
    assert sum(len(b) for b in judge.batches) == len(keys) - 2  # the held two were not run here
    assert len(df) == len(keys) and not df.duplicated(list(KEY_COLUMNS)).any()
    cols = [c for c in df.columns if c != "created_at"]
    assert df[cols].equals(reference[cols])


def test_an_expired_lease_is_taken_over(tiny, tmp_path):
    """A driver that claimed a batch and stopped renewing (hung, or on another host) loses it after its lease
    expires; the sweep runs it after every other batch, and only then."""
    path = tmp_path / "shared.sqlite"
    keys, reference = planned_keys(tiny, path)
    held = keys[:2]  # the first batch of the plan
    with TrialStore(path) as hung:
        assert hung.claim(held, ttl_s=1.5)
        start = time.monotonic()
        judge = RecordingJudge()
        df = sweep(tiny, CONCEPTS, judge=judge, **sweep_kw(path, lease_s=1.0))
    assert time.monotonic() - start >= 1.0  # it waited for the expiry
    assert sum(len(b) for b in judge.batches) == len(keys)
    cols = [c for c in df.columns if c != "created_at"]
    assert df[cols].equals(reference[cols])
    with TrialStore(path) as store:  # rows in the order they were written
        written = [tuple(r) for r in store.load()[list(KEY_COLUMNS)].itertuples(index=False)]
    assert written[-2:] == held and set(written[:-2]) == set(keys[2:])


def test_a_failed_batch_releases_every_lease_and_a_rerun_finishes(tiny, tmp_path):
    path = tmp_path / "s.sqlite"

    def fail_third(n):
        if n == 3:
            raise RuntimeError("judge exploded")

    with pytest.raises(RuntimeError, match="judge exploded"):
        sweep(tiny, CONCEPTS, judge=RecordingJudge(on_call=fail_third), **sweep_kw(path))
    with TrialStore(path) as store:
        assert len(store) == 4 and store.leases().empty  # two batches written; nothing left leased
    judge = RecordingJudge()
    df = sweep(tiny, CONCEPTS, judge=judge, **sweep_kw(path))
    assert len(df) == 12 and sum(len(b) for b in judge.batches) == 8


# ------------------------------------------------------------------------------------------- feature grids


@pytest.mark.parametrize(("shards", "layer_shards"), [(3, 1), (2, 2)])
def test_sharded_feature_grid_equals_one_call(tiny, tcs, shards, layer_shards):
    concepts = ["Bread", "Oceans", "Dust", "Trees", "Satellites"]
    kw = {"strengths": [-4.0, 0.0, 2.0, 8.0], "injection_layer": 1, "batch_size": 6}
    whole = feature_grid(tiny, tcs, concepts, **kw)
    parts = sharded_feature_grid(tiny, tcs, concepts, shards=shards, layer_shards=layer_shards, **kw)
    assert parts.concepts == whole.concepts and parts.strengths == whole.strengths
    assert parts.layers == whole.layers == sorted(tcs)
    for layer in whole.layers:
        assert whole.acts[layer]._nnz() > 0
        torch.testing.assert_close(parts.dense(layer), whole.dense(layer), atol=1e-5, rtol=0)
        assert torch.equal(parts.active(layer), whole.active(layer))


def test_merge_grids_refuses_parts_that_do_not_tile(tiny, tcs):
    kw = {"strengths": [0.0, 4.0], "injection_layer": 1, "layers": [2, 3]}
    a = feature_grid(tiny, tcs, ["Bread", "Oceans"], **kw)
    b = feature_grid(tiny, tcs, ["Dust"], **kw)
    merged = merge_grids([a, b])
    assert merged.concepts == ("Bread", "Oceans", "Dust")
    torch.testing.assert_close(merged.dense(3)[2], b.dense(3)[0], atol=0, rtol=0)
    torch.testing.assert_close(merged.dense(2)[:2], a.dense(2), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"twice: \['Dust'\]"):
        merge_grids([a, b, b])
    only_3 = feature_grid(tiny, tcs, ["Dust"], **(kw | {"layers": [3]}))
    with pytest.raises(ValueError, match=r"layer 2: .*missing: \['Dust'\]"):
        merge_grids([a, only_3])
    other = feature_grid(tiny, tcs, ["Dust"], **(kw | {"strengths": [0.0, 2.0]}))
    with pytest.raises(ValueError, match=r"differ in \['strengths'\]"):
        merge_grids([a, other])
    with pytest.raises(TypeError, match="FeatureGrid"):
        merge_grids([])
    with pytest.raises(ValueError, match="shards"):
        sharded_feature_grid(tiny, tcs, ["Dust"], shards=0)
    with pytest.raises(TypeError, match="cannot travel to Ray"):
        sharded_feature_grid(tiny, tcs, ["Dust"], shards=1, executor=RayExecutor())


def assert_same_attribution(got, whole):
    """The same rows (in any order); values within float rounding of other batch shapes."""
    assert got.settings == whole.settings
    for name in ("features", "remainders", "metric"):
        a, b = (_canonical(getattr(r, name)) for r in (got, whole))  # row order follows the chunks
        assert len(a) == len(b) > 0 and list(a.columns) == list(b.columns), name
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-6)
    assert torch.equal(got.vectors, whole.vectors)


def test_sharded_steering_attribution_equals_one_call(tiny, tcs):
    from mechintro.attribution.passes import steering_attribution

    concepts = ["Bread", "Oceans", "Dust", "Trees", "Satellites"]
    kw = {"strengths": [0.0, 1.0, 2.0, 4.0], "layer": 1, "batch_size": 6}
    whole = steering_attribution(tiny, tcs, concepts, progress=False, **kw)
    assert_same_attribution(sharded_steering_attribution(tiny, tcs, concepts, shards=3, **kw), whole)


def test_merge_attributions_refuses_overlapping_or_unlike_parts(tiny, tcs):
    from mechintro.attribution.passes import steering_attribution
    from mechintro.attribution.result import merge_attributions

    kw = {"strengths": [0.0, 2.0], "layer": 1, "progress": False}
    a = steering_attribution(tiny, tcs, ["Bread"], **kw)
    b = steering_attribution(tiny, tcs, ["Dust"], **kw)
    assert merge_attributions([a, b]).settings.concepts == ("Bread", "Dust")
    with pytest.raises(ValueError, match=r"more than one part: \['Dust'\]"):
        merge_attributions([a, b, b])
    other = steering_attribution(tiny, tcs, ["Oceans"], **(kw | {"strengths": [0.0, 4.0]}))
    with pytest.raises(ValueError, match=r"differ in \['strengths'\]"):
        merge_attributions([a, other])


def _canonical(frame):
    keys = [c for c in ("concept", "strength", "dictionary", "layer", "position", "feature") if c in frame]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- the layer


def test_the_behaviour_modules_import_no_private_names():
    """The plan, the batch worker, the executors, the leases and the store talk through public names only
    (executors once imported seven private names of trials)."""
    import ast
    from pathlib import Path

    import mechintro.behaviour as behaviour

    folder = Path(behaviour.__file__).parent
    private = []
    for name in ("plan", "batch", "trials", "executors", "leases", "store", "rows"):
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mechintro"):
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
