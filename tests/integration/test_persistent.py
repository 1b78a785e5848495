"""Persistent marks in a cluster: metadata across failover, push and close from
anywhere, upstream drain under load, node drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from pmlb.protocol.ids import worker_of
from pmlb.upstream import Conn, Handler, UpstreamServer
from tests.conftest import LEASE_TTL, Cluster, Etcd, Node
from tests.faults.report import record
from tests.support import ROOT, async_wait_until, http_get, tcp_open

PUSHER = """
import asyncio, sys
from pmlb.client import MarkClient
from pmlb.errors import MarkGone

async def main(etcd, prefix, mark, bogus):
    from pmlb.errors import PmlbError
    async with MarkClient([etcd], prefix, token="wrong") as intruder:
        try:
            await intruder.send(mark, b"should not arrive")
        except PmlbError as exc:
            print("REFUSED", exc, flush=True)
    async with MarkClient([etcd], prefix) as marks:
        await marks.send(mark, b"pushed from afar")
        info = await marks.describe(mark)
        print(info.client_addr, info.upstream, dict(info.metadata), info.frames_in, flush=True)
        try:
            await marks.send(bogus, b"x")
        except MarkGone as exc:
            print("GONE", exc, flush=True)
        await marks.close(mark, "kicked")
        try:
            await marks.describe(mark)
        except MarkGone:
            print("GONE-AFTER-CLOSE", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


class Meta(Handler):
    def __init__(self, name: str) -> None:
        self.name = name
        self.resumed: list[tuple[str, dict[str, str]]] = []

    def on_open(self, conn: Conn) -> None:
        if conn.resumed:
            self.resumed.append((conn.mark, dict(conn.metadata)))

    def on_message(self, conn: Conn, data: bytes) -> None:
        if data.startswith(b"set "):
            conn.set_meta({"user": data[4:].decode()})
        conn.send(f"{conn.mark} {self.name} {conn.metadata.get('user', '-')} ".encode() + data)


@pytest.mark.asyncio
async def _serving(node: Node, *uids: str) -> None:
    """Wait until the checker has marked every one of ``uids`` SERVING: while
    only some are, new marks all go to those (an upstream of unknown health is
    used only when none is SERVING), and round-robin tests would race it."""
    for uid in uids:
        await async_wait_until(
            lambda uid=uid: (
                node.metrics().get(f'pmlb_upstream_health{{status="SERVING",upstream="{uid}"}}')
                == 1
            ),
            15,
            f"{uid} SERVING",
        )


async def test_metadata_follows_the_mark_and_push_from_anywhere(
    etcd: Etcd, cluster: Cluster
) -> None:
    handlers = {n: Meta(n) for n in ("a", "b")}
    servers = {}
    for name, h in handlers.items():
        servers[name] = UpstreamServer(h, upstream_id=name, listen="127.0.0.1:0")
        port = await servers[name].start()
        etcd.put(f"/services/echo/upstreams/{name}", f"127.0.0.1:{port}")
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [],
            etcd=etcd.url,
            prefix=etcd.prefix,
            wait_links=["a", "b"],
            extra=["--control", "127.0.0.1:0"],
            env={"PMLB_CONTROL_TOKEN": "s3cret-token"},
        )
        await _serving(node, "a", "b")
        async with asyncio.timeout(40):
            conns = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(2)]
            replies = []
            for r, w in conns:
                w.write(b"set alice\n")
                replies.append((await r.readuntil(b"\n")).decode().split())
            on_a = next(i for i, rep in enumerate(replies) if rep[1] == "a")
            r, w = conns[on_a]
            mark = replies[on_a][0]
            assert replies[on_a][2] == "alice"

            await servers["a"].stop(0)  # a goes away: the mark moves to b
            w.write(b"who am i\n")
            line = (await r.readuntil(b"\n")).decode().split()
            assert line[:3] == [mark, "b", "alice"], "same mark, b sees a's metadata"
            assert handlers["b"].resumed == [(mark, {"user": "alice"})]

            # A separate process, with no link to the node, through the control API.
            out = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", PUSHER, etcd.url, etcd.prefix, mark, "n1.aaaaaaaaaaaaa.zz"],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=ROOT,
                check=False,
                env={**os.environ, "PMLB_CONTROL_TOKEN": "s3cret-token"},
            )
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert lines.pop(0).startswith("REFUSED"), "a wrong token is refused"
            assert lines[0].startswith("127.0.0.1 b {'user': 'alice'} ")
            assert int(lines[0].split()[-1]) >= 2, "counters"
            assert lines[1].startswith("GONE")
            assert "not open" in lines[1]
            assert lines[2] == "GONE-AFTER-CLOSE"
            assert await r.readuntil(b"\n") == b"pushed from afar\n"
            assert await r.read() == b"", "closed by the control API"
            for _, w2 in conns:
                w2.close()
        m = await asyncio.to_thread(node.metrics)
        # "kicked" is not in the close-reason vocabulary: counted as "other".
        assert m['pmlb_connections_closed_total{reason="other"}'] == 1
        assert "reason='kicked'" in node.proc.log(), "the log quotes the caller's word"
    finally:
        for s in servers.values():
            await s.stop(0)


async def _streamer(port: int, idx: int, n_msgs: int, marks: list[str] | None = None) -> list[str]:
    """The upstream of each reply, in order; ``marks`` gets the client's mark."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    seen = []
    mine = set()
    for n in range(n_msgs):
        w.write(f"c{idx}-{n}\n".encode())
        mark, upstream, text = (await r.readuntil(b"\n")).decode().rstrip("\n").split(" ", 2)
        mine.add(mark)
        assert len(mine) == 1, f"client {idx}: the mark changed"
        assert text == f"c{idx}-{n}", f"client {idx}: expected #{n}, got {text!r}"
        seen.append(upstream)
        await asyncio.sleep(0.01)
    w.close()
    if marks is not None:
        marks.append(mine.pop())
    return seen


@pytest.mark.asyncio
async def test_drain_an_upstream_under_load(etcd: Etcd, cluster: Cluster) -> None:
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    etcd.put("/services/echo/upstreams/u2", u2.addr)
    node = await asyncio.to_thread(
        cluster.node, [], etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1", "u2"]
    )
    await _serving(node, "u1", "u2")
    async with asyncio.timeout(60):
        marks: list[list[str]] = [[] for _ in range(60)]
        tasks = [asyncio.create_task(_streamer(node.port, i, 150, marks[i])) for i in range(60)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(etcd.pmlb, "upstream", "drain", "echo", "u1")
        results = await asyncio.gather(*tasks)  # every message answered, in order
    moved = [s for s in results if s[0] == "u1"]
    # Round-robin alternates exactly within each worker process of the node.
    workers = {worker_of(m[0]) for m in marks}
    for worker in workers:
        mine = [s for s, m in zip(results, marks, strict=True) if worker_of(m[0]) == worker]
        assert sum(s[0] == "u1" for s in mine) in (len(mine) // 2, -(-len(mine) // 2))
    assert all(s[-1] == "u2" for s in moved), "every mark left the drained upstream"
    m = await asyncio.to_thread(node.metrics)
    assert m['pmlb_upstream_marks{upstream="u1"}'] == 0
    assert m["pmlb_moves_total"] == len(moved)


@pytest.mark.asyncio
async def test_sigterm_drains_the_node(etcd: Etcd, cluster: Cluster) -> None:
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    node = await asyncio.to_thread(
        cluster.node,
        [],
        etcd=etcd.url,
        prefix=etcd.prefix,
        wait_links=["u1"],
        extra=["--drain-timeout", "2", "--drain-window", "1"],
    )
    async with asyncio.timeout(40):
        finisher = asyncio.create_task(_streamer(node.port, 0, 40))  # ~0.5 s of traffic
        stayers = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(10)]
        for r, w in stayers:
            w.write(b"hi\n")
            await r.readuntil(b"\n")
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        node.proc.signal(signal.SIGTERM)
        # "At once": the node revokes its lease. Expiry would take LEASE_TTL,
        # so leaving within half of it can only be the revoke.
        await async_wait_until(
            lambda: etcd.get("/nodes/n1") is None, LEASE_TTL / 2, "left etcd at once"
        )
        assert time.monotonic() - t0 < LEASE_TTL / 2
        status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.admin}/readyz")
        assert status == 503, "not ready while draining"
        assert not await asyncio.to_thread(tcp_open, "127.0.0.1", node.port), "no new clients"
        finished = len(await finisher)
        assert finished == 40, "a client that finishes in time is not cut"
        still = 0
        for r, w in stayers:
            w.write(b"still\n")
            still += (await r.readuntil(b"\n")).endswith(b" u1 still\n")
        assert still == len(stayers)
        for r, _ in stayers:
            assert await r.read() == b""  # closed at the drain deadline
        took = time.monotonic() - t0
        assert 2 <= took < 5, f"closed at {took:.1f}s, deadline 2 s + 1 s window"
    code = await asyncio.to_thread(node.proc.proc.wait, 15)
    assert code == 0
    # No duplicated column: _streamer checks every reply in order, so a
    # repeat fails it rather than being counted.
    record(
        "node SIGTERM (drain 2 s + 1 s window)",
        connections=1 + len(stayers),
        held=int(finished == 40),  # the client that finished in time was not cut
        sent=40 + 2 * len(stayers),
        lost=40 - finished + len(stayers) - still,
        recovery_s=round(took, 2),
        note=f"left etcd at once; {len(stayers)} idle clients closed at the drain deadline",
    )
    assert node.proc.log().count("reason=node_draining") == 10
