"""The data plane of one node: listeners, the mark registry, links and routing.

DataPlane is what the composition root builds and starts. It owns:

* the listening sockets (one ClientConn protocol per accepted connection);
* ``marks``, every mark this node holds, by mark string (links dispatch
  upstream frames through it, which is what lets any upstream reach any mark);
* the links, one per configured upstream, and the balancer that picks one for
  each new mark among the routable ones;
* the queue of clients waiting (bounded in time) for a routable upstream.

Upstreams come from ``set_upstreams`` - static flags today, etcd discovery
later; the plane does not care where the list comes from.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterable
from typing import Final

from pmlb import wire
from pmlb.config import NodeConfig, UpstreamSpec, format_hostport
from pmlb.dataplane.balancer import make_balancer
from pmlb.dataplane.conn import BOUND, CLIENT_EOF, ClientConn
from pmlb.dataplane.framing import Decoder, encoder_for, make_decoder
from pmlb.dataplane.link import Link
from pmlb.ids import MarkFactory
from pmlb.observability.stats import NodeStats

log = logging.getLogger("pmlb.plane")

MAX_META_BYTES: Final = 16_384
SERVING: Final = "SERVING"
UNKNOWN: Final = "UNKNOWN"


class DataPlane:
    def __init__(self, config: NodeConfig, stats: NodeStats | None = None) -> None:
        self.config = config
        self.stats = stats or NodeStats()
        self.marks: dict[str, ClientConn] = {}
        self.links: dict[str, Link] = {}
        self.waiting: dict[ClientConn, None] = {}  # insertion-ordered set
        self.balancer = make_balancer(config.balancer)
        self.factory = MarkFactory(config.node_id)
        self.encode = encoder_for(config.framing)
        self.max_frame = config.max_frame
        self.max_meta = MAX_META_BYTES
        # Return credit in chunks of half a window (like HTTP/2 WINDOW_UPDATE),
        # so small messages do not each cost a Flow frame.
        self.grant_threshold = max(1, config.window // 2)
        self.write_hard_limit = config.client_buffer + 2 * config.window
        self.listener_name = format_hostport(*config.listen[0])
        self.servers: list[asyncio.Server] = []
        self.accepting = False
        self.started_at = time.time()
        self._retired: list[Link] = []
        self._idle = asyncio.Event()

    # -- wiring -------------------------------------------------------------------

    def new_decoder(self) -> Decoder:
        return make_decoder(self.config.framing, self.config.max_frame)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.config.listen:
            server = await loop.create_server(
                lambda: ClientConn(self),
                host,
                port,
                backlog=self.config.backlog,
                reuse_address=True,
            )
            self.servers.append(server)
            for sock in server.sockets:
                log.info(
                    "listening on %s for service %r (%s framing)",
                    format_hostport(*sock.getsockname()[:2]),
                    self.config.service,
                    self.config.framing,
                )
        self.accepting = True

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self.servers for s in srv.sockets]

    def set_upstreams(self, specs: Iterable[UpstreamSpec]) -> None:
        """Make the link set match ``specs``: start new ones, update, retire gone ones."""
        wanted = {s.id: s for s in specs}
        for uid, link in list(self.links.items()):
            spec = wanted.get(uid)
            if spec is None or spec.addr != link.spec.addr:
                del self.links[uid]
                self._retire(link)
        for uid, spec in wanted.items():
            existing = self.links.get(uid)
            if existing is None:
                link = Link(spec, self)
                self.links[uid] = link
                link.start()
                log.info(
                    "upstream %s at %s added (weight %d%s)",
                    uid,
                    spec.addr,
                    spec.weight,
                    ", draining" if spec.drain else "",
                )
            elif existing.spec != spec:
                log.info(
                    "upstream %s changed: weight %d -> %d, drain %s -> %s, health %s -> %s",
                    uid,
                    existing.spec.weight,
                    spec.weight,
                    existing.spec.drain,
                    spec.drain,
                    existing.spec.health,
                    spec.health,
                )
                existing.spec = spec
        self._bind_waiting()

    def _retire(self, link: Link) -> None:
        # Existing marks stay until they close; no new marks go there.
        link.retired = True
        log.info(
            "upstream %s at %s removed; %d marks stay on it until they close",
            link.id,
            link.spec.addr,
            len(link.marks),
        )
        if link.marks:
            self._retired.append(link)
        else:
            link.stop()

    def routable(self) -> list[Link]:
        """The routing rule: up, registered, not draining, and SERVING; when none
        is SERVING, those with no health entry (UNKNOWN); never NOT_SERVING.
        A link that is down is out at once (the passive check)."""
        usable = [link for link in self.links.values() if link.routable]
        serving = [link for link in usable if link.spec.health == SERVING]
        return serving or [link for link in usable if link.spec.health == UNKNOWN]

    # -- marks -----------------------------------------------------------------------

    def accept(self, conn: ClientConn) -> None:
        stats = self.stats
        stats.accepted += 1
        stats.open += 1
        conn.mark = mark = self.factory.next()
        self.marks[mark] = conn
        self._idle.clear()
        link = self.balancer.pick(self.routable(), _client_key(conn.client_addr))
        if link is not None:
            conn.bind(link)
        else:
            self.waiting[conn] = None
            conn.wait_for_upstream(self.config.connect_timeout)
            log.info(
                "mark=%s client=%s:%d waiting for a routable upstream",
                mark,
                conn.client_addr,
                conn.client_port,
            )

    def unwait(self, conn: ClientConn) -> None:
        self.waiting.pop(conn, None)

    def forget(self, conn: ClientConn) -> None:
        if self.marks.pop(conn.mark, None) is None:
            return
        stats = self.stats
        stats.open -= 1
        reason = conn.close_reason or wire.CLIENT_CLOSED
        stats.closed[reason] += 1
        log.info(
            "mark=%s client=%s:%d closed reason=%s upstream=%s in=%d/%d out=%d/%d",
            conn.mark,
            conn.client_addr,
            conn.client_port,
            reason,
            conn.link.id if conn.link else "-",
            conn.frames_in,
            conn.bytes_in,
            conn.frames_out,
            conn.bytes_out,
        )
        if not self.marks:
            self._idle.set()

    def _bind_waiting(self) -> None:
        if not self.waiting:
            return
        targets = self.routable()
        if not targets:
            return
        for conn in list(self.waiting):
            picked = self.balancer.pick(targets, _client_key(conn.client_addr))
            if picked is None:
                return
            del self.waiting[conn]
            conn.bind(picked)

    # -- link events ------------------------------------------------------------------

    def link_up(self, link: Link) -> None:
        self._bind_waiting()

    def link_down(self, link: Link) -> None:
        for conn in list(link.marks.values()):
            conn.on_link_lost()
        link.marks.clear()
        # Marks that half-closed but still hold this link only waited for its
        # last replies; there will be none.
        for conn in list(self.marks.values()):
            if conn.link is link and conn.state == CLIENT_EOF:
                conn.close(wire.UPSTREAM_LOST, "link lost while lingering", notify=False)

    # -- shutdown -------------------------------------------------------------------------

    async def stop(self, timeout: float, reason: str = wire.NODE_SHUTDOWN) -> None:
        """Stop accepting, close every mark with ``reason``, flush links, stop."""
        self.accepting = False
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + timeout
        open_marks = list(self.marks.values())
        if open_marks:
            log.info("closing %d marks (%s)", len(open_marks), reason)
        for conn in open_marks:
            conn.close(reason, "", notify=conn.state == BOUND)
        # Let transports flush and links carry the closes out, bounded.
        if self.marks:
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                log.warning(
                    "%d client connections did not finish in time; aborting them", len(self.marks)
                )
                for conn in list(self.marks.values()):
                    if conn.transport is not None:
                        conn.transport.abort()
        links = list(self.links.values()) + self._retired
        await asyncio.gather(
            *(link.close(max(0.1, deadline - time.monotonic())) for link in links),
            return_exceptions=True,
        )
        for server in self.servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def _client_key(addr: str) -> bytes:
    try:
        return ipaddress.ip_address(addr).packed
    except ValueError:
        return addr.encode()
