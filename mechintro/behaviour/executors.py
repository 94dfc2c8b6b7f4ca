"""Executors: where the batches of a trial plan run -- in this process, or on Ray actors -- with this process
as the one writer of the trial store.

A sweep is three things (:mod:`mechintro.behaviour.trials` makes the first, this module the other two):

* **the plan**: every trial, and its batches (:func:`plan_batches`: per layer, shortest prompts first, so a
  batch holds prompts of about one length and every batch but a layer's last is full);
* **an executor** that computes batches: :class:`LocalExecutor` (this process, on the model it was given) or
  :class:`RayExecutor` (Ray actors, each loading the model once by its name and keeping it between calls);
* **one writer**: the driver (the process that called ``sweep``) claims each batch in the
  :class:`~mechintro.behaviour.store.TrialStore` before dispatching it, judges what comes back and writes the
  rows,
  batch by batch, in arrival order. Workers never open the store.

The driver's loop is the same for both executors (:func:`execute`). Every row depends only on its trial (its
own seed, :func:`mechintro.core.sampling.trial_seed`), so the executor, the number of actors and the order in
which
batches come back do not change a row.

**Leases.** A batch is claimed (:meth:`~mechintro.behaviour.store.TrialStore.claim`) just before it is
dispatched and
stays leased while it is in flight: a heartbeat renews every lease of this driver, and writing a batch's rows
releases it. Two drivers on one store split the batches. A driver that crashes leaves leases that a re-run
takes over at once when the crashed process was on this host
(:func:`mechintro.behaviour.store._is_dead_here`), or when
they expire elsewhere.

**Faults.** An actor that dies (killed, out of memory, a lost node) is replaced (at most
``max_actor_restarts`` times per call) and its batches in flight are sent again: their leases are still this
driver's. An error raised inside a batch (a bug, a bad setting) stops the call, as it would locally. Whatever
was written stays written: re-running the same call finishes the rest.

**Models on Ray.** Actors receive the model's *name* (``spec_for(model).name``: ``"organism"``, a folder
saved with ``save_pretrained``, or an HF id), never the object, and load it with
:func:`~mechintro.core.models.load_model` in the driver model's dtype, on a GPU when they were given one. A
folder
must exist at the same path on every node (``RayExecutor(model=...)`` names another path). Each actor's
weights are checked against the driver's (:func:`~mechintro.core.fingerprint.weights_fingerprint`); a model
edited in memory after loading
cannot travel to the actors, and is refused with an error rather than run as the file on disk. Actors stay
alive between calls (a notebook pays a model load once); :func:`release_ray_workers` frees them.

**Other work on the same actors.** :func:`map_on_model` runs any module-level function ``fn(model, item)``
over items on the executor's workers; :func:`sharded_feature_grid` uses it to split a feature grid over
concepts (and layers) and merges the parts exactly (:func:`mechintro.mechanism.features.merge_grids`);
:func:`sharded_steering_attribution` splits an attribution over concepts
(:func:`mechintro.attribution.passes.merge_attributions`).
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

import pandas as pd
import torch
from torch import Tensor

from mechintro.behaviour.store import Claim, TrialStore
from mechintro.behaviour.trials import (
    Trial,
    _batch_outputs,
    _Grid,
    _judged_rows,
    _layer_vectors,
    _make_batch,
    _Outputs,
    _prompt_key,
)
from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.models import Model, load_model, spec_for
from mechintro.core.prompts import TrialPrompt

if TYPE_CHECKING:
    from mechintro.attribution.passes import SteeringAttribution
    from mechintro.mechanism.features import FeatureGrid

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorName",
    "LocalExecutor",
    "RayExecutor",
    "TrialJob",
    "execute",
    "map_on_model",
    "plan_batches",
    "ray_workers",
    "release_ray_workers",
    "resolve_executor",
    "sharded_feature_grid",
    "sharded_steering_attribution",
]

ExecutorName: TypeAlias = Literal["local", "ray"]
"""``"local"``: batches run in this process; ``"ray"``: on Ray actors (:class:`RayExecutor` defaults)."""
EXECUTORS: tuple[ExecutorName, ...] = get_args(ExecutorName)


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LocalExecutor:
    """Run every batch in this process, on the model the call was given (the default executor)."""


@dataclass(frozen=True)
class RayExecutor:
    """Run batches on Ray actors; this process stays the judge and the only writer of the store.

    ``RayExecutor()`` uses the Ray instance this process is connected to, else connects as ``ray.init()``
    does (``RAY_ADDRESS``, or a cluster started on this machine with ``ray start``), else starts a local one.
    """

    address: str | None = None
    """Passed to ``ray.init`` when this process is not connected yet: ``"auto"`` (a cluster started on this
    machine), ``"ray://head:10001"`` (Ray Client; needs ``ray[client]``), ``"local"`` (always a new local
    instance), or None (``ray.init``'s own default). Ignored when Ray is initialized already."""
    num_actors: int | None = None
    """How many actors; None = as many as the cluster holds (GPUs / ``num_gpus``, else CPUs / ``num_cpus``),
    and never more than the call has batches."""
    num_gpus: float | None = None
    """GPUs per actor (a fraction shares a GPU); None = 1 when the cluster has GPUs, else 0. Actors with a
    GPU load the model on ``cuda``, the others on the CPU."""
    num_cpus: float = 1.0
    """CPUs per actor (Ray's logical CPUs)."""
    threads: int | None = None
    """``torch.set_num_threads`` in each actor; None = ``max(1, int(num_cpus))``."""
    model: str | None = None
    """What the actors load; None = ``spec_for(model).name`` of the driver's model. Use it when a local
    folder lives at another path on the workers. The rows keep the driver's model name either way."""
    in_flight: int = 2
    """Batches queued on each actor at once (2 keeps an actor busy while the driver writes)."""
    max_actor_restarts: int = 3
    """How many dead actors one call replaces before it gives up (what was written stays written)."""
    runtime_env: Mapping[str, Any] | None = None
    """Ray runtime environment of the actors, e.g. ``{"env_vars": {"HF_HOME": "/data/hf"}}``."""
    init: Mapping[str, Any] = field(default_factory=dict)
    """Other ``ray.init`` arguments, used only when this process starts or joins Ray (e.g. ``num_cpus=2``)."""

    def __post_init__(self) -> None:
        """Check every setting (errors name the field)."""
        if self.num_actors is not None and not _is_int(self.num_actors, minimum=1):
            raise ValueError(f"num_actors must be an int >= 1 or None, got {self.num_actors!r}")
        for name in ("num_gpus", "num_cpus"):
            value = getattr(self, name)
            if value is None and name == "num_gpus":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.threads is not None and not _is_int(self.threads, minimum=1):
            raise ValueError(f"threads must be an int >= 1 or None, got {self.threads!r}")
        if not _is_int(self.in_flight, minimum=1):
            raise ValueError(f"in_flight must be an int >= 1, got {self.in_flight!r}")
        if not _is_int(self.max_actor_restarts, minimum=0):
            raise ValueError(f"max_actor_restarts must be an int >= 0, got {self.max_actor_restarts!r}")
        if self.model is not None and not (isinstance(self.model, (str, os.PathLike)) and str(self.model)):
            raise ValueError(f"model must be a model name or folder (str), got {self.model!r}")

    @property
    def actor_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, int(self.num_cpus))


Executor: TypeAlias = LocalExecutor | RayExecutor


def _is_int(value: Any, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def resolve_executor(executor: str | Executor) -> Executor:
    """``"local"`` / ``"ray"`` / an executor object -> an executor object; anything else raises naming the
    choices. Asking for Ray where it is not installed fails here, before any model work."""
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; valid: {list(EXECUTORS)} or a RayExecutor(...)")
        executor = LocalExecutor() if executor == "local" else RayExecutor()
    if not isinstance(executor, (LocalExecutor, RayExecutor)):
        raise TypeError(
            f"executor must be one of {list(EXECUTORS)}, a LocalExecutor or a RayExecutor, got {executor!r}"
        )
    if isinstance(executor, RayExecutor) and importlib.util.find_spec("ray") is None:
        raise ImportError(
            "executor='ray' needs Ray: pip install 'mechintro[ray]' (or pip install 'ray>=2.40')"
        )
    return executor


# ----------------------------------------------------------------------------------------------- the plan


def plan_batches(
    todo: Sequence[Trial], prompts: Mapping[tuple, TrialPrompt], *, layers: Sequence[int], batch_size: int
) -> list[list[Trial]]:
    """Split the trials to run into batches: layer by layer (a batch injects at one layer), each layer's
    trials sorted by prompt length (stable: plan order within a length), then cut every ``batch_size``.

    Prompts of about one length share a batch (little padding), and every batch but each layer's last is
    full. The rows do not depend on the batches (per-trial seeds); only the time does.
    """
    batches: list[list[Trial]] = []
    for layer in layers:
        rows = sorted(
            (t for t in todo if t.layer == layer), key=lambda t: len(prompts[_prompt_key(t)].tokens)
        )
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return batches


@dataclass(frozen=True)
class TrialJob:
    """What one ``sweep`` call asks of an executor: its batches, and what a worker needs to compute them."""

    model: Model
    """The driver's model (the local executor runs on it; Ray actors load it by name)."""
    grid: _Grid
    """The validated call (concepts, settings; :mod:`mechintro.behaviour.trials`)."""
    batches: list[list[Trial]]
    """The trials to run, batched (:func:`plan_batches`)."""
    prompts: Mapping[tuple, TrialPrompt]
    """Every trial's prompt, by ``mechintro.behaviour.trials._prompt_key``."""
    vectors: Mapping[int, Tensor] | None = None
    """Given concept vectors ``{layer: [concept, d_model]}``; other layers are computed by the workers."""

    def prompts_of(self, trials: Sequence[Trial]) -> dict[tuple, TrialPrompt]:
        """The prompts one batch needs (what travels with it to an actor)."""
        return {_prompt_key(t): self.prompts[_prompt_key(t)] for t in trials}


class _JobRunner:
    """A worker's state for one job: the model and the concept vectors of each layer, made on first use."""

    def __init__(self, model: Model, grid: _Grid, vectors: Mapping[int, Any] | None) -> None:
        self.model, self.grid, self.given = model, grid, dict(vectors or {})
        self.by_layer: dict[int, dict[str, Tensor]] = {}

    def outputs(self, trials: Sequence[Trial], prompts: Mapping[tuple, TrialPrompt]) -> _Outputs:
        layer = trials[0].layer
        if layer not in self.by_layer:
            given = {layer: _fetch(self.given[layer])} if layer in self.given else None
            self.by_layer[layer] = _layer_vectors(self.model, self.grid, layer, given)
        batch = _make_batch(list(trials), prompts, self.by_layer[layer])
        return _batch_outputs(self.model, batch, settings=self.grid.settings, scores=self.grid.scores_logits)


def _fetch(value: Any) -> Any:
    """A Ray object reference's value (vectors put in the object store once per call), else the value."""
    if type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


# ----------------------------------------------------------------------------------------------- the driver


class _Leases:
    """Claims batches one at a time while several are in flight; renews them; releases what is not written.

    Like :class:`~mechintro.behaviour.store.ClaimQueue`, but several claims may be held at once (one per
    batch in
    flight on the workers). Keys another process holds are tried again every ``poll_s`` seconds, until they
    are written there or their lease is taken over.
    """

    def __init__(
        self, store: TrialStore, batches: Sequence[Sequence[tuple]], *, ttl_s: float, retry_errors: bool
    ) -> None:
        self.store, self.ttl_s, self.retry_errors = store, ttl_s, retry_errors
        self.poll_s = min(ttl_s / 4, 5.0)
        self._pending = collections.deque((i, list(keys)) for i, keys in enumerate(batches))
        self._waiting: list[tuple[int, list[tuple]]] = []
        self._retry_at = 0.0
        self._held: dict[int, Claim] = {}
        self._serial = itertools.count()
        self._heartbeat: Any = None
        self.skipped = 0
        """Keys found done when their batch was claimed (written meanwhile by another process)."""

    @property
    def finished(self) -> bool:
        """Nothing left to claim (every batch was claimed, skipped, or is done)."""
        return not self._pending and not self._waiting

    def next(self) -> tuple[int, Claim] | None:
        """(ticket, claim) of the next batch with keys to run now, or None if there is none right now."""
        if not self._pending and self._waiting and time.monotonic() >= self._retry_at:
            self._pending.extend(self._waiting)
            self._waiting = []
        while self._pending:
            index, keys = self._pending.popleft()
            claim = self.store.claim(keys, ttl_s=self.ttl_s, retry_errors=self.retry_errors)
            self.skipped += len(claim.done)
            if claim.busy:
                self._waiting.append((index, list(claim.busy)))
                self._retry_at = time.monotonic() + self.poll_s
            if claim:
                self._start_heartbeat()
                ticket = next(self._serial)
                self._held[ticket] = replace(claim, index=index)
                return ticket, self._held[ticket]
        return None

    def wait(self) -> None:
        """Sleep until busy keys may be claimed again."""
        time.sleep(max(0.0, self._retry_at - time.monotonic()))

    def written(self, ticket: int) -> None:
        """The claim's rows are stored (which released its leases)."""
        self._held.pop(ticket, None)

    def _start_heartbeat(self) -> None:
        from mechintro.behaviour.leases import _Heartbeat

        if self._heartbeat is None and self.store.shared:
            self._heartbeat = _Heartbeat(self.store.path, self.store.owner, self.ttl_s)
            self._heartbeat.start()

    def close(self) -> None:
        """Stop renewing; release the keys of claims that were not written (idempotent)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        held, self._held = list(self._held.values()), {}
        for claim in held:
            self.store.release(claim.keys)


def execute(
    job: TrialJob,
    *,
    judge: Any,
    store: TrialStore,
    executor: Executor,
    progress: bool = False,
    retry_errors: bool = True,
    lease_s: float = 600.0,
) -> None:
    """Run ``job``'s batches on ``executor``; judge and write each batch here as it comes back.

    The loop: claim the next batch in the store, hand it to a worker with room, and whenever a batch comes
    back, judge it and write its rows (one transaction; it releases the batch's leases). Leaving the loop, on
    success or on an error, releases the leases of batches not written.
    """
    from tqdm.auto import tqdm

    settings = job.grid.settings
    if not job.batches:
        return
    by_key = {t.key(settings): t for batch in job.batches for t in batch}
    keys = [[t.key(settings) for t in batch] for batch in job.batches]
    total = len(by_key)
    with (
        _workers(executor, job) as pool,
        _closing(_Leases(store, keys, ttl_s=lease_s, retry_errors=retry_errors)) as leases,
        tqdm(total=total, disable=not progress, desc=pool.description, unit="trial") as bar,
    ):
        while True:
            while pool.has_room():
                got = leases.next()
                if got is None:
                    break
                ticket, claim = got
                pool.submit(ticket, [by_key[k] for k in claim.keys])
            if not pool.busy:
                if leases.finished:
                    break
                leases.wait()
                continue
            for ticket, trials, outputs in pool.results(timeout=leases.poll_s):
                store.write(_judged_rows(trials, outputs, judge=judge, settings=settings))
                leases.written(ticket)
                bar.update(len(trials))
                bar.set_description(f"{pool.description}, layer {trials[0].layer}")
        bar.update(leases.skipped)


@contextmanager
def _closing(thing: Any) -> Iterator[Any]:
    try:
        yield thing
    finally:
        thing.close()


# ----------------------------------------------------------------------------------------------- local


class _LocalPool:
    """One in-process worker on the driver's model: a batch is computed when its result is asked for."""

    description = "trials"

    def __init__(self, job: TrialJob) -> None:
        self.job, self.runner = job, _JobRunner(job.model, job.grid, job.vectors)
        self._queue: collections.deque[tuple[int, list[Trial]]] = collections.deque()

    @property
    def busy(self) -> int:
        return len(self._queue)

    def has_room(self) -> bool:
        return not self._queue

    def submit(self, ticket: int, trials: list[Trial]) -> None:
        self._queue.append((ticket, trials))

    def results(self, *, timeout: float) -> Iterator[tuple[int, list[Trial], _Outputs]]:
        ticket, trials = self._queue.popleft()
        yield ticket, trials, self.runner.outputs(trials, self.job.prompts)

    def close(self) -> None:
        self._queue.clear()


@contextmanager
def _workers(executor: Executor, job: TrialJob) -> Iterator[Any]:
    pool = _LocalPool(job) if isinstance(executor, LocalExecutor) else _RayPool(executor, job)
    try:
        yield pool
    finally:
        pool.close()


# ----------------------------------------------------------------------------------------------- Ray


class _Worker:
    """The Ray actor: one model, loaded once; runs trial batches and ``fn(model, item)`` calls."""

    def __init__(self, name: str, *, device: str, dtype: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = load_model(name, device=device, dtype=getattr(torch, dtype))
        self.fingerprint = weights_fingerprint(self.model)
        self.jobs: collections.OrderedDict[str, _JobRunner] = collections.OrderedDict()
        self.batches = 0

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "device": str(self.model.cfg.device),
            "fingerprint": self.fingerprint,
            "threads": torch.get_num_threads(),
            "batches": self.batches,
        }

    def start_job(self, job_id: str, grid: _Grid, vectors: Mapping[int, Any] | None) -> None:
        self.jobs[job_id] = _JobRunner(self.model, grid, vectors)
        while len(self.jobs) > 2:  # a finished call's vectors are dropped
            self.jobs.popitem(last=False)

    def run(self, job_id: str, trials: list[Trial], prompts: Mapping[tuple, TrialPrompt]) -> _Outputs:
        self.batches += 1
        return self.jobs[job_id].outputs(trials, prompts)

    def call(self, fn: Callable[..., Any], item: Any) -> Any:
        self.batches += 1
        return fn(self.model, item)


@dataclass
class _Actor:
    """A live actor handle with what it reported at start."""

    handle: Any
    info: dict[str, Any]
    in_flight: int = 0


@dataclass
class _ActorSet:
    """Actors of one (model, resources) kind, kept between calls; ``busy`` while a call uses them."""

    key: tuple
    name: str
    options: dict[str, Any]
    init_kw: dict[str, Any]
    actors: list[_Actor] = field(default_factory=list)
    busy: bool = False


_ACTOR_SETS: dict[tuple, _ActorSet] = {}
"""The actors this process started, by (Ray job, model, resources): reused by later calls."""
_REMOTE: dict[str, Any] = {}


def _ray() -> Any:
    import ray

    return ray


def _connect(executor: RayExecutor) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=executor.address, **dict(executor.init))
    return ray


def _remote_worker() -> Any:
    if "worker" not in _REMOTE:
        _REMOTE["worker"] = _ray().remote(_Worker)
    return _REMOTE["worker"]


def _actor_gpus(executor: RayExecutor, ray: Any) -> float:
    if executor.num_gpus is not None:
        return float(executor.num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _n_actors(executor: RayExecutor, ray: Any, *, gpus: float, work: int) -> int:
    if executor.num_actors is not None:
        wanted = executor.num_actors
    else:
        resources = ray.cluster_resources()
        if gpus > 0:
            wanted = int(resources.get("GPU", 0) // gpus)
        else:
            wanted = int(resources.get("CPU", 1) // executor.num_cpus) if executor.num_cpus > 0 else 1
    return max(1, min(wanted, work))


def _actor_set(executor: RayExecutor, model: Model) -> _ActorSet:
    """The (cached) actor set for ``model`` under ``executor``'s resources."""
    ray = _connect(executor)
    gpus = _actor_gpus(executor, ray)
    name = str(executor.model or spec_for(model).name)
    dtype = str(model.cfg.dtype).removeprefix("torch.")
    device = "cuda" if gpus > 0 else "cpu"
    env = json.dumps(dict(executor.runtime_env or {}), sort_keys=True, default=str)
    key = (ray.get_runtime_context().get_job_id(), name, dtype, device, executor.num_cpus, gpus, env)
    key += (executor.actor_threads,)
    if key not in _ACTOR_SETS:
        options: dict[str, Any] = {"num_cpus": executor.num_cpus, "num_gpus": gpus}
        if executor.runtime_env:
            options["runtime_env"] = dict(executor.runtime_env)
        init_kw = {"device": device, "dtype": dtype, "threads": executor.actor_threads}
        _ACTOR_SETS[key] = _ActorSet(key=key, name=name, options=options, init_kw=init_kw)
    return _ACTOR_SETS[key]


def _start_actors(actor_set: _ActorSet, n: int) -> list[_Actor]:
    """``n`` new actors, each loaded and reporting; a failure to load raises naming the model."""
    ray = _ray()
    handles = [
        _remote_worker().options(**actor_set.options).remote(actor_set.name, **actor_set.init_kw)
        for _ in range(n)
    ]
    try:
        infos = ray.get([h.info.remote() for h in handles])
    except ray.exceptions.RayActorError as e:
        for h in handles:
            ray.kill(h)
        raise RuntimeError(
            f"the Ray actors could not load the model {actor_set.name!r} (a local folder must exist at that "
            f"path on every node; RayExecutor(model=...) names another): {e}"
        ) from None
    return [_Actor(h, info) for h, info in zip(handles, infos, strict=True)]


def _alive(actors: list[_Actor]) -> list[_Actor]:
    """The actors that are not dead (a dead one answers with an error at once; a busy one is kept)."""
    ray = _ray()
    pings = {actor.handle.info.remote(): actor for actor in actors}
    ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=5.0) if pings else ([], [])
    alive = []
    for ref, actor in pings.items():
        if ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                ray.kill(actor.handle)
                continue
        alive.append(actor)
    return alive


def _check_fingerprints(actors: list[_Actor], model: Model, name: str) -> None:
    expected = weights_fingerprint(model)
    wrong = [a.info["pid"] for a in actors if a.info["fingerprint"] != expected]
    if wrong:
        raise ValueError(
            f"the model the Ray actors loaded from {name!r} differs from the driver's model (weights "
            f"fingerprint {expected}; actors {wrong} differ). Actors load the model by its name, so a "
            f"model changed in memory after load_model cannot run on Ray: save it with save_pretrained and "
            f"load that folder, or use executor='local'. If the folder changed after the actors loaded it, "
            f"call mechintro.behaviour.executors.release_ray_workers() and run again."
        )


class _RayPool:
    """The actors of one call: dispatch with ``in_flight`` batches per actor, collect, replace the dead."""

    def __init__(
        self, executor: RayExecutor, job: TrialJob | None, *, model: Model | None = None, work: int = 0
    ) -> None:
        ray = _connect(executor)
        self.executor = executor
        self.model = job.model if job is not None else model
        self.job = job
        self.set = _actor_set(executor, self.model)
        if self.set.busy:
            raise RuntimeError(
                "another call in this process is using these Ray actors; run calls one at a time"
            )
        work = len(job.batches) if job is not None else work
        n = _n_actors(executor, ray, gpus=float(self.set.options["num_gpus"]), work=work)
        self.set.actors = _alive(self.set.actors)
        if len(self.set.actors) < n:
            self.set.actors += _start_actors(self.set, n - len(self.set.actors))
        _check_fingerprints(self.set.actors, self.model, self.set.name)
        self.actors = self.set.actors[:n]
        for actor in self.actors:
            actor.in_flight = 0
        self.job_id = os.urandom(8).hex()
        self.vectors = {}
        if job is not None and job.vectors:
            self.vectors = {layer: ray.put(v) for layer, v in job.vectors.items()}
        for actor in self.actors:
            self._start_job(actor)
        self.restarts = 0
        self._flight: dict[Any, tuple[_Actor, int, Any]] = {}
        self.description = f"trials on {len(self.actors)} Ray actors"
        self.set.busy = True

    def _start_job(self, actor: _Actor) -> None:
        if self.job is not None:
            actor.handle.start_job.remote(self.job_id, self.job.grid, self.vectors)

    @property
    def busy(self) -> int:
        return len(self._flight)

    def has_room(self) -> bool:
        return any(a.in_flight < self.executor.in_flight for a in self.actors)

    def _send(self, ticket: int, payload: Any) -> None:
        actor = min(self.actors, key=lambda a: a.in_flight)
        if self.job is not None:
            ref = actor.handle.run.remote(self.job_id, payload, self.job.prompts_of(payload))
        else:
            fn, item = payload
            ref = actor.handle.call.remote(fn, item)
        actor.in_flight += 1
        self._flight[ref] = (actor, ticket, payload)

    def submit(self, ticket: int, payload: Any) -> None:
        self._send(ticket, payload)

    def _replace(self, dead: _Actor, error: Exception) -> None:
        ray = _ray()
        if dead not in self.actors:
            return  # replaced already (each of its batches in flight reports the death)
        self.restarts += 1
        if self.restarts > self.executor.max_actor_restarts:
            raise RuntimeError(
                f"{self.restarts} Ray actors died in this call (max_actor_restarts="
                f"{self.executor.max_actor_restarts}); the rows written so far are kept, and running the "
                f"same call again finishes the rest. Last error: {error}"
            ) from None
        ray.kill(dead.handle)
        (fresh,) = _start_actors(self.set, 1)
        _check_fingerprints([fresh], self.model, self.set.name)
        self._start_job(fresh)
        self.actors[self.actors.index(dead)] = fresh
        self.set.actors[self.set.actors.index(dead)] = fresh

    def results(self, *, timeout: float) -> Iterator[tuple[int, Any, Any]]:
        ray = _ray()
        ready, _ = ray.wait(list(self._flight), num_returns=1, timeout=timeout)
        for ref in ready:
            actor, ticket, payload = self._flight.pop(ref)
            actor.in_flight -= 1
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._replace(actor, e)
                self._send(ticket, payload)  # its lease is still ours
                continue
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
            yield ticket, payload, out

    def close(self) -> None:
        ray = _ray()
        for ref in list(self._flight):
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort: the actor may be gone already
                pass
        self._flight.clear()
        self.set.busy = False


def ray_workers(*, live: bool = True) -> pd.DataFrame:
    """The Ray actors this process keeps: model, pid, node, device, threads, weights fingerprint, and how many
    batches (or ``map_on_model`` items) each has run. ``live=True`` asks each actor now (it answers after the
    work queued on it; a dead one shows device "dead"); ``live=False`` gives what they reported at start."""
    columns = ["model", "pid", "node", "device", "threads", "fingerprint", "batches"]
    actors = [(s.name, a) for s in _ACTOR_SETS.values() for a in s.actors]
    rows = []
    for name, actor in actors:
        info = actor.info
        if live:
            ray = _ray()
            try:
                info = ray.get(actor.handle.info.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                info = actor.info | {"batches": None, "device": "dead"}
        rows.append({"model": name, **info})
    return pd.DataFrame(rows, columns=columns)


def release_ray_workers() -> int:
    """Kill the Ray actors this process keeps (their models leave memory); return how many."""
    n = 0
    if importlib.util.find_spec("ray") is None:
        return 0
    ray = _ray()
    for actor_set in list(_ACTOR_SETS.values()):
        if actor_set.busy:
            raise RuntimeError("a call is using the Ray actors; release them after it returns")
        for actor in actor_set.actors:
            if ray.is_initialized():
                ray.kill(actor.handle)
            n += 1
    _ACTOR_SETS.clear()
    return n


# ----------------------------------------------------------------------------------------------- other work


def map_on_model(
    fn: Callable[[Model, Any], Any], items: Sequence[Any], *, model: Model, executor: str | Executor = "local"
) -> list[Any]:
    """``[fn(model, item) for item in items]``, on the executor's workers; results in the order of ``items``.

    On Ray, each actor's own copy of ``model`` (loaded by name, checked by
    :func:`~mechintro.core.fingerprint.weights_fingerprint`) is
    passed, so ``fn`` must be a module-level function (pickled by reference) and ``item`` small and picklable.
    A dead actor is replaced and its items run again (so ``fn`` should have no side effects). This is the hook
    for sharding any per-item analysis (feature grids by concept, attribution by concept and strength).
    """
    executor = resolve_executor(executor)
    items = list(items)
    if isinstance(executor, LocalExecutor):
        return [fn(model, item) for item in items]
    if not items:
        return []
    results: dict[int, Any] = {}
    todo = collections.deque(enumerate(items))
    pool = _RayPool(executor, None, model=model, work=len(items))
    try:
        while todo or pool.busy:
            while todo and pool.has_room():
                index, item = todo.popleft()
                pool.submit(index, (fn, item))
            for index, _payload, out in pool.results(timeout=5.0):
                results[index] = out
    finally:
        pool.close()
    return [results[i] for i in range(len(items))]


def _grid_part(model: Model, part: dict[str, Any]) -> FeatureGrid:
    """One shard of :func:`sharded_feature_grid` (run where the model is)."""
    from mechintro.core.transcoders import load_transcoders
    from mechintro.mechanism.features import feature_grid

    part = dict(part)
    transcoders = part.pop("transcoders")
    if not isinstance(transcoders, Mapping):
        transcoders = load_transcoders(model, part["layers"], source=transcoders)
    return feature_grid(model, transcoders, **part)


def sharded_feature_grid(
    model: Model,
    transcoders: Mapping[int, Any] | str | Path | None,
    concepts: Sequence[str],
    *,
    shards: int,
    layer_shards: int = 1,
    executor: str | Executor = "local",
    layers: Sequence[int] | None = None,
    vectors: Tensor | None = None,
    injection_layer: int | None = None,
    **grid_kw: Any,
) -> FeatureGrid:
    """:func:`~mechintro.mechanism.features.feature_grid` split into ``shards`` concept chunks x
    ``layer_shards`` layer
    groups, run on ``executor``, and merged (:func:`~mechintro.mechanism.features.merge_grids`) into the grid
    one call
    gives.

    Concept vectors are computed once here, over every concept (as one unsharded call does), and each shard
    gets its slice, so every shard injects exactly the unsharded vectors. A grid row depends only on its own
    (concept, strength) forward, so the merged grid equals the unsharded one up to float rounding of
    different batch shapes. ``layer_shards`` splits the transcoder layers: a worker then loads only its
    layers' dictionaries (the memory that limits 262k-wide transcoders), at the price of one forward per
    layer group.

    Args:
        transcoders: a ``{layer: transcoder}`` mapping (local executor only), or where the workers load them
            from: a sae-lens release or folder, or None for the model's own
            (:func:`~mechintro.core.transcoders.load_transcoders`).
        shards / layer_shards: how many concept chunks / layer groups (each at least one item).
        layers: transcoder layers (default: those of the mapping, or every layer of the model).
        Other arguments: those of :func:`~mechintro.mechanism.features.feature_grid`.
    """
    from mechintro.core.concepts import concept_vectors
    from mechintro.core.hooks import check_layer
    from mechintro.mechanism.features import merge_grids

    executor = resolve_executor(executor)
    concepts = list(concepts)
    if not _is_int(shards, minimum=1) or not _is_int(layer_shards, minimum=1):
        raise ValueError(f"shards and layer_shards must be ints >= 1, got {shards!r}, {layer_shards!r}")
    if isinstance(transcoders, Mapping) and isinstance(executor, RayExecutor):
        raise TypeError(
            "transcoder objects cannot travel to Ray actors: pass where to load them from (a sae-lens "
            "release, a folder, or None for the model's own)"
        )
    spec = spec_for(model)
    if layers is None:
        layers = sorted(transcoders) if isinstance(transcoders, Mapping) else list(range(spec.n_layers))
    layers = [check_layer(model, layer) for layer in layers]
    injection_layer = spec.injection_layer if injection_layer is None else check_layer(model, injection_layer)
    if vectors is None:
        vectors = concept_vectors(model, concepts, layer=injection_layer)
    vectors = torch.as_tensor(vectors).float().cpu()
    if vectors.shape[0] != len(concepts):
        raise ValueError(f"vectors has {vectors.shape[0]} rows for {len(concepts)} concepts")
    parts = []
    for c in _split(range(len(concepts)), shards):
        for group in _split(layers, layer_shards):
            part = {
                "transcoders": (
                    {la: transcoders[la] for la in group} if isinstance(transcoders, Mapping) else transcoders
                ),
                "concepts": [concepts[i] for i in c],
                "vectors": vectors[list(c)],
                "layers": list(group),
                "injection_layer": injection_layer,
                **grid_kw,
            }
            parts.append(part)
    return merge_grids(map_on_model(_grid_part, parts, model=model, executor=executor))


def _attribution_part(model: Model, part: dict[str, Any]) -> SteeringAttribution:
    """One shard of :func:`sharded_steering_attribution` (run where the model is)."""
    from mechintro.attribution.passes import steering_attribution
    from mechintro.core.transcoders import load_transcoders

    part = dict(part)
    transcoders = part.pop("transcoders")
    if not isinstance(transcoders, Mapping):  # one layer in memory at a time on the worker
        transcoders = load_transcoders(model, source=transcoders, lazy=True)
    return steering_attribution(model, transcoders, part.pop("concepts"), progress=False, **part)


def sharded_steering_attribution(
    model: Model,
    transcoders: Mapping[int, Any] | str | Path | None,
    concepts: Sequence[str],
    *,
    shards: int,
    executor: str | Executor = "local",
    vectors: Tensor | None = None,
    layer: int | None = None,
    **attribution_kw: Any,
) -> SteeringAttribution:
    """:func:`~mechintro.attribution.passes.steering_attribution` split into ``shards`` concept chunks, run on
    ``executor`` and merged (:func:`~mechintro.attribution.passes.merge_attributions`).

    Each concept's rows depend only on that concept (its vector, the strength grid, the prompt), so the
    merged result equals one call up to float rounding of different batch shapes. Concept vectors are
    computed once here and sliced, so every shard injects exactly the unsharded vectors.

    Args:
        transcoders: a ``{layer: transcoder}`` mapping (local executor only), or where the workers load them
            from (a sae-lens release or folder, or None for the model's own), lazily, one layer at a time.
        shards: how many concept chunks (at least one concept each).
        Other arguments: those of :func:`~mechintro.attribution.passes.steering_attribution` (``saes`` must
            be picklable to travel to Ray actors).
    """
    from mechintro.attribution.passes import merge_attributions
    from mechintro.core.concepts import check_concepts, concept_vectors
    from mechintro.core.hooks import check_layer

    executor = resolve_executor(executor)
    concepts = check_concepts([concepts] if isinstance(concepts, str) else concepts)
    if not _is_int(shards, minimum=1):
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    if isinstance(transcoders, Mapping) and isinstance(executor, RayExecutor):
        raise TypeError(
            "transcoder objects cannot travel to Ray actors: pass where to load them from (a sae-lens "
            "release, a folder, or None for the model's own)"
        )
    layer = spec_for(model).injection_layer if layer is None else check_layer(model, layer)
    if vectors is None:
        vectors = concept_vectors(model, concepts, layer=layer)
    vectors = torch.as_tensor(vectors).float().cpu()
    if vectors.shape[0] != len(concepts):
        raise ValueError(f"vectors has {vectors.shape[0]} rows for {len(concepts)} concepts")
    parts = [
        {
            "transcoders": transcoders,
            "concepts": [concepts[i] for i in chunk],
            "vectors": vectors[chunk],
            "layer": layer,
            **attribution_kw,
        }
        for chunk in _split(range(len(concepts)), shards)
    ]
    return merge_attributions(map_on_model(_attribution_part, parts, model=model, executor=executor))


def _split(items: Sequence[Any], n: int) -> list[list[Any]]:
    """``items`` in ``n`` contiguous chunks of near-equal size (fewer if there are fewer items)."""
    items = list(items)
    n = min(n, len(items))
    if n == 0:
        raise ValueError("nothing to split: no concepts or no layers")
    bounds = [round(i * len(items) / n) for i in range(n + 1)]
    return [items[a:b] for a, b in itertools.pairwise(bounds)]
