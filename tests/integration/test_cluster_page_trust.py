"""`pmlb status` and the cluster page (`pmlb dashboard`) read every node
registered in etcd and ask each one's admin address: both the values and the
addresses are whatever somebody wrote into etcd (security review, findings 1
and 6).

Hostile peers here are real listeners on loopback addresses of their own
(127.0.0.5, 127.0.0.6) that record what reaches them: a token catcher, a
redirector, NaN and +Inf metrics, a one-byte-a-second trickle, a body with no
end, garbage. Each must cost only its own row, bounded in time, and a token
must reach only a live node's registration."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pmlb.client import MarkClient
from pmlb.errors import PmlbError
from tests.conftest import Cluster, Etcd
from tests.support import Proc, free_port, run_pmlb, tcp_open, wait_until

TOKEN = "dash-t0ken-s3cret"
# pmlb.observability.scrape.SCRAPE_TIMEOUT is 3 s per node, and the nodes are
# asked at once: a page that takes over this long is held by a hostile node.
PAGE_BOUND = 8.0


class Hostile:
    """A listener on ``host`` that answers every request with ``answer``
    (called with the socket after the request head arrived) and records each
    request head it read."""

    def __init__(self, host: str, answer: Callable[[socket.socket], None]) -> None:
        self.heads: list[str] = []
        self.sock = socket.create_server((host, 0))
        self.addr = f"{host}:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                self.heads.append(head.decode("latin-1"))
                self.answer(conn)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _ok(body: bytes, status: str = "200 OK", extra: str = "") -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
            + body
        )

    return answer


def _trickle(stop: threading.Event) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        while not stop.is_set():  # one byte a second, for as long as the peer reads
            conn.sendall(b"#")
            stop.wait(1.0)

    return answer


def _endless(stop: threading.Event) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        line = b"pmlb_marks_open 1\n" * 4096
        while not stop.is_set():
            conn.sendall(line)

    return answer


@pytest.fixture
def hostiles() -> Iterator[Callable[[str, Callable[[socket.socket], None]], Hostile]]:
    made: list[Hostile] = []

    def make(host: str, answer: Callable[[socket.socket], None]) -> Hostile:
        h = Hostile(host, answer)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _lease(etcd: Etcd) -> str:
    """A live lease (60 s) in hex, as etcdctl takes it."""
    out = etcd.ctl("lease", "grant", "60")  # "lease 694d... granted with TTL(60s)"
    return out.split()[1]


def _register(etcd: Etcd, node_id: str, value: dict[str, object], leased: bool = True) -> None:
    key = etcd.prefix + f"/nodes/{node_id}"
    lease = ["--lease", _lease(etcd)] if leased else []
    etcd.ctl("put", *lease, key, json.dumps(value))


def _dashboard(cluster: Cluster, etcd: Etcd, dns: str) -> int:
    port = free_port()
    args = ["dashboard", "--etcd", etcd.url, "--etcd-prefix", etcd.prefix, "--dns-prefix", dns]
    dash = Proc(
        "dashboard",
        [*args, "--listen", f"127.0.0.1:{port}"],
        cluster.log_dir,
        env={"PMLB_ADMIN_TOKEN": TOKEN},
    )
    cluster.procs.append(dash)
    wait_until(lambda: tcp_open("127.0.0.1", port) or not dash.alive(), 20, "dashboard up")
    assert dash.alive(), dash.log()
    return port


def _get(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_token_goes_only_to_a_live_node_and_never_through_a_redirect(
    cluster: Cluster, etcd: Etcd, hostiles: Callable[..., Hostile]
) -> None:
    """Finding 1: the page sent its admin token to any admin address etcd
    named, and urllib followed a 302 with the token attached to wherever it
    pointed; that host's body came back to the caller."""
    catcher = hostiles("127.0.0.5", _ok(b'{"mark": "stolen"}'))
    beyond = hostiles("127.0.0.6", _ok(b'{"mark": "from the redirect target"}'))
    redirect = hostiles(
        "127.0.0.5", _ok(b"", "302 Found", f"Location: http://{beyond.addr}/steal\r\n")
    )
    # Written by hand: no lease, so not a node (every pmlb node registers under one).
    _register(etcd, "evil", {"admin": catcher.addr, "services": ["echo"]}, leased=False)
    # Leased, as a live node would be, but its admin endpoint redirects.
    _register(etcd, "moved", {"admin": redirect.addr, "services": ["echo"]})
    port = _dashboard(cluster, etcd, "/skydns-none")

    status, body = _get(port, "/api/mark?mark=evil.q4dz2mpxbwr7k.1", TOKEN)
    assert status == 404, body
    assert "no lease" in str(body["error"])
    status, body = _get(port, "/api/mark?mark=moved.q4dz2mpxbwr7k.1", TOKEN)
    assert status == 502, body
    assert "redirects are not followed" in str(body["error"])
    assert "from the redirect target" not in json.dumps(body)

    # The unleased address was never asked for a mark; the redirect target was
    # never reached at all. (The cluster report's /metrics scrape, open and
    # tokenless, may reach the hand-written address: that carries nothing.)
    assert not any("/api/mark" in h for h in catcher.heads), catcher.heads
    assert not beyond.heads, beyond.heads
    assert not any(TOKEN in h for h in catcher.heads), "no token for an unleased key"

    # MarkClient refuses the same unleased key rather than sending its control
    # token to the address it names.
    async def send() -> str:
        async with MarkClient([etcd.url], etcd.prefix, token="ctl-t0ken") as m:
            try:
                await m.send("evil.q4dz2mpxbwr7k.1", b"hello")
            except PmlbError as exc:
                return str(exc)
        return "sent"

    assert "no lease" in asyncio.run(asyncio.wait_for(send(), 30))
    assert not any(h for h in catcher.heads if "/metrics" not in h), catcher.heads


def test_one_hostile_node_costs_only_its_own_row(
    cluster: Cluster, etcd: Etcd, hostiles: Callable[..., Hostile]
) -> None:
    """Finding 6: a node whose /metrics said NaN or +Inf raised ValueError or
    OverflowError; `{"services": 5}` raised TypeError; a 3,000-deep JSON value
    under the DNS prefix escaped the depth guard; a node sending /metrics one
    byte a second held /api/cluster for over 12 s. Now each costs its own row,
    the page answers within a bound, and the real node's row is right."""
    stop = threading.Event()
    try:
        up = cluster.echo("u1")
        etcd.put("/services/echo/upstreams/u1", up.addr)
        real = cluster.node([], node_id="n1", etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1"])
        client = socket.create_connection(("127.0.0.1", real.port), timeout=5)
        nan = hostiles(
            "127.0.0.5",
            _ok(
                b"# TYPE pmlb_marks_open gauge\npmlb_marks_open NaN\n"
                b"# TYPE pmlb_connections_accepted counter\n"
                b"pmlb_connections_accepted_total +Inf\n"
                b'pmlb_upstream_marks{upstream="u1"} -Inf\n'
            ),
        )
        trickle = hostiles("127.0.0.5", _trickle(stop))
        endless = hostiles("127.0.0.5", _endless(stop))
        garbage = hostiles("127.0.0.5", _ok(os.urandom(4096)))
        badhttp = hostiles("127.0.0.5", lambda c: c.sendall(b"SSH-2.0-OpenSSH\r\n\r\n"))
        started = "2026-01-01T00:00:00"  # no zone: cannot be subtracted from an aware time
        for name, h in (
            ("nan", nan),
            ("trickle", trickle),
            ("endless", endless),
            ("garbage", garbage),
            ("badhttp", badhttp),
        ):
            _register(etcd, name, {"admin": h.addr, "services": ["echo"], "started_at": started})
        _register(etcd, "typed", {"services": 5, "listen": "127.0.0.1:1"})
        _register(etcd, "workers", {"workers": 3, "admin": 7})
        deep = "[" * 3000 + "]" * 3000
        dns = f"/skydns{etcd.prefix}"
        etcd.ctl("put", f"{dns}/test/lb/deep", deep)
        etcd.ctl("put", f"{dns}/test/lb/n1", json.dumps({"host": "127.0.0.1"}))
        port = _dashboard(cluster, etcd, dns)

        def check(report: dict[str, object]) -> None:
            nodes = {str(n["id"]): n for n in report["nodes"]}  # type: ignore[attr-defined]
            assert nodes["n1"]["reachable"] is True, nodes["n1"]
            assert nodes["n1"]["marks"] == 1, nodes["n1"]
            assert nodes["n1"]["leased"] is True
            assert nodes["nan"]["reachable"] is True
            assert nodes["nan"]["marks"] is None, "NaN is no count"
            assert nodes["nan"]["accepted_total"] is None, "+Inf is no count"
            for name in ("trickle", "endless", "garbage", "badhttp"):
                assert nodes[name]["reachable"] is False, nodes[name]
                assert nodes[name]["scrape_error"], nodes[name]
            for name in ("typed", "workers"):
                assert "must be" in str(nodes[name]["malformed"]), nodes[name]
            upstreams = report["services"]["echo"]["upstreams"]  # type: ignore[index]
            assert [u["marks"] for u in upstreams] == [1], "-Inf from one node adds nothing"

        # The dashboard, twice: a hostile node must not hold later requests either.
        for _ in range(2):
            t0 = time.monotonic()
            status, report = _get(port, "/api/cluster")
            took = time.monotonic() - t0
            assert status == 200, report
            assert took < PAGE_BOUND, f"/api/cluster took {took:.1f} s"
            check(report)
            dns_rows = {d["node"]: d for d in report["dns"]}  # type: ignore[attr-defined]
            assert dns_rows["deep"]["host"] == "?", "3,000 deep: refused, its row kept"
            assert dns_rows["n1"]["host"] == "127.0.0.1"

        # `pmlb status`, JSON and table, the same.
        t0 = time.monotonic()
        out = run_pmlb("status", "--json", "--etcd", etcd.url, "--etcd-prefix", etcd.prefix)
        assert time.monotonic() - t0 < PAGE_BOUND + 5, "one process start, then bounded"
        check(json.loads(out.stdout))
        table = run_pmlb("status", "--etcd", etcd.url, "--etcd-prefix", etcd.prefix).stdout
        assert "! node typed: listen must be a list of strings" in table, table
        assert "unreachable" in table
        client.close()
    finally:
        stop.set()


def test_a_hand_written_node_never_reaches_dns(
    cluster: Cluster, etcd: Etcd, tmp_path: Path
) -> None:
    """Finding 5: a fake node entry went into dns-sync's hosts file, so
    clients were sent to whatever address it named. Only live registrations
    (keys under a lease) are published; the real node still is."""
    up = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", up.addr)
    _register(etcd, "fake", {"listen": ["127.0.0.66:1883"], "services": ["echo"]}, leased=False)
    cluster.node([], node_id="n1", etcd=etcd.url, prefix=etcd.prefix, wait_links=["u1"])
    hosts = tmp_path / "hosts"
    sync = Proc(
        "dns-sync",
        [
            "dns-sync",
            "--etcd",
            etcd.url,
            "--etcd-prefix",
            etcd.prefix,
            "--hosts-file",
            str(hosts),
            "--name",
            "lb.test",
        ],
        cluster.log_dir,
    )
    cluster.procs.append(sync)
    wait_until(lambda: hosts.exists() and "127.0.0.1 lb.test" in hosts.read_text(), 20, "hosts")
    assert "127.0.0.66" not in hosts.read_text()
    assert "no lease" in sync.log()
