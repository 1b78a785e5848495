"""The node's etcd session: one lease, kept alive, re-granted when lost.

Everything this node writes to etcd lives under this lease: its registration,
the checker key when it is elected, and the health keys it writes as checker.
So when the node dies, all of it vanishes within the TTL, and when it shuts
down cleanly, revoking the lease removes all of it at once.

When etcd is unreachable the session keeps trying (static stability: the
node keeps serving with what it knows); when the lease turns out to be gone
(a long partition, or etcd restarted on a fresh data dir) a new one is
granted and every ``on_new_lease`` callback runs again to re-create its keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from pmlb.aio import Backoff, stop_task, supervised
from pmlb.store.base import Store, StoreError
from pmlb.store.listwatch import STORE_RETRY

log = logging.getLogger("pmlb.session")

OnLease = Callable[[int], Awaitable[None]]


class Session:
    def __init__(self, store: Store, ttl: int) -> None:
        self.store = store
        self.ttl = ttl
        self.lease = 0
        self.healthy = False
        self.last_ok = 0.0
        self.grants = 0
        # Set whenever the lease or health changes; the checker clears it and waits.
        self.changed = asyncio.Event()
        self._callbacks: list[OnLease] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def on_new_lease(self, callback: OnLease) -> None:
        self._callbacks.append(callback)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            supervised("etcd-session", self._run), name="etcd-session"
        )

    async def stop(self, revoke: bool = True) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_task(self._task, "etcd session")
        if revoke and self.lease and await self.store.revoke(self.lease):
            log.info("lease %x revoked: registration and checker keys removed", self.lease)
        self.lease = 0

    def _set(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            if healthy:
                log.info("etcd session healthy (lease %x)", self.lease)
            else:
                log.warning("etcd unreachable: serving with the last known view, retrying")
            self.changed.set()

    async def _run(self) -> None:
        backoff = Backoff(*STORE_RETRY)
        while not self._stopping:
            try:
                if not self.lease:
                    self.lease = await self.store.grant(self.ttl)
                    self.grants += 1
                    log.info("granted lease %x (ttl %ds)", self.lease, self.ttl)
                    for cb in self._callbacks:
                        await cb(self.lease)
                    self.changed.set()
                left = await self.store.keepalive_once(self.lease)
                if left <= 0:
                    log.warning(
                        "lease %x is gone (expired while etcd was away?); re-registering",
                        self.lease,
                    )
                    self.lease = 0
                    self.changed.set()
                    continue
                self.last_ok = time.monotonic()
                self._set(True)
                backoff.reset()
                await asyncio.sleep(max(0.5, self.ttl / 3))
            except StoreError as exc:
                self._set(False)
                delay = backoff.next()
                log.debug("session: %s; retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
