"""Live handover under load (make test-handover): 200 streaming clients and
5,000 idle ones on one node, at the default worker count and at one.

1. Three handovers in a row, each to a changed version of pmlb (a release
   directory with another version string, switched the way a deploy
   switches a ``current`` symlink): every client stays connected with its
   mark, and nothing a streaming client sent is lost, duplicated or
   reordered.
2. A successor that fails to start (a configuration it cannot read): the
   node serves on, every client with it.
3. A successor killed mid-handover: the marks it had taken go with it (its
   responsibility); the node keeps every client it still held, and serves
   on.

Each scenario's figures go to the fault table (README "Live handover",
spliced by make test-handover from this run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WORKERS, Cluster, Node
from tests.faults.report import record
from tests.support import ROOT, async_wait_until, children, node_status, pid_alive, scrape

pytestmark = pytest.mark.asyncio(loop_scope="function")

STREAMERS = 200
IDLE = 5_000
SEND_EVERY = 0.05  # each streaming client: 20 messages a second
HANDOVERS = 3


def _rss(pid: int) -> int:
    total = 0
    for p in (pid, *children(pid)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class Releases:
    """pmlb copies under ``releases/vN``, one ``current`` symlink: the
    node runs from ``current``; a deploy points it at the next release."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.current = base / "current"
        self.n = 0

    def next(self) -> str:
        self.n += 1
        version = f"0.1.0+handover{self.n}"
        target = self.base / "releases" / f"v{self.n}"
        shutil.copytree(
            ROOT / "node" / "pmlb", target / "pmlb", ignore=shutil.ignore_patterns("__pycache__")
        )
        init = target / "pmlb" / "__init__.py"
        init.write_text(
            re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
        )
        tmp = self.base / "current.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(self.current)  # atomic, as `ln -sfn` + rename does
        return version


class Streamer:
    """Sends a numbered line every SEND_EVERY without waiting for answers;
    reads the echoes on the side and keeps what arrived, and when."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.sent = 0
        self.got: list[int] = []
        self.times: list[float] = []
        self.marks: set[bytes] = set()
        self.closed = ""
        self.stop = asyncio.Event()
        self.caught_up = asyncio.Event()  # stopped, and every answer is in

    async def run(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        read = asyncio.create_task(self._read(reader))
        try:
            while not self.stop.is_set() and not read.done():
                self.sent += 1
                writer.write(b"%d\n" % self.sent)
                await asyncio.sleep(SEND_EVERY)
            # Everything sent is answered within a bound, or counted lost.
            if len(self.got) >= self.sent:
                self.caught_up.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.caught_up.wait(), 15)
        finally:
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readuntil(b"\n")
                mark, _, text = line.rstrip(b"\n").split(b" ", 2)
                self.marks.add(mark)
                self.got.append(int(text))
                self.times.append(time.monotonic())
                if self.stop.is_set() and len(self.got) >= self.sent:
                    self.caught_up.set()
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.closed = repr(exc)

    def figures(self) -> tuple[int, int, int]:
        """(lost, duplicated, reordered)."""
        seen = set(self.got)
        lost = len(set(range(1, self.sent + 1)) - seen)
        duplicated = len(self.got) - len(seen)
        reordered = sum(1 for a, b in zip(self.got, self.got[1:], strict=False) if b < a)
        return lost, duplicated, reordered

    def gap_in(self, start: float, end: float) -> float:
        """The longest wait between two answers that overlaps [start, end]."""
        worst = 0.0
        for a, b in zip(self.times, self.times[1:], strict=False):
            if b >= start and a <= end:
                worst = max(worst, b - a)
        return worst


class Idle:
    def __init__(self) -> None:
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]] = []

    async def open(self, port: int, n: int) -> None:
        async def one(i: int) -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"idle%d\n" % i)
            mark = (await r.readuntil(b"\n")).split(b" ", 1)[0]
            self.conns.append((r, w, mark))

        for start in range(0, n, 250):  # 250 at a time: a burst, bounded
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 250))))

    async def check(self, word: bytes) -> tuple[int, int]:
        """Every idle client says ``word``: (closed, mark changed)."""

        async def one(r: asyncio.StreamReader, w: asyncio.StreamWriter, mark: bytes) -> str:
            try:
                w.write(word + b"\n")
                async with asyncio.timeout(20):
                    line = await r.readuntil(b"\n")
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                return "closed"
            return "ok" if line.split(b" ", 1)[0] == mark else "changed"

        out: list[str] = []
        for start in range(0, len(self.conns), 500):
            out += await asyncio.gather(*(one(*c) for c in self.conns[start : start + 500]))
        return out.count("closed"), out.count("changed")


@pytest.fixture
def successors() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start(cluster: Cluster, tmp_path: Path, releases: Releases) -> tuple[Node, Path]:
    releases.next()
    config = tmp_path / "node.toml"
    config.write_text('log-level = "info"\n')
    u1, u2 = cluster.echo("u1"), cluster.echo("u2")
    node = cluster.node(
        [f"u1={u1.addr}", f"u2={u2.addr}"],
        extra=["--config", str(config), "--max-connections", "0"],
        env={"PYTHONPATH": str(releases.current)},
    )
    return node, config


async def _taken(admin: int, old: int) -> dict[str, object]:
    def done() -> dict[str, object] | None:
        try:
            node = node_status(admin)
        except OSError:
            return None
        handover = node["handover"]
        assert isinstance(handover, dict)
        return node if node["pid"] != old and handover["state"] == "taken" else None

    node = await async_wait_until(done, 120, "the successor took over", step=0.1)
    assert isinstance(node, dict)
    await async_wait_until(lambda: not pid_alive(old), 60, "the old node exited", step=0.1)
    return node


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@pytest.mark.parametrize("workers", WORKERS, indirect=True)
async def test_three_handovers_under_load_then_a_failed_and_a_killed_successor(
    cluster: Cluster, tmp_path: Path, successors: list[int], workers: str
) -> None:
    releases = Releases(tmp_path)
    at = "one worker" if workers == "w1" else "default workers"
    node, config = await asyncio.to_thread(_start, cluster, tmp_path, releases)
    async with asyncio.timeout(900):
        idle = Idle()
        await idle.open(node.port, IDLE)
        streamers = [Streamer(i) for i in range(STREAMERS)]
        tasks = [asyncio.create_task(s.run(node.port)) for s in streamers]
        await async_wait_until(lambda: all(s.got for s in streamers), 30, "streaming")
        pid = node.proc.pid
        rss_before = _rss(pid)
        marks_total = IDLE + STREAMERS
        for n in range(HANDOVERS):
            version = releases.next()
            t0 = time.monotonic()
            os.kill(pid, signal.SIGUSR2)
            status = await _taken(node.admin, pid)
            took = time.monotonic() - t0
            new_pid = status["pid"]
            assert isinstance(new_pid, int)
            successors.append(new_pid)
            assert status["version"] == version, "the successor runs the new release"
            handover = status["handover"]
            assert isinstance(handover, dict)
            gaps = [s.gap_in(t0, t0 + took) for s in streamers]
            pid = new_pid
            moved = int(handover["marks_in"])
            record(
                f"{at}: handover {n + 1} of {HANDOVERS} to {version}",
                connections=marks_total,
                held=moved,
                note=(
                    f"{took:.1f} s from SIGUSR2 to done; {handover['transfer_seconds']} s "
                    f"transfer ({1000 * float(handover['transfer_seconds']) / max(1, moved):.2f} "
                    f"s per 1,000 marks); pause per streaming client p50 "
                    f"{1000 * _quantile(gaps, 0.5):.0f} ms, p99 {1000 * _quantile(gaps, 0.99):.0f}"
                    f" ms, max {1000 * max(gaps):.0f} ms; node-side pause per mark mean "
                    f"{handover['pause_mean_ms']} ms, max {handover['pause_max_ms']} ms"
                ),
            )
            assert moved == marks_total, handover
            assert _quantile(gaps, 0.99) < 1.0, f"p99 pause {_quantile(gaps, 0.99):.2f}s"
            # The next handover starts once streaming has gone on here a while.
            await asyncio.sleep(1.0)
        rss_after = _rss(pid)
        for s in streamers:
            s.stop.set()
        await asyncio.gather(*tasks)
        lost = sum(s.figures()[0] for s in streamers)
        duplicated = sum(s.figures()[1] for s in streamers)
        reordered = sum(s.figures()[2] for s in streamers)
        changed_s = sum(len(s.marks) != 1 for s in streamers)
        closed_s = sum(bool(s.closed) for s in streamers)
        closed_i, changed_i = await idle.check(b"after")
        record(
            f"{at}: {HANDOVERS} handovers in a row, totals",
            connections=marks_total,
            held=marks_total - closed_s - closed_i,
            sent=sum(s.sent for s in streamers),
            lost=lost,
            duplicated=duplicated,
            note=(
                f"reordered {reordered}; marks changed {changed_s + changed_i}; connections "
                f"closed {closed_s + closed_i}; node RSS {rss_before / 2**20:.0f} MiB before, "
                f"{rss_after / 2**20:.0f} MiB after"
            ),
        )
        assert (lost, duplicated, reordered) == (0, 0, 0)
        assert (closed_s, changed_s, closed_i, changed_i) == (0, 0, 0, 0)

        # 2. A successor that cannot start: the node serves on.
        config.write_text("not toml = = \n")
        os.kill(pid, signal.SIGUSR2)

        def failed() -> bool:
            handover = node_status(node.admin)["handover"]
            assert isinstance(handover, dict)
            return handover["state"] == "failed"

        await async_wait_until(failed, 120, "the handover failed", step=0.1)
        assert node_status(node.admin)["pid"] == pid
        closed_i, changed_i = await idle.check(b"still")
        record(
            f"{at}: successor fails to start (bad config)",
            connections=IDLE,
            held=IDLE - closed_i,
            lost=closed_i,
            note=f"marks changed {changed_i}; the node serves on",
        )
        assert (closed_i, changed_i) == (0, 0)
        config.write_text('log-level = "info"\n')

        # 3. A successor killed mid-handover.
        log_before = len(_logs(cluster))
        os.kill(pid, signal.SIGUSR2)
        await async_wait_until(
            lambda: "handover: took" in _logs(cluster)[log_before:], 120, "a batch taken", step=0.01
        )
        successor = _successor_pid(_logs(cluster)[log_before:])
        for victim in (*children(successor), successor):  # its workers first: a crash
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        await async_wait_until(failed, 120, "the handover failed", step=0.1)
        assert node_status(node.admin)["pid"] == pid
        closed_i, changed_i = await idle.check(b"survived")
        record(
            f"{at}: successor killed mid-handover",
            connections=IDLE,
            held=IDLE - closed_i,
            note=(
                f"{closed_i} clients closed (taken by the successor before it died); "
                f"marks changed {changed_i}; the node serves the rest"
            ),
        )
        assert changed_i == 0
        assert closed_i < IDLE, "the node kept what it still held"
        # Exactly the marks the successor had confirmed went with it.
        m = await asyncio.to_thread(scrape, node.admin)
        assert m['pmlb_handover_marks_total{direction="out"}'] == closed_i
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"new\n")
        assert (await r.readuntil(b"\n")).endswith(b" new\n"), "and accepts new clients"
        w.close()
        for _, w, _ in idle.conns:
            w.close()


def _logs(cluster: Cluster) -> str:
    return "".join(p.log() for p in cluster.procs if p.name.startswith("node-"))


def _successor_pid(log: str) -> int:
    found = re.findall(r"started the successor(?: node)? \(pid (\d+)\)", log)
    assert found, "no successor started"
    return int(found[-1])
