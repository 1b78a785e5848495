"""systemd's Type=notify (issue [17]): the unit shipped in deploy/systemd
says Type=notify, so the node must tell systemd READY=1 once it listens and,
in cluster mode, is registered in etcd, and STOPPING=1 when it begins to
drain. Here a Unix datagram socket plays systemd's $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, Etcd, default_workers_too
from tests.support import ROOT, tcp_open


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(30)
    yield s, path
    s.close()


@default_workers_too
def test_ready_once_registered_and_stopping_at_the_drain(
    cluster: Cluster, etcd: Etcd, notify_socket: tuple[socket.socket, str], workers: str
) -> None:
    sock, path = notify_socket
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    node = cluster.node(
        [], etcd=etcd.url, prefix=etcd.prefix, env={"NOTIFY_SOCKET": path}, wait_links=["u1"]
    )
    assert sock.recv(100) == b"READY=1"
    # At READY=1 the node listens and its key is in etcd.
    assert tcp_open("127.0.0.1", node.port)
    assert etcd.get("/nodes/n1") is not None
    node.proc.signal(signal.SIGTERM)
    assert sock.recv(100) == b"STOPPING=1"
    assert node.proc.proc.wait(30) == 0
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(100)  # once each, and nothing from the workers


@default_workers_too
def test_a_handover_makes_the_successor_the_main_process(
    cluster: Cluster, etcd: Etcd, notify_socket: tuple[socket.socket, str], workers: str
) -> None:
    """ExecReload (SIGUSR2): the successor says MAINPID= and READY=1, the old
    process never says STOPPING=1, and the node's key stays in etcd."""
    sock, path = notify_socket
    u1 = cluster.echo("u1")
    etcd.put("/services/echo/upstreams/u1", u1.addr)
    node = cluster.node(
        [], etcd=etcd.url, prefix=etcd.prefix, env={"NOTIFY_SOCKET": path}, wait_links=["u1"]
    )
    assert sock.recv(100) == b"READY=1"
    node.proc.signal(signal.SIGUSR2)
    said = sock.recv(100).decode()
    pid = int(said.removeprefix("MAINPID=").split("\n")[0])
    try:
        assert said == f"MAINPID={pid}\nREADY=1"
        assert pid != node.proc.pid
        assert node.proc.proc.wait(30) == 0
        assert etcd.get("/nodes/n1") is not None, "the successor's registration stays"
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)  # no STOPPING=1 from the old process
    finally:
        os.kill(pid, signal.SIGTERM)
    assert sock.recv(100) == b"STOPPING=1"  # the successor's own stop, later


def test_static_upstreams_ready_once_listening(
    cluster: Cluster, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    u1 = cluster.echo("u1")
    node = cluster.node([f"u1={u1.addr}"], env={"NOTIFY_SOCKET": path})
    assert sock.recv(100) == b"READY=1"
    assert tcp_open("127.0.0.1", node.port)


def test_the_unit_is_type_notify_and_runs_from_a_venv() -> None:
    unit = (ROOT / "deploy" / "systemd" / "pmlb-node.service").read_text()
    assert "\nType=notify\n" in unit
    # The successor of a live handover tells systemd it is the main process.
    assert "\nNotifyAccess=all\n" in unit
    assert "\nExecReload=/bin/kill -USR2 $MAINPID\n" in unit
    assert "ExecStart=/opt/pmlb/bin/pmlb node" in unit
