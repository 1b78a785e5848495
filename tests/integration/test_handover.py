"""Live handover (SIGUSR2): a node hands its clients, marks and all, to a
successor process started from its own command line.

What a user relies on: no client is disconnected, no mark changes, every
message a client sends is answered exactly once and in order across the
handover (and the next one); a successor that cannot start leaves the node
serving, says why, and the handover can be tried again. The load version
(200 streaming + 5,000 idle clients, three handovers, a successor killed
mid-way) is tests/faults/test_handover_load.py (make test-handover).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_chain
from tests.conftest import Cluster, Node
from tests.support import async_wait_until, node_status, pid_alive, scrape, tcp_open

pytestmark = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture
def successors() -> Iterator[list[int]]:
    """PIDs of successor processes (not our children): killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _hand_over(admin: int, pid: int, successors: list[int]) -> dict[str, object]:
    """SIGUSR2 to ``pid``; the successor's status once it has taken over and
    ``pid`` has exited."""
    os.kill(pid, signal.SIGUSR2)

    def taken() -> dict[str, object] | None:
        try:
            node = node_status(admin)
        except OSError:
            return None
        handover = node["handover"]
        assert isinstance(handover, dict)
        return node if node["pid"] != pid and handover["state"] == "taken" else None

    node = await async_wait_until(taken, 30, "the successor took over")
    assert isinstance(node, dict)
    new_pid = node["pid"]
    assert isinstance(new_pid, int)
    successors.append(new_pid)
    await async_wait_until(lambda: not pid_alive(pid), 30, f"the old process {pid} exited")
    return node


class Streamer:
    """A client that sends numbered lines one at a time and checks each echo:
    the same mark every time, the number it sent, nothing else."""

    def __init__(self) -> None:
        self.marks: set[bytes] = set()
        self.sent = 0
        self.answered = 0
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def run(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not self.stop.is_set():
                self.sent += 1
                writer.write(b"%d\n" % self.sent)
                line = await asyncio.wait_for(reader.readuntil(b"\n"), 10)
                mark, _, text = line.rstrip(b"\n").split(b" ", 2)
                self.marks.add(mark)
                if text != b"%d" % self.sent:
                    self.errors.append(f"sent {self.sent}, echo {text!r}")
                    return
                self.answered += 1
                await asyncio.sleep(0.005)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.errors.append(f"after {self.answered} answers: {exc!r}")
        finally:
            writer.close()


async def _idle_clients(
    port: int, n: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]]:
    out = []
    for i in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"idle%d\n" % i)
        mark = (await r.readuntil(b"\n")).split(b" ", 1)[0]
        out.append((r, w, mark))
    return out


def _node(cluster: Cluster, extra: list[str] | None = None) -> Node:
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    return cluster.node([f"u1={u1.addr}", f"u2={u2.addr}"], extra=extra)


async def test_handover_keeps_every_client_and_its_mark(
    cluster: Cluster, successors: list[int]
) -> None:
    node = await asyncio.to_thread(_node, cluster)
    async with asyncio.timeout(120):
        streamers = [Streamer() for _ in range(10)]
        tasks = [asyncio.create_task(s.run(node.port)) for s in streamers]
        idle = await _idle_clients(node.port, 20)
        await async_wait_until(lambda: all(s.answered >= 5 for s in streamers), 10, "traffic")
        pid = node.proc.pid
        versions = []
        for _ in range(2):  # the successor hands over in turn
            before = sum(s.answered for s in streamers)
            status = await _hand_over(node.admin, pid, successors)
            pid = status["pid"]  # type: ignore[assignment]
            versions.append(status["version"])
            handover = status["handover"]
            assert isinstance(handover, dict)
            assert handover["marks_in"] == len(streamers) + len(idle), handover
            # Traffic flows on through the successor.
            await async_wait_until(
                lambda before=before: sum(s.answered for s in streamers) > before + 50,
                10,
                "answers after the handover",
            )
        for s in streamers:
            s.stop.set()
        await asyncio.gather(*tasks)
        for s in streamers:
            assert not s.errors, s.errors
            assert len(s.marks) == 1, f"the mark changed: {s.marks}"
        for i, (r, w, mark) in enumerate(idle):
            w.write(b"again%d\n" % i)
            line = await r.readuntil(b"\n")
            assert line.split(b" ", 1)[0] == mark
            assert line.endswith(b" again%d\n" % i)
            w.close()
        # A new client is served by the successor, with a mark of its own.
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"new\n")
        assert (await r.readuntil(b"\n")).endswith(b" new\n")
        w.close()
    m = await asyncio.to_thread(scrape, node.admin)
    assert m['pmlb_handover_marks_total{direction="in"}'] == len(streamers) + len(idle)
    assert node.proc.proc.wait(5) == 0, "the first process exited cleanly"
    assert "handover done" in node.proc.log()


async def test_a_successor_that_cannot_start_leaves_the_node_serving(
    cluster: Cluster, successors: list[int], tmp_path: Path
) -> None:
    """A bad upgrade (here: a configuration file the successor cannot read)
    changes nothing for clients; the node says why; the next try works."""
    config = tmp_path / "node.toml"
    config.write_text('log-level = "info"\n')
    node = await asyncio.to_thread(_node, cluster, ["--config", str(config)])
    async with asyncio.timeout(90):
        idle = await _idle_clients(node.port, 5)
        config.write_text("this is not toml = = \n")
        node.proc.signal(signal.SIGUSR2)

        def failed() -> dict[str, object] | None:
            handover = node_status(node.admin)["handover"]
            assert isinstance(handover, dict)
            return handover if handover["state"] == "failed" else None

        handover = await async_wait_until(failed, 30, "the handover failed")
        assert isinstance(handover, dict)
        assert "the successor" in str(handover["last_error"]), handover
        assert "exited" in str(handover["last_error"]), handover
        assert node.proc.alive()
        assert node_status(node.admin)["pid"] == node.proc.pid
        assert "handover failed, this process carries on serving" in node.proc.log()
        for i, (r, w, mark) in enumerate(idle):
            w.write(b"still%d\n" % i)
            line = await r.readuntil(b"\n")
            assert line.split(b" ", 1)[0] == mark
        assert await asyncio.to_thread(tcp_open, "127.0.0.1", node.port), "still accepting"
        m = await asyncio.to_thread(scrape, node.admin)
        # Counted by each process that tried: every worker of a node of several.
        processes = len(node_status(node.admin).get("workers") or [None])  # type: ignore[arg-type]
        assert m["pmlb_handovers_failed_total"] == processes
        # Mended: the next try hands over.
        config.write_text('log-level = "info"\n')
        status = await _hand_over(node.admin, node.proc.pid, successors)
        handover = status["handover"]
        assert isinstance(handover, dict)
        assert handover["marks_in"] == len(idle)
        for i, (r, w, mark) in enumerate(idle):
            w.write(b"after%d\n" % i)
            line = await r.readuntil(b"\n")
            assert line.split(b" ", 1)[0] == mark
            w.close()


async def test_tls_clients_stay_and_drain_new_ones_go_to_the_successor(
    cluster: Cluster, successors: list[int], tmp_path: Path
) -> None:
    """A TLS session's keys live in the process that made it: TLS clients are
    not moved; they are served by the old process until its drain timeout
    (1 s in the suite), then closed with node_draining, as a restart would."""
    chain = make_chain(tmp_path / "pki")
    node = await asyncio.to_thread(
        _node,
        cluster,
        ["--tls-cert", str(chain.server_cert), "--tls-key", str(chain.server_key)],
    )
    ctx = ssl.create_default_context(cafile=str(chain.ca))
    async with asyncio.timeout(60):
        clients = []
        for i in range(3):
            r, w = await asyncio.open_connection(
                "127.0.0.1", node.port, ssl=ctx, server_hostname="127.0.0.1"
            )
            w.write(b"tls%d\n" % i)
            clients.append((r, w, (await r.readuntil(b"\n")).split(b" ", 1)[0]))
        status = await _hand_over(node.admin, node.proc.pid, successors)
        handover = status["handover"]
        assert isinstance(handover, dict)
        assert handover["marks_in"] == 0, "no TLS client moves"
        # Each process (every worker) says how many of its marks stay.
        stay = re.findall(r"(\d+) stay here to drain", node.proc.log())
        assert sum(map(int, stay)) == len(clients), stay
        for r, _, _ in clients:  # closed by the old process at its drain deadline
            assert await r.read() == b""
        assert node.proc.log().count("reason=node_draining") == len(clients)
        # A new TLS client is the successor's.
        r, w = await asyncio.open_connection(
            "127.0.0.1", node.port, ssl=ctx, server_hostname="127.0.0.1"
        )
        w.write(b"fresh\n")
        assert (await r.readuntil(b"\n")).endswith(b" fresh\n")
        w.close()


async def test_a_partial_message_the_successor_refuses_closes_only_its_client(
    cluster: Cluster, successors: list[int], tmp_path: Path
) -> None:
    """The successor runs with a smaller --max-frame (changed in the config
    file): a client holding a partial message over it is closed, with a
    framing error counted; every other client moves as usual."""
    config = tmp_path / "node.toml"
    config.write_text("max-frame = 65536\n")
    node = await asyncio.to_thread(_node, cluster, ["--config", str(config)])
    async with asyncio.timeout(60):
        idle = await _idle_clients(node.port, 5)
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"x" * 2000)  # no newline: held as a partial line
        await w.drain()
        config.write_text("max-frame = 1000\n")
        status = await _hand_over(node.admin, node.proc.pid, successors)
        handover = status["handover"]
        assert isinstance(handover, dict)
        assert handover["marks_in"] == len(idle)
        assert await r.read() == b"", "the refused client is closed"
        for i, (ri, wi, mark) in enumerate(idle):
            wi.write(b"moved%d\n" % i)
            assert (await ri.readuntil(b"\n")).split(b" ", 1)[0] == mark
            wi.close()
    m = await asyncio.to_thread(scrape, node.admin)
    assert m["pmlb_framing_errors_total"] == 1
    assert "handed over with input this node refuses" in node.proc.log()
