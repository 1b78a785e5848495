"""Exactly-once effects on top of at-least-once delivery, with the SDK's
idempotency key (mark, seq): the ledger example across a failover."""

from __future__ import annotations

import asyncio

import pytest

from pmlb.upstream import Conn, UpstreamServer
from pmlb.upstream.ledger import Ledger, LedgerStore
from tests.conftest import Cluster

pytestmark = pytest.mark.asyncio(loop_scope="function")


class DiesOnce(Ledger):
    """The first instance to get message ``fatal_seq`` applies it to the shared
    store and then never answers it: it dies between its effect and its reply."""

    def __init__(self, name: str, store: LedgerStore, fatal_seq: int, dying: dict[str, str]):
        super().__init__(store)
        self.name = name
        self.fatal_seq = fatal_seq
        self.dying = dying
        self.applied = asyncio.Event()

    async def on_message(self, conn: Conn, data: bytes) -> None:  # type: ignore[override]
        if conn.seq != self.fatal_seq or self.dying:
            super().on_message(conn, data)
            return
        self.dying["who"] = self.name
        self.store.apply(conn.mark, conn.seq, int(data.split()[1]))
        self.applied.set()
        await asyncio.sleep(3600)  # cancelled when this instance stops


async def test_a_replayed_message_is_applied_once(cluster: Cluster) -> None:
    store = LedgerStore()
    dying: dict[str, str] = {}
    handlers = {n: DiesOnce(n, store, 5, dying) for n in ("a", "b")}
    servers = {n: UpstreamServer(h, upstream_id=n) for n, h in handlers.items()}
    for s in servers.values():
        await s.start()
    try:
        node = await asyncio.to_thread(
            cluster.node, [f"{n}=127.0.0.1:{s.port}" for n, s in servers.items()]
        )
        async with asyncio.timeout(30):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            replies = []
            for i in range(1, 5):
                w.write(b"add %d\n" % i)
                replies.append(await r.readuntil(b"\n"))
            w.write(b"add 5\n")
            applied = [asyncio.ensure_future(h.applied.wait()) for h in handlers.values()]
            await asyncio.wait(applied, return_when=asyncio.FIRST_COMPLETED)
            for f in applied:
                f.cancel()
            await servers[dying["who"]].stop(0)  # dies after applying, before answering
            replies.append(await r.readuntil(b"\n"))  # answered by the other instance
            w.write(b"add 6\n")
            replies.append(await r.readuntil(b"\n"))
            w.close()
        assert replies == [b"balance %d\n" % (i * (i + 1) // 2) for i in range(1, 7)]
        assert store.balances == {next(iter(store.balances)): 21}, "every add applied once"
        assert store.replays == 1, "the replayed message was recognised by its (mark, seq)"
    finally:
        for s in servers.values():
            await s.stop(0)
