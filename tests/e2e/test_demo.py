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
    port, up = free_port(), free_port()
    # The demo derives more ports from these: listeners port and port + 1, admin
    # port + 100.., control port + 200.., upstreams up and up + 1. None may overlap.
    derived = {port, port + 1, port + 100, port + 101, port + 200, port + 201}
    while not all(map(bindable, derived)):
        port = free_port()
        derived = {port, port + 1, port + 100, port + 101, port + 200, port + 201}
    while {up, up + 1} & derived or not bindable(up + 1):
        up = free_port()
    log = (tmp_path / "demo.log").open("wb")
    tmp_before = set(Path(tempfile.gettempdir()).glob("pmlb-etcd-*"))
    demo = subprocess.Popen(
        [sys.executable, "-m", "pmlb", "demo", "--port", str(port), "--upstream-port", str(up)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
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

        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
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
