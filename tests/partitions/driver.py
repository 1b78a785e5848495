"""Streaming clients for the partition suite, run inside the clients' namespace.

    python -m tests.partitions.driver --node HOST:PORT --clients N --messages M
        [--interval S] [--size BYTES] [--deadline S] --out FILE.json

Each client connects, sends M numbered lines at a steady pace and reads the
echoes (``<mark> <upstream> <line>`` from the journaling upstream). It counts
rather than asserts, so every figure is what the run measured: a number
skipped is lost, one seen again duplicated, a reply naming another mark a
mark change; the longest gap between two replies is the client's stall. The
JSON written at the end holds the totals and each client's mark and the
upstreams it saw. Clients that cannot finish by ``--deadline`` are counted as
``unfinished`` with what they had.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any


async def client(
    host: str, port: int, idx: int, args: argparse.Namespace, out: dict[str, Any]
) -> None:
    stats = out["clients"][idx]
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, TimeoutError) as exc:
        stats["error"] = f"connect: {exc!r}"
        return
    stats["connected_at"] = time.time()
    pad = "." * max(0, args.size - 16)
    last = time.monotonic()

    async def send() -> None:
        for i in range(args.messages):
            w.write(f"c{idx}-{i}{pad}\n".encode())
            stats["sent"] += 1
            await w.drain()
            await asyncio.sleep(args.interval)

    async def receive() -> None:
        nonlocal last
        expected = 0
        while expected < args.messages:
            raw = await r.readuntil(b"\n")
            mark, upstream, text = raw.decode().rstrip("\n").split(" ", 2)
            if not stats["mark"]:
                stats["mark"] = mark
            elif mark != stats["mark"]:
                stats["mark_changes"] += 1
            num = int(text.split("-", 1)[1].rstrip("."))
            if num < expected:
                stats["duplicated"] += 1
                continue
            stats["lost"] += num - expected
            stats["received"] += 1
            expected = num + 1
            if not stats["upstreams"] or stats["upstreams"][-1] != upstream:
                stats["upstreams"].append(upstream)
            now = time.monotonic()
            stats["max_gap_s"] = max(stats["max_gap_s"], now - last)
            last = now

    try:
        await asyncio.gather(send(), receive())
        stats["finished"] = True
        stats["duration_s"] = time.time() - stats["connected_at"]
        # --hold: stay connected, silent, for this long (the client-side cut).
        if args.hold:
            stats["holding"] = True
            await asyncio.sleep(args.hold)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        stats["error"] = repr(exc)
    finally:
        w.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.node.rpartition(":")
    out: dict[str, Any] = {
        "clients": [
            {
                "sent": 0,
                "received": 0,
                "lost": 0,
                "duplicated": 0,
                "mark_changes": 0,
                "max_gap_s": 0.0,
                "mark": "",
                "upstreams": [],
                "finished": False,
            }
            for _ in range(args.clients)
        ]
    }
    tasks = [
        asyncio.create_task(client(host, int(port), i, args, out)) for i in range(args.clients)
    ]
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cs = out["clients"]
    out["totals"] = {
        k: sum(c[k] for c in cs) for k in ("sent", "received", "lost", "duplicated", "mark_changes")
    }
    out["totals"]["unfinished"] = sum(not c["finished"] for c in cs)
    out["totals"]["max_gap_s"] = max((c["max_gap_s"] for c in cs), default=0.0)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--node", required=True)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--hold", type=float, default=0.0)
    p.add_argument("--out", required=True)
    parsed = p.parse_args()
    Path(parsed.out).write_text(json.dumps(asyncio.run(main(parsed))))
