"""The store seam: what the cluster code needs of a store, and its types.

``Store`` is the interface; ``store.etcd.EtcdStore`` is the implementation a
node runs, ``store.memory.MemoryStore`` one in the process for unit tests of
the code above it (the election, discovery). A store keeps keys under
revisions, leases that expire unless refreshed, compare-and-set for an
election, and a watch that resumes from a revision (Patroni's AbstractDCS is
the model). Every call is bounded in time and raises StoreError when the
store cannot be reached within it; a watch raises WatchReset when it cannot
continue from its revision.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from pmlb.errors import PmlbError


class StoreError(PmlbError):
    """The store could not be reached within the call's deadline, or refused the call."""


class WatchReset(PmlbError):
    """The watch cannot continue from its revision (compacted, cancelled, cluster
    replaced): list again and watch from the new revision."""


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    mod_revision: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "put" or "delete"
    key: str
    value: bytes
    lease: int = 0  # a put's lease (0: none); nodes register under one


class Store(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def get_prefix(self, prefix: str) -> tuple[int, list[KV]]:
        """Every key under ``prefix`` and the revision they were read at."""

    async def get(self, key: str) -> KV | None: ...

    async def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        """Write ``key``; the new revision."""

    async def delete(self, key: str) -> int:
        """Delete ``key``; how many keys went."""

    async def put_if_absent(self, key: str, value: str, lease: int) -> bool:
        """Create ``key`` only if it does not exist (an election campaign)."""

    async def delete_if_value(self, key: str, value: str, deadline: float | None = None) -> bool:
        """Delete ``key`` only while it still holds ``value`` (resigning)."""

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""

    async def revoke(self, lease: int) -> bool:
        """End ``lease`` now, deleting its keys."""

    async def keepalive_once(self, lease: int) -> int:
        """Refresh ``lease``; its remaining TTL, 0 when the store no longer has it."""

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Events under ``prefix`` from ``start_revision`` on, a list per
        response. Raises WatchReset when the caller must list again,
        StoreError when the stream broke."""
