"""The upstream SDK against a real node: health, metadata, upstream close, push."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pmlb.upstream import Conn, Handler, UpstreamServer
from tests.conftest import Cluster
from tests.support import async_wait_until, free_port, http_get

pytestmark = pytest.mark.asyncio(loop_scope="function")


class App(Handler):
    def __init__(self, name: str) -> None:
        self.name = name
        self.server: UpstreamServer | None = None

    def on_open(self, conn: Conn) -> None:
        conn.send(f"hello from {self.name}".encode())

    async def on_message(self, conn: Conn, data: bytes) -> None:
        await asyncio.sleep(0)  # handlers may be coroutines
        cmd, _, arg = data.decode().partition(" ")
        if cmd == "meta":
            conn.set_meta({"user": arg})
            conn.send(b"ok")
        elif cmd == "bye":
            conn.send(b"goodbye")
            conn.close()
        elif cmd == "push":  # arg: a mark bound to the other upstream
            assert self.server is not None
            await self.server.push(arg, f"pushed by {self.name}".encode())
            conn.send(b"pushed")


async def test_health_meta_close_and_push(cluster: Cluster) -> None:
    apps = [App("a"), App("b")]
    servers = []
    for app in apps:
        server = UpstreamServer(app, upstream_id=app.name, listen="127.0.0.1:0")
        app.server = server
        await server.start()
        servers.append(server)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="pmlb.v1.Upstream")
            resp = await stub.Check(req, timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            await servers[0].set_serving(False)
            resp = await stub.Check(req, timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await servers[0].set_serving(True)

        node = await asyncio.to_thread(
            cluster.node,
            [f"a=127.0.0.1:{servers[0].port}", f"b=127.0.0.1:{servers[1].port}"],
            extra=["--push-upstreams", "a"],  # a may push to marks bound to b
        )
        async with asyncio.timeout(30):
            conns = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(2)]
            greetings = [(await r.readuntil(b"\n")).decode() for r, _ in conns]
            assert sorted(greetings) == ["hello from a\n", "hello from b\n"]
            (ra, wa), (rb, wb) = conns if greetings[0].endswith("a\n") else conns[::-1]

            wa.write(b"meta alice\n")
            assert await ra.readuntil(b"\n") == b"ok\n"
            _, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{node.admin}/connections"
            )
            marks = {m["upstream"]: m for m in json.loads(body)["marks"]}
            assert marks["a"]["metadata"] == {"user": "alice"}
            mark_b = marks["b"]["mark"]

            wa.write(f"push {mark_b}\n".encode())
            assert await ra.readuntil(b"\n") == b"pushed\n"
            assert await rb.readuntil(b"\n") == b"pushed by a\n", "a reached b's mark"

            wb.write(b"bye\n")
            assert await rb.readuntil(b"\n") == b"goodbye\n"
            assert await rb.read() == b"", "the upstream closed the mark"
            wa.close()
        m = await asyncio.to_thread(node.metrics)
        assert m['pmlb_connections_closed_total{reason="upstream_closed"}'] == 1
    finally:
        for server in servers:
            await server.stop(0)


async def test_nodes_leaving_leave_no_errors_in_the_upstream_log(cluster: Cluster) -> None:
    """A node that stops or dies is routine for an upstream: its log says so at
    INFO, with no ERROR line and no traceback (grpclib logged "Failed to handle
    cancellation" with a traceback for every node that went away)."""
    echo = cluster.echo("u1")
    polite = cluster.node([f"u1={echo.addr}"], framing="line", node_id="polite")
    rude = cluster.node([f"u1={echo.addr}"], framing="line", node_id="rude")
    async with asyncio.timeout(30):
        for node in (polite, rude):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            w.write(b"hi\n")
            assert (await r.readuntil(b"\n")).endswith(b" u1 hi\n")
        await asyncio.to_thread(polite.proc.stop)
        await asyncio.to_thread(rude.proc.kill)
        for who in ("polite", "rude"):
            await async_wait_until(
                lambda who=who: f"node {who} stream ended" in echo.proc.log(), 10, f"{who} gone"
            )
    log = echo.proc.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


async def test_the_node_limits_reach_the_sdk_which_refuses_what_they_forbid(
    cluster: Cluster,
) -> None:
    """Open carries --max-frame and --max-meta; a reply or metadata over them
    raises in the handler (which answers otherwise) instead of the node
    dropping it or closing the client."""
    from pmlb.errors import FrameTooLarge, MetadataTooLarge

    class Limited(Handler):
        def on_message(self, conn: Conn, data: bytes) -> None:
            try:
                conn.send(b"x" * (conn.max_frame + 1))
            except FrameTooLarge as exc:
                conn.send(f"refused: {exc}".encode())
            try:
                conn.set_meta({"k": "v" * conn.max_meta})
            except MetadataTooLarge:
                conn.send(f"meta refused at {conn.max_meta}".encode())
            conn.send(b"x" * conn.max_frame)  # exactly the limit is fine

    server = UpstreamServer(Limited(), upstream_id="l", listen="127.0.0.1:0")
    await server.start()
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"l=127.0.0.1:{server.port}"],
            extra=["--max-frame", "1000", "--max-meta", "64"],
        )
        async with asyncio.timeout(30):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            w.write(b"go\n")
            assert await r.readuntil(b"\n") == (
                b"refused: frame of 1001 bytes exceeds the limit of 1000 bytes\n"
            )
            assert await r.readuntil(b"\n") == b"meta refused at 64\n"
            assert await r.readuntil(b"\n") == b"x" * 1000 + b"\n"
            w.write(b"again\n")
            assert (await r.readuntil(b"\n")).startswith(b"refused"), "the client stayed"
            w.close()
        m = await asyncio.to_thread(node.metrics)
        assert m.get('pmlb_connections_closed_total{reason="protocol_error"}', 0) == 0
        assert m.get("pmlb_bad_upstream_frames_total", 0) == 0, "nothing oversized was sent"
    finally:
        await server.stop(0)


async def test_a_deferred_message_and_one_a_push_answered_are_replayed_when_unfinished(
    cluster: Cluster,
) -> None:
    """Acknowledgements an upstream controls. ``hold`` defers its own
    acknowledgement (and replies at once); ``slow`` is still being handled when
    another mark's handler pushes to its client. Neither is finished, so when
    their upstream goes away the node replays both to the next one; ``push``,
    answered by its own handler, is not replayed."""
    handled: list[tuple[str, str, int]] = []
    release = asyncio.Event()

    class App(Handler):
        def __init__(self, name: str) -> None:
            self.name = name
            self.server: UpstreamServer | None = None
            self.deferred: list[object] = []

        async def on_message(self, conn: Conn, data: bytes) -> None:
            text = data.decode()
            handled.append((self.name, text.split(" ")[0], conn.seq))
            if text == "hold":
                self.deferred.append(conn.defer())
                conn.send(b"held")
            elif text == "slow":
                await release.wait()
                conn.send(b"slow done")
            elif text.startswith("push "):
                assert self.server is not None
                await self.server.push(text.split(" ")[1], b"pushed")
                conn.send(b"pushed it")

    a_app, b_app = App("a"), App("b")
    a = UpstreamServer(a_app, upstream_id="a", listen="127.0.0.1:0")
    a_app.server = a
    await a.start()
    b_port = free_port()
    b = UpstreamServer(b_app, upstream_id="b", listen=f"127.0.0.1:{b_port}")
    b_app.server = b
    try:
        # b is not up yet: every mark binds to a.
        node = await asyncio.to_thread(
            cluster.node,
            [f"a=127.0.0.1:{a.port}", f"b=127.0.0.1:{b_port}"],
            wait_links=["a"],
        )
        async with asyncio.timeout(30):
            clients = {}
            for word in ("hold", "slow"):
                clients[word] = await asyncio.open_connection("127.0.0.1", node.port)
                clients[word][1].write(word.encode() + b"\n")
            assert await clients["hold"][0].readuntil(b"\n") == b"held\n"
            await async_wait_until(lambda: ("a", "slow", 1) in handled, 10, "slow started")
            _, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{node.admin}/connections"
            )
            slow_mark = next(m["mark"] for m in json.loads(body)["marks"] if m["frames_out"] == 0)
            clients["push"] = await asyncio.open_connection("127.0.0.1", node.port)
            clients["push"][1].write(f"push {slow_mark}\n".encode())
            assert await clients["push"][0].readuntil(b"\n") == b"pushed it\n"
            assert await clients["slow"][0].readuntil(b"\n") == b"pushed\n"

            await b.start()
            await async_wait_until(
                lambda: node.metrics().get('pmlb_upstream_up{upstream="b"}') == 1, 15, "b up"
            )
            await a.stop(0)  # a goes away with "hold" and "slow" unfinished
            await async_wait_until(lambda: ("b", "hold", 1) in handled, 15, "hold replayed")
            await async_wait_until(lambda: ("b", "slow", 1) in handled, 15, "slow replayed")
            release.set()
            assert await clients["slow"][0].readuntil(b"\n") == b"slow done\n"
            for _, w in clients.values():
                w.close()
        assert ("b", "push", 1) not in handled, "a message its own reply acknowledged"
        assert handled.count(("a", "push", 1)) == 1
    finally:
        release.set()
        await a.stop(0)
        await b.stop(0)
