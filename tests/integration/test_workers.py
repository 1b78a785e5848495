"""`pmlb node --workers 2`: two node processes on one port, one supervisor.

What a user relies on: clients are spread over both workers and answered, each
worker is a node of its own in etcd (marks name it, MarkClient reaches it), the
host is published in DNS once, a crashed worker is restarted and the other
worker's clients never notice, SIGHUP reaches every worker, and SIGTERM drains
them all and leaves etcd.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

import pytest

from pmlb.client import MarkClient
from tests.conftest import Cluster, Etcd
from tests.support import (
    Proc,
    async_wait_until,
    children,
    cmdline,
    free_port,
    scrape,
)

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _port_pair() -> int:
    """A free port whose successor is free too (worker 1 takes port + 1).

    Free means bindable: a port nobody listens on can still be taken as the
    source port of some connection (CI once gave worker 1 such a port, and it
    could not bind for the whole test)."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def _worker_pid(supervisor: int, node_id: str) -> int | None:
    for pid in children(supervisor):
        if node_id in cmdline(pid):
            return pid
    return None


async def _line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes) -> bytes:
    writer.write(text + b"\n")
    return await reader.readuntil(b"\n")


async def test_two_workers_share_a_port_and_survive_each_other(
    cluster: Cluster, etcd: Etcd
) -> None:
    echo = cluster.echo("e1")
    etcd.put("/services/echo/upstreams/e1", echo.addr)
    listen, admin, control = free_port(), _port_pair(), _port_pair()
    dns = f"/skydns{etcd.prefix}"
    args = ["node", "--workers", "2", "--node-id", "h1", "--service", "echo"]
    args += ["--framing", "line", "--listen", f"127.0.0.1:{listen}"]
    args += ["--admin", f"127.0.0.1:{admin}", "--control", f"127.0.0.1:{control}"]
    args += ["--etcd", etcd.url, "--etcd-prefix", etcd.prefix, "--lease-ttl", "3"]
    args += ["--dns-name", "lb.test", "--dns-prefix", dns, "--drain-timeout", "1"]
    sup = Proc("supervisor", args, cluster.log_dir)
    cluster.procs.append(sup)
    async with asyncio.timeout(90):
        for i in (0, 1):
            await async_wait_until(
                lambda i=i: scrape(admin + i).get('pmlb_upstream_up{upstream="e1"}') == 1,
                20,
                f"worker {i} linked to e1",
            )
        status = json.loads(await asyncio.to_thread(etcd.pmlb, "status", "--json"))
        assert {n["id"] for n in status["nodes"]} == {"h1-w0", "h1-w1"}, status["nodes"]
        records = etcd.ctl("get", "--prefix", "--keys-only", dns).split()
        assert records == [f"{dns}/test/lb/h1-w0"], "the host is published once"

        # Clients land on both workers (the kernel hashes each connection).
        clients = [await asyncio.open_connection("127.0.0.1", listen) for _ in range(40)]
        marks = [(await _line(r, w, b"hi")).split()[0].decode() for r, w in clients]
        by_worker = {m.split(".")[0] for m in marks}
        assert by_worker == {"h1-w0", "h1-w1"}, marks
        assert len(set(marks)) == len(marks)
        on_w1 = next(m for m in marks if m.startswith("h1-w1."))
        async with MarkClient([etcd.url], etcd.prefix) as mc:
            await mc.send(on_w1, b"via the control API of worker 1")
        r, w = clients[marks.index(on_w1)]
        assert await r.readuntil(b"\n") == b"via the control API of worker 1\n"

        # SIGHUP reaches both workers.
        sup.signal(signal.SIGHUP)
        await async_wait_until(
            lambda: all(f"node/h1-w{i} pmlb.app: reload" in sup.log() for i in (0, 1)),
            10,
            "both workers reloaded",
        )

        # Worker 1 crashes: its clients are closed, worker 0's carry on, and it
        # comes back as the same node id.
        old = _worker_pid(sup.pid, "h1-w1")
        assert old is not None
        os.kill(old, signal.SIGKILL)
        for (r, w), mark in zip(clients, marks, strict=True):
            if mark.startswith("h1-w1."):
                assert await r.read() == b"", "a dead worker's client sees EOF"
            else:
                assert await _line(r, w, b"still") == f"{mark} e1 still\n".encode()
        await async_wait_until(
            lambda: _worker_pid(sup.pid, "h1-w1") not in (None, old),
            10,
            "worker 1 restarted",
        )
        await async_wait_until(
            lambda: scrape(admin + 1).get('pmlb_upstream_up{upstream="e1"}') == 1,
            20,
            "restarted worker 1 linked",
        )
        r, w = await asyncio.open_connection("127.0.0.1", listen)
        assert b" e1 after\n" in await _line(r, w, b"after")
        w.close()
        assert f"worker 1 (pid {old}) exited unexpectedly" in sup.log()

        # SIGTERM: every worker drains and leaves etcd; the supervisor exits 0.
        for _, w in clients:
            w.close()
        sup.signal(signal.SIGTERM)
        assert await asyncio.to_thread(sup.proc.wait, 30) == 0, sup.log()[-2000:]
        assert etcd.keys("/nodes/") == []
        assert etcd.ctl("get", "--prefix", "--keys-only", dns).split() == []
