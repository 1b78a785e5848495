"""Limits: per node, per client address (per worker), idle timeout, max lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections import Counter

import pytest

from pmlb.node.workers import default_workers
from pmlb.protocol.ids import worker_of
from tests.conftest import Cluster, both_transports
from tests.support import http_get

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def _open(port: int, src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))


async def _is_refused(r: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(r.read(), 5) == b""
    return True


async def _works(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    w.write(b"ping\n")
    return (await r.readuntil(b"\n")).endswith(b" u1 ping\n")


async def _mark(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> str | None:
    """The mark of a connection the node admitted; None if it was refused."""
    w.write(b"ping\n")
    try:
        line = await asyncio.wait_for(r.readuntil(b"\n"), 5)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    return line.split()[0].decode()


async def test_per_client_limit(cluster: Cluster, workers: str) -> None:
    """--max-per-client is per worker process (its help says so): with N
    workers one address holds at most 2 per worker, so of 2N + 1 connections
    at least one is refused, and every worker admits at most 2."""
    n = 1 if workers == "w1" else default_workers()
    up = cluster.echo("u1")
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"], extra=["--max-per-client", "2"])
    async with asyncio.timeout(30):
        a = [await _open(node.port, "127.0.0.11") for _ in range(2 * n + 1)]
        marks = [await _mark(*c) for c in a]
        admitted = [m for m in marks if m is not None]
        assert len(admitted) < len(a), "at least one connection from one address refused"
        per_worker = Counter(worker_of(m) for m in admitted)
        assert max(per_worker.values()) <= 2, per_worker
        if n == 1:
            assert len(admitted) == 2
        b = [await _open(node.port, "127.0.0.12") for _ in range(2)]
        assert all([await _works(*c) for c in b]), "other addresses are not affected"
        first = marks.index(admitted[0])
        a[first][1].close()  # a slot frees up for that address (on that worker)
        for _ in range(50):
            d = await _open(node.port, "127.0.0.11")
            try:
                if await asyncio.wait_for(_works(*d), 1):
                    break
            except (asyncio.IncompleteReadError, ConnectionResetError, TimeoutError):
                await asyncio.sleep(0.05)
        else:
            pytest.fail("no slot freed after a client left")
        last = marks.index(admitted[-1])
        assert await _works(*a[last]), "admitted clients never notice the limit"
    m = await asyncio.to_thread(node.metrics)
    assert m['pmlb_connections_refused_total{limit="client_limit"}'] >= len(a) - len(admitted)


async def test_idle_timeout_and_max_lifetime(cluster: Cluster) -> None:
    up = cluster.echo("u1")
    node = await asyncio.to_thread(
        cluster.node, [f"u1={up.addr}"], extra=["--idle-timeout", "1", "--max-lifetime", "3"]
    )
    async with asyncio.timeout(30):
        t0 = time.monotonic()
        idle_r, idle_w = await _open(node.port, "127.0.0.1")
        busy_r, busy_w = await _open(node.port, "127.0.0.1")
        assert await _works(idle_r, idle_w)
        closed_at: dict[str, float] = {}

        async def watch_idle() -> None:
            with contextlib.suppress(ConnectionResetError):
                await idle_r.read()
            closed_at["idle"] = time.monotonic() - t0

        watcher = asyncio.create_task(watch_idle())
        while True:
            try:
                assert await _works(busy_r, busy_w)
            except (asyncio.IncompleteReadError, ConnectionResetError):
                break
            await asyncio.sleep(0.2)
        await watcher
        closed_idle_at = closed_at["idle"]
        lifetime = time.monotonic() - t0
    # One sweep every min(limits)/4 s (pmlb.dataplane.plane.start_sweeper);
    # lifetimes are jittered down by up to 10 %. Never early; late by at most
    # a sweep, plus one second for a loaded machine.
    idle, life, sweep = 1.0, 3.0, min(1.0, 3.0) / 4
    assert idle <= closed_idle_at < idle + sweep + 1, f"idle client closed at {closed_idle_at:.2f}s"
    assert life * 0.9 <= lifetime < life + sweep + 1, f"busy client closed at {lifetime:.2f}s"
    m = await asyncio.to_thread(node.metrics)
    assert m['pmlb_connections_closed_total{reason="idle_timeout"}'] == 1
    assert m['pmlb_connections_closed_total{reason="max_lifetime"}'] == 1


async def test_accept_rate_limit_paces_a_burst(cluster: Cluster) -> None:
    up = cluster.echo("u1")
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"], extra=["--accept-rate", "20"])
    async with asyncio.timeout(30):
        t0 = time.monotonic()

        async def one(i: int) -> float:
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            w.write(f"n{i}\n".encode())
            assert (await r.readuntil(b"\n")).endswith(f" u1 n{i}\n".encode())
            w.close()
            return time.monotonic() - t0

        times = await asyncio.gather(*(one(i) for i in range(60)))
    # 20 in the first burst, then 20 a second: the last ones wait about two seconds.
    assert max(times) >= 1.5, f"not paced: all served within {max(times):.2f}s"
    assert sorted(times)[15] < 1.0, "the first burst is not delayed"
    m = await asyncio.to_thread(node.metrics)
    assert m["pmlb_accept_rate_pauses_total"] >= 1
    closed = {k for k in m if k.startswith("pmlb_connections_closed_total")}
    assert closed <= {'pmlb_connections_closed_total{reason="client_closed"}'}, "none refused"


@both_transports
async def test_metadata_is_bounded(cluster: Cluster) -> None:
    from pmlb.errors import MetadataTooLarge
    from pmlb.upstream import Conn, Handler, UpstreamServer

    class Greedy(Handler):
        def on_message(self, conn: Conn, data: bytes) -> None:
            try:
                conn.set_meta({"blob": "x" * int(data)})
            except MetadataTooLarge:
                conn.send(f"refused over {conn.max_meta}".encode())
                return
            conn.send(b"ok")

    server = UpstreamServer(Greedy(), upstream_id="g", listen="127.0.0.1:0")
    port = await server.start()
    try:
        node = await asyncio.to_thread(
            cluster.node, [f"g=127.0.0.1:{port}"], extra=["--max-meta", "1000"]
        )
        async with asyncio.timeout(20):
            r, w = await asyncio.open_connection("127.0.0.1", node.port)
            answers = []
            for size in (500, 5000, 400):
                w.write(f"{size}\n".encode())
                answers.append(await r.readuntil(b"\n"))
            assert answers == [b"ok\n", b"refused over 1000\n", b"ok\n"], answers
            _, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{node.admin}/connections"
            )
            kept = json.loads(body)["marks"][0]["metadata"]
            assert kept == {"blob": "x" * 400}, "the refused set changed nothing"
            w.close()
        m = await asyncio.to_thread(node.metrics)
        assert m.get("pmlb_bad_upstream_frames_total", 0) == 0, "nothing oversized reached it"
    finally:
        await server.stop(0)


def _keepalive_timers(port: int) -> list[str]:
    """The kernel's timers on the node's side of client connections to ``port``
    (``ss -o``: e.g. ``timer:(keepalive,29sec,0)``)."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize(("setting", "expect_probes"), [("30s", True), ("0", False)])
async def test_client_keepalive_is_set_on_accepted_connections(
    cluster: Cluster, setting: str, expect_probes: bool
) -> None:
    up = cluster.echo("u1")
    node = await asyncio.to_thread(
        cluster.node, [f"u1={up.addr}"], extra=["--client-keepalive", setting]
    )
    async with asyncio.timeout(20):
        r, w = await _open(node.port, "127.0.0.1")
        assert await _works(r, w)
        lines = await asyncio.to_thread(_keepalive_timers, node.port)
        w.close()
    assert len(lines) == 1, lines
    # A client that vanishes without FIN or RST is probed after 30 s, so the
    # node notices it (the partition suite measures that on a real cut).
    assert ("timer:(keepalive" in lines[0]) is expect_probes, lines[0]
