"""The SDK's view of the node's marks and its confirmed pushes, against a real
node at the default worker count (several links per node, one per worker).

- ``UpstreamServer(watch_marks=True)``: every mark of the node, bound to any
  upstream, with its metadata, kept current as marks come, change and go.
- ``push`` resolves once the node has accepted the message, and fails with
  MarkGone for a mark that is not open and PushRefused when the node does not
  permit the push (--push-upstreams).
- ``atomic()``: frames made inside go in one Batch; an await inside is an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pmlb.errors import MarkGone, PushRefused
from pmlb.upstream import Conn, Handler, UpstreamServer
from pmlb.upstream.tracking import MarkInfo
from tests.conftest import Cluster, default_workers_too
from tests.support import async_wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="function"), default_workers_too]

CLIENTS = 8


class Tagger(Handler):
    """``tag X`` sets metadata tag=X and answers ``ok``; anything else echoes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[str, MarkInfo | None]] = []

    def on_open(self, conn: Conn) -> None:
        conn.send(f"on {self.name} {conn.mark}".encode())

    def on_message(self, conn: Conn, data: bytes) -> None:
        cmd, _, arg = data.decode().partition(" ")
        if cmd == "tag":
            conn.set_meta({"tag": arg})
            conn.send(b"ok")
        else:
            conn.send(data)

    def on_mark(self, mark: str, info: MarkInfo | None) -> None:
        self.events.append((mark, info))


async def _servers(*names: str, **kw: Any) -> list[UpstreamServer]:
    servers = []
    for name in names:
        server = UpstreamServer(Tagger(name), upstream_id=name, watch_marks=True, **kw)
        await server.start()
        servers.append(server)
    return servers


async def test_an_upstream_sees_every_mark_of_the_node_with_its_metadata(
    cluster: Cluster, workers: str
) -> None:
    servers = await _servers("a", "b")
    try:
        node = await asyncio.to_thread(
            cluster.node, [f"{s.upstream_id}=127.0.0.1:{s.port}" for s in servers]
        )
        streams = 1 if workers == "w1" else 2  # one link per worker
        async with asyncio.timeout(30):
            for s in servers:
                await s.marks_synced(streams)
            clients = [
                await asyncio.open_connection("127.0.0.1", node.port) for _ in range(CLIENTS)
            ]
            owners: dict[str, str] = {}
            for i, (r, w) in enumerate(clients):
                _, upstream, mark = (await r.readuntil(b"\n")).decode().split()
                owners[mark] = upstream
                w.write(f"tag t{i}\n".encode())
                assert await r.readuntil(b"\n") == b"ok\n"
            assert set(owners.values()) == {"a", "b"}, owners
            for s in servers:
                # Each sees all of them, its own and the other's, as bound and tagged.
                await async_wait_until(
                    lambda s=s: (
                        {m: (i.upstream, i.metadata.get("tag")) for m, i in s.marks.items()}
                        == {m: (u, f"t{n}") for n, (m, u) in enumerate(owners.items())}
                    ),
                    10,
                    f"{s.upstream_id} sees every mark",
                )
                info = s.marks[next(iter(owners))]
                assert (info.node_id, info.client_addr) == ("n1", "127.0.0.1")
                assert min(info.client_port, info.accepted_at_unix_ms) > 0
            for _, w in clients[:3]:
                w.close()
            closed = list(owners)[:3]
            for s in servers:
                await async_wait_until(
                    lambda s=s: (
                        not any(m in s.marks for m in closed) and len(s.marks) == CLIENTS - 3
                    ),
                    10,
                    f"{s.upstream_id} forgets closed marks",
                )
                handler = s.handler
                assert isinstance(handler, Tagger)
                gone = {m for m, info in handler.events if info is None}
                assert set(closed) <= gone, "on_mark was told of each close"
            for _, w in clients[3:]:
                w.close()
    finally:
        for s in servers:
            await s.stop(0)


async def test_a_push_resolves_once_accepted_and_fails_when_refused(
    cluster: Cluster, workers: str
) -> None:
    servers = await _servers("a", "b")
    a, b = servers
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"{s.upstream_id}=127.0.0.1:{s.port}" for s in servers],
            extra=["--push-upstreams", "a"],  # a may push anywhere; b only to its own
        )
        async with asyncio.timeout(30):
            streams = 1 if workers == "w1" else 2
            await a.marks_synced(streams)
            clients: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
            while {"a", "b"} - {a.marks[m].upstream for m in clients if m in a.marks}:
                r, w = await asyncio.open_connection("127.0.0.1", node.port)
                _, _, mark = (await r.readuntil(b"\n")).decode().split()
                clients[mark] = (r, w)
                await async_wait_until(lambda mark=mark: mark in a.marks, 10, "mark seen")
            on_b = next(m for m in clients if a.marks[m].upstream == "b")
            on_a = next(m for m in clients if a.marks[m].upstream == "a")

            # Accepted: a's pushes (to its own mark and to b's), confirmed together.
            many = [a.push(on_b, b"to b %d" % i) for i in range(100)]
            many.append(a.push(on_a, b"to a"))
            await asyncio.gather(*many)
            r, _ = clients[on_b]
            got = [await r.readuntil(b"\n") for _ in range(100)]
            assert got == [b"to b %d\n" % i for i in range(100)]
            assert await clients[on_a][0].readuntil(b"\n") == b"to a\n"

            # Not open: MarkGone, from the node's answer.
            ghost = on_b.rsplit(".", 1)[0] + ".zzzzzz"
            with pytest.raises(MarkGone):
                await a.push(ghost, b"nobody")
            # Not permitted: b may not push to a's mark.
            with pytest.raises(PushRefused) as refused:
                await b.push(on_a, b"not allowed")
            assert refused.value.reason == "not_permitted"
            assert b.stats["pushes_refused"] == 1
            # The refused and the gone push did not disturb the others.
            await a.push(on_a, b"still here")
            assert await clients[on_a][0].readuntil(b"\n") == b"still here\n"

            # atomic(): one Batch per node; an await inside is a mistake, said so.
            with a.atomic():
                done = [a.push(on_b, b"atomic %d" % i) for i in range(3)]
            await asyncio.gather(*done)
            assert [await r.readuntil(b"\n") for _ in range(3)] == [
                b"atomic %d\n" % i for i in range(3)
            ]

            async def await_inside() -> None:
                with a.atomic():
                    a.push(on_b, b"x")
                    await asyncio.sleep(0.05)  # lets the writer send: the mistake

            with pytest.raises(RuntimeError, match="await"):
                await await_inside()
            for _, w in clients.values():
                w.close()
    finally:
        for s in servers:
            await s.stop(0)
