"""`pmlb demo` (what `make demo` runs) answers nc-style clients and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import ROOT, bindable, children, free_port, run_pmlb, tcp_open, wait_until


def test_demo_answers_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port, up = _demo_ports()
    log = (tmp_path / "demo.log").open("wb")
    tmp_before = set(Path(tempfile.gettempdir()).glob("pmlb-etcd-*"))
    demo = subprocess.Popen(
        [sys.executable, "-m", "pmlb", "demo", "--port", str(port), "--upstream-port", str(up)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        # A terminal's foreground process group of its own: Ctrl-C is SIGINT
        # to every process in it (os.killpg below), as a shell sends it.
        process_group=0,
    )
    try:
        wait_until(
            lambda: b"pmlb demo is up" in (tmp_path / "demo.log").read_bytes(),
            60,
            "the demo banner",
        )
        kids = children(demo.pid)
        assert len(kids) == 5, "etcd, two upstreams and two nodes"
        banner = (tmp_path / "demo.log").read_text()
        addrs = re.findall(r"pmlb connect (127\.0\.0\.\d+):(\d+)", banner)
        assert len(addrs) == 2
        # The README's quick start, as written: the client pmlb ships, fed a line.
        typed = run_pmlb("connect", ":".join(addrs[0]), stdin="hello\n", timeout=30)
        assert typed.returncode == 0, typed.stderr
        mark, upstream, text = typed.stdout.strip().split(" ", 2)
        assert (mark.split(".")[0], upstream in ("u1", "u2"), text) == ("n1", True, "hello")
        for (host, p), node in zip(addrs, ("n1", "n2"), strict=True):
            seen = set()
            for _ in range(4):
                with socket.create_connection((host, int(p)), timeout=10) as s:
                    s.sendall(b"hello\n")
                    s.shutdown(socket.SHUT_WR)  # like `printf 'hello\n' | nc -N`
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                mark, upstream, text = data.decode().rstrip("\n").split(" ", 2)
                assert text == "hello"
                assert mark.startswith(f"{node}.")
                seen.add(upstream)
            assert seen == {"u1", "u2"}, "both upstreams serve through each node"
        assert "checker: n" in banner
        # Where to look: each node's page, and how to open the cluster's.
        assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ ", banner), banner
        assert "pmlb dashboard --etcd" in banner

        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C
        assert demo.wait(60) == 0
        stopped = (tmp_path / "demo.log").read_text()
        # The children are not in the terminal's group: each gets one SIGTERM
        # from the demo, drains and stops; etcd stops after the nodes.
        assert "received again" not in stopped, stopped[-3000:]
        assert "SIGINT" not in stopped.split("pmlb demo is up", 1)[1], stopped[-3000:]
        assert stopped.count("node n1 stopped") + stopped.count("node n2 stopped") == 2, stopped[
            -3000:
        ]
        assert "UNAVAILABLE" not in stopped, "etcd outlived the nodes"
        for pid in kids:
            wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 10, f"child {pid} gone")
        for host, p in addrs:
            assert not tcp_open(host, int(p))
        assert set(Path(tempfile.gettempdir()).glob("pmlb-etcd-*")) == tmp_before, "no temp files"
    finally:
        if demo.poll() is None:
            leftovers = children(demo.pid)
            demo.kill()
            for pid in leftovers:  # never leave the demo's children behind a failed test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log.close()


def _demo_ports() -> tuple[int, int]:
    """A client port and an upstream port for `pmlb demo --port --upstream-port`.
    The demo derives more ports from these: listeners port and port + 1, admin
    port + 100.., control port + 200.., upstreams up and up + 1. None may overlap."""
    port, up = free_port(), free_port()
    derived = {port, port + 1, port + 100, port + 101, port + 200, port + 201}
    while not all(map(bindable, derived)):
        port = free_port()
        derived = {port, port + 1, port + 100, port + 101, port + 200, port + 201}
    while {up, up + 1} & derived or not bindable(up + 1):
        up = free_port()
    return port, up


def test_a_quick_rerun_keeps_the_addresses(tmp_path: Path) -> None:
    """The nodes close their clients at the drain, so their client ports are
    in TIME_WAIT when the demo exits; a re-run at once must still take the
    addresses README names (the check binds as the node does, SO_REUSEADDR)."""
    port, up = _demo_ports()
    seen = []
    for run in (1, 2):
        out = tmp_path / f"demo{run}.log"
        with out.open("wb") as log:
            demo = subprocess.Popen(
                [sys.executable, "-m", "pmlb", "demo", "--port", str(port),
                 "--upstream-port", str(up)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                process_group=0,
            )  # fmt: skip
            try:
                wait_until(lambda out=out: b"pmlb demo is up" in out.read_bytes(), 60, "banner")
                addrs = re.findall(r"pmlb connect (127\.0\.0\.\d+:\d+)", out.read_text())
                seen.append(addrs)
                host, p = addrs[0].split(":")
                client = socket.create_connection((host, int(p)), timeout=10)
                client.sendall(b"hi\n")
                assert client.recv(100).endswith(b"hi\n")
                os.killpg(demo.pid, signal.SIGINT)
                assert demo.wait(60) == 0
                assert client.recv(100) == b"", "closed by the node at its drain"
                client.close()
            finally:
                if demo.poll() is None:
                    leftovers = children(demo.pid)
                    demo.kill()
                    demo.wait()
                    for pid in leftovers:  # never leave the demo's children behind
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
    assert seen[0] == seen[1], seen
