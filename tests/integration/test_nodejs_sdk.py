"""The Node.js SDK (node/upstream-js) in the main suite: the conformance kit
against it, and a real node routing clients to a Node.js upstream and a
Python upstream side by side, with failovers both ways that keep every mark
and every message. (Its own unit tests: tests/unit/test_nodejs_sdk_units.py.)"""

from __future__ import annotations

import asyncio
import signal

from pmlb.testing.conformance_kit import CASES, Options, run_cases
from tests.conftest import JS_SDK, Cluster, Upstream
from tests.faults.clients import new_stats, stream
from tests.support import Proc, async_wait_until, free_port, tcp_open, wait_until


def js_upstream(cluster: Cluster, node_bin: str, uid: str, *extra: str, port: int = 0) -> Upstream:
    port = port or free_port()
    proc = Proc(
        f"js-{uid}-{len(cluster.procs)}",
        [
            str(JS_SDK / "examples" / "echo.js"),
            "--listen",
            f"127.0.0.1:{port}",
            "--id",
            uid,
            *extra,
        ],
        cluster.log_dir,
        program=node_bin,
    )
    cluster.procs.append(proc)
    wait_until(lambda: tcp_open("127.0.0.1", port) or not proc.alive(), 15, f"node.js {uid}")
    assert proc.alive(), proc.log()
    return Upstream(proc, uid, port)


async def test_the_conformance_kit_passes_the_nodejs_sdk(
    cluster: Cluster, node_bin: str, link_transport: str
) -> None:
    up = js_upstream(cluster, node_bin, "js1", "--conformance")
    results = await run_cases(Options(up.addr, link_transport))
    assert [r.case.name for r in results] == [c.name for c in CASES]
    assert {r.case.name: r.line for r in results if not r.passed} == {}


CLIENTS = 60
MESSAGES = 80


async def _wave(port: int, fault: object) -> tuple[dict[str, int], list[list[str]]]:
    """CLIENTS streaming clients; ``fault()`` once they all run. Returns the
    counts and, per client, its mark then the upstream of each reply."""
    stats = new_stats()
    gaps: list[float] = []
    seen: list[list[str]] = [[] for _ in range(CLIENTS)]
    started = [asyncio.Event() for _ in range(CLIENTS)]
    tasks = [
        asyncio.create_task(stream(port, i, MESSAGES, started[i], stats, gaps, seen[i]))
        for i in range(CLIENTS)
    ]
    for ev in started:
        await ev.wait()
    fault()  # type: ignore[operator]
    await asyncio.gather(*tasks)
    return stats, seen


async def test_a_node_routes_to_nodejs_and_python_upstreams_and_fails_over_both_ways(
    cluster: Cluster, node_bin: str
) -> None:
    js = js_upstream(cluster, node_bin, "js1")
    py = cluster.echo("py1")
    node = await asyncio.to_thread(
        cluster.node, [f"js1={js.addr}", f"py1={py.addr}"], extra=["--ack-timeout", "1.5"]
    )
    async with asyncio.timeout(90):
        # 1: side by side, then the Node.js upstream dies mid-stream.
        stats, seen = await _wave(node.port, lambda: js.proc.signal(signal.SIGKILL))
        first = {s[1] for s in seen}
        assert first == {"js1", "py1"}, "clients were spread over both languages"
        moved = [s for s in seen if s[1] == "js1"]
        assert moved, "some clients started on the Node.js upstream"
        assert all(s[-1] == "py1" for s in moved), "they finished on the Python one"
        assert stats["lost"] == stats["duplicated"] == stats["mark_changes"] == 0, stats
        assert stats["received"] == CLIENTS * MESSAGES
        # 2: the Node.js upstream comes back on its address; the Python one dies.
        js = js_upstream(cluster, node_bin, "js1", port=js.port)
        await async_wait_until(
            lambda: node.metrics().get('pmlb_upstream_up{upstream="js1"}') == 1, 15, "js1 up"
        )
        stats2, seen2 = await _wave(node.port, lambda: py.proc.signal(signal.SIGKILL))
        moved2 = [s for s in seen2 if s[1] == "py1"]
        assert moved2, "some clients started on the Python upstream"
        assert all(s[-1] == "js1" for s in moved2), "they finished on the Node.js one"
        assert stats2["lost"] == stats2["duplicated"] == stats2["mark_changes"] == 0, stats2
        assert stats2["received"] == CLIENTS * MESSAGES
        await async_wait_until(lambda: node.metrics()["pmlb_marks_open"] == 0, 10, "all closed")
    m = await asyncio.to_thread(node.metrics)
    assert m["pmlb_failovers_total"] == len(moved) + len(moved2)
