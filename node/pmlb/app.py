"""The composition root: builds a node's parts from its config, starts them in
order, and stops them in the reverse order.

Start: data plane links (they connect in the background) -> listeners ->
admin. Stop (the first SIGTERM/SIGINT, or the ``stop`` event in tests): stop
accepting -> close every mark with ``node_shutdown`` (the upstreams are told)
-> flush links -> admin. Each step is bounded by ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import logging

from pmlb import __version__
from pmlb.config import NodeConfig
from pmlb.dataplane.plane import DataPlane
from pmlb.observability import metrics
from pmlb.observability.admin import AdminServer, json_body
from pmlb.observability.stats import NodeStats
from pmlb.upstream.echo import EchoHandler
from pmlb.upstream.sdk import UpstreamServer

log = logging.getLogger("pmlb.app")


class NodeApp:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.stats = NodeStats()
        self.plane = DataPlane(config, self.stats)
        self.admin: AdminServer | None = None
        if config.admin is not None:
            self.admin = AdminServer(*config.admin)
            self._routes(self.admin)

    async def start(self) -> None:
        self.plane.set_upstreams(self.config.upstreams)
        await self.plane.start()
        if self.admin is not None:
            await self.admin.start()
        log.info(
            "node %s (pmlb %s) ready: service %r, %d upstreams",
            self.config.node_id,
            __version__,
            self.config.service,
            len(self.config.upstreams),
        )

    async def stop(self) -> None:
        log.info("node %s stopping", self.config.node_id)
        await self.plane.stop(self.config.shutdown_timeout)
        if self.admin is not None:
            await self.admin.stop()
        log.info("node %s stopped", self.config.node_id)

    async def run(self, stop: asyncio.Event) -> int:
        await self.start()
        await stop.wait()
        await self.stop()
        return 0

    # -- admin --------------------------------------------------------------------

    def _routes(self, admin: AdminServer) -> None:
        plane = self.plane

        async def healthz(query: str) -> tuple[int, str, bytes]:
            return 200, "text/plain", b"ok\n"

        async def readyz(query: str) -> tuple[int, str, bytes]:
            ready = plane.accepting and bool(plane.routable())
            return (200 if ready else 503), "text/plain", b"ready\n" if ready else b"not ready\n"

        async def metrics_(query: str) -> tuple[int, str, bytes]:
            links = [(lk.id, lk.state, lk.load, lk.routable) for lk in plane.links.values()]
            return 200, "text/plain; version=0.0.4", metrics.render(self.stats, links)

        async def connections(query: str) -> tuple[int, str, bytes]:
            return (
                200,
                "application/json",
                json_body({"marks": [c.describe() for c in list(plane.marks.values())[:1000]]}),
            )

        admin.route("GET", "/healthz", healthz)
        admin.route("GET", "/readyz", readyz)
        admin.route("GET", "/metrics", metrics_)
        admin.route("GET", "/connections", connections)


async def run_echo(
    listen: str, upstream_id: str, plain: bool, window: int, stop: asyncio.Event
) -> int:
    server = UpstreamServer(
        EchoHandler(upstream_id, plain), upstream_id=upstream_id, listen=listen, window=window
    )
    await server.start()
    await stop.wait()
    await server.stop(1.0)
    return 0
