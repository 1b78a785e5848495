"""A test upstream built with the SDK that journals every handler invocation.

It answers like ``pmlb echo-upstream`` (``<mark> <id> <message>``) and appends
``<mark> <seq> <id>`` to a journal file before handling each message, so the
fault suite can count, across every upstream process, how often each client
message was processed: more than once means it was *reprocessed* after a
failover (delivery to upstreams is at-least-once). The message ``crash`` ends
the process at once (``os._exit``), as a handler bug that kills the whole
process would.

    python -m tests.faults.journal_upstream --listen HOST:PORT --id ID --journal FILE
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pmlb.upstream import Conn, Handler, UpstreamServer


class Journaling(Handler):
    def __init__(self, uid: str, fd: int, closes_fd: int | None = None) -> None:
        self.uid = uid
        self.fd = fd
        self.closes_fd = closes_fd

    def on_open(self, conn: Conn) -> None:
        conn.state = f"{conn.mark} {self.uid} ".encode()

    def on_message(self, conn: Conn, data: bytes) -> None:
        # One write(2) per line on an O_APPEND file: whole lines, even when
        # several processes share the file or this one is killed.
        os.write(self.fd, f"{conn.mark} {conn.seq} {self.uid}\n".encode())
        if data == b"crash":
            os._exit(17)
        conn.send(conn.state + data)

    def on_close(self, conn: Conn, reason: str) -> None:
        # With --closes: ``<mark> <reason>`` for every mark the node closed here
        # (the partition suite checks what an upstream is told).
        if self.closes_fd is not None:
            os.write(self.closes_fd, f"{conn.mark} {reason}\n".encode())


def reprocessed(journals: Iterable[Path]) -> tuple[int, Counter[tuple[str, int]]]:
    """(handler invocations beyond the first per (mark, seq), the counts)."""
    counts: Counter[tuple[str, int]] = Counter()
    for path in journals:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            mark, seq, _ = line.split(" ")
            counts[(mark, int(seq))] += 1
    return sum(n - 1 for n in counts.values()), counts


async def _main(listen: str, uid: str, journal: str, closes: str | None) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    fd = os.open(journal, flags, 0o644)
    closes_fd = os.open(closes, flags, 0o644) if closes else None
    server = UpstreamServer(Journaling(uid, fd, closes_fd), upstream_id=uid, listen=listen)
    await server.start()
    await server.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--closes", help="append '<mark> <reason>' for every close here")
    a = p.parse_args()
    asyncio.run(_main(a.listen, a.id, a.journal, a.closes))
