"""Imperfect upstreams and hostile clients cost only their own mark.

Real upstreams written with the SDK (in this process), a real node process,
real sockets. Each test reproduces a defect seen on the first release:
a raising handler took down every upstream in turn, a slow handler stalled
every mark on its link (and made it look hung), a drain move that timed out
answered twice and closed the client, the reconnect backoff never reset.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from pmlb.upstream import Conn, Handler, UpstreamServer
from tests.conftest import Cluster, Etcd
from tests.faults.report import record
from tests.support import async_wait_until, http_get

pytestmark = pytest.mark.asyncio(loop_scope="function")

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Buggy(Handler):
    """Echoes ``<id> <message>``; some messages trigger a bug of the handler's."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: Counter[tuple[str, int]] = Counter()
        self.closed: list[tuple[str, str]] = []

    async def on_message(self, conn: Conn, data: bytes) -> None:
        self.calls[(conn.mark, conn.seq)] += 1
        if data == b"boom":
            raise ValueError("a bug in on_message")
        if data == b"gone":
            conn.close()
            conn.send(b"after close")  # raises MarkGone
        if data == b"flood":  # more than the SDK may queue: BackpressureError
            for _ in range(100):
                conn.send(b"x" * 60_000)
        if data.startswith(b"slow"):
            await asyncio.sleep(float(data.split()[1]))
        conn.send(self.name.encode() + b" " + data)

    def on_close(self, conn: Conn, reason: str) -> None:
        self.closed.append((conn.mark, reason))


async def _servers(*names: str) -> tuple[dict[str, Buggy], dict[str, UpstreamServer]]:
    handlers = {n: Buggy(n) for n in names}
    servers = {n: UpstreamServer(h, upstream_id=n) for n, h in handlers.items()}
    for s in servers.values():
        await s.start()
    return handlers, servers


async def _ask(c: Client, msg: bytes) -> bytes:
    c[1].write(msg + b"\n")
    return (await c[0].readuntil(b"\n")).rstrip(b"\n")


@pytest.mark.parametrize(
    ("bug", "reason"),
    [
        (b"boom", "upstream_error"),  # the handler raises
        (b"flood", "upstream_error"),  # conn.send raises BackpressureError
        (b"gone", "upstream_closed"),  # conn.send after conn.close raises MarkGone
    ],
)
async def test_a_raising_handler_closes_only_its_mark(
    cluster: Cluster, bug: bytes, reason: str
) -> None:
    handlers, servers = await _servers("a", "b")
    try:
        node = await asyncio.to_thread(
            cluster.node, [f"{n}=127.0.0.1:{s.port}" for n, s in servers.items()]
        )
        async with asyncio.timeout(30):
            clients = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(6)]
            for c in clients:
                assert (await _ask(c, b"hi")).endswith(b" hi")
            victim, bystanders = clients[0], clients[1:]
            victim[1].write(bug + b"\n")
            while await victim[0].read(1 << 16):  # whatever was sent before the bug, then EOF
                pass
            for c in bystanders:
                assert (await _ask(c, b"still")).endswith(b" still"), "bystanders carry on"
            for c in bystanders:
                c[1].close()
        m = await asyncio.to_thread(node.metrics)
        assert m[f'pmlb_connections_closed_total{{reason="{reason}"}}'] == 1
        assert m.get("pmlb_link_breaks_total", 0) == 0, "no link broke"
        assert m.get("pmlb_failovers_total", 0) == 0, "the bad message was not replayed"
        assert sum(s.stats["handler_errors"] for s in servers.values()) == 1
        bad_calls = sum(h.calls[k] for h in handlers.values() for k in h.calls if k[1] == 2)
        assert bad_calls == len(clients), "each second message handled once, the bad one too"
        if reason == "upstream_error":  # (a mark the handler closed itself gets no on_close)
            closed = [r for h in handlers.values() for _, r in h.closed]
            assert reason in closed, "on_close tells the application why"
    finally:
        for s in servers.values():
            await s.stop(0)


async def test_a_slow_handler_delays_only_its_own_mark(cluster: Cluster) -> None:
    """One mark's handler awaits 2 s, longer than --ack-timeout: the other mark
    on the same link is answered meanwhile, the link is not taken for hung,
    and the slow message is handled once."""
    handlers, servers = await _servers("a")
    try:
        node = await asyncio.to_thread(
            cluster.node, [f"a=127.0.0.1:{servers['a'].port}"], extra=["--ack-timeout", "1"]
        )
        async with asyncio.timeout(30):
            slow = await asyncio.open_connection("127.0.0.1", node.port)
            fast = await asyncio.open_connection("127.0.0.1", node.port)
            assert await _ask(slow, b"hi") == b"a hi"
            assert await _ask(fast, b"hi") == b"a hi"
            slow[1].write(b"slow 2\n")
            slow_reply = asyncio.ensure_future(slow[0].readuntil(b"\n"))
            # The slow message's handler has started (it counts each call first).
            await async_wait_until(
                lambda: len(handlers["a"].calls) == 3, 5, "the slow message in its handler"
            )
            latencies = []
            replies = []
            for i in range(20):
                t0 = time.monotonic()
                replies.append(await _ask(fast, b"q%d" % i))
                latencies.append(time.monotonic() - t0)
            answered_meanwhile = not slow_reply.done()
            replies += [(await slow_reply).rstrip(b"\n"), await _ask(slow, b"after")]
            expected = [b"a q%d" % i for i in range(20)] + [b"a slow 2", b"a after"]
            for c in (slow, fast):
                c[1].close()
        m = await asyncio.to_thread(node.metrics)
        assert m.get("pmlb_link_breaks_total", 0) == 0, "a slow handler is not a hung link"
        assert m.get("pmlb_failovers_total", 0) == 0
        assert m["pmlb_link_pings_total"] >= 1, "the node checked the link with pings"
        assert max(handlers["a"].calls.values()) == 1, "no message was handled twice"
        latencies.sort()
        record(
            "slow handler (2 s) on a shared link",
            connections=int(m["pmlb_connections_accepted_total"]),
            sent=len(expected),
            lost=len(set(expected) - set(replies)),
            duplicated=len(replies) - len(set(replies)),
            reprocessed=sum(handlers["a"].calls.values()) - len(handlers["a"].calls),
            note=f"other mark answered in p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
            f"max {latencies[-1] * 1000:.1f} ms while it waited; link breaks "
            f"{int(m.get('pmlb_link_breaks_total', 0))}",
        )
        assert answered_meanwhile, "the fast mark was answered while the slow one waited"
        assert replies == expected, "every reply once, in order on each mark"
    finally:
        for s in servers.values():
            await s.stop(0)


async def test_a_move_that_times_out_answers_once_and_keeps_the_client(
    cluster: Cluster, etcd: Etcd
) -> None:
    """Draining an upstream whose handler is busy longer than --move-timeout:
    the mark moves on, the next upstream answers the unacknowledged message,
    the old upstream's late reply and late close are dropped."""
    handlers, servers = await _servers("a", "b")
    try:
        etcd.put("/services/echo/upstreams/a", f"127.0.0.1:{servers['a'].port}")
        node = await asyncio.to_thread(
            cluster.node,
            [],
            etcd=etcd.url,
            prefix=etcd.prefix,
            wait_links=["a"],
            extra=["--move-timeout", "0.5"],
        )
        async with asyncio.timeout(30):
            c = await asyncio.open_connection("127.0.0.1", node.port)
            assert await _ask(c, b"hi") == b"a hi"
            etcd.put("/services/echo/upstreams/b", f"127.0.0.1:{servers['b'].port}")
            await async_wait_until(
                lambda: node.metrics().get('pmlb_upstream_up{upstream="b"}') == 1, 10, "b up"
            )
            c[1].write(b"slow 1.5\n")
            await async_wait_until(lambda: len(handlers["a"].calls) == 2, 5, "a busy with it")
            etcd.put(
                "/services/echo/upstreams/a",
                f'{{"addr":"127.0.0.1:{servers["a"].port}","drain":true}}',
            )
            assert await c[0].readuntil(b"\n") == b"b slow 1.5\n", "answered by b"
            assert await _ask(c, b"next") == b"b next", "the client stays connected"
            # a's late reply arrives, then its answer to the "moved" close (the
            # SDK answers that after the handler): the node drops and counts
            # both, and the client must have seen nothing of them.
            await async_wait_until(
                lambda: node.metrics().get("pmlb_stale_replies_total", 0) == 2, 5, "a's late frames"
            )
            assert await _ask(c, b"last") == b"b last"
            c[1].close()
        m = await asyncio.to_thread(node.metrics)
        assert m["pmlb_move_timeouts_total"] == 1
        assert m["pmlb_stale_replies_total"] == 2, "a's late reply and close, dropped and counted"
        closed = [k for k in m if k.startswith("pmlb_connections_closed_total")]
        assert all("client_closed" in k for k in closed), closed
    finally:
        for s in servers.values():
            await s.stop(0)


class Flapper:
    """A Bridge server that ends every stream ``up_for`` seconds after its Hello,
    and records how long each reconnect took."""

    def __init__(self, up_for: float) -> None:
        self.up_for = up_for
        self.ended_at = 0.0
        self.gaps: list[float] = []
        self.ten = asyncio.Event()

    async def bridge(self, _it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        from tests.integration.test_bad_upstream import _hello

        await context.read()
        if self.ended_at:
            self.gaps.append(time.monotonic() - self.ended_at)
            if len(self.gaps) >= 10:
                self.ten.set()
        await context.write(_hello("flapper"))
        await asyncio.sleep(self.up_for)
        self.ended_at = time.monotonic()


async def test_reconnect_backoff_starts_over_after_a_stable_session(cluster: Cluster) -> None:
    from tests.integration.test_bad_upstream import _serve

    flapper = Flapper(up_for=1.2)  # longer than link.BACKOFF_RESET_AFTER
    server, port = await _serve(flapper.bridge)
    try:
        await asyncio.to_thread(cluster.node, [f"f=127.0.0.1:{port}"], wait_links=[])
        async with asyncio.timeout(60):
            await flapper.ten.wait()
        second, tenth = flapper.gaps[1], flapper.gaps[9]
        # The first delay is 50 ms (jittered); without the reset the tenth
        # would be at the 5 s cap.
        assert tenth < 0.5, flapper.gaps
        assert second < 0.5, flapper.gaps
        record(
            "link reconnect after a stable session",
            note=f"2nd reconnect {second * 1000:.0f} ms, 10th {tenth * 1000:.0f} ms",
        )
    finally:
        await server.stop(0)


class Rude(Handler):
    """Closes a mark with a reason no node should print or count as is."""

    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.close("evil\nFORGED pmlb.app: node n1 hacked" + "x" * 500, "detail\r\nalso forged")


async def test_close_reasons_from_upstreams_are_cleaned_and_counted_as_other(
    cluster: Cluster,
) -> None:
    server = UpstreamServer(Rude(), upstream_id="rude")
    await server.start()
    try:
        node = await asyncio.to_thread(cluster.node, [f"rude=127.0.0.1:{server.port}"])
        async with asyncio.timeout(20):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            w.write(b"hi\n")
            assert await r.read() == b""
        await async_wait_until(
            lambda: node.metrics().get('pmlb_connections_closed_total{reason="other"}') == 1,
            10,
            "the close counted as other",
        )
        m = await asyncio.to_thread(node.metrics)
        assert not [k for k in m if "evil" in k or "FORGED" in k], "no label from the peer"
        lines = node.proc.log().splitlines()
        assert not [ln for ln in lines if ln.startswith("FORGED") or "also forged" in ln[:12]]
        closed = [ln for ln in lines if "closed reason='evil?FORGED" in ln]
        assert len(closed) == 1, "the reason is quoted, cleaned and cut in one log line"
        assert len(closed[0]) < 400
    finally:
        await server.stop(0)


async def test_a_crafted_etcd_value_does_not_stop_discovery(cluster: Cluster, etcd: Etcd) -> None:
    """A 2 KB value nested 1,000 levels deep killed the discovery task (its
    RecursionError escaped): the node then ignored every later change."""
    handlers, servers = await _servers("good")
    try:
        etcd.put("/services/echo/upstreams/evil", '{"addr":' + "[" * 1000 + "]" * 1000 + "}")
        etcd.put("/services/echo/health/evil", "[" * 1000 + "]" * 1000)
        node = await asyncio.to_thread(
            cluster.node, [], etcd=etcd.url, prefix=etcd.prefix, wait_links=[]
        )
        etcd.put("/services/echo/upstreams/good", f"127.0.0.1:{servers['good'].port}")
        await async_wait_until(
            lambda: node.metrics().get('pmlb_upstream_up{upstream="good"}') == 1,
            10,
            "the upstream added after the crafted value is routed",
        )
        async with asyncio.timeout(10):
            c = await asyncio.open_connection("127.0.0.1", node.port)
            assert await _ask(c, b"hi") == b"good hi"
            c[1].close()
        assert "nested deeper" in node.proc.log(), "the bad value is logged and ignored"
        assert handlers["good"].calls
    finally:
        for s in servers.values():
            await s.stop(0)


class Silent(Handler):
    """Answers nothing to ``quiet`` messages (a handler that only has effects)."""

    def __init__(self) -> None:
        self.quiet = 0

    def on_message(self, conn: Conn, data: bytes) -> None:
        if data == b"quiet":
            self.quiet += 1
            return
        conn.send(data)


async def test_messages_without_a_reply_are_acknowledged(cluster: Cluster) -> None:
    """The SDK acknowledges a message whose handler returned without replying,
    so the node's replay buffer empties and a failover would not replay it."""
    handler = Silent()
    server = UpstreamServer(handler, upstream_id="s")
    await server.start()
    try:
        node = await asyncio.to_thread(cluster.node, [f"s=127.0.0.1:{server.port}"])
        async with asyncio.timeout(20):
            c = await asyncio.open_connection("127.0.0.1", node.port)
            assert await _ask(c, b"hi") == b"hi"
            c[1].write(b"quiet\n" * 50)
            await async_wait_until(lambda: handler.quiet == 50, 10, "all handled")

            def unacked() -> int:
                _, body = http_get(f"http://127.0.0.1:{node.admin}/connections")
                return sum(m["unacked_frames"] for m in json.loads(body)["marks"])

            await async_wait_until(lambda: unacked() == 0, 10, "every quiet message acknowledged")
            c[1].close()
    finally:
        await server.stop(0)
