"""A node bound to 0.0.0.0 registers addresses others can dial.

Before: every shipped example listened on 0.0.0.0, and nodes registered
control 0.0.0.0:PORT and admin 0.0.0.0:PORT, so MarkClient, an upstream's push
to a mark on another node and `pmlb status` dialled their own host instead.
Now the wildcard is replaced by --advertise, or automatically by the local
address the node reaches etcd from: loopback here, since etcd is on loopback.
Every client in this test dials loopback only.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from pmlb.client import MarkClient
from pmlb.upstream import Conn, Handler, UpstreamServer
from tests.conftest import Cluster, Etcd
from tests.support import Proc, async_wait_until, free_port, scrape, tcp_open, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="function")
CONTROL_TOKEN = "advertise-ctl"


def _wildcard_node(cluster: Cluster, etcd: Etcd, node_id: str, service: str) -> dict[str, int]:
    ports = {"listen": free_port(), "admin": free_port(), "control": free_port()}
    args = ["node", "--node-id", node_id, "--service", service, "--framing", "line"]
    args += ["--etcd", etcd.url, "--etcd-prefix", etcd.prefix, "--lease-ttl", "3"]
    args += ["--check-interval", "0.3", "--check-rise", "1", "--drain-timeout", "1"]
    for what, port in ports.items():
        args += [f"--{what}", f"0.0.0.0:{port}"]
    # A control API beyond loopback needs a token (the test's MarkClient and
    # SDK read the same PMLB_CONTROL_TOKEN).
    proc = Proc(f"node-{node_id}", args, cluster.log_dir, env={"PMLB_CONTROL_TOKEN": CONTROL_TOKEN})
    cluster.procs.append(proc)
    wait_until(lambda: tcp_open("127.0.0.1", ports["listen"]) or not proc.alive(), 15, "listener")
    assert proc.alive(), proc.log()
    return ports


class Pusher(Handler):
    """On ``push MARK``, sends to that mark through the SDK's push()."""

    server: UpstreamServer

    async def on_message(self, conn: Conn, data: bytes) -> None:
        cmd, _, mark = data.decode().partition(" ")
        if cmd == "push":
            await self.server.push(mark, b"pushed across nodes")
            conn.send(b"done")


async def test_wildcard_binds_register_reachable_addresses(
    cluster: Cluster, etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PMLB_CONTROL_TOKEN", CONTROL_TOKEN)
    echo = cluster.echo("e1")
    pusher = Pusher()
    pusher.server = UpstreamServer(
        pusher, upstream_id="p1", etcd=[etcd.url], etcd_prefix=etcd.prefix
    )
    await pusher.server.start()
    try:
        etcd.put("/services/echo/upstreams/e1", echo.addr)
        etcd.put("/services/other/upstreams/p1", f"127.0.0.1:{pusher.server.port}")
        n1 = await asyncio.to_thread(_wildcard_node, cluster, etcd, "n1", "echo")
        n2 = await asyncio.to_thread(_wildcard_node, cluster, etcd, "n2", "other")
        for ports, uid in ((n1, "e1"), (n2, "p1")):
            await async_wait_until(
                lambda p=ports, u=uid: (
                    scrape(p["admin"]).get(f'pmlb_upstream_up{{upstream="{u}"}}') == 1
                ),
                15,
                f"link to {uid}",
            )
        registered = json.loads(etcd.get("/nodes/n1") or "{}")
        assert registered["control"] == f"127.0.0.1:{n1['control']}", registered
        assert registered["admin"] == f"127.0.0.1:{n1['admin']}", registered
        assert registered["listen"] == [f"127.0.0.1:{n1['listen']}"], registered

        async with asyncio.timeout(30):
            r1, w1 = await asyncio.open_connection("127.0.0.1", n1["listen"])
            w1.write(b"hi\n")
            mark = (await r1.readuntil(b"\n")).split()[0].decode()
            assert mark.startswith("n1.")

            async with MarkClient([etcd.url], etcd.prefix) as marks:
                await marks.send(mark, b"via the control API")
            assert await r1.readuntil(b"\n") == b"via the control API\n"

            r2, w2 = await asyncio.open_connection("127.0.0.1", n2["listen"])
            w2.write(f"push {mark}\n".encode())
            assert await r2.readuntil(b"\n") == b"done\n"
            assert await r1.readuntil(b"\n") == b"pushed across nodes\n", "SDK push to n1"
            w1.close()
            w2.close()

        status = json.loads(await asyncio.to_thread(etcd.pmlb, "status", "--json"))
        nodes = {n["id"]: n for n in status["nodes"]}
        assert nodes["n1"]["reachable"], nodes
        assert nodes["n2"]["reachable"], nodes
    finally:
        await pusher.server.stop(0)
