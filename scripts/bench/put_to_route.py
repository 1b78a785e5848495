"""How long from `etcdctl put` to the first mark routed by it, on every node.

Starts a local etcd, two echo upstreams (ids "a" and "b") and two nodes, then
`ROUNDS` times re-points the upstream key to the other echo process and
measures, per node, the time until a new connection is answered by it.
Prints p50 and max. A measurement, not a test: nothing asserts on speed.

    python scripts/bench/put_to_route.py [ROUNDS]
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pmlb.testing.localetcd import LocalEtcd, etcd_binary

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing on port {port}")


def served_by(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"x\n")
            s.shutdown(socket.SHUT_WR)
            data = s.recv(256).decode()
        return data.split(" ")[1] if data.count(" ") >= 2 else ""
    except OSError:
        return ""


def main(rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pmlb-put2route-"))
    etcd = LocalEtcd(log_path=tmp / "etcd.log")
    etcd.start()
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> None:
        log = (tmp / f"p{len(procs)}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pmlb", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        )

    try:
        ups = {}
        for uid in ("a", "b"):
            ups[uid] = free_port()
            spawn(
                "echo-upstream",
                "--id",
                uid,
                "--listen",
                f"127.0.0.1:{ups[uid]}",
                "--log-level",
                "warning",
            )
            wait_port(ups[uid])
        etcdctl = str(Path(etcd_binary()).with_name("etcdctl"))
        key = "/pmlb/services/echo/upstreams/up"
        subprocess.run(
            [etcdctl, "--endpoints", etcd.url, "put", key, f"127.0.0.1:{ups['a']}"],
            check=True,
            capture_output=True,
        )
        node_ports = []
        for i in (1, 2):
            port = free_port()
            spawn(
                "node",
                "--workers",
                "1",
                "--etcd",
                etcd.url,
                "--service",
                "echo",
                "--node-id",
                f"n{i}",
                "--listen",
                f"127.0.0.1:{port}",
                "--framing",
                "line",
                "--log-level",
                "warning",
            )
            wait_port(port)
            node_ports.append(port)
        for port in node_ports:
            while served_by(port) != "a":
                time.sleep(0.01)
        samples = []
        target = "a"
        for _ in range(rounds):
            target = "b" if target == "a" else "a"
            t0 = time.monotonic()
            subprocess.run(
                [etcdctl, "--endpoints", etcd.url, "put", key, f"127.0.0.1:{ups[target]}"],
                check=True,
                capture_output=True,
            )
            for port in node_ports:
                while served_by(port) != target:
                    if time.monotonic() - t0 > 10:
                        raise SystemExit("a node did not follow the put within 10 s")
                samples.append(time.monotonic() - t0)
        print(
            f"put -> first routed mark, {rounds} puts x 2 nodes (includes etcdctl's own "
            f"start-up): p50 {statistics.median(samples) * 1000:.0f} ms, "
            f"max {max(samples) * 1000:.0f} ms"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        etcd.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
