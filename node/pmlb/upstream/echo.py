"""The example upstream: ``pmlb echo-upstream``.

Replies to each message with ``<mark> <id> <message>``, so a client can see
which mark it has and which upstream served it; with ``plain`` it echoes the
payload unchanged, which is what the benchmarks use.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pmlb.transport import ServerTLS
from pmlb.upstream.sdk import Conn, Handler, UpstreamServer

log = logging.getLogger("pmlb.upstream")


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


async def run_echo(
    listen: str,
    upstream_id: str,
    plain: bool,
    window: int,
    stop: asyncio.Event,
    *,
    tls: ServerTLS | None = None,
    token: str | None = None,
    transport: str | None = None,
    conformance: bool = False,
    allow_anonymous: bool = False,
) -> int:
    """``pmlb echo-upstream``: serve until ``stop`` is set."""
    provider: Any = None
    try:  # tracing is part of the node's dependencies, optional here
        from pmlb.observability.tracing import make_provider

        provider = make_provider("pmlb-echo-upstream", upstream_id, None)
    except ImportError as exc:
        log.info("tracing off: %s", exc)
    from pmlb.upstream.conformance import ConformanceHandler

    handler = ConformanceHandler() if conformance else EchoHandler(upstream_id, plain)
    server = UpstreamServer(
        handler,
        upstream_id=upstream_id,
        listen=listen,
        window=window,
        tracer_provider=provider,
        tls=tls,
        token=token,
        allow_anonymous=allow_anonymous,
        transport=transport,
    )
    if isinstance(handler, ConformanceHandler):
        handler.server = server
    await server.start()
    await stop.wait()
    await server.stop(1.0)
    if provider is not None:
        await asyncio.to_thread(provider.shutdown)
    return 0
