"""Secure by default: the admin API's sensitive endpoints, the Bridge and
marks bound to other upstreams are closed to whoever merely reaches them.

Before: POST /drain and /connections answered anyone (any Host, no token), an
upstream's Bridge accepted any caller, and any upstream could push to, close
or change the metadata of any mark on the node."""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path

import pytest

from pmlb.client import MarkClient
from pmlb.errors import PmlbError, PushRefused
from pmlb.upstream import Conn, Handler, UpstreamServer
from tests.certs import make_chain
from tests.conftest import Cluster, Etcd
from tests.support import async_wait_until, http_get

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _request(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


async def test_admin_token_and_host_check(cluster: Cluster) -> None:
    up = cluster.echo("u1")
    node = await asyncio.to_thread(
        cluster.node, [f"u1={up.addr}"], env={"PMLB_ADMIN_TOKEN": "adm1n-s3cret"}
    )
    req = lambda *a: asyncio.to_thread(_request, node.admin, *a)  # noqa: E731
    ok = {"Authorization": "Bearer adm1n-s3cret"}
    assert (await req("GET", "/connections", {}))[0] == 401, "no token, no client list"
    assert (await req("GET", "/connections", {"Authorization": "Bearer nope"}))[0] == 401
    status, body = await req("GET", "/connections", ok)
    assert status == 200
    assert "marks" in json.loads(body)
    # DNS rebinding: the right token cannot help a request for someone else's name.
    assert (await req("GET", "/connections", {**ok, "Host": "evil.example:80"}))[0] == 421
    assert (await req("POST", "/drain", {"Host": "evil.example"}))[0] == 421
    assert (await req("POST", "/drain", {}))[0] == 401, "a cross-site form cannot drain"
    # The dashboard's mark views and actions are behind the same token; its
    # page and the node/upstream summary are not (no client data in them).
    assert (await req("GET", "/api/mark?mark=x", {}))[0] == 401
    assert (await req("POST", "/api/mark/close?mark=x", {}))[0] == 401
    assert (await req("POST", "/api/mark/close?mark=x", {"Host": "evil.example"}))[0] == 421
    assert (await req("GET", "/api/mark?mark=x", ok))[0] == 404, "no such mark, but allowed"
    status, body = await req("GET", "/api/status", {})
    assert status == 200
    assert "client" not in body
    assert (await req("GET", "/dashboard", {}))[0] == 200
    # Probes and scrapers need nothing.
    assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.admin}/healthz"))[0] == 200
    assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.admin}/metrics"))[0] == 200
    assert "adm1n-s3cret" not in node.proc.log(), "the token is never logged"


@pytest.mark.parametrize("token", [None, "adm1n-s3cret"], ids=["no-token", "token"])
async def test_cross_site_requests_change_nothing(cluster: Cluster, token: str | None) -> None:
    """Security review, finding 2: with no admin token (the default on
    loopback) a cross-site POST drained the node and closed clients. A request
    that changes state is refused when its Origin or Sec-Fetch-Site names
    another site, token or no token; the page's own requests pass."""
    up = cluster.echo("u1")
    env = {"PMLB_ADMIN_TOKEN": token} if token else None
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"], env=env)
    req = lambda *a: asyncio.to_thread(_request, node.admin, *a)  # noqa: E731
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    evil = [
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain is another origin
        {"Origin": "null"},  # a sandboxed frame or a file: page
    ]
    for headers in evil:
        for path in ("/drain", "/api/mark/close?mark=x"):
            status, body = await req("POST", path, {**auth, **headers})
            assert status == 403, (path, headers, status, body)
            assert "cross-site" in body
    status, _ = await req("GET", "/readyz", {})
    assert status == 200, "not drained"
    # The page's own request: same origin (what a browser sends from /dashboard).
    own = {"Origin": f"http://127.0.0.1:{node.admin}", "Sec-Fetch-Site": "same-origin"}
    assert (await req("POST", "/api/mark/close?mark=x", {**auth, **own}))[0] == 404
    # A script or curl sends neither header: allowed as before.
    assert (await req("POST", "/api/mark/close?mark=x", auth))[0] == 404


async def test_browser_routes_check_the_host_and_send_protective_headers(
    cluster: Cluster,
) -> None:
    """Security review, finding 11: /api/status answered any Host (DNS
    rebinding could read the node's addresses and upstreams), and no response
    carried Content-Security-Policy, X-Content-Type-Options or frame
    ancestors. Probes and scrapers (healthz, readyz, metrics) keep answering
    any name they are given."""
    up = cluster.echo("u1")
    node = await asyncio.to_thread(cluster.node, [f"u1={up.addr}"])
    rebind = {"Host": "rebind.evil.example"}
    for path in ("/api/status", "/dashboard", "/"):
        status, _ = await asyncio.to_thread(_request, node.admin, "GET", path, rebind)
        assert status == 421, path
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _ = await asyncio.to_thread(_request, node.admin, "GET", path, rebind)
        assert status == 200, path

    def headers(path: str) -> dict[str, str]:
        c = http.client.HTTPConnection("127.0.0.1", node.admin, timeout=5)
        try:
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            return {k.lower(): v for k, v in r.getheaders()}
        finally:
            c.close()

    for path in ("/dashboard", "/api/status", "/metrics"):
        h = await asyncio.to_thread(headers, path)
        assert h.get("x-content-type-options") == "nosniff", path
        assert "frame-ancestors 'none'" in h.get("content-security-policy", ""), path
        assert h.get("x-frame-options") == "DENY", path


class Echo(Handler):
    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.send(data)


async def test_upstreams_refuse_nodes_without_the_token(cluster: Cluster) -> None:
    server = UpstreamServer(Echo(), upstream_id="t", token="up-s3cret")
    await server.start()
    try:
        node = await asyncio.to_thread(cluster.node, [f"t=127.0.0.1:{server.port}"], wait_links=[])
        await async_wait_until(lambda: server.stats["unauthenticated"] >= 1, 10, "refused")
        assert node.metrics().get('pmlb_upstream_up{upstream="t"}') == 0
        good = await asyncio.to_thread(
            cluster.node,
            [f"t=127.0.0.1:{server.port}"],
            node_id="n2",
            env={"PMLB_UPSTREAM_TOKEN": "up-s3cret"},
        )
        async with asyncio.timeout(10):
            r, w = await asyncio.open_connection("127.0.0.1", good.port)
            w.write(b"with the token\n")
            assert await r.readuntil(b"\n") == b"with the token\n"
            w.close()
    finally:
        await server.stop(0)


class Meddler(Handler):
    """On ``meddle MARK``, tries to push to, re-label and close another mark."""

    server: UpstreamServer

    def __init__(self) -> None:
        self.refusals: list[str] = []

    async def on_message(self, conn: Conn, data: bytes) -> None:
        cmd, _, mark = data.decode().partition(" ")
        if cmd == "meddle":
            try:
                await self.server.push(mark, b"hijacked")
            except PushRefused as exc:  # the node says no, and the SDK says so
                self.refusals.append(exc.reason)
            session = self.server._session_for(mark)
            assert session is not None
            f = session.writer.frame()
            f.mark = mark
            f.meta.set["user"] = "mallory"
            session.writer.kick()
            await self.server.close_mark(mark)
        conn.send(data)


async def test_an_upstream_acts_only_on_its_own_marks(cluster: Cluster) -> None:
    victim_up = cluster.echo("v")
    meddler = Meddler()
    meddler.server = UpstreamServer(meddler, upstream_id="m")
    await meddler.server.start()
    try:
        node = await asyncio.to_thread(
            cluster.node,
            [f"v={victim_up.addr}", f"m=127.0.0.1:{meddler.server.port}"],
        )
        async with asyncio.timeout(20):
            conns = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(2)]
            replies = []
            for r, w in conns:
                w.write(b"who\n")
                replies.append(await r.readuntil(b"\n"))
            # Round-robin: one client on v (reply "<mark> v who"), one on m ("who").
            on_v = next(i for i, line in enumerate(replies) if b" v who" in line)
            on_m = 1 - on_v
            assert replies[on_m] == b"who\n", replies
            victim_mark = replies[on_v].split()[0].decode()
            conns[on_m][1].write(f"meddle {victim_mark}\n".encode())
            assert await conns[on_m][0].readuntil(b"\n") == f"meddle {victim_mark}\n".encode()
            conns[on_v][1].write(b"still mine\n")
            assert (await conns[on_v][0].readuntil(b"\n")).endswith(b" v still mine\n"), (
                "no hijacked push arrived first, and the mark is still open"
            )
            _, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{node.admin}/connections"
            )
            meta = {m["mark"]: m["metadata"] for m in json.loads(body)["marks"]}
            assert meta[victim_mark] == {}, "the metadata was not changed"
            for _, w in conns:
                w.close()
        m = await asyncio.to_thread(node.metrics)
        assert m["pmlb_refused_pushes_total"] == 3
        assert meddler.refusals == ["not_permitted"], "the upstream was told its push was refused"
    finally:
        await meddler.server.stop(0)


async def test_control_api_over_mutual_tls(cluster: Cluster, etcd: Etcd, tmp_path: Path) -> None:
    """The control API's token travelled in clear; now it can be served over TLS,
    and with a client CA only callers with a certificate signed by it get in."""
    chain = await asyncio.to_thread(make_chain, tmp_path / "pki")
    up = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", up.addr)
    node = await asyncio.to_thread(
        cluster.node,
        [],
        etcd=etcd.url,
        prefix=etcd.prefix,
        wait_links=["u1"],
        extra=[
            "--control",
            "127.0.0.1:0",
            "--control-cert",
            str(chain.server_cert),
            "--control-key",
            str(chain.server_key),
            "--control-client-ca",
            str(chain.ca),
        ],
        env={"PMLB_CONTROL_TOKEN": "ctl-s3cret"},
    )
    async with asyncio.timeout(30):
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"hi\n")
        mark = (await r.readuntil(b"\n")).split()[0].decode()
        async with MarkClient(
            [etcd.url],
            etcd.prefix,
            token="ctl-s3cret",
            control_ca=str(chain.ca),
            control_cert=str(chain.client_cert),
            control_key=str(chain.client_key),
        ) as marks:
            await marks.send(mark, b"over mutual TLS")
        assert await r.readuntil(b"\n") == b"over mutual TLS\n"
        for kwargs in ({}, {"control_ca": str(chain.ca)}):  # in clear; TLS without a cert
            async with MarkClient([etcd.url], etcd.prefix, token="ctl-s3cret", **kwargs) as m:
                with pytest.raises(PmlbError):
                    await m.send(mark, b"must not arrive")
        w.write(b"after\n")
        assert (await r.readuntil(b"\n")).endswith(b" u1 after\n"), "nothing else arrived"
        w.close()
