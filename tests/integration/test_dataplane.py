"""The data plane end to end: real node and upstream processes, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct

import pytest

from pmlb.protocol.ids import worker_of
from tests.conftest import Cluster
from tests.faults.report import record
from tests.support import async_wait_until, chunks, encode, free_port, http_get, read_message

pytestmark = pytest.mark.asyncio(loop_scope="function")

CLIENTS = 1000


async def _converse(
    port: int, framing: str, idx: int, seed: int
) -> tuple[list[bytes], list[bytes] | bytes]:
    """One client: send numbered messages in random pieces while reading replies."""
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    msgs = [f"c{idx}-m{i}-".encode() + b"x" * rng.randrange(0, 200) for i in range(10)]
    stream = b"".join(encode(framing, m) for m in msgs)

    async def send() -> None:
        for piece in chunks(stream, iter(lambda: rng.randrange(1, 64), None)):
            writer.write(piece)
            await writer.drain()
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # let other clients interleave

    async def receive() -> list[bytes] | bytes:
        if framing == "raw":
            return await reader.readexactly(len(stream))
        return [await read_message(reader, framing) for _ in msgs]

    _, result = await asyncio.gather(send(), receive())
    writer.close()
    return msgs, result


@pytest.mark.parametrize("framing", ["line", "len16", "len32", "raw"])
async def test_1000_clients_get_their_own_bytes_and_distinct_marks(
    cluster: Cluster, framing: str
) -> None:
    plain = framing == "raw"  # raw has no message boundaries to prefix
    u1, u2 = cluster.echo("u1", plain=plain), cluster.echo("u2", plain=plain)
    node = cluster.node([f"u1={u1.addr}", f"u2={u2.addr}"], framing=framing)
    before = node.metrics()
    accepted_before = before["pmlb_connections_accepted_total"]

    async with asyncio.timeout(90):
        results = await asyncio.gather(
            *(_converse(node.port, framing, i, seed=i) for i in range(CLIENTS))
        )

    marks: set[bytes] = set()
    upstreams: set[bytes] = set()
    for i, (msgs, got) in enumerate(results):
        sent = msgs
        if framing == "raw":
            stream = b"".join(sent)
            assert got == stream, f"client {i} got other bytes back"
            continue
        replies = got
        assert len(replies) == len(sent)
        client_marks = {r.split(b" ", 2)[0] for r in replies}
        assert len(client_marks) == 1, f"client {i} saw several marks: {client_marks}"
        assert [r.split(b" ", 2)[2] for r in replies] == sent, f"client {i}: wrong bytes/order"
        mark = client_marks.pop()
        assert mark.startswith(b"n1."), "the mark names its node"
        marks.add(mark)
        upstreams |= {r.split(b" ", 2)[1] for r in replies}
    if framing != "raw":
        assert len(marks) == CLIENTS, "every connection has its own mark"
        assert upstreams == {b"u1", b"u2"}, "both upstreams served"
    m = node.metrics()
    assert m["pmlb_connections_accepted_total"] - accepted_before == CLIENTS
    if framing == "raw":  # frames are reads: as the kernel cut them, at least one each
        assert m["pmlb_frames_in_total"] - before["pmlb_frames_in_total"] >= CLIENTS
    else:  # one frame per message, exactly
        frames = m["pmlb_frames_in_total"] - before["pmlb_frames_in_total"]
        assert frames == sum(len(msgs) for msgs, _ in results)


async def test_client_that_never_reads_stalls_only_itself(cluster: Cluster) -> None:
    up = cluster.echo("u1", plain=True)
    node = cluster.node(
        [f"u1={up.addr}"], framing="raw", extra=["--window", "65536", "--client-buffer", "65536"]
    )
    rss_before = node.proc.tree_rss_bytes()

    # The hog writes as fast as it can and never reads its echoes.
    hog = socket.create_connection(("127.0.0.1", node.port))
    hog.setblocking(False)
    block = b"h" * 65536
    sent = 0
    target = 256 << 20
    loop = asyncio.get_running_loop()
    stalled_since = None
    async with asyncio.timeout(60):
        while sent < target:
            try:
                sent += hog.send(block)
                stalled_since = None
            except BlockingIOError:
                now = loop.time()
                stalled_since = stalled_since or now
                if now - stalled_since > 1.5:
                    break  # the node stopped reading us: backpressure reached the client
                await asyncio.sleep(0.01)

        assert sent < target, "a client that never reads could push without bound"

        # Everyone else is unaffected while the hog is stuck.
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        answered = pinged = 0
        for i in range(50):
            msg = f"ping {i}".encode()
            writer.write(msg)
            pinged += 1
            answered += await reader.readexactly(len(msg)) == msg
        open_now = int(node.metrics()["pmlb_marks_open"])  # the hog's and this one's
        writer.close()
        assert answered == pinged

    grown = node.proc.tree_rss_bytes() - rss_before
    # client_buffer + 2 x window is the configured bound for the hog's mark
    # (192 KiB); allow the interpreter's own growth on top.
    assert grown < 8 << 20, f"node RSS grew by {grown} bytes for one non-reading client"
    assert node.metrics()["pmlb_credit_stalls_total"] >= 1
    # No duplicated column: with raw framing a repeat cannot be told from the
    # next echo (a wrong byte fails readexactly, counted as not answered).
    record(
        "a client that never reads while others stream",
        connections=int(node.metrics()["pmlb_connections_accepted_total"]),
        held=open_now,
        sent=pinged,
        lost=pinged - answered,
        note=f"hog pushed {sent >> 20} MiB before blocking; node RSS +{grown >> 10} KiB",
    )
    hog.close()


async def test_oversized_frame_and_reset_close_only_their_own_mark(cluster: Cluster) -> None:
    from pmlb.upstream import Conn, Handler, UpstreamServer

    closes: dict[str, str] = {}

    class Recorder(Handler):
        def on_message(self, conn: Conn, data: bytes) -> None:
            conn.send(conn.mark.encode() + b" " + data)

        def on_close(self, conn: Conn, reason: str) -> None:
            closes[conn.mark] = reason

    server = UpstreamServer(Recorder(), upstream_id="rec", listen="127.0.0.1:0")
    port = await server.start()
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"rec=127.0.0.1:{port}"],
            framing="line",
            extra=["--max-frame", "1024"],
        )
        async with asyncio.timeout(30):
            bystanders = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(5)]
            marks = []
            for r, w in bystanders:
                w.write(b"hi\n")
                marks.append((await r.readuntil(b"\n")).split(b" ")[0].decode())

            # An oversized line: that client, and only it, is closed.
            r_big, w_big = await asyncio.open_connection("127.0.0.1", node.port)
            w_big.write(b"ok\n")
            big_mark = (await r_big.readuntil(b"\n")).split(b" ")[0].decode()
            w_big.write(b"x" * 5000)
            assert await r_big.read() == b"", "the oversized client is closed"

            # A reset mid-frame: half a line, then RST.
            r_rst, w_rst = await asyncio.open_connection("127.0.0.1", node.port)
            w_rst.write(b"ok\n")
            reset_mark = (await r_rst.readuntil(b"\n")).split(b" ")[0].decode()
            w_rst.write(b"half a li")
            await w_rst.drain()
            sock = w_rst.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w_rst.transport.abort()  # with SO_LINGER 0 the close is a RST

            await async_wait_until(
                lambda: big_mark in closes and reset_mark in closes,
                10,
                "the upstream to see both closes",
            )
            assert closes[big_mark] == "frame_too_large"
            assert closes[reset_mark] == "client_reset"
            for (r, w), mark in zip(bystanders, marks, strict=True):
                w.write(b"still here\n")
                assert await r.readuntil(b"\n") == f"{mark} still here\n".encode()
                assert mark not in closes
        m = node.metrics()
        assert m["pmlb_frames_too_large_total"] == 1
        assert m['pmlb_connections_closed_total{reason="frame_too_large"}'] == 1
        assert m['pmlb_connections_closed_total{reason="client_reset"}'] == 1
        assert "oversized frame" in node.proc.log()
        for _, w in bystanders:
            w.close()
    finally:
        await server.stop(0)


async def test_upstream_sigkill_marks_survive_and_it_is_used_again_when_back(
    cluster: Cluster,
) -> None:
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    node = cluster.node([f"u1={u1.addr}", f"u2={u2.addr}"], framing="line")

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes, bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"who\n")
        mark, upstream, _ = (await r.readuntil(b"\n")).split(b" ", 2)
        return r, w, mark, upstream

    async with asyncio.timeout(60):
        clients = [await connect() for _ in range(20)]
        on_u1 = [c for c in clients if c[3] == b"u1"]
        # Round-robin alternates exactly within each worker process (the
        # kernel spreads connections over a node's workers).
        for worker in {worker_of(c[2].decode()) for c in clients}:
            mine = [c for c in clients if worker_of(c[2].decode()) == worker]
            assert sum(c[3] == b"u1" for c in mine) in (len(mine) // 2, -(-len(mine) // 2))

        u1.proc.kill()
        for r, w, mark, _ in clients:
            w.write(b"still there?\n")
            reply = await r.readuntil(b"\n")
            assert reply == mark + b" u2 still there?\n", "same mark, now served by u2"
        fresh = [await connect() for _ in range(6)]
        assert {c[3] for c in fresh} == {b"u2"}, "new clients avoid the dead upstream"
        m = node.metrics()
        assert m["pmlb_failovers_total"] == len(on_u1)
        assert m['pmlb_upstream_up{upstream="u1"}'] == 0
        assert 'pmlb_connections_closed_total{reason="upstream_lost"}' not in m

        cluster.echo("u1", port=u1.port)  # back on the same address
        await async_wait_until(
            lambda: node.metrics()['pmlb_upstream_up{upstream="u1"}'] == 1, 15, "u1 retried"
        )
        again = [await connect() for _ in range(6)]
        assert b"u1" in {c[3] for c in again}, "the revived upstream is used again"
        for _r, w, _, _ in clients + fresh + again:
            w.close()
    status, _body = http_get(f"http://127.0.0.1:{node.admin}/healthz")
    assert status == 200


async def test_clients_wait_bounded_for_an_upstream(cluster: Cluster) -> None:
    port = free_port()
    node = cluster.node(
        [f"u1=127.0.0.1:{port}"],
        framing="line",
        wait_links=[],
        extra=["--connect-timeout", "8"],
    )
    async with asyncio.timeout(40):
        # Sent and half-closed before any upstream exists: nothing is lost.
        r1, w1 = await asyncio.open_connection("127.0.0.1", node.port)
        w1.write(b"early bird\n")
        w1.write_eof()
        await async_wait_until(
            lambda: "waiting for a routable upstream" in node.proc.log(),
            10,
            "the node to park the client",
        )
        await asyncio.to_thread(cluster.echo, "u1", port=port)
        reply = await r1.read()
        assert reply.endswith(b" u1 early bird\n"), reply
        w1.close()

    node2 = cluster.node(
        [f"u9=127.0.0.1:{free_port()}"],
        framing="line",
        node_id="n2",
        wait_links=[],
        extra=["--connect-timeout", "0.5"],
    )
    async with asyncio.timeout(20):
        r2, w2 = await asyncio.open_connection("127.0.0.1", node2.port)
        w2.write(b"anyone?\n")
        assert await r2.read() == b"", "closed after the connect timeout"
        w2.close()
    m = node2.metrics()
    assert m["pmlb_no_upstream_total"] == 1
    assert m['pmlb_connections_closed_total{reason="no_upstream"}'] == 1


async def test_proxy_protocol_from_trusted_peers_only(cluster: Cluster) -> None:
    from pmlb.dataplane import proxyproto

    up = cluster.echo("u1")
    node = cluster.node(
        [f"u1={up.addr}"],
        framing="line",
        extra=["--proxy-trusted", "127.0.0.1/32", "--proxy-timeout", "1"],
    )

    async def conn_from(src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", node.port, local_addr=(src, 0))

    async with asyncio.timeout(30):
        r1, w1 = await conn_from("127.0.0.1")
        w1.write(proxyproto.v1("203.0.113.7", 4242, "127.0.0.1", node.port) + b"hi\n")
        assert (await r1.readuntil(b"\n")).endswith(b" u1 hi\n")
        r2, w2 = await conn_from("127.0.0.1")
        w2.write(proxyproto.v2("2001:db8::9", 5151, "::1", 9000) + b"hey\n")
        assert (await r2.readuntil(b"\n")).endswith(b" u1 hey\n")
        # untrusted peer: a header is just data, the address is its own
        r3, w3 = await conn_from("127.0.0.5")
        w3.write(proxyproto.v1("198.51.100.1", 1, "127.0.0.1", 2))
        w3.write(b"x\n")
        assert (await r3.readuntil(b"\n")).endswith(
            b" u1 PROXY TCP4 198.51.100.1 127.0.0.1 1 2\r\n"
        )
        _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.admin}/connections")
        seen = {(m["client_addr"], m["client_port"]) for m in json.loads(body)["marks"]}
        assert ("203.0.113.7", 4242) in seen
        assert ("2001:db8::9", 5151) in seen
        assert any(addr == "127.0.0.5" for addr, _ in seen)
        # trusted peer with garbage, and one that never sends its header (slowloris)
        r4, w4 = await conn_from("127.0.0.1")
        w4.write(b"GET / HTTP/1.0\r\n\r\n")
        r5, _w5 = await conn_from("127.0.0.1")
        for r in (r4, r5):
            with contextlib.suppress(ConnectionResetError):
                assert await r.read() == b""
        w1.write(b"still\n")
        assert (await r1.readuntil(b"\n")).endswith(b" u1 still\n")
        for w in (w1, w2, w3):
            w.close()
    m = await asyncio.to_thread(node.metrics)
    assert m["pmlb_proxy_header_errors_total"] == 2
    assert "no PROXY header within 1.0s" in node.proc.log()
