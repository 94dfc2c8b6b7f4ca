"""Sweeps on Ray: one local 2-CPU Ray instance for the module (Ray's start is slow), actors kept warm between
tests. The same sweep run locally, on Ray actors, after an actor is killed, and after the driver is killed and
the sweep resumed gives identical texts and verdicts (float columns within 1e-5)."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

from mechintro.behaviour.executors import RayExecutor, ray_workers, release_ray_workers  # noqa: E402
from mechintro.behaviour.judges import LogitJudge, RuleJudge, Verdict  # noqa: E402
from mechintro.behaviour.store import KEY_COLUMNS, TrialStore  # noqa: E402
from mechintro.behaviour.trials import logit_scores, sweep  # noqa: E402
from mechintro.mechanism.sharded import sharded_feature_grid  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
CONCEPTS = ["Bread", "Oceans", "Dust"]
PLAN = {
    "layers": [1, 2],
    "strengths": [2.0, 8.0],
    "n_trials": 2,
    "forced": True,
    "batch_size": 4,
    "max_new_tokens": 5,
    "progress": False,
}
N_ROWS = 3 * 2 * 2 * (1 + 2 + 2)  # concepts x layers x trials x (control, 2 injection, 2 forced)


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance with 2 CPUs for the whole module (its start costs seconds)."""
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray
    release_ray_workers()
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows(tiny):
    """The reference: the sweep run in this process."""
    return sweep(tiny, CONCEPTS, judge=RuleJudge(), **PLAN)


def assert_same_rows(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Identical keys, texts and verdicts; float columns within 1e-5 (created_at aside)."""
    assert len(got) == len(expected) and not got.duplicated(list(KEY_COLUMNS)).any()
    assert list(got.columns) == list(expected.columns)
    for column in got.columns.drop("created_at"):
        a, b = got[column], expected[column]
        if pd.api.types.is_float_dtype(a):
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-5, rtol=0, err_msg=column)
        else:
            assert a.astype(object).tolist() == b.astype(object).tolist(), column


class KillingJudge:
    """RuleJudge verdicts (judged here, in the driver); on call ``at`` it SIGKILLs a Ray actor (the one
    with the lowest pid), as an out-of-memory kill would. Counts judged rows."""

    name = "rule"

    def __init__(self, at: int | None = None):
        self.at, self.calls, self.rows, self.killed = at, 0, 0, None

    def judge(self, *, responses, concepts, forced):
        self.calls += 1
        self.rows += len(responses)
        if self.calls == self.at:
            self.killed = int(ray_workers(live=False).pid.min())
            os.kill(self.killed, signal.SIGKILL)
        return RuleJudge().judge(responses=responses, concepts=concepts, forced=forced)


def test_ray_sweep_equals_the_local_sweep(tiny, local_rows, monkeypatch, tmp_path):
    import mechintro.behaviour.batch as batch

    before = ray_workers()
    # the driver only judges and writes: generating here would fail
    monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("the driver generated"))
    got = sweep(tiny, CONCEPTS, judge=RuleJudge(), store=tmp_path / "ray.sqlite", executor="ray", **PLAN)
    assert_same_rows(got, local_rows)
    assert local_rows.response.nunique() > N_ROWS // 2 and len(got) == N_ROWS  # real, distinct samples
    workers = ray_workers()
    assert len(workers) == 2 and os.getpid() not in set(workers.pid)
    done = workers.batches.to_numpy() - before.set_index("pid").batches.reindex(workers.pid, fill_value=0)
    assert (done > 0).all() and done.sum() == 2 * math.ceil(N_ROWS / 2 / 4)  # every batch, on both actors
    with TrialStore(tmp_path / "ray.sqlite") as store:
        assert len(store) == N_ROWS and store.leases().empty


def test_logit_scoring_on_ray_equals_local(tiny, monkeypatch):
    """Scores are computed on the actors and judged here: a threshold at the median gap splits rows both
    ways, so any change of a gap near it, or of which row it belongs to, changes a verdict."""
    scores = logit_scores(tiny, CONCEPTS, layer=1, strength=8.0, trials=range(1, 7))
    judge = LogitJudge(threshold=float(scores.gap.median()))
    kw = {
        "layers": [1],
        "strengths": [8.0],
        "n_trials": 6,
        "judge": judge,
        "progress": False,
        "batch_size": 5,
    }
    local = sweep(tiny, CONCEPTS, **kw)
    got = sweep(tiny, CONCEPTS, executor=RayExecutor(num_actors=2), **kw)
    assert 0 < local.detected.sum() < len(local)
    assert_same_rows(got, local)


def test_batches_in_flight_stay_leased_past_their_ttl(tiny, local_rows, tmp_path):
    """Batches queued on actors are claimed before dispatch and renewed while they wait: a second driver
    looking at the store after more than one lease period sees them held, live, by this driver."""
    path = tmp_path / "s.sqlite"
    seen = {}

    class SlowJudge:
        name = "rule"

        def judge(self, **rows):
            if not seen:
                time.sleep(1.5)  # longer than lease_s
                with TrialStore(path) as other:
                    seen["leases"] = other.leases()
                    seen["now"] = time.time()
            return RuleJudge().judge(**rows)

    got = sweep(tiny, CONCEPTS, judge=SlowJudge(), store=path, executor="ray", lease_s=1.0, **PLAN)
    assert_same_rows(got, local_rows)
    leases = seen["leases"]
    assert len(leases) >= 4  # the judged batch and at least one more in flight
    assert (leases.expires > seen["now"]).all() and leases.owner.nunique() == 1


def test_a_killed_actor_is_replaced_and_its_batches_run_again(tiny, local_rows, tmp_path):
    judge = KillingJudge(at=2)
    got = sweep(tiny, CONCEPTS, judge=judge, store=tmp_path / "s.sqlite", executor="ray", **PLAN)
    assert_same_rows(got, local_rows)
    assert judge.rows == N_ROWS  # nothing judged twice, nothing lost
    pids = set(ray_workers().pid)
    assert judge.killed not in pids and len(pids) == 2


def test_too_many_actor_deaths_stop_the_call_and_a_rerun_finishes(tiny, local_rows, tmp_path):
    path = tmp_path / "s.sqlite"
    judge = KillingJudge(at=1)
    with pytest.raises(RuntimeError, match="max_actor_restarts=0"):
        sweep(tiny, CONCEPTS, judge=judge, store=path, executor=RayExecutor(max_actor_restarts=0), **PLAN)
    with TrialStore(path) as store:
        written = len(store)
        assert 4 <= written < N_ROWS and store.leases().empty  # the written batch stays; no lease is left
    again = KillingJudge()
    got = sweep(tiny, CONCEPTS, judge=again, store=path, executor="ray", **PLAN)
    assert_same_rows(got, local_rows)
    assert again.rows == N_ROWS - written


class FlakyJudge(KillingJudge):
    """RuleJudge verdicts, except a judge error for every ``Oceans`` row while ``down``."""

    def __init__(self, down: bool):
        super().__init__()
        self.down = down

    def judge(self, *, responses, concepts, forced):
        verdicts = super().judge(responses=responses, concepts=concepts, forced=forced)
        return [
            Verdict(None, None, None, error="judge API down") if self.down and c == "Oceans" else v
            for v, c in zip(verdicts, concepts, strict=True)
        ]


def test_judge_errors_are_run_again_on_a_rerun(tiny, local_rows, tmp_path):
    path = tmp_path / "s.sqlite"
    first = sweep(tiny, CONCEPTS, judge=FlakyJudge(down=True), store=path, executor="ray", **PLAN)
    errors = int(first.judge_error.notna().sum())
    assert errors == N_ROWS // 3 and (first[first.judge_error.notna()].concept == "Oceans").all()
    kept = FlakyJudge(down=False)
    sweep(tiny, CONCEPTS, judge=kept, store=path, executor="ray", retry_errors=False, **PLAN)
    assert kept.rows == 0  # error rows count as done when errors are not retried
    retried = FlakyJudge(down=False)
    got = sweep(tiny, CONCEPTS, judge=retried, store=path, executor="ray", **PLAN)
    assert retried.rows == errors  # only the error rows, generated and judged again
    assert_same_rows(got, local_rows)


def test_killed_driver_resumes_on_ray_with_identical_rows(
    tiny, tiny_dir, local_rows, tmp_path, kill_a_stalled_sweep
):
    path = tmp_path / "crash.sqlite"
    # this module's warm actors hold both logical CPUs: the killed driver's actor asks for none
    pid = kill_a_stalled_sweep(
        tiny_dir,
        path,
        concepts=CONCEPTS,
        settings="layers=[1, 2], strengths=[2.0, 8.0], n_trials=2, forced=True, batch_size=4, "
        "max_new_tokens=5, executor=RayExecutor(num_actors=1, num_cpus=0, threads=1)",
        stall_at=3,
        prelude="import ray\nfrom mechintro.behaviour.executors import RayExecutor\n"
        "ray.init(address=sys.argv[3], log_to_driver=False)",
        args=[ray.get_runtime_context().gcs_address],
    )
    with TrialStore(path) as store:
        assert len(store) == 8  # two batches of four written before the kill
        leases = store.leases()
        assert len(leases) >= 4 and set(leases.owner.str.split(":").str[1]) == {str(pid)}

    judge = KillingJudge()
    start = time.monotonic()
    got = sweep(tiny, CONCEPTS, judge=judge, store=path, executor="ray", **PLAN)
    assert time.monotonic() - start < 120  # the dead driver's leases were taken over, not waited out
    assert judge.rows == N_ROWS - 8
    assert_same_rows(got, local_rows)


def test_a_model_edited_in_memory_is_refused(tiny_dir, local_rows):
    from mechintro.core.models import load_model

    edited = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        for p in edited.parameters():
            p.add_(0.01)
    with pytest.raises(ValueError, match="differs from the driver's model"):
        sweep(edited, CONCEPTS, judge=RuleJudge(), executor="ray", **PLAN)


def test_sharded_feature_grid_on_ray_equals_one_call(tiny, tmp_path_factory):
    from mechintro.core.transcoders import load_transcoders
    from mechintro.mechanism.features import feature_grid
    from mechintro.testing import save_random_transcoders

    source = save_random_transcoders(tmp_path_factory.mktemp("ray_tcs"), seed=3)
    tcs = load_transcoders(tiny, source=source)
    concepts = ["Bread", "Oceans", "Dust", "Trees"]
    kw = {"strengths": [-4.0, 0.0, 8.0], "injection_layer": 1, "layers": [1, 2, 3]}
    whole = feature_grid(tiny, tcs, concepts, **kw)
    got = sharded_feature_grid(tiny, source, concepts, shards=2, layer_shards=2, executor="ray", **kw)
    assert got.concepts == whole.concepts and got.layers == whole.layers
    for layer in whole.layers:
        assert whole.acts[layer]._nnz() > 0
        torch.testing.assert_close(got.dense(layer), whole.dense(layer), atol=1e-5, rtol=0)


def test_sharded_steering_attribution_on_ray_equals_one_call(tiny, tmp_path_factory):
    from mechintro.attribution.passes import steering_attribution
    from mechintro.attribution.sharded import sharded_steering_attribution
    from mechintro.core.transcoders import load_transcoders
    from mechintro.testing import save_random_transcoders

    source = save_random_transcoders(tmp_path_factory.mktemp("ray_att"), seed=3)
    concepts = ["Bread", "Oceans", "Dust"]
    kw = {"strengths": [0.0, 2.0, 4.0], "layer": 1}
    whole = steering_attribution(tiny, load_transcoders(tiny, source=source), concepts, progress=False, **kw)
    got = sharded_steering_attribution(tiny, source, concepts, shards=2, executor="ray", **kw)
    assert got.settings == whole.settings
    for name in ("features", "remainders", "metric"):
        a, b = (_canonical(getattr(r, name)) for r in (got, whole))  # row order follows the chunks
        assert len(a) == len(b) > 0, name
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-6)


def test_cli_sweep_with_ray_writes_the_local_rows(tiny, tiny_dir, local_rows, monkeypatch, tmp_path):
    """``mechintro sweep --ray --ray-actors 1`` fills the store with the rows of the local sweep."""
    import mechintro.behaviour.batch as batch
    from mechintro.cli.main import main

    store = tmp_path / "cli.sqlite"
    argv = ["sweep", "--model", str(tiny_dir), "--concepts", ",".join(CONCEPTS), "--layers", "1,2"]
    argv += [
        "--strengths",
        "2,8",
        "--n-trials",
        "2",
        "--forced",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "5",
    ]
    assert main([*argv, "--quiet", "--store", str(store), "--ray", "--ray-actors", "1"]) == 0
    monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("everything is in the store already"))
    assert_same_rows(sweep(tiny, CONCEPTS, judge=RuleJudge(), store=store, **PLAN), local_rows)
    with pytest.raises(SystemExit):
        main([*argv, "--quiet", "--ray-actors", "1"])


def _canonical(frame):
    keys = [c for c in ("concept", "strength", "dictionary", "layer", "position", "feature") if c in frame]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)
