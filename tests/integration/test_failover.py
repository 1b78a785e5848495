"""Persistent marks: clients keep their mark and lose nothing while upstreams die."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from pmlb.protocol.ids import worker_of
from tests.conftest import Cluster, Node
from tests.faults.journal_upstream import reprocessed
from tests.faults.report import record
from tests.support import async_wait_until

pytestmark = pytest.mark.asyncio(loop_scope="function")

CLIENTS = 200
MESSAGES = 60


async def _stream(
    port: int, idx: int, started: asyncio.Event, counts: Counter[str]
) -> tuple[bytes, list[bytes]]:
    """Send numbered lines at a steady pace; return (mark, upstreams seen per reply).
    ``counts`` gets sent, received, lost (a number skipped) and duplicated."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for n in range(MESSAGES):
            writer.write(f"c{idx}-{n}\n".encode())
            counts["sent"] += 1
            await writer.drain()
            if n == 5:
                started.set()
            await asyncio.sleep(0.02)

    async def receive() -> tuple[bytes, list[bytes]]:
        mark = b""
        seen: list[bytes] = []
        expected = 0
        while expected < MESSAGES:
            line = await reader.readuntil(b"\n")
            m, upstream, text = line.rstrip(b"\n").split(b" ", 2)
            mark = mark or m
            assert m == mark, f"client {idx}: mark changed {mark!r} -> {m!r}"
            num = int(text.rsplit(b"-", 1)[1])
            if num < expected:
                counts["duplicated"] += 1
                continue
            counts["lost"] += num - expected
            counts["received"] += 1
            expected = num + 1
            seen.append(upstream)
        return mark, seen

    _, result = await asyncio.gather(send(), receive())
    writer.close()
    return result


async def _run_with_fault(
    node: Node, fault: object, counts: Counter[str]
) -> list[tuple[bytes, list[bytes]]]:
    started = asyncio.Event()
    tasks = [asyncio.create_task(_stream(node.port, i, started, counts)) for i in range(CLIENTS)]
    await started.wait()
    await asyncio.sleep(0.3)  # mid-stream
    fault()  # type: ignore[operator]
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
async def test_streaming_clients_lose_nothing_when_an_upstream_dies(
    cluster: Cluster, how: str
) -> None:
    # SDK upstreams that journal what they handle, to count reprocessing.
    u1, u2 = cluster.journaling("u1"), cluster.journaling("u2")
    node = await asyncio.to_thread(
        cluster.node,
        [f"u1={u1.addr}", f"u2={u2.addr}"],
        framing="line",
        extra=["--ack-timeout", "1.5"],
    )
    sig = signal.SIGKILL if how == "sigkill" else signal.SIGSTOP
    counts: Counter[str] = Counter()
    async with asyncio.timeout(90):
        results = await _run_with_fault(node, lambda: u1.proc.signal(sig), counts)
    marks = {mark for mark, _ in results}
    assert len(marks) == CLIENTS, "every client kept one distinct mark"
    moved = [seen for _, seen in results if seen[0] == b"u1"]
    # Round-robin alternates exactly within each worker process of the node.
    for worker in {worker_of(mark.decode()) for mark, _ in results}:
        mine = [seen for mark, seen in results if worker_of(mark.decode()) == worker]
        assert sum(seen[0] == b"u1" for seen in mine) in (len(mine) // 2, -(-len(mine) // 2))
    assert all(seen[-1] == b"u2" for seen in moved), "u1's clients finished on u2"
    await async_wait_until(lambda: node.metrics()["pmlb_marks_open"] == 0, 10, "all closed")
    m = await asyncio.to_thread(node.metrics)
    again, _ = reprocessed(cluster.journals())
    record(
        f"upstream {how.upper()} under load",
        connections=CLIENTS,
        held=len(marks),
        sent=counts["sent"],
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        reprocessed=again,
        failovers=int(m["pmlb_failovers_total"]),
        note="reprocessed: handled by u1 and again by u2 (at-least-once to upstreams)",
    )
    assert counts["lost"] == 0
    assert counts["duplicated"] == 0
    assert counts["received"] == CLIENTS * MESSAGES
    assert m["pmlb_failovers_total"] == len(moved)
    closed = {k: v for k, v in m.items() if k.startswith("pmlb_connections_closed_total")}
    assert set(closed) == {'pmlb_connections_closed_total{reason="client_closed"}'}, closed
