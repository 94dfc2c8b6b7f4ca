"""Batch leases for runs that share one store: :class:`ClaimQueue`, the one lease loop over a
:class:`~mechintro.behaviour.store.TrialStore`, and the heartbeat thread that renews a live claimant's leases.

Like the store, this module imports neither torch nor the rest of the package. The SQL of a claim lives in
the store (:meth:`~mechintro.behaviour.store.TrialStore.claim`, ``renew``, ``release``); this module drives
it. A queue hands out the claims of a run's batches, either one at a time
(iterate over it: each claim is given back when the loop moves on) or several at once (:meth:`ClaimQueue.next`
while workers have room, :meth:`ClaimQueue.written` as their rows are stored), which is how the executors keep
several batches in flight. Keys another process holds are tried again every ``poll_s`` seconds, until they are
written there or their lease expires (or their owner died on this host) and they are taken over.
"""

from __future__ import annotations

import collections
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mechintro.behaviour.store import Claim, TrialStore, check_seconds

__all__ = ["Claim", "ClaimQueue"]


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
    """The claims of a run's batches in a store shared by several processes. Use it in a ``with`` block.

    ``batches`` is the run's batches of keys, in the order to run them. Each claim holds the keys of one batch
    (``claim.index``) that this process got: run them and ``write`` their rows. Keys that are done are skipped
    (counted in :attr:`skipped`); keys another process holds are tried again after the other batches, every
    ``poll_s`` seconds (default ``min(ttl_s / 4, 5)``). While a claim is held a heartbeat thread renews it
    every ``ttl_s / 3`` seconds; leaving the ``with`` block (also on an error) releases what was not
    written::

        with ClaimQueue(store, batches, ttl_s=120) as queue:
            for claim in queue:
                store.write(run(claim.keys))
    """

    def __init__(
        self,
        store: TrialStore,
        batches: Sequence[Sequence[Sequence[Any]]],
        *,
        ttl_s: float = 120.0,
        poll_s: float | None = None,
        retry_errors: bool = True,
        owner: str | None = None,
    ) -> None:
        store.check_writable()
        self.store = store
        self.ttl_s = check_seconds("ttl_s", ttl_s)
        self.poll_s = min(self.ttl_s / 4, 5.0) if poll_s is None else check_seconds("poll_s", poll_s)
        """How long busy keys wait before they are tried again."""
        self.retry_errors = bool(retry_errors)
        self.owner = owner or store.owner
        """Who the claims are for (default: the store's owner id)."""
        self._pending = collections.deque((i, [tuple(k) for k in keys]) for i, keys in enumerate(batches))
        self._waiting: list[tuple[int, list[tuple]]] = []
        self._retry_at = 0.0
        self._held: dict[int, Claim] = {}
        self._serial = itertools.count()
        self._heartbeat: _Heartbeat | None = None
        self.skipped = 0
        """Keys found done when their batch was claimed (stored meanwhile, e.g. by another process)."""

    @property
    def finished(self) -> bool:
        """Nothing left to claim (every batch was claimed, skipped, or is done)."""
        return not self._pending and not self._waiting

    def next(self) -> tuple[int, Claim] | None:
        """(ticket, claim) of the next batch with keys to run now, or None if there is none right now (then
        :meth:`wait`, unless :attr:`finished`). Several claims may be held at once."""
        if not self._pending and self._waiting and time.monotonic() >= self._retry_at:
            self._pending.extend(self._waiting)
            self._waiting = []
        while self._pending:
            index, keys = self._pending.popleft()
            claim = self.store.claim(keys, ttl_s=self.ttl_s, owner=self.owner, retry_errors=self.retry_errors)
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

    def give_back(self, ticket: int) -> None:
        """Release the claim's keys that were not written (written ones are released already)."""
        claim = self._held.pop(ticket, None)
        if claim is not None:
            self.store.release(claim.keys, owner=self.owner)

    def __iter__(self) -> Iterator[Claim]:
        """Claims of granted keys, one batch at a time; each is given back when the loop asks for the next."""
        try:
            while True:
                got = self.next()
                if got is None:
                    if self.finished:
                        return
                    self.wait()
                    continue
                ticket, claim = got
                yield claim
                self.give_back(ticket)
        finally:
            self.close()

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None and self.store.shared:
            self._heartbeat = _Heartbeat(self.store.path, self.owner, self.ttl_s)
            self._heartbeat.start()

    def close(self) -> None:
        """Stop renewing, release the keys of claims not written, and claim nothing more (idempotent)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        for ticket in list(self._held):
            self.give_back(ticket)
        self._pending.clear()
        self._waiting = []

    def __enter__(self) -> ClaimQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
