"""A node of several worker processes is one node.

What a user relies on, with the default ``--workers`` (one per CPU; two on
these machines) or an explicit count: one ``/pmlb/nodes/<id>`` entry listing
the workers, one row in ``pmlb status``, the checker key naming the node,
marks that name the node (and their worker), one admin address whose
/metrics, /connections, mark search and /drain cover every worker, one
control address that reaches every mark, one DNS record; a crashed worker is
restarted and the other's clients never notice; SIGHUP reaches every worker;
SIGTERM drains them all and leaves etcd. And a node that cannot start (an
address it needs is taken) refuses to, in one line, without ever accepting a
client it would then drop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from pmlb.client import MarkClient
from pmlb.node.workers import default_workers
from pmlb.protocol.ids import worker_of
from tests.conftest import Cluster, Etcd
from tests.support import (
    ROOT,
    Proc,
    async_wait_until,
    children,
    free_port,
    scrape,
)

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _worker_pids(supervisor: int) -> list[int]:
    return [pid for pid in children(supervisor) if "pmlb" in open(f"/proc/{pid}/cmdline").read()]


def _listening(admin: int, n: int) -> bool:
    m = scrape(admin)
    return (
        m.get('pmlb_upstream_up{upstream="e1"}') == 1
        and sum(m.get(f'pmlb_worker_up{{worker="{i}"}}', 0) for i in range(n)) == n
    )


async def _line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes) -> bytes:
    writer.write(text + b"\n")
    return await reader.readuntil(b"\n")


def _admin(port: int, method: str, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_default_node_is_one_node_of_every_core(cluster: Cluster, etcd: Etcd) -> None:
    """No --workers flag: as many workers as CPUs, and still one node."""
    assert default_workers() >= 2, "these machines have two cores; the test needs them"
    echo = cluster.echo("e1")
    etcd.put("/services/echo/upstreams/e1", echo.addr)
    listen, admin, control = free_port(), free_port(), free_port()
    dns = f"/skydns{etcd.prefix}"
    args = ["node", "--node-id", "h1", "--service", "echo", "--framing", "line"]
    args += ["--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"]
    args += ["--control", f"127.0.0.1:{control}", "--drain-timeout", "1"]
    args += ["--etcd", etcd.url, "--etcd-prefix", etcd.prefix, "--lease-ttl", "3"]
    args += ["--dns-name", "lb.test", "--dns-prefix", dns]
    env = {k: v for k, v in os.environ.items() if k != "PMLB_WORKERS"}  # the default
    sup = Proc("node-h1", args, cluster.log_dir, env={"PMLB_WORKERS": "0", **env})
    cluster.procs.append(sup)
    n = default_workers()
    async with asyncio.timeout(90):
        await async_wait_until(
            lambda: _listening(admin, n),
            20,
            "every worker linked to e1 and listening",
        )
        await async_wait_until(
            lambda: etcd.keys("/nodes/") == [f"{etcd.prefix}/nodes/h1"], 10, "h1 registered"
        )

        # One node in etcd and in `pmlb status`, listing its workers.
        entry = json.loads(etcd.get("/nodes/h1") or "{}")
        assert [w["index"] for w in entry["workers"]] == list(range(n))
        assert entry["admin"] == f"127.0.0.1:{admin}"
        assert entry["control"] == f"127.0.0.1:{control}"
        status = json.loads(await asyncio.to_thread(etcd.pmlb, "status", "--json"))
        assert [nd["id"] for nd in status["nodes"]] == ["h1"], status["nodes"]
        text = await asyncio.to_thread(etcd.pmlb, "status")
        rows = [ln for ln in text.splitlines() if ln.startswith("h1 ")]
        assert len(rows) == 1, text
        assert rows[0].split()[3] == str(n), "the WORKERS column"
        await async_wait_until(
            lambda: etcd.get("/services/echo/checker") == "h1", 10, "the checker names the node"
        )
        records = etcd.ctl("get", "--prefix", "--keys-only", dns).split()
        assert records == [f"{dns}/test/lb/h1"], "the host is published once, as the node"

        # Clients land on every worker; their marks name the node and the worker.
        clients = [await asyncio.open_connection("127.0.0.1", listen) for _ in range(40)]
        marks = [(await _line(r, w, b"hi")).split()[0].decode() for r, w in clients]
        assert {m.split(".")[0] for m in marks} == {"h1"}
        assert {worker_of(m) for m in marks} == set(range(n)), marks
        assert len(set(marks)) == len(marks)

        # The one admin address covers every worker.
        m = await asyncio.to_thread(scrape, admin)
        assert m["pmlb_connections_accepted_total"] == len(clients)
        assert m["pmlb_marks_open"] == len(clients)
        assert m["pmlb_frames_in_total"] == len(clients)
        assert sum(m[f'pmlb_worker_marks_open{{worker="{i}"}}'] for i in range(n)) == len(clients)
        listed, after = [], ""
        while True:
            code, body = await asyncio.to_thread(
                _admin, admin, "GET", f"/connections?limit=7&after={after}"
            )
            assert code == 200, body
            page = json.loads(body)
            listed += [c["mark"] for c in page["marks"]]
            after = page["next"]
            if not after:
                break
        assert sorted(listed) == sorted(marks), "/connections pages through every worker"
        assert page["total"] == len(marks)
        for mark in (marks[0], next(m for m in marks if worker_of(m) == n - 1)):
            code, body = await asyncio.to_thread(_admin, admin, "GET", f"/api/mark?mark={mark}")
            assert code == 200
            assert json.loads(body)["mark"] == mark
        code, body = await asyncio.to_thread(_admin, admin, "GET", "/api/status")
        node = json.loads(body)["node"]
        assert node["id"] == "h1"
        assert node["marks_open"] == len(clients)
        assert [w["index"] for w in node["workers"]] == list(range(n))

        # The one control address reaches every worker's marks.
        async with MarkClient([etcd.url], etcd.prefix) as mc:
            for i in range(n):
                mark = next(m for m in marks if worker_of(m) == i)
                await mc.send(mark, f"via the control API to worker {i}".encode())
                r, _ = clients[marks.index(mark)]
                expected = f"via the control API to worker {i}\n".encode()
                assert await r.readuntil(b"\n") == expected

        # SIGTERM: the node leaves etcd and DNS, every worker drains, exit 0.
        for _, w in clients:
            w.close()
        sup.signal(signal.SIGTERM)
        assert await asyncio.to_thread(sup.proc.wait, 30) == 0, sup.log()[-2000:]
        assert etcd.keys("/nodes/") == []
        assert etcd.ctl("get", "--prefix", "--keys-only", dns).split() == []


async def test_a_crashed_worker_is_restarted_and_the_others_clients_carry_on(
    cluster: Cluster, etcd: Etcd
) -> None:
    echo = cluster.echo("e1")
    etcd.put("/services/echo/upstreams/e1", echo.addr)
    listen, admin = free_port(), free_port()
    args = ["node", "--workers", "2", "--node-id", "h1", "--service", "echo"]
    args += ["--framing", "line", "--listen", f"127.0.0.1:{listen}"]
    args += ["--admin", f"127.0.0.1:{admin}", "--drain-timeout", "1"]
    args += ["--etcd", etcd.url, "--etcd-prefix", etcd.prefix, "--lease-ttl", "3"]
    sup = Proc("supervisor", args, cluster.log_dir)
    cluster.procs.append(sup)
    async with asyncio.timeout(90):
        await async_wait_until(
            lambda: _listening(admin, 2),
            20,
            "both workers linked to e1 and listening",
        )
        clients = [await asyncio.open_connection("127.0.0.1", listen) for _ in range(40)]
        marks = [(await _line(r, w, b"hi")).split()[0].decode() for r, w in clients]
        assert {worker_of(m) for m in marks} == {0, 1}

        # SIGHUP reaches both workers.
        sup.signal(signal.SIGHUP)
        await async_wait_until(
            lambda: all(f"node/h1/w{i} pmlb.app: reload" in sup.log() for i in (0, 1)),
            10,
            "both workers reloaded",
        )

        # Worker 1 crashes: its clients are closed, worker 0's carry on, and it
        # comes back listening once it is whole.
        pids = _worker_pids(sup.pid)
        assert len(pids) == 2
        status = json.loads((await asyncio.to_thread(_admin, admin, "GET", "/api/status"))[1])
        old = next(w["pid"] for w in status["node"]["workers"] if w["index"] == 1)
        os.kill(old, signal.SIGKILL)
        for (r, w), mark in zip(clients, marks, strict=True):
            if worker_of(mark) == 1:
                assert await r.read() == b"", "a dead worker's client sees EOF"
            else:
                assert await _line(r, w, b"still") == f"{mark} e1 still\n".encode()
        await async_wait_until(
            lambda: (
                scrape(admin).get('pmlb_worker_restarts_total{worker="1"}') == 1
                and scrape(admin).get('pmlb_worker_up{worker="1"}') == 1
            ),
            20,
            "worker 1 restarted and listening",
        )
        assert f"worker 1 (pid {old}) exited unexpectedly" in sup.log()
        assert etcd.keys("/nodes/") == [f"{etcd.prefix}/nodes/h1"], (
            "the node stayed registered throughout"
        )
        fresh = [await asyncio.open_connection("127.0.0.1", listen) for _ in range(20)]
        again = [(await _line(r, w, b"after")).split()[0].decode() for r, w in fresh]
        assert {worker_of(m) for m in again} == {0, 1}, "the restarted worker takes clients"

        for _, w in clients + fresh:
            w.close()
        sup.signal(signal.SIGTERM)
        assert await asyncio.to_thread(sup.proc.wait, 30) == 0, sup.log()[-2000:]
        assert etcd.keys("/nodes/") == []


@pytest.mark.parametrize("taken", ["control", "listen"])
async def test_a_node_whose_address_is_taken_refuses_to_start_without_taking_a_client(
    cluster: Cluster, taken: str
) -> None:
    """The failure the issue saw (a worker bound the client port, accepted
    clients, then died on its control port, over and over) cannot happen: the
    node checks its addresses first and refuses to start in one line."""
    echo = cluster.echo("e1")
    listen, admin, control = free_port(), free_port(), free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", control if taken == "control" else listen))
    squatter.listen()
    try:
        args = [sys.executable, "-m", "pmlb", "node", "--workers", "2", "--node-id", "h1"]
        args += ["--framing", "line", "--listen", f"127.0.0.1:{listen}"]
        args += ["--admin", f"127.0.0.1:{admin}", "--control", f"127.0.0.1:{control}"]
        args += ["--upstream", echo.addr]
        done = await asyncio.to_thread(
            subprocess.run, args, capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert done.returncode == 1, done.stderr
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("pmlb node:")]
        port = control if taken == "control" else listen
        assert lines == [
            f"pmlb node: {'control address' if taken == 'control' else 'client listener'} "
            f"127.0.0.1:{port} is not available: Address already in use"
        ], done.stderr
        assert "worker 0 started" not in done.stderr, "no worker ever started"
        if taken == "control":
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", listen), timeout=5)
    finally:
        squatter.close()


async def test_a_worker_that_cannot_start_stops_the_node_with_its_reason(
    cluster: Cluster, tmp_path: object
) -> None:
    """An error only a worker meets (its TLS certificate does not load) is the
    node's start-up error: the worker's words, exit 2, nothing left running."""
    from pathlib import Path

    bad = Path(str(tmp_path)) / "bad.pem"
    bad.write_text("not a certificate\n")
    listen = free_port()
    args = [sys.executable, "-m", "pmlb", "node", "--workers", "2", "--node-id", "h1"]
    args += ["--listen", f"127.0.0.1:{listen}", "--upstream", "127.0.0.1:1"]
    args += ["--tls-cert", str(bad), "--tls-key", str(bad)]
    done = await asyncio.to_thread(
        subprocess.run, args, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pmlb node: error: worker "), last
    assert "could not start: " in last, last
    assert "bad.pem" in last, last
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", listen), timeout=5)
