"""The fault suite (`make test-faults`, also part of `make test`): faults a
production node meets, each reporting its figures (see the table printed at the
end of the run)."""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import struct
import time

import pytest

from tests.conftest import SUITE_TRANSPORTS, Cluster, Etcd, both_transports, default_workers_too
from tests.faults.clients import stream as _stream
from tests.faults.report import record
from tests.support import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="function"), pytest.mark.faults]


class Relay:
    """A TCP relay between node and upstream that can silently stop forwarding
    (a cut cable: no FIN, no RST), one direction or both."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.forward_up = True  # node -> upstream
        self.forward_down = True  # upstream -> node
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if self.forward_up if up else self.forward_down:
                        dst.write(data)
                        await dst.drain()
                    # else: swallowed, like packets into a dead link

        await asyncio.gather(pipe(r, uw, True), pipe(ur, w, False), return_exceptions=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@default_workers_too
# Every suite transport: nghttp2 links (the default) have a byte-level progress
# clock, grpc.aio links notice a hung peer by whole messages only, so the cut
# must be caught both ways.
@pytest.mark.parametrize("link_transport", SUITE_TRANSPORTS, indirect=True)
@pytest.mark.parametrize("direction", ["both", "node_to_upstream", "upstream_to_node"])
async def test_link_cut_without_fin(cluster: Cluster, direction: str, link_transport: str) -> None:
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    relay = Relay(("127.0.0.1", u1.port))
    await relay.start()
    node = await asyncio.to_thread(
        cluster.node,
        [f"u1=127.0.0.1:{relay.port}", f"u2={u2.addr}"],
        extra=["--ack-timeout", "1.5"],
    )
    stats = {"sent": 0, "received": 0, "lost": 0, "duplicated": 0}
    gaps: list[float] = []
    started = asyncio.Event()
    clients = 100
    seen: list[list[str]] = [[] for _ in range(clients)]  # mark, then each reply's upstream
    async with asyncio.timeout(60):
        tasks = [
            asyncio.create_task(_stream(node.port, i, 100, started, stats, gaps, seen[i]))
            for i in range(clients)
        ]
        await started.wait()
        await asyncio.sleep(0.3)
        if direction in ("both", "node_to_upstream"):
            relay.forward_up = False
        if direction in ("both", "upstream_to_node"):
            relay.forward_down = False
        await asyncio.gather(*tasks)
    await relay.stop()
    m = await asyncio.to_thread(node.metrics)
    record(
        f"link cut without FIN ({direction})",  # record() adds the transport
        connections=clients,
        held=clients,
        sent=stats["sent"],
        lost=stats["lost"],
        duplicated=stats["duplicated"],
        recovery_s=round(max(gaps), 2),
        failovers=int(m["pmlb_failovers_total"]),
    )
    assert stats["lost"] == 0
    assert stats["duplicated"] == 0
    assert stats["received"] == clients * 100
    # Exactly the marks that were on the cut link moved, each once, to u2.
    on_u1 = [s for s in seen if s[1] == "u1"]
    assert on_u1, "some clients were on the cut link"
    assert all(s[-1] == "u2" for s in on_u1), "every one of them moved to u2"
    assert all(s[1:] == ["u2"] * (len(s) - 1) for s in seen if s[1] == "u2")
    assert m["pmlb_failovers_total"] == len(on_u1)


@both_transports
@default_workers_too
async def test_ten_thousand_connections_open_and_drop_at_once(cluster: Cluster) -> None:
    up = cluster.echo("u1", plain=True)
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"], framing="raw")
    rss0 = node.proc.tree_rss_bytes()  # every worker's too
    canary = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    canary.sendall(b"x")
    echoes = [canary.recv(10)]
    assert echoes[0] == b"x"
    n = 10_000
    t0 = time.monotonic()
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", node.port))
        socks.append(s)
    await asyncio.to_thread(
        wait_until, lambda: node.metrics()["pmlb_marks_open"] >= n + 1, 60, "all accepted"
    )
    opened = time.monotonic() - t0
    peak = node.proc.tree_rss_bytes()
    for s in socks:  # drop them all at once, with a RST
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    t1 = time.monotonic()
    await asyncio.to_thread(
        wait_until, lambda: node.metrics()["pmlb_marks_open"] == 1, 60, "all gone"
    )
    dropped = time.monotonic() - t1
    still_open = int(node.metrics()["pmlb_marks_open"])  # the bystander's, if it held
    canary.sendall(b"y")
    echoes.append(canary.recv(10))
    assert echoes[1] == b"y", "the bystander never noticed"
    canary.close()
    got = b"".join(echoes)
    record(
        "10,000 connections opened and dropped at once",
        connections=n,
        held=still_open,
        sent=len(echoes),  # one probe sent per echo awaited
        lost=sum(c not in got for c in b"xy"),
        duplicated=len(got) - len(set(got)),
        recovery_s=round(dropped, 2),
        note=f"open {opened:.1f}s, RSS +{(peak - rss0) / n:.0f} B/conn at peak",
    )
    assert node.proc.alive()


@pytest.mark.parametrize("workers", ["w1", "wdefault"], indirect=True)
async def test_at_max_connections_accept_pauses_and_resumes(cluster: Cluster, workers: str) -> None:
    """At the limit the node stops accepting (clients wait in the backlog) and serves
    everyone it has; as marks close, the waiting clients are taken. The limit is
    the whole node's, however many workers share it (which clients wait is the
    kernel's choice when it spreads them over the workers)."""
    up = cluster.echo("u1", plain=True)
    node = await asyncio.to_thread(
        cluster.node, [f"u1={up.addr}"], framing="raw", extra=["--max-connections", "100"]
    )
    clients = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in range(150)]
    for s in clients:
        s.sendall(b"a")
    sent = len(clients)
    await asyncio.to_thread(
        wait_until, lambda: node.metrics()["pmlb_marks_open"] == 100, 10, "the node full"
    )
    held_at_once = int(node.metrics()["pmlb_marks_open"])

    def answered_within(socks: list[socket.socket], seconds: float) -> list[socket.socket]:
        """The sockets that got their byte back within ``seconds`` (read)."""
        got: list[socket.socket] = []
        pending = list(socks)
        deadline = time.monotonic() + seconds
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))
            for s in ready:
                assert s.recv(4) == b"a", "an echo, not a refusal"
                got.append(s)
                pending.remove(s)
        return got

    admitted = await asyncio.to_thread(answered_within, clients, 3.0)
    parked = [s for s in clients if s not in admitted]
    assert len(admitted) == 100, "exactly the limit is served"
    assert node.metrics()["pmlb_marks_open"] == 100, "never more than the limit"
    for s in admitted[:5]:
        s.sendall(b"b")
        sent += 1
        assert s.recv(4) == b"b", "admitted clients are served as usual"
    t0 = time.monotonic()
    for s in admitted[50:]:  # 50 leave: the 50 waiting get in
        s.close()
    late = await asyncio.to_thread(answered_within, parked, 10.0)
    took = time.monotonic() - t0
    answered = len(admitted) + 5 + len(late)
    m = node.metrics()
    workers_n = int(m.get("pmlb_workers", 1))
    refused = int(m.get('pmlb_connections_refused_total{limit="node_full"}', 0))
    record(
        f"at --max-connections (100), 50 more wait [{workers}]",
        connections=len(clients),
        held=held_at_once,
        sent=sent,
        lost=sent - answered,
        recovery_s=round(took, 2),
        note=f"accept paused, backlog kept; {workers_n} worker(s); refused {refused}",
    )
    assert len(late) == len(parked), "a waiting client is served once a slot frees"
    assert refused == 0, "nobody was refused: the others waited"
    assert "accepting paused" in node.proc.log()
    for s in admitted[:50] + parked:
        s.close()


@pytest.mark.slow
@default_workers_too
async def test_etcd_stopped_then_replaced_under_load(etcd: Etcd, cluster: Cluster) -> None:
    """etcd SIGSTOPped for 30 s, then killed and replaced by an empty one, while 100
    clients stream: nothing lost, nobody disconnected, new clients still routed."""
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    etcd.put("/services/echo/upstreams/u2", u2.addr)
    node = await asyncio.to_thread(
        cluster.node, [], etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1", "u2"]
    )
    stats = {"sent": 0, "received": 0, "lost": 0, "duplicated": 0}
    gaps: list[float] = []
    started = asyncio.Event()
    clients = 100
    new_ok = 0
    async with asyncio.timeout(120):
        tasks = [
            asyncio.create_task(_stream(node.port, i, 1700, started, stats, gaps))
            for i in range(clients)
        ]  # ~40 s of traffic each
        await started.wait()
        assert etcd.server.proc is not None
        etcd.server.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(30):
                await asyncio.sleep(1)
                r, w = await asyncio.open_connection("127.0.0.1", node.port)
                w.write(b"new\n")
                new_ok += (await r.readuntil(b"\n")).endswith(b" new\n")
                w.close()
        finally:
            etcd.server.proc.send_signal(signal.SIGCONT)
        etcd.server.kill()
        await asyncio.to_thread(etcd.server.start, 15.0, True)
        await asyncio.to_thread(wait_until, lambda: etcd.keys("/nodes/"), 20, "re-registered")
        await asyncio.gather(*tasks)
    record(
        "etcd SIGSTOP 30 s, then killed and replaced, under load",
        connections=clients,
        held=clients,
        sent=stats["sent"],
        lost=stats["lost"],
        duplicated=stats["duplicated"],
        recovery_s=round(max(gaps), 2),
        note=f"{new_ok}/30 new clients routed while etcd was frozen",
    )
    assert stats["lost"] == 0
    assert stats["duplicated"] == 0
    assert stats["received"] == clients * 1700
    assert new_ok == 30


@default_workers_too
async def test_at_the_file_descriptor_limit(cluster: Cluster) -> None:
    """Out of fds, the node pauses accepting (no spin, no crash), keeps serving the
    connections it has, and takes new ones again once fds free up."""
    up = cluster.echo("u1", plain=True)
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"], framing="raw", nofile=120)
    socks = []
    for _ in range(200):  # more than the node can hold
        s = socket.socket()
        s.settimeout(5)
        s.connect(("127.0.0.1", node.port))
        socks.append(s)
    # Out of fds even the admin endpoint cannot accept: watch the log instead.
    await asyncio.to_thread(
        wait_until, lambda: "Too many open files" in node.proc.log(), 15, "the node to hit EMFILE"
    )
    first = socks[0]
    first.sendall(b"a")
    echoes = [first.recv(4)]
    assert echoes[0] == b"a", "connections already accepted are served"
    for s in socks[1:151]:  # free plenty: the backlog holds ~100 waiting clients
        s.close()
    last = socks[-1]
    last.sendall(b"z")
    last.settimeout(15)
    echoes.append(last.recv(4))
    assert echoes[1] == b"z", "a waiting client gets in once fds free up"
    assert node.proc.alive()
    # A node of several workers sums what its workers answer; the one that ran
    # out of fds answers its supervisor again once it has some (seen missing
    # once, right after the fds were freed): polled, with a deadline.
    await asyncio.to_thread(
        wait_until,
        lambda: node.metrics().get("pmlb_accept_resource_errors_total", 0) >= 1,
        15,
        "the accept errors counted",
    )
    m = node.metrics()
    record(
        "at the file-descriptor limit (nofile 120), 200 clients",
        connections=len(socks),  # each connected (the backlog took those not accepted)
        held=int(m["pmlb_marks_open"]),
        sent=len(echoes),  # one probe sent per echo awaited
        lost=sum(e == b"" for e in echoes),
        duplicated=sum(max(0, len(e) - 1) for e in echoes),
        note="accept paused on EMFILE, resumed when fds freed",
    )
    for s in socks:
        s.close()
