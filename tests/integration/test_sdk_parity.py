"""The two SDKs, same semantics: the chat-room twins (node/examples/rooms_server.py
and node/upstream-js/examples/rooms.js) behind one real node at the default
worker count. Clients on either upstream see the same answers: every mark of
the node with its metadata (watch_marks), pushes across upstreams accepted
before the sender is answered, MarkGone for a mark that is not open, and
PushRefused(not_permitted) where the node's --push-upstreams does not list
the sender.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import JS_SDK, Cluster, Node, Upstream, default_workers_too
from tests.support import ROOT, http_get

pytestmark = [pytest.mark.asyncio(loop_scope="function"), default_workers_too]

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _twins(cluster: Cluster, node_bin: str) -> tuple[Upstream, Upstream]:
    js = cluster.script("js1", JS_SDK / "examples" / "rooms.js", program=node_bin)
    py = cluster.script("py1", ROOT / "node" / "examples" / "rooms_server.py")
    return js, py


async def _marks(node: Node, clients: list[Client]) -> list[tuple[str, str]]:
    """(mark, upstream) of each client, from the node's admin API, once every
    client is there and bound."""
    ports = [w.get_extra_info("sockname")[1] for _, w in clients]
    by_port: dict[int, tuple[str, str]] = {}

    async def read() -> bool:
        _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.admin}/connections")
        by_port.clear()
        for m in json.loads(body)["marks"]:
            if m["upstream"]:
                by_port[m["client_port"]] = (m["mark"], m["upstream"])
        return all(p in by_port for p in ports)

    deadline = asyncio.get_running_loop().time() + 10
    while not await read():
        assert asyncio.get_running_loop().time() < deadline, "clients not all bound"
        await asyncio.sleep(0.05)  # polling the admin API, with a deadline
    return [by_port[p] for p in ports]


async def _ask(client: Client, line: str) -> str:
    r, w = client
    w.write(line.encode() + b"\n")
    return (await r.readuntil(b"\n")).decode().rstrip("\n")


async def _connect_both(node: Node, n: int) -> tuple[list[Client], list[tuple[str, str]]]:
    """At least n clients, some on each upstream."""
    clients: list[Client] = []
    while True:
        clients.append(await asyncio.open_connection("127.0.0.1", node.port))
        if len(clients) < n:
            continue
        marks = await _marks(node, clients)
        if {u for _, u in marks} == {"js1", "py1"}:
            return clients, marks
        assert len(clients) < 20, f"20 clients, all on {marks[0][1]}"


async def test_both_sdks_see_the_node_and_push_across_it_alike(
    cluster: Cluster, node_bin: str, workers: str
) -> None:
    js, py = _twins(cluster, node_bin)
    node = await asyncio.to_thread(
        cluster.node, [f"js1={js.addr}", f"py1={py.addr}"], extra=["--push-upstreams", "js1,py1"]
    )
    async with asyncio.timeout(60):
        clients, marks = await _connect_both(node, 6)
        rooms = ["r1" if i % 3 else "r2" for i in range(len(clients))]
        for c, room in zip(clients, rooms, strict=True):
            assert await _ask(c, f"join {room}") == f"joined {room}"
        members = {
            room: sorted(m for (m, _), r in zip(marks, rooms, strict=True) if r == room)
            for room in set(rooms)
        }
        # Every client, whichever SDK serves it, sees its whole room.
        for c, room in zip(clients, rooms, strict=True):
            assert await _ask(c, "who") == "members " + " ".join(members[room])
        # say, from a client on each upstream: the room hears it, once.
        for sdk in ("js1", "py1"):
            i = next(
                i
                for i, ((_, u), r) in enumerate(zip(marks, rooms, strict=True))
                if u == sdk and r == "r1"
            )
            others = [j for j, r in enumerate(rooms) if r == "r1" and j != i]
            assert await _ask(clients[i], "say hello") == f"said {len(others)}"
            for j in others:
                line = (await clients[j][0].readuntil(b"\n")).decode()
                assert line == f"{marks[i][0]} says hello\n", (sdk, j)
        # push: accepted (and delivered), or gone, the same from both.
        ghost = marks[0][0].rsplit(".", 1)[0] + ".zzzzzz"
        for sdk in ("js1", "py1"):
            i = next(i for i, (_, u) in enumerate(marks) if u == sdk)
            j = next(j for j, (_, u) in enumerate(marks) if u != sdk)
            assert await _ask(clients[i], f"push {marks[j][0]} direct from {sdk}") == "accepted"
            assert await clients[j][0].readuntil(b"\n") == f"direct from {sdk}\n".encode()
            assert await _ask(clients[i], f"push {ghost} x") == "gone"
        # kick: close_mark / closeMark on a mark bound to the other upstream.
        for sdk in ("js1", "py1"):
            live = [k for k in range(len(clients)) if not clients[k][0].at_eof()]
            i = next(i for i in live if marks[i][1] == sdk)
            j = next(j for j in live if marks[j][1] != sdk)
            assert await _ask(clients[i], f"kick {marks[j][0]}") == "kicked"
            assert await clients[j][0].read() == b"", f"{sdk} closed the other's client"
        m = await asyncio.to_thread(node.metrics)
        assert m['pmlb_connections_closed_total{reason="other"}'] == 2, "kicked is not a node word"
        for _, w in clients:
            w.close()


async def test_both_sdks_report_a_push_the_node_does_not_permit(
    cluster: Cluster, node_bin: str, workers: str
) -> None:
    js, py = _twins(cluster, node_bin)
    node = await asyncio.to_thread(cluster.node, [f"js1={js.addr}", f"py1={py.addr}"])
    async with asyncio.timeout(60):
        clients, marks = await _connect_both(node, 2)
        for sdk in ("js1", "py1"):
            i = next(i for i, (_, u) in enumerate(marks) if u == sdk)
            j = next(j for j, (_, u) in enumerate(marks) if u != sdk)
            answer = await _ask(clients[i], f"push {marks[j][0]} not allowed")
            assert answer == "refused not_permitted", sdk
        m = await asyncio.to_thread(node.metrics)
        assert m["pmlb_refused_pushes_total"] == 2
        for _, w in clients:
            w.close()
