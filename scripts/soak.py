"""`make soak`: minutes of steady churn against one node; RSS, fds and tasks must stay flat.

Starts two `pmlb echo-upstream` and one node (line framing) on loopback, then for
DURATION seconds keeps LONG long-lived clients streaming and opens, uses and
closes short connections at RATE per second (bounded, loopback only). Every
5 s it samples the node's RSS, open fds and asyncio tasks (from /metrics).
Prints the samples and a verdict: the second half must not grow by more than
10 % (RSS) or any fds/tasks beyond the connections open at that moment.

    python scripts/soak.py [DURATION_S] [RATE] [LONG]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(admin: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return -1.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def long_client(port: int, stop: asyncio.Event, errors: list[str]) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    while not stop.is_set():
        w.write(f"long-{n}\n".encode())
        line = await asyncio.wait_for(r.readuntil(b"\n"), 10)
        if not line.endswith(f"long-{n}\n".encode()):
            errors.append(f"long client got {line!r}")
        n += 1
        await asyncio.sleep(0.1)
    w.close()


async def short_client(port: int, errors: list[str]) -> None:
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for i in range(3):
            w.write(f"short-{i}\n".encode())
            await asyncio.wait_for(r.readuntil(b"\n"), 10)
        w.close()
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        errors.append(f"short client: {exc!r}")


async def soak(duration: float, rate: int, long_n: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="pmlb-soak-"))
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", "pmlb", *args, "--log-level", "warning"],
            stdout=(tmp / f"p{len(procs)}.log").open("wb"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        procs.append(p)
        return p

    try:
        ups = []
        for uid in ("u1", "u2"):
            port = free_port()
            spawn("echo-upstream", "--id", uid, "--listen", f"127.0.0.1:{port}")
            ups.append(f"{uid}=127.0.0.1:{port}")
        port, admin = free_port(), free_port()
        node = spawn(
            "node",
            "--workers",
            "1",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            f"127.0.0.1:{admin}",
            "--framing",
            "line",
            "--upstream",
            ups[0],
            "--upstream",
            ups[1],
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if metric(admin, 'pmlb_upstream_up{upstream="u2"}') == 1:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        stop = asyncio.Event()
        errors: list[str] = []
        longs = [asyncio.create_task(long_client(port, stop, errors)) for _ in range(long_n)]
        samples = []
        churned = 0
        t0 = time.monotonic()
        next_sample = t0
        pending: set[asyncio.Task[None]] = set()
        while time.monotonic() - t0 < duration:
            for _ in range(max(1, rate // 10)):
                task = asyncio.create_task(short_client(port, errors))
                pending.add(task)
                task.add_done_callback(pending.discard)
                churned += 1
            if time.monotonic() >= next_sample:
                samples.append(
                    (
                        round(time.monotonic() - t0),
                        rss_kb(node.pid),
                        len(os.listdir(f"/proc/{node.pid}/fd")),
                        int(metric(admin, "pmlb_asyncio_tasks")),
                        int(metric(admin, "pmlb_marks_open")),
                    )
                )
                next_sample += 5
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*longs, *pending, return_exceptions=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
    print(
        f"soak {duration:.0f}s: {churned} short connections, {long_n} long-lived streaming, "
        f"{len(errors)} errors"
    )
    print("| t (s) | RSS (KB) | fds | tasks | marks open |\n|---|---|---|---|---|")
    for s in samples:
        print("| " + " | ".join(map(str, s)) + " |")
    half = samples[len(samples) // 2 :]
    rss_growth = (half[-1][1] - half[0][1]) / half[0][1] if half else 0.0
    flat = rss_growth <= 0.10 and max(s[2] - s[4] for s in half) < 64
    print(
        f"second half RSS growth {rss_growth * 100:.1f} %, "
        f"fds beyond open marks <= {max(s[2] - s[4] for s in half)}: "
        f"{'FLAT' if flat else 'GROWING'}"
    )
    for e in errors[:5]:
        print("error:", e)
    return 0 if flat and not errors else 1


if __name__ == "__main__":
    a = sys.argv[1:]
    sys.exit(
        asyncio.run(
            soak(
                float(a[0]) if a else 180.0,
                int(a[1]) if len(a) > 1 else 200,
                int(a[2]) if len(a) > 2 else 50,
            )
        )
    )
