"""The store seam (issue [18]): the in-process MemoryStore behaves as the
cluster code expects of etcd, and the code above the seam runs on it
unchanged: discovery follows puts, deletes, malformed values and lease
expiry; the list-then-watch loop lists again after a reset. EtcdStore's own
behaviour is tested against a real etcd (tests/integration)."""

from __future__ import annotations

import asyncio

import pytest

from pmlb.cluster.discovery import ServiceView
from pmlb.protocol.domain import UpstreamSpec
from pmlb.store.base import StoreError, WatchReset
from pmlb.store.keys import Keys
from pmlb.store.memory import MemoryStore
from tests.support import async_wait_until


async def test_leases_compare_and_set_and_watches() -> None:
    async with asyncio.timeout(10):
        s = MemoryStore()
        lease = await s.grant(10)
        assert await s.put_if_absent("/e/leader", "n1", lease)
        assert not await s.put_if_absent("/e/leader", "n2", lease)
        assert not await s.delete_if_value("/e/leader", "n2")
        rev, kvs = await s.get_prefix("/e/")
        assert [(kv.key, kv.value, kv.lease) for kv in kvs] == [("/e/leader", b"n1", lease)]
        watch = s.watch_prefix("/e/", rev + 1)
        await s.put("/e/other", "x")
        assert [(e.kind, e.key) for e in await anext(watch)] == [("put", "/e/other")]
        assert await s.keepalive_once(lease) == 10
        await s.expire(lease)  # the leader's key goes with its lease
        assert [(e.kind, e.key) for e in await anext(watch)] == [("delete", "/e/leader")]
        assert await s.keepalive_once(lease) == 0
        with pytest.raises(StoreError, match="lease"):
            await s.put("/e/x", "y", lease)
        await s.close()
        with pytest.raises(StoreError):
            await s.get("/e/other")


async def test_a_compacted_revision_resets_the_watch() -> None:
    s = MemoryStore()
    for i in range(3):
        await s.put(f"/k/{i}", "v")
    s._history.clear()  # as if etcd compacted everything before now
    await s.put("/k/3", "v")
    with pytest.raises(WatchReset):
        await anext(s.watch_prefix("/k/", 1))


async def test_discovery_follows_the_store() -> None:
    """ServiceView over MemoryStore: the upstream list follows puts and
    deletes, a malformed value is counted and ignored, and the rest stays."""
    async with asyncio.timeout(10):
        s = MemoryStore()
        keys = Keys("/pmlb")
        seen: list[list[UpstreamSpec]] = []
        view = ServiceView(s, keys, "echo", seen.append)
        await s.put(keys.upstream("echo", "u1"), "127.0.0.1:7001")
        view.start()
        try:
            await async_wait_until(view.synced.is_set, 5, "the first list")
            assert [u.id for u in seen[-1]] == ["u1"]
            await s.put(keys.upstream("echo", "u2"), '{"addr":"127.0.0.1:7002","weight":3}')
            await async_wait_until(lambda: len(seen[-1]) == 2, 5, "u2 added")
            assert seen[-1][1].weight == 3
            await s.put(keys.upstream("echo", "bad"), "{not json")
            await async_wait_until(lambda: view.malformed == 1, 5, "the bad value counted")
            assert [u.id for u in seen[-1]] == ["u1", "u2"]
            await s.delete(keys.upstream("echo", "u1"))
            await async_wait_until(lambda: [u.id for u in seen[-1]] == ["u2"], 5, "u1 removed")
        finally:
            await view.stop()
