"""Close reasons README documents and nothing else tested, each where a user
meets it, with the upstream told the same word the node counts:

- ``write_overflow``: a client that does not read while pushes pile up for it
  (pushes are not held for credit; the client's buffer bound is);
- ``upstream_lost``: its upstream died and no other can take the mark;
- ``node_draining``: the node stops with marks still open at its drain
  deadline (``node_shutdown`` is for marks left after the drain, which its
  last step leaves none of);
- and a second SIGTERM ends a draining node at once.
"""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest

from pmlb.errors import MarkGone, PushRefused
from pmlb.upstream import Conn, Handler, UpstreamServer
from tests.conftest import Cluster, default_workers_too
from tests.support import async_wait_until, http_get

pytestmark = [pytest.mark.asyncio(loop_scope="function"), default_workers_too]


class Recorder(Handler):
    def __init__(self) -> None:
        self.closed: dict[str, str] = {}
        self.conns: dict[str, Conn] = {}

    def on_open(self, conn: Conn) -> None:
        self.conns[conn.mark] = conn
        conn.send(conn.mark.encode())

    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.send(data)

    def on_close(self, conn: Conn, reason: str) -> None:
        self.closed[conn.mark] = reason


async def _server() -> tuple[Recorder, UpstreamServer]:
    rec = Recorder()
    server = UpstreamServer(rec, upstream_id="u1")
    await server.start()
    return rec, server


async def test_a_client_that_does_not_read_pushes_is_closed_write_overflow(
    cluster: Cluster, workers: str
) -> None:
    rec, server = await _server()
    try:
        node = await asyncio.to_thread(
            cluster.node, [f"u1=127.0.0.1:{server.port}"], extra=["--client-buffer", "64KiB"]
        )
        async with asyncio.timeout(30):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            mark = (await r.readuntil(b"\n")).decode().strip()
            # Never read again: the kernel's buffers fill, then the node's.
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            chunk = b"x" * 60_000
            outcomes: list[BaseException | None] = []
            for _ in range(200):
                if mark in rec.closed:
                    break
                try:
                    await server.push(mark, chunk)
                    outcomes.append(None)
                except (MarkGone, PushRefused) as exc:
                    outcomes.append(exc)
                    break
            await async_wait_until(lambda: mark in rec.closed, 10, "the upstream told")
            assert rec.closed[mark] == "write_overflow"
            m = await asyncio.to_thread(node.metrics)
            assert m['pmlb_connections_closed_total{reason="write_overflow"}'] == 1
            accepted = outcomes.count(None)
            # Bounded: what the node took is about the client buffer plus what
            # the kernel holds, far below 200 x 60 KB.
            assert 0 < accepted < 100, accepted
            w.close()
    finally:
        await server.stop(0)


async def test_a_mark_with_nowhere_to_go_is_closed_upstream_lost(
    cluster: Cluster, workers: str
) -> None:
    _, server = await _server()
    node = await asyncio.to_thread(
        cluster.node, [f"u1=127.0.0.1:{server.port}"], extra=["--connect-timeout", "1"]
    )
    async with asyncio.timeout(30):
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        await r.readuntil(b"\n")
        await server.stop(0)  # the only upstream goes away
        assert await r.read() == b"", "the client is closed, not left hanging"
        await async_wait_until(
            lambda: (
                node.metrics().get('pmlb_connections_closed_total{reason="upstream_lost"}') == 1
            ),
            10,
            "counted upstream_lost",
        )
        w.close()


async def test_marks_open_at_the_drain_deadline_are_closed_node_draining(
    cluster: Cluster, workers: str
) -> None:
    rec, server = await _server()
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"u1=127.0.0.1:{server.port}"],
            extra=["--drain-timeout", "0.1", "--drain-window", "0.1"],
        )
        async with asyncio.timeout(30):
            clients = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(4)]
            marks = [(await r.readuntil(b"\n")).decode().strip() for r, _ in clients]
            node.proc.signal(signal.SIGTERM)
            for r, _ in clients:
                assert await r.read() == b""
            await async_wait_until(
                lambda: all(m in rec.closed for m in marks), 10, "the upstream told of each"
            )
            assert [rec.closed[m] for m in marks] == ["node_draining"] * len(marks)
            assert await asyncio.to_thread(node.proc.proc.wait, 15) == 0
    finally:
        await server.stop(0)


async def test_a_second_sigterm_ends_a_draining_node_at_once(
    cluster: Cluster, workers: str
) -> None:
    _, server = await _server()
    try:
        node = await asyncio.to_thread(
            cluster.node, [f"u1=127.0.0.1:{server.port}"], extra=["--drain-timeout", "60"]
        )
        async with asyncio.timeout(30):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            await r.readuntil(b"\n")
            node.proc.signal(signal.SIGTERM)
            await async_wait_until(
                lambda: http_get(f"http://127.0.0.1:{node.admin}/readyz")[0] == 503,
                10,
                "draining (its client may stay 60 s)",
            )
            w.write(b"still\n")
            assert await r.readuntil(b"\n") == b"still\n", "served while draining"
            node.proc.signal(signal.SIGTERM)
            # At once: well inside the 60 s the drain would have taken.
            code = await asyncio.to_thread(node.proc.proc.wait, 10)
            assert code != 0, "forced, not a clean stop"
            assert await r.read() == b""
            assert "received again: exiting now" in node.proc.log()
            w.close()
    finally:
        await server.stop(0)
