"""A store in this process's memory, for unit tests of the code above the
seam (the election, discovery, registration): ``store.base.Store`` with
revisions, leases that expire, compare-and-set and watches that resume from
a revision, in the same terms as etcd. Not for a node: nodes of a cluster
share etcd. Bounded like the rest: the watch history keeps HISTORY events
(an older start revision raises WatchReset, as a compacted etcd does)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Final

from pmlb.store.base import KV, Event, StoreError, WatchReset

HISTORY: Final = 10_000


class MemoryStore:
    def __init__(self) -> None:
        self.revision = 0
        self._keys: dict[str, KV] = {}
        self._leases: dict[int, tuple[int, float]] = {}  # id -> (ttl, expires at)
        self._next_lease = 0
        self._history: deque[tuple[int, Event]] = deque(maxlen=HISTORY)
        self._changed = asyncio.Condition()
        self.closed = False

    async def connect(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    def _live(self) -> None:
        if self.closed:
            raise StoreError("the memory store is closed")
        now = time.monotonic()
        for lease in [lid for lid, (_, at) in self._leases.items() if at <= now]:
            self._end(lease)

    def _write(self, kind: str, key: str, value: bytes, lease: int) -> int:
        self.revision += 1
        if kind == "put":
            self._keys[key] = KV(key, value, self.revision, lease)
        else:
            self._keys.pop(key, None)
        self._history.append((self.revision, Event(kind, key, value, lease)))
        return self.revision

    def _end(self, lease: int) -> None:
        self._leases.pop(lease, None)
        for kv in [kv for kv in self._keys.values() if kv.lease == lease]:
            self._write("delete", kv.key, b"", 0)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def get_prefix(self, prefix: str) -> tuple[int, list[KV]]:
        self._live()
        return self.revision, sorted(
            (kv for k, kv in self._keys.items() if k.startswith(prefix)), key=lambda kv: kv.key
        )

    async def get(self, key: str) -> KV | None:
        self._live()
        return self._keys.get(key)

    async def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        self._live()
        if lease and lease not in self._leases:
            raise StoreError(f"lease {lease:x} not found")
        raw = value.encode() if isinstance(value, str) else value
        revision = self._write("put", key, raw, lease)
        await self._notify()
        return revision

    async def delete(self, key: str) -> int:
        self._live()
        if key not in self._keys:
            return 0
        self._write("delete", key, b"", 0)
        await self._notify()
        return 1

    async def put_if_absent(self, key: str, value: str, lease: int) -> bool:
        self._live()
        if key in self._keys:
            return False
        await self.put(key, value, lease)
        return True

    async def delete_if_value(self, key: str, value: str, deadline: float | None = None) -> bool:
        self._live()
        kv = self._keys.get(key)
        if kv is None or kv.value != value.encode():
            return False
        return await self.delete(key) == 1

    async def grant(self, ttl: int) -> int:
        self._live()
        self._next_lease += 1
        self._leases[self._next_lease] = (ttl, time.monotonic() + ttl)
        return self._next_lease

    async def revoke(self, lease: int) -> bool:
        self._live()
        if lease not in self._leases:
            return False
        self._end(lease)
        await self._notify()
        return True

    async def keepalive_once(self, lease: int) -> int:
        self._live()
        if lease not in self._leases:
            return 0
        ttl, _ = self._leases[lease]
        self._leases[lease] = (ttl, time.monotonic() + ttl)
        return ttl

    async def expire(self, lease: int) -> None:
        """End ``lease`` as its TTL running out would (tests: no waiting)."""
        self._end(lease)
        await self._notify()

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        seen = start_revision - 1
        while True:
            self._live()
            oldest = self._history[0][0] if self._history else self.revision + 1
            if seen + 1 < oldest and seen < self.revision:
                raise WatchReset(f"revision {start_revision} is compacted")
            events = [ev for rev, ev in self._history if rev > seen and ev.key.startswith(prefix)]
            seen = self.revision
            if events:
                yield events
                continue
            async with self._changed:
                await self._changed.wait()
