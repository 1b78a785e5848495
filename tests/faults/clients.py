"""Streaming clients for the fault suite: they count, rather than assert, so
every figure in the table is what the run measured."""

from __future__ import annotations

import asyncio
import time


def new_stats() -> dict[str, int]:
    return {"sent": 0, "received": 0, "lost": 0, "duplicated": 0, "mark_changes": 0}


async def stream(
    port: int,
    idx: int,
    n: int,
    started: asyncio.Event,
    stats: dict[str, int],
    gaps: list[float],
    seen: list[str] | None = None,
) -> None:
    """Send ``n`` numbered lines at a steady pace and read the echoes: a number
    skipped counts as lost, one seen again as duplicated, a reply naming
    another mark than the first as a mark change. ``gaps`` gets the time
    between consecutive replies (the longest is the recovery time); ``seen``,
    if given, the mark then the upstream id of every reply counted."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    last = time.monotonic()

    async def send() -> None:
        for i in range(n):
            w.write(f"c{idx}-{i}\n".encode())
            stats["sent"] += 1
            if i == 3:
                started.set()
            await asyncio.sleep(0.02)

    async def receive() -> None:
        nonlocal last
        expected = 0
        mark = ""
        while expected < n:
            line = (await r.readuntil(b"\n")).decode().rstrip("\n")
            first = line.split(" ", 1)[0]
            mark = mark or first
            if first != mark and " " in line:
                stats["mark_changes"] += 1
            num = int(line.rsplit("-", 1)[1])
            if num < expected:
                stats["duplicated"] += 1
                continue
            stats["lost"] += num - expected
            stats["received"] += 1
            if seen is not None:
                if not seen:
                    seen.append(mark)
                seen.append(line.split(" ", 2)[1])
            expected = num + 1
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    await asyncio.gather(send(), receive())
    w.close()
