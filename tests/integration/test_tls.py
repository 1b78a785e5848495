"""TLS: clients to the node (reloaded on SIGHUP without dropping anyone) and
mutual TLS between the node and its upstreams, with a real chain made here."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
from pathlib import Path

import pytest

from tests.certs import issue, make_chain
from tests.conftest import Cluster
from tests.support import Proc, free_port, tcp_open, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _client_ctx(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = True
    return ctx


def _peer_cn(w: asyncio.StreamWriter) -> str:
    cert = w.get_extra_info("peercert")
    return dict(x[0] for x in cert["subject"])["commonName"]


async def test_client_tls_and_reload_on_sighup(tmp_path: Path, cluster: Cluster) -> None:
    chain = make_chain(tmp_path / "pki")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(chain.server_cert, live_cert)
    shutil.copy(chain.server_key, live_key)
    up = cluster.echo("u1")
    node = await asyncio.to_thread(
        cluster.node,
        [f"u1={up.addr}"],
        extra=["--tls-cert", str(live_cert), "--tls-key", str(live_key)],
    )
    ctx = _client_ctx(chain.ca)
    async with asyncio.timeout(30):
        r1, w1 = await asyncio.open_connection(
            "127.0.0.1", node.port, ssl=ctx, server_hostname="127.0.0.1"
        )
        assert _peer_cn(w1) == "pmlb server"
        w1.write(b"secret hello\n")
        assert (await r1.readuntil(b"\n")).endswith(b" u1 secret hello\n")

        # A plain-text client gets nothing through.
        pr, pw = await asyncio.open_connection("127.0.0.1", node.port)
        pw.write(b"hello in clear\n")
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
            await pr.readuntil(b"\n")

        renewed_cert, renewed_key = await asyncio.to_thread(issue, chain, "renewed server")
        shutil.copy(renewed_cert, live_cert)
        shutil.copy(renewed_key, live_key)
        node.proc.signal(signal.SIGHUP)

        async def new_cn() -> str:
            _r, w = await asyncio.open_connection(
                "127.0.0.1", node.port, ssl=ctx, server_hostname="127.0.0.1"
            )
            cn = _peer_cn(w)
            w.close()
            return cn

        for _ in range(100):
            if await new_cn() == "renewed server":
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("new connections never saw the renewed certificate")
        w1.write(b"still here\n")
        assert (await r1.readuntil(b"\n")).endswith(b" u1 still here\n"), "kept across reload"
        w1.close()
    assert "TLS certificate reloaded" in node.proc.log()
    assert "BEGIN" not in node.proc.log(), "no key material in logs"


async def test_mutual_tls_to_upstreams(tmp_path: Path, cluster: Cluster) -> None:
    chain = make_chain(tmp_path / "pki")
    rogue = make_chain(tmp_path / "rogue")  # another CA: its certificates must be refused
    port = free_port()
    echo = Proc(
        "echo-tls",
        [
            "echo-upstream",
            "--listen",
            f"127.0.0.1:{port}",
            "--id",
            "u1",
            "--tls-cert",
            str(chain.server_cert),
            "--tls-key",
            str(chain.server_key),
            "--tls-client-ca",
            str(chain.ca),
        ],
        tmp_path,
    )
    cluster.procs.append(echo)
    await asyncio.to_thread(wait_until, lambda: tcp_open("127.0.0.1", port), 15, "echo up")

    good = await asyncio.to_thread(
        cluster.node,
        [f"u1=127.0.0.1:{port}"],
        node_id="n1",
        extra=[
            "--upstream-ca",
            str(chain.ca),
            "--upstream-cert",
            str(chain.client_cert),
            "--upstream-key",
            str(chain.client_key),
        ],
    )
    async with asyncio.timeout(20):
        r, w = await asyncio.open_connection("127.0.0.1", good.port)
        w.write(b"over mtls\n")
        assert (await r.readuntil(b"\n")).endswith(b" u1 over mtls\n")
        w.close()

    bad = await asyncio.to_thread(
        cluster.node,
        [f"u1=127.0.0.1:{port}"],
        node_id="n2",
        wait_links=[],
        extra=[
            "--upstream-ca",
            str(chain.ca),
            "--upstream-cert",
            str(rogue.client_cert),
            "--upstream-key",
            str(rogue.client_key),
            "--connect-timeout",
            "1",
        ],
    )
    async with asyncio.timeout(20):
        r, w = await asyncio.open_connection("127.0.0.1", bad.port)
        w.write(b"let me in\n")
        assert await r.read() == b"", "no link with a foreign certificate: nothing routed"
    m = await asyncio.to_thread(bad.metrics)
    assert m['pmlb_upstream_up{upstream="u1"}'] == 0
    assert m['pmlb_connections_closed_total{reason="no_upstream"}'] >= 1
    plain = await asyncio.to_thread(
        cluster.node, [f"u1=127.0.0.1:{port}"], node_id="n3", wait_links=[]
    )
    await asyncio.sleep(1.0)  # give a plain-text link every chance to (wrongly) come up
    assert (await asyncio.to_thread(plain.metrics))['pmlb_upstream_up{upstream="u1"}'] == 0


async def test_client_certificates_are_required_with_tls_client_ca(
    tmp_path: Path, cluster: Cluster
) -> None:
    """--tls-client-ca: a client with a certificate from that CA is served; one
    with no certificate, or one from another CA, gets no byte through, and
    the node serves on."""
    chain = make_chain(tmp_path / "pki")
    other = make_chain(tmp_path / "other")
    up = cluster.echo("u1")
    node = await asyncio.to_thread(
        cluster.node,
        [f"u1={up.addr}"],
        extra=[
            "--tls-cert", str(chain.server_cert),
            "--tls-key", str(chain.server_key),
            "--tls-client-ca", str(chain.ca),
        ],
    )  # fmt: skip

    def ctx(cert: Path | None, key: Path | None) -> ssl.SSLContext:
        c = _client_ctx(chain.ca)
        if cert is not None and key is not None:
            c.load_cert_chain(cert, key)
        return c

    async def ask(context: ssl.SSLContext) -> bytes:
        r, w = await asyncio.open_connection(
            "127.0.0.1", node.port, ssl=context, server_hostname="127.0.0.1"
        )
        try:
            w.write(b"hi\n")
            return await r.readuntil(b"\n")
        finally:
            w.close()

    async with asyncio.timeout(30):
        assert (await ask(ctx(chain.client_cert, chain.client_key))).endswith(b" u1 hi\n")
        for cert, key in ((None, None), (other.client_cert, other.client_key)):
            with pytest.raises((ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError)):
                await ask(ctx(cert, key))
        assert (await ask(ctx(chain.client_cert, chain.client_key))).endswith(b" u1 hi\n")
