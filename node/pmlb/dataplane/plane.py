"""The data plane of one node: listeners, the mark registry, links and routing.

DataPlane is what the composition root builds and starts. It owns:

* the listening sockets (one ClientConn protocol per accepted connection);
* ``marks``, every mark this node holds, by mark string (links dispatch
  upstream frames through it, which is what lets any upstream reach any mark);
* the links, one per configured upstream, and the balancer that picks one for
  each new mark among the routable ones;
* the queue of clients waiting (bounded in time) for a routable upstream.

Upstreams come from ``set_upstreams`` (static flags, or etcd discovery
through the composition root); the plane does not care where the list comes
from. In a node of several workers, ``siblings`` and ``probation`` (see
pmlb.dataplane.siblings) are what this worker shares with the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from typing import Final, Protocol

from pmlb.aio import wait_event
from pmlb.config import NodeConfig
from pmlb.dataplane.acceptor import Acceptor
from pmlb.dataplane.balancer import make_balancer
from pmlb.dataplane.conn import BOUND, CLIENT_EOF, CLOSING, MOVING, ClientConn
from pmlb.dataplane.framing import Decoder, encoder_for, make_decoder
from pmlb.dataplane.link import Link, LinkSettings
from pmlb.dataplane.mark import MarkLimits
from pmlb.dataplane.placement import Placement
from pmlb.dataplane.probation import Probation
from pmlb.dataplane.siblings import NodeCounters, NodeProbation, Siblings
from pmlb.dataplane.upstreams import UpstreamLink, Upstreams
from pmlb.dataplane.watch import MarkWatch
from pmlb.observability.logs import fields
from pmlb.observability.stats import HandoverStats, NodeStats
from pmlb.observability.tracing import ConnTracer
from pmlb.protocol import reasons
from pmlb.protocol.domain import UpstreamSpec, format_hostport
from pmlb.protocol.ids import MarkFactory
from pmlb.tlsconf import ListenerTLS, upstream_channel_credentials
from pmlb.transport import ClientTLS

log = logging.getLogger("pmlb.plane")

# Closed marks the admin API (and dashboard) still describes, newest last.
RECENTLY_CLOSED: Final = 512
# How often a worker paused at --max-connections looks whether its siblings'
# clients left room.
LIMIT_POLL: Final = 0.05


class Claims(Protocol):
    """A handover batch being let go (dataplane.handoff.Release)."""

    def claim(self, conn: ClientConn) -> bool: ...


class DataPlane:
    def __init__(
        self,
        config: NodeConfig,
        stats: NodeStats | None = None,
        tracer: ConnTracer | None = None,
        siblings: Siblings | None = None,
        probation: NodeProbation | None = None,
        counters: NodeCounters | None = None,
    ) -> None:
        self.config = config
        self.link_settings = LinkSettings.of(config)
        self.siblings = siblings
        self.counters = counters
        self._limit_poll: asyncio.TimerHandle | None = None
        self.stats = stats or NodeStats()
        self.tracer = tracer or ConnTracer(config.node_id, config.service, None)
        self.marks: dict[str, ClientConn] = {}
        self.upstreams = Upstreams(
            lambda spec: Link(spec, self),
            self.stats,
            lambda: self.config.drain_rate,
            self._bind_waiting,
        )
        self.links = self.upstreams.links  # by id (the admin API and tests read it)
        self.placement = Placement(
            make_balancer(config.balancer),
            Probation(probation),
            self.routable,
            lambda: self.config.connect_timeout,
        )
        self.factory = MarkFactory(
            config.node_id, worker=siblings.index if siblings is not None else None
        )
        self.encode = encoder_for(config.framing)
        self.max_frame = config.max_frame
        self.max_meta = config.max_meta
        # Return credit in chunks of half a window (like HTTP/2 WINDOW_UPDATE),
        # so small messages do not each cost a Flow frame.
        self.grant_threshold = max(1, config.window // 2)
        self.mark_limits = MarkLimits(config.replay_buffer, self.grant_threshold)
        self.write_hard_limit = config.client_buffer + 2 * config.window
        self.listener_name = format_hostport(*config.listen[0])
        self.proxy_trusted = [ipaddress.ip_network(n) for n in config.proxy_trusted]
        self.tls = (
            ListenerTLS(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert and config.tls_key
            else None
        )
        self.upstream_credentials = upstream_channel_credentials(
            config.upstream_ca, config.upstream_cert, config.upstream_key
        )
        # The same files for the links, whichever transport they use.
        self.link_tls = (
            ClientTLS(config.upstream_ca, config.upstream_cert, config.upstream_key)
            if config.upstream_ca or config.upstream_cert
            else None
        )
        self.acceptors: list[Acceptor] = []
        self.accepting = False
        self.started_at = time.time()
        self._idle = asyncio.Event()
        self.per_client: dict[str, int] = {}
        self._limit_logged = 0.0
        self._sweeper: asyncio.Task[None] | None = None
        self._raw_decoder: Decoder | None = None
        self.recently_closed: dict[str, dict[str, object]] = {}
        self.watch = MarkWatch()
        self.handover_stats = HandoverStats()
        self.handoff: Claims | None = None  # a handover batch on its way out

    def reconfigure(self, config: NodeConfig) -> None:
        """Take a reloaded config (only config.RELOADABLE fields differ): the
        plane and its marks read timeouts and limits from ``self.config`` when
        they use them; cached copies and the sweeper follow here."""
        limits_before = (self.config.idle_timeout, self.config.max_lifetime)
        self.config = config
        self.link_settings = LinkSettings.of(config)
        self.max_meta = config.max_meta
        for acceptor in self.acceptors:
            acceptor.set_rate(config.accept_rate)
            acceptor.keepalive = config.client_keepalive
        if (config.idle_timeout, config.max_lifetime) != limits_before:
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
            self.start_sweeper()

    # -- wiring -------------------------------------------------------------------

    def expects_proxy(self, addr: str) -> bool:
        """Whether a connection from ``addr`` must start with a PROXY header."""
        if not self.proxy_trusted or not addr:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.proxy_trusted)

    def _proxy_failed(self, addr: str, port: int, why: str) -> None:
        self.stats.proxy_errors += 1
        log.warning("client=%s:%d (trusted proxy) closed: %s", addr, port, why)

    def new_decoder(self) -> Decoder:
        # Raw framing keeps no state between reads: one decoder serves every
        # connection (a few dozen bytes less per idle mark).
        if self.config.framing == "raw":
            if self._raw_decoder is None:
                self._raw_decoder = make_decoder("raw", self.config.max_frame)
            return self._raw_decoder
        return make_decoder(self.config.framing, self.config.max_frame)

    async def start(self, socks: list[socket.socket] | None = None) -> None:
        """Listen on the configured addresses, or on ``socks``: the listeners
        the node's previous process handed over, in the same order."""
        for i, (host, port) in enumerate(self.config.listen):
            acceptor = Acceptor(
                host,
                port,
                self.config.backlog,
                lambda header: ClientConn(self, header),
                self._at_limit,
                ssl_context=self.tls.context if self.tls else None,
                handshake_timeout=self.config.proxy_timeout if self.tls else None,
                rate=self.config.accept_rate,
                proxy_before_tls=self.expects_proxy if self.proxy_trusted else None,
                proxy_failed=self._proxy_failed,
                reuse_port=self.config.reuse_port,
                keepalive=self.config.client_keepalive,
                gate=_Admission(self) if self.counters is not None else None,
                counted=self.publish_open if self.counters is not None else None,
                sock=socks[i] if socks else None,
            )
            self.acceptors.append(acceptor)
            log.info(
                "listening on %s for service %r (%s framing%s)",
                format_hostport(*acceptor.address),
                self.config.service,
                self.config.framing,
                ", TLS" if self.tls else "",
            )
        self.accepting = True
        self.start_sweeper()

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        return [a.address for a in self.acceptors]

    def publish_open(self, extra: int = 0) -> None:
        """This worker's client sockets (open or being set up, plus ``extra``
        just accepted) in its slot of the node's counters."""
        if self.counters is not None:
            held = self.stats.open + sum(a.in_flight for a in self.acceptors) + extra
            self.counters.publish(held)

    def _at_limit(self) -> bool:
        limit = self.config.max_connections
        if not limit:
            return False
        if self.counters is None:
            # Count sockets accepted but not yet set up, or a burst would overshoot.
            return self.stats.open + sum(a.in_flight for a in self.acceptors) >= limit
        full = self.counters.total() >= limit  # every worker's, in flight included
        if full and self._limit_poll is None:
            # A sibling's client leaving frees room without telling us: look again.
            self._limit_poll = asyncio.get_running_loop().call_later(
                LIMIT_POLL, self._recheck_limit
            )
        return full

    def _recheck_limit(self) -> None:
        self._limit_poll = None
        if not self.accepting:
            return
        for acceptor in self.acceptors:
            if acceptor.paused_at_limit and not self._at_limit():
                acceptor.resume()

    # -- marks -----------------------------------------------------------------------

    def accept(self, conn: ClientConn) -> None:
        stats = self.stats
        stats.accepted += 1
        stats.open += 1
        self.publish_open()
        conn.mark = mark = self.factory.next()
        self.marks[mark] = conn
        self._idle.clear()
        conn.last_active = time.monotonic()
        cfg = self.config
        if cfg.max_per_client:
            n = self.per_client.get(conn.client_addr, 0) + 1
            self.per_client[conn.client_addr] = n
            if n > cfg.max_per_client:
                self._refuse(conn, reasons.CLIENT_LIMIT, f"over {cfg.max_per_client} per client")
                return
        # A safety net: the acceptors keep the node (every worker) within it.
        if cfg.max_connections and stats.open > cfg.max_connections:
            self._refuse(conn, reasons.NODE_FULL, f"over {cfg.max_connections} connections")
            return
        if self.tracer.enabled:
            conn.span = self.tracer.start(conn)
        if self.watch.watchers:
            self.watch.changed(conn)
        log.info(
            "mark=%s client=%s:%d accepted",
            mark,
            conn.client_addr,
            conn.client_port,
            extra=fields(
                mark=mark,
                client=f"{conn.client_addr}:{conn.client_port}",
                trace_id=self.tracer.trace_id(conn.span),
            ),
        )
        if not self.placement.place_new(conn):
            log.info(
                "mark=%s client=%s:%d waiting for a routable upstream",
                mark,
                conn.client_addr,
                conn.client_port,
            )

    def _refuse(self, conn: ClientConn, reason: str, detail: str) -> None:
        self.stats.limited[reason] += 1
        now = time.monotonic()
        if now - self._limit_logged > 1.0:  # a flood must not flood the log too
            self._limit_logged = now
            log.warning(
                "client=%s:%d refused (%s: %s); %d refused so far",
                conn.client_addr,
                conn.client_port,
                reason,
                detail,
                self.stats.limited[reason],
            )
        conn.close(reason, detail, abort=True)

    def start_sweeper(self) -> None:
        """Idle timeout and max lifetime: one periodic pass, no timer per connection."""
        cfg = self.config
        limits = [t for t in (cfg.idle_timeout, cfg.max_lifetime) if t]
        if limits:
            period = min(10.0, max(0.1, min(limits) / 4))
            self._sweeper = asyncio.get_running_loop().create_task(_sweep(self, period))

    def forget(self, conn: ClientConn) -> None:
        if self.marks.pop(conn.mark, None) is None:
            return
        if self.watch.watchers:
            self.watch.closed(conn)
        stats = self.stats
        stats.open -= 1
        self.publish_open()
        reason = conn.close_reason or reasons.CLIENT_CLOSED
        stats.closed[reasons.label(reason)] += 1
        if conn.accepted_ms:
            stats.connection_duration.observe(max(0.0, time.time() - conn.accepted_ms / 1000))
        self.uncount_client(conn.client_addr)
        # The dashboard shows a closed mark's reason for a while (bounded).
        gone = conn.describe()
        gone.update(state="closed", close_reason=reason, closed_at_unix_ms=int(time.time() * 1000))
        gone["trace_id"] = self.tracer.trace_id(conn.span) or ""
        self.recently_closed[conn.mark] = gone
        if len(self.recently_closed) > RECENTLY_CLOSED:
            self.recently_closed.pop(next(iter(self.recently_closed)))
        _closed(conn, reason, self.tracer)
        if not self.marks:
            self._idle.set()
        if self.config.max_connections and self.accepting:
            for acceptor in self.acceptors:
                if acceptor.paused_at_limit and not self._at_limit():
                    acceptor.resume()

    # -- placing marks on links (dataplane.placement) -------------------------------------

    def _bind_waiting(self) -> None:
        self.placement.bind_waiting()

    def rebind(self, conn: ClientConn) -> None:
        if self.handoff is None or not self.handoff.claim(conn):
            self.placement.rebind(conn)

    def adopt(self, conn: ClientConn) -> None:
        """A mark the node's previous process handed over (dataplane.handoff):
        counted (--max-per-client too), never refused: it was admitted."""
        self.stats.open += 1
        self.publish_open()
        self.marks[conn.mark] = conn
        self._idle.clear()
        if self.config.max_per_client:
            self.per_client[conn.client_addr] = self.per_client.get(conn.client_addr, 0) + 1

    def uncount_client(self, addr: str) -> None:
        """A connection of ``addr`` left (closed, or handed over)."""
        if self.config.max_per_client:
            left = self.per_client.get(addr, 1) - 1
            if left > 0:
                self.per_client[addr] = left
            else:
                self.per_client.pop(addr, None)

    def unwait(self, conn: ClientConn) -> None:
        self.placement.unwait(conn)

    def cleared(self, conn: ClientConn) -> None:
        self.placement.cleared(conn)

    def probation_left(self, link: UpstreamLink, conn: ClientConn) -> None:
        self.placement.probation_left(link, conn)

    def probation_broke(self, link: UpstreamLink) -> None:
        self.placement.probation_broke(link)

    def set_upstreams(self, specs: Iterable[UpstreamSpec]) -> None:
        """Make the link set match ``specs`` (dataplane.upstreams)."""
        self.upstreams.set(specs)

    def routable(self) -> list[UpstreamLink]:
        return self.upstreams.routable()

    def link_up(self, link: UpstreamLink) -> None:
        if link.watch_marks:
            self.watch.add(link, self.marks.values())
        self._bind_waiting()

    def link_down(self, link: UpstreamLink) -> None:
        """Fail every mark of ``link`` over to another upstream (same mark, replay);
        a mark whose frames broke the previous link as well is closed (poison)."""
        self.watch.remove(link)
        affected = [
            c
            for c in self.marks.values()
            if c.route is link and c.state in (BOUND, MOVING, CLIENT_EOF)
        ]
        if affected:
            link.failed_over += len(affected)
            log.warning("upstream %s lost: resuming %d marks elsewhere", link.id, len(affected))
        for conn in affected:
            conn.on_link_lost()
        link.marks.clear()

    # -- shutdown -------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.accepting = False
        for acceptor in self.acceptors:
            acceptor.close()

    async def drain(self, timeout: float, window: float) -> None:
        """Keep serving open marks up to ``timeout``, then close what is left
        spread over ``window`` (no reconnect storm), reason node_draining."""
        self.stop_accepting()
        if self.marks:
            log.info("draining: %d marks open; waiting up to %.0fs", len(self.marks), timeout)
            await wait_event(self._idle, timeout)
        left = list(self.marks.values())
        if not left:
            return
        log.info("drain timeout: closing %d marks over %.1fs", len(left), window)
        gap = window / len(left)
        for conn in left:
            if conn.span is not None:
                self.tracer.child(conn.span, "pmlb.drain", {"pmlb.mark": conn.mark})
            conn.close(reasons.NODE_DRAINING, "node draining", notify=True)
            await asyncio.sleep(gap)

    async def stop(self, timeout: float, reason: str = reasons.NODE_SHUTDOWN) -> None:
        """Stop accepting, close every mark with ``reason``, flush links, stop."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        open_marks = list(self.marks.values())
        if open_marks:
            log.info("closing %d marks (%s)", len(open_marks), reason)
        for conn in open_marks:
            conn.close(reason, "", notify=conn.state in (BOUND, MOVING))
        # Let transports flush and links carry the closes out, bounded.
        if self.marks and not await wait_event(self._idle, max(0.0, deadline - time.monotonic())):
            log.warning(
                "%d client connections did not finish in time; aborting them", len(self.marks)
            )
            for conn in list(self.marks.values()):
                if conn.transport is not None:
                    conn.transport.abort()
        self.upstreams.stop_migrations()
        if self._sweeper is not None:
            self._sweeper.cancel()
        links = self.upstreams.all()
        await asyncio.gather(
            *(link.close(max(0.1, deadline - time.monotonic())) for link in links),
            return_exceptions=True,
        )


class _Admission:
    """The acceptors' gate in a node of several workers: the node-wide
    admission lock, taken only while --max-connections is set (it may be set
    or lifted by SIGHUP)."""

    __slots__ = ("_locked", "_plane")

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._locked = False

    def __enter__(self) -> None:
        counters = self._plane.counters
        if counters is not None and self._plane.config.max_connections:
            counters.__enter__()
            self._locked = True

    def __exit__(self, *exc: object) -> None:
        if self._locked:
            self._locked = False
            assert self._plane.counters is not None
            self._plane.counters.__exit__()


def _closed(conn: ClientConn, reason: str, tracer: ConnTracer) -> None:
    """The line (and the trace's end) every closed mark gets."""
    log.info(
        "mark=%s client=%s:%d closed reason=%s upstream=%s in=%d/%d out=%d/%d",
        conn.mark,
        conn.client_addr,
        conn.client_port,
        reasons.for_log(reason),
        conn.route.id if conn.route else "-",
        conn.frames_in,
        conn.bytes_in,
        conn.frames_out,
        conn.bytes_out,
        extra=fields(
            mark=conn.mark,
            client=f"{conn.client_addr}:{conn.client_port}",
            upstream=conn.route.id if conn.route else "",
            reason=reason,
            trace_id=tracer.trace_id(conn.span),
        ),
    )
    if conn.span is not None:
        upstreams = [
            v for k, v in sorted(conn.span.attributes.items()) if k.startswith("pmlb.upstream.")
        ]
        tracer.end(conn, upstreams)


async def _sweep(plane: DataPlane, period: float) -> None:
    """The sweeper's loop: idle timeout and max lifetime (DataPlane.start_sweeper)."""
    while True:
        cfg = plane.config
        await asyncio.sleep(period)
        now = time.monotonic()
        idle_before = now - cfg.idle_timeout if cfg.idle_timeout else -1.0
        wall_ms = time.time() * 1000
        for conn in list(plane.marks.values()):
            if conn.state >= CLOSING:
                continue
            if cfg.idle_timeout and conn.last_active < idle_before:
                conn.close(reasons.IDLE_TIMEOUT, f"silent for {cfg.idle_timeout:g}s")
            elif cfg.max_lifetime:
                # Jitter (up to -10%, stable per mark) spreads reconnects out.
                life = cfg.max_lifetime * (1 - 0.1 * (hash(conn.mark) % 1000) / 1000)
                if wall_ms - conn.accepted_ms > life * 1000:
                    conn.close(reasons.MAX_LIFETIME, f"open for {cfg.max_lifetime:g}s")
