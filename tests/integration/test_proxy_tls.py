"""PROXY before TLS, as HAProxy (send-proxy-v2) and AWS NLB send it: a real
HAProxy in TCP mode passes the client's TLS through to a TLS node and puts its
PROXY v2 header in front. Before, the node read the header only after the TLS
handshake, so this could not work at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.certs import make_chain
from tests.conftest import Cluster
from tests.support import free_port, http_get, needs, tcp_open, wait_until

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)

# A developer machine without HAProxy skips with this reason; under .ci/run a
# missing HAProxy fails the run (tests/support.needs).
pytestmark = needs(
    None if HAPROXY else "haproxy is not installed: apt-get install haproxy (.ci/run does)"
)


@pytest.mark.asyncio(loop_scope="function")
async def test_haproxy_send_proxy_v2_in_front_of_a_tls_node(
    tmp_path: Path, cluster: Cluster
) -> None:
    assert HAPROXY is not None, "haproxy is required in CI"
    chain = make_chain(tmp_path / "pki")
    up = cluster.echo("u1")
    node = await asyncio.to_thread(
        cluster.node,
        [f"u1={up.addr}"],
        extra=[
            "--tls-cert",
            str(chain.server_cert),
            "--tls-key",
            str(chain.server_key),
            "--proxy-trusted",
            "127.0.0.1/32",
        ],
    )
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 100\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend f\n  bind 127.0.0.1:{front}\n  default_backend b\n"
        f"backend b\n  server node 127.0.0.1:{node.port} send-proxy-v2\n"
    )
    log = (tmp_path / "haproxy.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        HAPROXY, "-db", "-f", str(cfg), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        await asyncio.to_thread(wait_until, lambda: tcp_open("127.0.0.1", front), 10, "haproxy")
        ctx = ssl.create_default_context(cafile=str(chain.ca))
        async with asyncio.timeout(20):
            r, w = await asyncio.open_connection(
                "127.0.0.1", front, ssl=ctx, server_hostname="127.0.0.1"
            )
            client_port = w.get_extra_info("sockname")[1]
            w.write(b"through haproxy\n")
            assert (await r.readuntil(b"\n")).endswith(b" u1 through haproxy\n")
            _, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{node.admin}/connections"
            )
            ports = [m["client_port"] for m in json.loads(body)["marks"]]
            assert client_port in ports, "the node sees the client's own address from PROXY"
            w.close()

            # A trusted peer that sends TLS without the PROXY header is refused.
            errors_before = (await asyncio.to_thread(node.metrics))[
                "pmlb_proxy_header_errors_total"
            ]
            bad_r, bad_w = await asyncio.open_connection("127.0.0.1", node.port)
            bad_w.write(b"\x16\x03\x01\x00\x05hello")
            with contextlib.suppress(ConnectionResetError):  # aborted: EOF or a reset
                assert await bad_r.read() == b""
        m = await asyncio.to_thread(node.metrics)
        # (The suite's readiness probe, a bare connect, counted one before.)
        assert m["pmlb_proxy_header_errors_total"] - errors_before == 1, "the one bad client"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        log.close()
