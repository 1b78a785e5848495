"""``pmlb demo``: a local cluster in one command.

Starts two echo upstreams and a node as child processes, waits until the node
answers, prints how to connect, and on Ctrl-C (or SIGTERM) stops every child
by PID, leaving nothing behind. Static mode for now: etcd joins in a later
release.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from pmlb.errors import PmlbError


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


def _spawn(name: str, *args: str) -> Child:
    cmd = [sys.executable, "-m", "pmlb", *args]
    return Child(name, subprocess.Popen(cmd, stdin=subprocess.DEVNULL))


def wait_port(host: str, port: int, timeout: float, children: list[Child]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.proc.poll() is not None:
                raise PmlbError(f"{child.name} exited with status {child.proc.returncode}")
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
        for child in children:
            if child.proc.poll() is not None:
                raise PmlbError(f"{child.name} exited with status {child.proc.returncode}")
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


def stop_children(children: list[Child], timeout: float = 10.0) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def run_demo(port: int, upstream_port: int = 7001) -> int:
    host = "127.0.0.1"
    children: list[Child] = []
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        ups = ((1, upstream_port), (2, upstream_port + 1))
        for i, up_port in ups:
            children.append(
                _spawn(
                    f"upstream u{i}",
                    "echo-upstream",
                    "--listen",
                    f"{host}:{up_port}",
                    "--id",
                    f"u{i}",
                )
            )
        admin = port + 100
        children.append(
            _spawn(
                "node n1",
                "node",
                "--node-id",
                "n1",
                "--listen",
                f"{host}:{port}",
                "--framing",
                "line",
                "--admin",
                f"{host}:{admin}",
                "--upstream",
                f"u1={host}:{ups[0][1]}",
                "--upstream",
                f"u2={host}:{ups[1][1]}",
            )
        )
        wait_port(host, port, 20.0, children)
        wait_links_up(f"http://{host}:{admin}", 2, 20.0, children)
        print(
            f"\npmlb demo is up: node n1 on {host}:{port} (line framing), "
            f"echo upstreams u1 on :{ups[0][1]} and u2 on :{ups[1][1]}.\n"
            f"  connect:  nc {host} {port}     then type: hello\n"
            f"            -> '<mark> u1 hello' (the upstream knows who is talking)\n"
            f"  metrics:  curl http://{host}:{admin}/metrics\n"
            f"  marks:    curl http://{host}:{admin}/connections\n"
            f"Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping:
            for child in children:
                if child.proc.poll() is not None:
                    raise PmlbError(f"{child.name} exited with status {child.proc.returncode}")
            time.sleep(0.2)
        return 0
    finally:
        stop_children(children)
        print("pmlb demo stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(run_demo(int(os.environ.get("PMLB_DEMO_PORT", "9000"))))
