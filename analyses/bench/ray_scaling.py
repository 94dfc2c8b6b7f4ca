"""Benchmark: sweep trials/s against the number of Ray actors on this machine, and what the driver (the one
writer of the trial store) spends per batch.

For each worker count (``--workers 1,2``) the same sweep runs on a local Ray instance, each actor with
``torch.set_num_threads(1)``, into a fresh SQLite store, after a warm-up call that starts the actors (their
start is timed apart). The in-process executor runs it too, as the baseline. Timed in the driver:

* **wall**: the whole call; trials/s = trials / wall;
* **driver busy**: claiming batches, judging (RuleJudge) and writing rows -- the work only the driver does;
  everything else is time the driver waits for actors;
* **store capacity**: rows/s the store takes when nothing else runs (claim + write of batches of the same
  size, synthetic rows), so ``capacity / trials/s`` is how many times more trials the writer could absorb.

The store is not the bottleneck when the driver is busy for a small fraction of the wall time and the
capacity is many times the trial rate. Writes a JSON to analyses/bench/results/.

    python analyses/bench/ray_scaling.py                  # the organism
    python analyses/bench/ray_scaling.py --model tiny     # a random tiny Gemma 3 (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mechintro.behaviour.executors import LocalExecutor, RayExecutor, ray_workers, release_ray_workers
from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.store import TrialStore
from mechintro.behaviour.trials import sweep
from mechintro.cli import setup as runs
from mechintro.core.concepts import original_concepts
from mechintro.core.models import spec_for

RESULTS = Path(__file__).resolve().parent / "results"


class TimedStore(TrialStore):
    """A TrialStore that adds up the seconds spent in ``claim`` and ``write`` (the driver's store work)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seconds = {"claim": 0.0, "write": 0.0}
        self.calls = {"claim": 0, "write": 0}

    def _timed(self, name: str, fn: Any, *args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def claim(self, *args: Any, **kw: Any) -> Any:
        return self._timed("claim", super().claim, *args, **kw)

    def write(self, *args: Any, **kw: Any) -> Any:
        return self._timed("write", super().write, *args, **kw)


class TimedJudge:
    """RuleJudge, timed."""

    name = "rule"

    def __init__(self) -> None:
        self.inner, self.seconds = RuleJudge(), 0.0

    def judge(self, **rows: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.judge(**rows)
        finally:
            self.seconds += time.perf_counter() - start


def run_once(model: Any, concepts: list[str], args: argparse.Namespace, executor: Any, folder: Path) -> dict:
    """One timed sweep into a fresh store."""
    path = folder / f"run_{time.monotonic_ns()}.sqlite"
    judge = TimedJudge()
    with TimedStore(path) as store:
        start = time.perf_counter()
        df = sweep(model, concepts, judge=judge, store=store, executor=executor, **sweep_kw(model, args))
        wall = time.perf_counter() - start
        driver = store.seconds["claim"] + store.seconds["write"] + judge.seconds
        return {
            "trials": len(df),
            "batches": store.calls["write"],
            "wall_s": wall,
            "trials_per_s": len(df) / wall,
            "new_tokens": int(df.n_new_tokens.sum()),
            "claim_s": store.seconds["claim"],
            "write_s": store.seconds["write"],
            "judge_s": judge.seconds,
            "driver_busy_s": driver,
            "driver_busy_fraction": driver / wall,
            "write_ms_per_batch": 1000 * store.seconds["write"] / max(1, store.calls["write"]),
            "batch_s": wall / max(1, store.calls["write"]),
            "responses": df.response.tolist(),
        }


def sweep_kw(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    spec = spec_for(model)
    return {
        "layers": [spec.injection_layer],
        "strengths": [spec.strength],
        "n_trials": args.n_trials,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "progress": False,
    }


def store_capacity(args: argparse.Namespace, folder: Path, n_rows: int) -> dict[str, float]:
    """Rows/s of claim + write alone, in batches of ``--batch-size`` synthetic rows."""
    rows = [
        {
            "model": "bench",
            "concept": f"c{i // 100}",
            "trial": 1 + i % 10,
            "sample": (i // 10) % 10,
            "condition": "injection",
            "layer": 3,
            "strength": 2.0,
            "variant": "original",
            "persona": "standard_assistant",
            "seed": 0,
            "judge": "rule",
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "response": "No, I do not detect an injected thought.",
            "n_new_tokens": 10,
            "detected": False,
            "identified": False,
        }
        for i in range(n_rows)
    ]
    with TrialStore(folder / "capacity.sqlite") as store:
        keys = [tuple(r[c] for c in TrialStore.KEY_COLUMNS) for r in rows]
        start = time.perf_counter()
        for i in range(0, n_rows, args.batch_size):
            assert store.claim(keys[i : i + args.batch_size], ttl_s=600)
            store.write(rows[i : i + args.batch_size])
        seconds = time.perf_counter() - start
    return {"rows": n_rows, "seconds": seconds, "rows_per_s": n_rows / seconds}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']} on {result['cpu_count']} CPU cores, {result['trials']} trials per run, "
        f"batch {result['batch_size']}, max_new_tokens {result['max_new_tokens']}",
        f"{'executor':<18}{'trials/s':>10}{'speedup':>9}{'wall s':>9}{'driver busy':>13}"
        f"{'write ms/batch':>16}{'start s':>9}",
    ]
    base = result["runs"][0]["trials_per_s"]
    for r in result["runs"]:
        lines.append(
            f"{r['executor']:<18}{r['trials_per_s']:>10.1f}{r['trials_per_s'] / base:>8.2f}x"
            f"{r['wall_s']:>9.2f}{100 * r['driver_busy_fraction']:>12.1f}%{r['write_ms_per_batch']:>16.2f}"
            f"{r.get('actor_start_s', 0.0):>9.1f}"
        )
    cap = result["store_capacity"]
    lines.append(
        f"store alone: {cap['rows_per_s']:.0f} rows/s (claim + write, batch {result['batch_size']}) = "
        f"{result['store_headroom']:.0f}x the fastest trial rate measured"
    )
    lines.append(f"identical responses across executors: {result['identical']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="organism, a folder, an HF id, or 'tiny'")
    p.add_argument("--n-concepts", type=int, default=16, help="concepts (the first of the original 50)")
    p.add_argument("--n-trials", type=int, default=16, help="trials per concept and condition")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="comma-separated actor counts")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import ray

    args = parse_args(argv)
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    model = runs.load_named_model(args.model, device="cpu")
    concepts = original_concepts()[: args.n_concepts]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sweep(
            model,
            concepts[:1],
            judge=RuleJudge(),
            executor="local",
            **(sweep_kw(model, args) | {"n_trials": 1}),
        )
        local = run_once(model, concepts, args, LocalExecutor(), folder)
        results.append({"executor": "local (in-process)", "workers": 0, **local})
        ray.init(num_cpus=max(workers), log_to_driver=False, include_dashboard=False)
        try:
            for n in workers:
                release_ray_workers()
                executor = RayExecutor(num_actors=n, threads=1)
                start = time.perf_counter()
                warm = sweep_kw(model, args) | {"n_trials": 1, "batch_size": 1}
                sweep(model, concepts[:n], judge=RuleJudge(), executor=executor, **warm)  # starts the actors
                actor_start = time.perf_counter() - start
                assert len(ray_workers()) == n
                got = run_once(model, concepts, args, executor, folder)
                results.append({"executor": f"ray x {n}", "workers": n, "actor_start_s": actor_start, **got})
            release_ray_workers()
        finally:
            ray.shutdown()
        capacity = store_capacity(args, folder, n_rows=max(2000, results[0]["trials"]))
    identical = all(r["responses"] == results[0]["responses"] for r in results)
    for r in results:
        del r["responses"]
    result = {
        "model": args.model,
        "model_name": spec_for(model).name,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "trials": results[0]["trials"],
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "runs": results,
        "store_capacity": capacity,
        "store_headroom": capacity["rows_per_s"] / max(r["trials_per_s"] for r in results),
        "identical": identical,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    slug = Path(args.model).name if Path(args.model).exists() else args.model.replace("/", "_")
    path = args.out / f"ray_scaling_{slug}_cpu.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
