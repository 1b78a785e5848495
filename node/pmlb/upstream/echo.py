"""The example upstream: ``pmlb echo-upstream``.

Replies to each message with ``<mark> <id> <message>``, so a client can see
which mark it has and which upstream served it; with ``plain`` it echoes the
payload unchanged, which is what the benchmarks use.
"""

from __future__ import annotations

from pmlb.upstream.sdk import Conn, Handler


class EchoHandler(Handler):
    def __init__(self, upstream_id: str, plain: bool = False) -> None:
        self.upstream_id = upstream_id
        self.plain = plain
        self.opened = 0
        self.closed = 0

    def on_open(self, conn: Conn) -> None:
        self.opened += 1
        conn.state = f"{conn.mark} {self.upstream_id} ".encode()

    def on_message(self, conn: Conn, data: bytes) -> None:
        conn.send(data if self.plain else conn.state + data)

    def on_close(self, conn: Conn, reason: str) -> None:
        self.closed += 1
