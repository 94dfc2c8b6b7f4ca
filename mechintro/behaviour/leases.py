"""Batch leases for runs that share one store: the :class:`Claim` record, the :class:`ClaimQueue` runner loop
and the heartbeat thread that renews a live claimant's leases (used by :mod:`mechintro.behaviour.store`).

The SQL lives in :class:`mechintro.behaviour.store.TrialStore` (``claim``, ``renew``, ``release``); this
module only
drives it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mechintro.behaviour.store import TrialStore


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
    """Position of the batch in the list given to :meth:`TrialStore.claims` (None for a direct claim)."""

    def __bool__(self) -> bool:
        return bool(self.keys)


class _Heartbeat(threading.Thread):
    """Renews every lease of ``owner`` each ``ttl_s / 3`` seconds, on its own connection, until stopped."""

    def __init__(self, path: Path, owner: str, ttl_s: float) -> None:
        super().__init__(name=f"lease-heartbeat-{owner}", daemon=True)
        self.path, self.owner, self.ttl_s = path, owner, ttl_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=max(self.ttl_s, 1.0), isolation_level=None)
        try:
            while not self._stop_event.wait(self.ttl_s / 3):
                try:
                    conn.execute(
                        "UPDATE leases SET expires = ? WHERE owner = ?",
                        (time.time() + self.ttl_s, self.owner),
                    )
                except sqlite3.Error:  # a busy store: try again at the next beat (the lease lasts ttl_s)
                    pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class ClaimQueue:
    """Iterate over the claims of a run's batches; see :meth:`TrialStore.claims`. Use it in a ``with``."""

    def __init__(
        self,
        store: TrialStore,
        batches: Sequence[Sequence[Sequence[Any]]],
        *,
        ttl_s: float,
        poll_s: float,
        retry_errors: bool,
        owner: str,
    ) -> None:
        self.store, self.ttl_s, self.poll_s = store, ttl_s, poll_s
        self.retry_errors, self.owner = retry_errors, owner
        self._pending = [(i, [tuple(k) for k in keys]) for i, keys in enumerate(batches)]
        self._held: Claim | None = None
        self._heartbeat: _Heartbeat | None = None
        self.skipped = 0
        """Keys found done when their batch was claimed (stored meanwhile, e.g. by another process)."""

    def __iter__(self) -> Iterator[Claim]:
        """Claims of granted keys, batch by batch; busy keys are tried again after the others."""
        try:
            while self._pending:
                waiting = []
                for index, keys in self._pending:
                    claim = self.store.claim(
                        keys, ttl_s=self.ttl_s, owner=self.owner, retry_errors=self.retry_errors
                    )
                    self.skipped += len(claim.done)
                    if claim.busy:
                        waiting.append((index, list(claim.busy)))
                    if not claim:
                        continue
                    self._start_heartbeat()
                    self._held = replace(claim, index=index)
                    yield self._held
                    self._release_held()
                self._pending = waiting
                if waiting:
                    time.sleep(self.poll_s)
        finally:
            self.close()

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None and self.store.shared:
            self._heartbeat = _Heartbeat(self.store.path, self.owner, self.ttl_s)
            self._heartbeat.start()

    def _release_held(self) -> None:
        """Give back the held claim's keys that were not written (written ones are released already)."""
        if self._held is not None:
            held, self._held = self._held, None
            self.store.release(held.keys, owner=self.owner)

    def close(self) -> None:
        """Stop renewing and release what is held (idempotent)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        self._release_held()
        self._pending = []

    def __enter__(self) -> ClaimQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
