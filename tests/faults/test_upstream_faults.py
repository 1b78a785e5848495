"""Faults that come from an upstream's code or a client's manners, not from the
network: a message that crashes every upstream process it reaches, and a
client that floods empty messages and never reads."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from tests.conftest import Cluster
from tests.faults.clients import new_stats, stream
from tests.faults.journal_upstream import reprocessed
from tests.faults.report import record

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.faults]


async def test_a_message_that_crashes_upstreams_stops_at_the_second(cluster: Cluster) -> None:
    """A handler bug kills its whole process on one message. The node replays
    the unacknowledged message once (it may have been the link, not the
    message); when the second upstream dies with it in flight too, the mark is
    closed (reason poison) instead of taking down a third. Bystanders that
    streamed through both crashes lose nothing."""
    ups = [cluster.journaling(f"u{i}") for i in (1, 2, 3)]
    node = await asyncio.to_thread(
        cluster.node, [f"{u.id}={u.addr}" for u in ups], extra=["--ack-timeout", "1.5"]
    )
    stats = new_stats()
    gaps: list[float] = []
    started = asyncio.Event()
    clients, messages = 60, 80
    async with asyncio.timeout(90):
        tasks = [
            asyncio.create_task(stream(node.port, i, messages, started, stats, gaps))
            for i in range(clients)
        ]
        await started.wait()
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"crash\n")
        poison_got = await r.read()
        await asyncio.gather(*tasks)
    dead = [u.id for u in ups if not u.proc.alive()]
    m = await asyncio.to_thread(node.metrics)
    again, _ = reprocessed(cluster.journals())
    poisoned = int(m.get('pmlb_connections_closed_total{reason="poison"}', 0))
    record(
        "a message that crashes its upstream process",
        connections=clients + 1,
        held=clients,
        sent=stats["sent"] + 1,
        lost=stats["lost"],
        duplicated=stats["duplicated"],
        reprocessed=again,
        recovery_s=round(max(gaps), 2),
        failovers=int(m["pmlb_failovers_total"]),
        note=f"upstreams crashed {len(dead)} of 3; marks closed as poison {poisoned}",
    )
    assert poison_got == b"", "the poison mark is closed, with no reply"
    assert len(dead) == 2, f"the cascade stops at the second upstream (dead: {dead})"
    assert m['pmlb_connections_closed_total{reason="poison"}'] == 1
    assert m["pmlb_poisoned_marks_total"] == 1
    assert stats["lost"] == 0
    assert stats["duplicated"] == 0
    assert stats["mark_changes"] == 0
    assert stats["received"] == clients * messages


def _flood(port: int, total: int, stall: float) -> tuple[socket.socket, int]:
    """Send ``total`` bytes of newlines without ever reading; stop early when
    the node has not taken a byte for ``stall`` seconds. Returns the socket
    (still open) and how many bytes the kernel accepted."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    chunk = b"\n" * 65536
    sent = 0
    last_progress = time.monotonic()
    while sent < total and time.monotonic() - last_progress < stall:
        try:
            n = s.send(chunk[: min(len(chunk), total - sent)])
        except BlockingIOError:
            time.sleep(0.005)
            continue
        sent += n
        last_progress = time.monotonic()
    return s, sent


async def test_an_empty_message_flood_stalls_only_its_own_client(cluster: Cluster) -> None:
    """2.5 MB of newlines (2.5 million empty messages) from a client that never
    reads: every frame costs credit, so the flood closes its own window like
    any other; node memory stays bounded and other clients lose nothing."""
    up = cluster.echo("u1")
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"])
    rss0 = node.proc.tree_rss_bytes()
    stats = new_stats()
    gaps: list[float] = []
    started = asyncio.Event()
    clients, messages = 20, 100
    peak = rss0
    async with asyncio.timeout(90):
        tasks = [
            asyncio.create_task(stream(node.port, i, messages, started, stats, gaps))
            for i in range(clients)
        ]
        await started.wait()
        flood = asyncio.ensure_future(asyncio.to_thread(_flood, node.port, 2_500_000, 3.0))
        while not flood.done():
            peak = max(peak, node.proc.tree_rss_bytes())
            await asyncio.sleep(0.05)
        sock, flooded = await flood
        await asyncio.gather(*tasks)
        peak = max(peak, node.proc.tree_rss_bytes())
    m = await asyncio.to_thread(node.metrics)
    grown = (peak - rss0) / (1 << 20)
    record(
        "2.5 MB of empty messages from a client that never reads",
        connections=clients + 1,
        held=clients + 1,
        sent=stats["sent"],
        lost=stats["lost"],
        duplicated=stats["duplicated"],
        note=f"flood {flooded / 1e6:.2f} MB taken by the kernel, node RSS +{grown:.1f} MiB, "
        f"link breaks {int(m.get('pmlb_link_breaks_total', 0))}, "
        f"frames in {int(m['pmlb_frames_in_total'])}",
    )
    with contextlib.suppress(OSError):
        sock.close()
    assert grown <= 16, f"node RSS grew {grown:.1f} MiB"
    assert m.get("pmlb_link_breaks_total", 0) == 0
    assert m["pmlb_credit_stalls_total"] >= 1, "the flooding client was stalled"
    assert stats["lost"] == 0
    assert stats["duplicated"] == 0
    assert stats["received"] == clients * messages
