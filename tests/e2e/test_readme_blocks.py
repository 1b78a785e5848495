"""README's command blocks, run as written (issue [17]): "A cluster with
etcd" (it never started etcd, used commands that are only in .venv/bin, and
gave its nodes no --admin, so `pmlb status` called serving nodes unreachable)
"A five-minute tour" (its commands were not runnable as shown) and the
conformance kit's block under "Writing an upstream" (it used a bare `pmlb`,
which a clone after `make install` has only in .venv/bin).

Each block is read from README (between its markers), not copied here: each
line runs in bash from the repository's root, a line ending in `&` in the
background (as a terminal of its own), and the test waits for what that line
listens on before the next, as a person would. Their fixed ports (2379,
7001-7002, 9000-9001, 9100-9101; 4770-4771) must be free. README's wheel and
npm blocks run in tests/packages, its Containers block in tests/deploy."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cluster
from tests.support import ROOT, Proc, children, http_get, tcp_open, wait_until


def _block(name: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- readme-{name} -->", 1)[1].split(f"<!-- /readme-{name} -->", 1)[0]
    body = block.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def _listenable(port: int) -> bool:
    """Free to listen on as the servers listen (SO_REUSEADDR: a port in
    TIME_WAIT from an earlier run is free for them)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def _listens(line: str) -> tuple[str, int]:
    m = re.search(r"--listen (\S+):(\d+)", line)
    return (m.group(1), int(m.group(2))) if m else ("127.0.0.1", 2379)


CLUSTER_PORTS = (2379, 7001, 7002, 9000, 9001, 9100, 9101)


def _run_block(
    name: str,
    tmp_path: Path,
    background: list[subprocess.Popen[bytes]],
    ports: tuple[int, ...] = CLUSTER_PORTS,
) -> dict[str, str]:
    """Run README's block ``name``; the output of each foreground line, by
    its pmlb subcommand ("upstream ls", "status", "connect 127.0.0.1:9000")
    or, for other commands, its first word."""
    busy = [p for p in ports if not _listenable(p)]
    assert not busy, f"README's ports are taken here: {busy}"
    outputs: dict[str, str] = {}
    for i, line in enumerate(_block(name)):
        command = line.split("  #", 1)[0].rstrip()
        if command.endswith("&"):
            log = (tmp_path / f"bg{i}.log").open("wb")
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command[:-1]}"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            background.append(proc)
            host, port = _listens(command)
            wait_until(
                lambda h=host, p=port, pr=proc: tcp_open(h, p) or pr.poll() is not None,
                30,
                f"line {i + 1} listening",
            )
            assert proc.poll() is None, (tmp_path / f"bg{i}.log").read_text()
            continue
        # The nodes take their upstreams from etcd's watch: `ls`, `status`
        # and `drain` are typed once both links are up, as a person would.
        if "upstream ls" in command:
            for admin in (9100, 9101):
                wait_until(lambda a=admin: _links_up(a) == 2, 30, f"node on {admin}: both links")
            # and once the elected checker has written both healths (rise 2).
            wait_until(lambda c=command: _run(c).stdout.count("SERVING") == 2, 30, "both SERVING")
        r = _run(command)
        assert r.returncode == 0, (line, r.stdout, r.stderr)
        words = command.replace("| ", "").split()
        pmlb = next((j for j, w in enumerate(words) if w.endswith("pmlb")), None)
        key = " ".join(words[pmlb + 1 : pmlb + 3]) if pmlb is not None else words[0]
        outputs[key] = r.stdout
    return outputs


def _stop(background: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(background):  # nodes first, etcd last
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(background):
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            for pid in children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def test_the_tour_runs_as_written(tmp_path: Path) -> None:
    background: list[subprocess.Popen[bytes]] = []
    try:
        outputs = _run_block("tour", tmp_path, background)
        mark, upstream, text = outputs["connect 127.0.0.1:9000"].split()
        assert (upstream in ("u1", "u2"), text) == (True, "hello"), outputs
        assert ".w" in mark or mark.count(".") == 2, mark
        assert "marks" in json.loads(outputs["curl"]), outputs["curl"]
    finally:
        _stop(background)


def test_the_cluster_section_runs_as_written(tmp_path: Path) -> None:
    background: list[subprocess.Popen[bytes]] = []
    try:
        outputs = _run_block("cluster", tmp_path, background)
        ls = outputs["upstream ls"]
        assert re.search(r"^u1\s+127\.0\.0\.1:7001\s+1\s+no\s+SERVING", ls, re.M), ls
        assert re.search(r"^u2\s+127\.0\.0\.1:7002\s+3\s+no\s+SERVING", ls, re.M), ls
        status = outputs["status"]
        assert "unreachable" not in status, status
        assert re.search(r"^n1\s+127\.0\.0\.1:9000\s", status, re.M), status
        assert re.search(r"^n2\s+127\.0\.0\.1:9001\s", status, re.M), status
        # After the drain, new clients of either node go to u2 only.
        served = set()
        for port in (9000, 9001):
            for _ in range(4):
                with socket.create_connection(("127.0.0.1", port), 10) as s:
                    s.sendall(b"who\n")
                    served.add(s.recv(200).split()[1].decode())
        assert served == {"u2"}, served
    finally:
        _stop(background)


def test_the_conformance_kit_runs_as_written(tmp_path: Path) -> None:
    """The kit against both example upstreams, as README shows it: every
    case passes (the kit exits 0 only then) and each run names its cases."""
    background: list[subprocess.Popen[bytes]] = []
    try:
        outputs = _run_block("conformance", tmp_path, background, ports=(4770, 4771))
    finally:
        _stop(background)
    cases = _run(".venv/bin/pmlb conformance --list").stdout.splitlines()
    for key in ("conformance 127.0.0.1:4770", "conformance 127.0.0.1:4771"):
        out = outputs[key]
        passed = [line.split()[1] for line in out.splitlines() if line.startswith("PASS ")]
        assert passed == [case.split()[0] for case in cases], out
        assert f"{len(cases)} passed, 0 failed" in out, out


def _run(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def _links_up(admin: int) -> int:
    from tests.support import scrape

    try:
        m = scrape(admin)
    except OSError:
        return 0
    return sum(1 for k, v in m.items() if k.startswith("pmlb_upstream_up{") and v == 1)


def _python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Writing an upstream\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_python_upstream_example_runs_as_written(cluster: Cluster) -> None:
    """ "Writing an upstream"'s Python example, read from README and run as a
    file: behind a node, a client is welcomed with its mark, gets its line
    back upper-cased, the metadata it set shows in /connections, and the
    close reaches on_close."""
    assert _listenable(7001), "README's upstream port 7001 is taken here"
    example = cluster.log_dir / "chat.py"
    example.write_text(_python_example())
    # PYTHONUNBUFFERED: print() reaches the log line by line, as on a terminal.
    up = Proc(
        "readme-chat",
        [str(example)],
        cluster.log_dir,
        env={"PYTHONUNBUFFERED": "1"},
        program=sys.executable,
    )
    cluster.procs.append(up)
    wait_until(lambda: tcp_open("127.0.0.1", 7001) or not up.alive(), 20, "the example serving")
    assert up.alive(), up.log()
    node = cluster.node(["chat-1=127.0.0.1:7001"], wait_links=["chat-1"])
    with (
        socket.create_connection(("127.0.0.1", node.port), timeout=10) as s,
        s.makefile("rb") as f,  # closed with the socket: the client hangs up
    ):
        welcome = f.readline()
        assert welcome.startswith(b"welcome n1."), welcome
        mark = welcome.split()[1].decode()
        s.sendall(b"hello\n")
        assert f.readline() == b"HELLO\n"
        status, body = http_get(f"http://127.0.0.1:{node.admin}/connections")
        assert status == 200
        (entry,) = [m for m in json.loads(body)["marks"] if m["mark"] == mark]
        assert entry["metadata"] == {"last": "hello"}, entry
    wait_until(lambda: f"{mark} closed: client_closed" in up.log(), 10, "on_close")
